"""Shared fixtures: real generated images, real tar archives, a real S3 endpoint on loopback."""

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

# No model hub is reachable here: fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from embedpipe.config import (
    CatalogSettings,
    CombineSettings,
    IngestSettings,
    MineSettings,
    SplitSettings,
    TrainSettings,
)
from embedpipe.core import storage
from embedpipe.data.demo_data import DemoSpec, generate_demo_dataset


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30), quality=90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(colour=(30, 200, 30), size=(24, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixel data is one empty
    chunk: Image.open sees the size, any decode fails or allocates the declared pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def strip_png(width=16000, height=1) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def sixteen_bit_png(levels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(levels.astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_with_orientation(orientation: int) -> bytes:
    """40x20 stored pixels: left half red, right half blue."""
    image = Image.new("RGB", (40, 20), (220, 20, 20))
    image.paste((20, 20, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def flat_tree(root: Path, categories=2, concepts=3, images=6) -> Path:
    """<category>/<concept>/<image>, every image distinct."""
    files = {}
    for c in range(categories):
        for k in range(concepts):
            for i in range(images):
                colour = (40 * c + 10, 30 * k + 20, 9 * i + 5)
                files[f"cat{c}/concept{k}/img{i:02d}.jpg"] = jpeg_bytes(colour)
    return write_tree(root, files)


@contextlib.contextmanager
def lock_held_elsewhere(out: Path):
    """The output's lock, as another live run on this host holds it; yields (pid, lock)."""
    lock_path = out / ".embedpipe" / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}
        lock_path.write_text(json.dumps(record))
        yield holder.pid, lock_path
    finally:
        holder.kill()
        holder.wait()


def killed_after_a_checkpoint(monkeypatch, train, error=KeyboardInterrupt) -> None:
    """Run ``train()`` dying right after it saves its first checkpoint, as kill -9 would."""
    from embedpipe.train.loop import Loop

    saved = Loop.save_last

    def save_then_die(self):
        saved(self)
        raise error

    monkeypatch.setattr(Loop, "save_last", save_then_die)
    with pytest.raises(error):
        train()
    monkeypatch.setattr(Loop, "save_last", saved)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    # Five objects per shape (the demo itself draws six): the counts below are for this.
    generate_demo_dataset(str(root), DemoSpec(concepts=5))
    return root


@pytest.fixture
def one_worker() -> IngestSettings:
    return IngestSettings(workers=1)


@pytest.fixture(scope="session")
def demo_images(demo_dir, tmp_path_factory) -> str:
    from embedpipe.data.ingest import ingest_images

    out = tmp_path_factory.mktemp("demo-images") / "images"
    ingest_images([str(demo_dir)], str(out), IngestSettings(workers=1))
    return str(out)


@pytest.fixture(scope="session")
def demo_catalog(demo_images, tmp_path_factory) -> str:
    from embedpipe.data.catalog import build_catalog

    out = tmp_path_factory.mktemp("demo-catalog") / "catalog"
    build_catalog(demo_images, str(out), CatalogSettings())
    return str(out)


@pytest.fixture(scope="session")
def default_split_settings() -> SplitSettings:
    return SplitSettings()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint (moto) on 127.0.0.1, and the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return name


def upload_tree(root: Path, bucket: str, prefix: str) -> str:
    client = storage.s3_client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


TINY_OPEN_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_entry():
    """A 2-layer open_clip model (7.5M parameters) registered as data, as users would."""
    from embedpipe.models.registry import ModelEntry

    return ModelEntry(
        name="tiny",
        library="open_clip",
        architecture="embedpipe-tiny",
        embed_dim=64,
        image_size=64,
        text=True,
        open_clip_config=TINY_OPEN_CLIP,
    )


def random_embeddings(
    images_uri: str, out: Path, dim: int, seed: int = 0, only_split=None, limit=None
) -> tuple[str, str]:
    """The images' metadata as a selection, and random vectors for its distinct ids as an
    embeddings dataset: input for mining when the vectors' values do not matter."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from embedpipe.core import datasets

    meta = datasets.read_table(images_uri, "images", ["image_id", "category", "concept", "split"])
    if only_split:
        meta = meta.filter(pc.equal(meta.column("split"), only_split))
    meta = meta.slice(0, limit)
    ids = list(dict.fromkeys(meta.column("image_id").to_pylist()))
    matrix = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    datasets.write_table(str(out / "meta"), meta, "selection")
    datasets.write_table(
        str(out / "emb"), pa.table({"image_id": ids, "embedding": vectors}), "embeddings"
    )
    return str(out / "meta"), str(out / "emb")


def compile_for_overlay(overlay: str, out: Path) -> Path:
    """`embedpipe compile` of configs/cluster.toml for manifests/overlays/OVERLAY into out."""
    from embedpipe.cli import main

    root = Path(__file__).resolve().parent.parent
    argv = ["compile", "--config", str(root / "configs" / "cluster.toml"), "--out", str(out)]
    assert main([*argv, "--overlay", str(root / "manifests" / "overlays" / overlay)]) == 0
    return out


@pytest.fixture(scope="session")
def gpu_cloud_build(tmp_path_factory):
    """The pipelines compiled for the gpu-cloud overlay, with AWS secrets in the environment
    (sentinels that must not find their way into the YAML)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value-1234")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sentinel-key-id-5678")
        return compile_for_overlay("gpu-cloud", tmp_path_factory.mktemp("gpu-cloud"))


def assert_same_embeddings(actual, expected, atol: float = 1e-5) -> None:
    """Two embedding tables: the same ids in the same order, and vectors equal within a
    tolerance (batch composition and the CPU model change the last bits of a float)."""
    import numpy as np

    assert actual.column_names == expected.column_names
    assert actual.column("image_id").to_pylist() == expected.column("image_id").to_pylist()
    dim = actual.schema.field("embedding").type.list_size
    vectors = [
        np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, dim)
        for table in (actual, expected)
    ]
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=atol)


# --- tuning: the demo images, their concept splits, random 32-d embeddings as a head's
# frozen inputs, and hard negatives mined from them ------------------------------------

FROZEN = {"library": "transformers", "architecture": "Frozen", "embed_dim": 32, "image_size": 32}


@pytest.fixture(scope="session")
def tune_inputs(demo_images, demo_catalog, tmp_path_factory) -> dict[str, str]:
    import pyarrow as pa

    from embedpipe.core import datasets
    from embedpipe.data.split import create_concept_splits
    from embedpipe.mining.combine import combine_negatives
    from embedpipe.mining.mine import mine_category
    from embedpipe.mining.partition import partition_by_category

    root = tmp_path_factory.mktemp("tune-inputs")
    splits = str(root / "splits")
    create_concept_splits(demo_catalog, splits, SplitSettings())
    table = datasets.read_table(demo_images, "images", ["image_id"])
    ids = list(dict.fromkeys(table.column(0).to_pylist()))
    matrix = np.random.default_rng(0).normal(size=(len(ids), 32)).astype(np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 32)
    embeddings = str(root / "emb")
    datasets.write_table(
        embeddings, pa.table({"image_id": ids, "embedding": vectors}), "embeddings"
    )
    parts = partition_by_category(splits, embeddings, str(root / "parts"))
    mined = []
    for category, part in sorted(parts.items()):
        mined.append(str(root / "neg" / category))
        mine_category(part, mined[-1], MineSettings(gpu=False, top_k=3))
    negatives = str(root / "combined")
    combine_negatives(mined, negatives, CombineSettings())
    return {
        "images": demo_images,
        "splits": splits,
        "embeddings": embeddings,
        "negatives": negatives,
    }


@pytest.fixture(scope="session")
def frozen_entry():
    """The backbone of a head whose embeddings the test wrote itself."""
    from embedpipe.models.registry import ModelEntry

    return ModelEntry(name="frozen", **FROZEN)


HEAD_TRAIN = dict(
    model="frozen",
    mode="head",
    pairs="image_image",
    loss="infonce",
    batch_size=16,
    steps=6,
    lr=1e-2,
    depth=2,
    width=32,
    out_dim=16,
    val_every=2,
    num_workers=0,
    hard_negative_share=0.0,
    device="cpu",
)


def head_train(**changes) -> TrainSettings:
    """A projection head that trains in well under a second on the demo embeddings."""
    return TrainSettings(**{**HEAD_TRAIN, **changes})
