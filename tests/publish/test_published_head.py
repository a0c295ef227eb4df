"""A published head is one transformers model that embeds pictures by itself: loaded with
AutoModel + AutoImageProcessor (or embedpipe's local-dir:/hf-hub:), it gives the vectors
`embedpipe embed --weights CHECKPOINT` writes, on real decoded photos, with a
random-weights backbone drawn from a non-zero seed."""

import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from embedpipe.cli import main
from embedpipe.config import IngestSettings, PublishSettings
from embedpipe.core import datasets
from embedpipe.data.ingest import ingest_images
from embedpipe.models.heads import ProjectionHead, save_head_checkpoint
from embedpipe.models.identity import checkpoint_identity
from embedpipe.publish.stage import publish_checkpoint

PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 real photos (scikit-image's and scikit-learn's samples, two crops of each, one per
    split), as JPEG and PNG files ingested into an images dataset."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    pictures = {name: Image.fromarray(getattr(skimage.data, name)()) for name in PICTURES}
    china, flower = load_sample_images().images
    pictures.update(china=Image.fromarray(china), flower=Image.fromarray(flower))
    for index, (name, picture) in enumerate(sorted(pictures.items())):
        width, height = picture.size
        crops = {
            "train": (0, 0, width * 3 // 4, height),
            "test": (width // 5, height // 6, width, height - 3),
        }
        for split, box in crops.items():
            folder = root / "src" / split / "pictures" / name
            folder.mkdir(parents=True)
            kind = "PNG" if index % 3 == 0 else "JPEG"  # grey "camera" and "coins" stay grey
            picture.crop(box).save(folder / f"{name}.{kind.lower()}", kind)
    ingest_images([str(root / "src")], str(root / "images"), IngestSettings(workers=1))
    return str(root / "images")


@pytest.fixture(scope="module")
def head_checkpoint(tiny_entry, tmp_path_factory):
    torch.manual_seed(4)
    head = ProjectionHead(in_dim=64, out_dim=16, width=32, depth=3, activation="relu")
    path = tmp_path_factory.mktemp("head") / "ckpt"
    settings = {"train": {"epochs": 2, "embeddings": str(tmp_path_factory.getbasetemp())}}
    save_head_checkpoint(head, tiny_entry, str(path), settings, weights="random", seed=7)
    return str(path)


@pytest.fixture(scope="module")
def published(head_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pub") / "tiny-head"
    result = publish_checkpoint(head_checkpoint, str(out), PublishSettings())
    assert result.kind == "head" and result.max_difference <= 1e-5
    return out


def _embed_cli(images: str, weights: str, out) -> dict[str, np.ndarray]:
    argv = ["embed", images, "--weights", weights, "--out", str(out), "--num-workers", "0"]
    assert main([*argv, "--device", "cpu", "--precision", "fp32"]) == 0
    table = datasets.read_table(str(out), "embeddings", ["image_id", "embedding"])
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return dict(zip(table.column("image_id").to_pylist(), vectors, strict=True))


@pytest.fixture(scope="module")
def checkpoint_vectors(photos, head_checkpoint, tmp_path_factory):
    """What `embedpipe embed --weights CHECKPOINT` writes: the reference."""
    return _embed_cli(photos, head_checkpoint, tmp_path_factory.mktemp("emb") / "ckpt")


def _decoded(photos: str) -> tuple[list[str], list[Image.Image]]:
    rows = datasets.read_table(photos, "images", ["image_id", "image"]).to_pylist()
    return [r["image_id"] for r in rows], [Image.open(io.BytesIO(r["image"])) for r in rows]


def test_one_folder_holds_backbone_head_and_preprocessing(published):
    assert sorted(p.name for p in published.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_embedpipe_head.py",
        "preprocessor_config.json",
    ]
    config = json.loads((published / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_embedpipe_head.EmbedpipeHeadModel"
    assert config["backbone"]["name"] == "tiny" and config["normalize_input"] is True
    processor = json.loads((published / "preprocessor_config.json").read_text())
    assert processor["auto_map"]["AutoImageProcessor"] == (
        "modeling_embedpipe_head.EmbedpipeImageProcessor"
    )
    assert processor["preprocess_cfg"]["size"] == [64, 64]
    modeling = (published / "modeling_embedpipe_head.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+embedpipe", modeling, re.MULTILINE)
    from safetensors.torch import load_file

    names = set(load_file(str(published / "model.safetensors")))
    assert "visual.conv1.weight" in names and "head.4.weight" in names


def test_automodel_and_its_image_processor_embed_photos_as_embed_writes_them(
    published, photos, checkpoint_vectors
):
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(published), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(published), trust_remote_code=True).eval()
    ids, pictures = _decoded(photos)
    expected = np.stack([checkpoint_vectors[i] for i in ids])
    with torch.no_grad():
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        got = model(pixel_values=pixels).numpy()
        features = model.get_image_features(pixel_values=pixels).numpy()
    difference = np.abs(got - expected).max()
    print(f"published head vs embed --weights CHECKPOINT: max |difference| {difference:.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(features, got)
    np.testing.assert_allclose(model.embed(pictures).numpy(), expected, atol=1e-4)  # PIL
    np.testing.assert_array_equal(model.embed(pixels).numpy(), got)  # a pixel tensor
    np.testing.assert_allclose(model.embed(pictures[0]).numpy(), expected[:1], atol=1e-4)


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_the_cards_snippet_embeds_a_picture_as_written_without_embedpipe(
    published, photos, checkpoint_vectors, tmp_path
):
    picture = _chelsea(photos)
    code = _snippet((published / "README.md").read_text())
    assert '"PATH"' in code and '"IMAGE.jpg"' in code  # what the comments say to replace
    code = code.replace('"PATH"', json.dumps(str(published))).replace(
        '"IMAGE.jpg"', json.dumps(picture["source"])
    )
    script = tmp_path / "snippet.py"
    script.write_text(
        "import sys\nsys.modules['embedpipe'] = None  # the published model must not need it\n"
        f"{code}\nimport numpy\nnumpy.save({str(tmp_path / 'out.npy')!r}, embedding.numpy())\n"
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env={**_env(), **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (1, 16)
    np.testing.assert_allclose(got[0], checkpoint_vectors[picture["image_id"]], atol=1e-4)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def test_embed_and_evaluate_take_the_published_head_as_weights(
    published, photos, head_checkpoint, checkpoint_vectors, tmp_path, capsys
):
    got = _embed_cli(photos, f"local-dir:{published}", tmp_path / "emb")
    assert got.keys() == checkpoint_vectors.keys()
    for image_id, vector in got.items():
        np.testing.assert_allclose(vector, checkpoint_vectors[image_id], atol=1e-6)

    argv = ["evaluate", photos, "--weights", f"local-dir:{published}", "--weights"]
    argv += [head_checkpoint, "--tasks", "image_retrieval", "--query-split", "test"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    runs = json.loads((tmp_path / "eval" / ".embedpipe" / "metrics.json").read_text())["models"]
    assert [run["identity"] for run in runs] == [checkpoint_identity(head_checkpoint)] * 2
    assert runs[0]["metrics"] == pytest.approx(runs[1]["metrics"], abs=1e-6)
    assert "image_image_recall@1" in runs[0]["metrics"]


def _hub_cache(cache, repo_id: str, folder) -> None:
    """The Hugging Face cache layout huggingface_hub reads offline: refs/main names a
    commit, snapshots/COMMIT holds the files (as blobs linked from the snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in folder.iterdir():
        import hashlib

        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(f"../../blobs/{blob.name}")


def test_hf_hub_weights_of_a_published_head_load_from_the_local_cache_offline(
    published, photos, checkpoint_vectors, tmp_path, monkeypatch
):
    _hub_cache(tmp_path / "hub", "org/tiny-head", published)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    got = _embed_cli(photos, "hf-hub:org/tiny-head", tmp_path / "emb")
    for image_id, vector in got.items():
        np.testing.assert_allclose(vector, checkpoint_vectors[image_id], atol=1e-6)


def test_a_head_on_a_transformers_backbone_publishes_the_same_way(photos, tmp_path):
    """A DINOv2 backbone (random weights, seed 2): its tower, the head and its
    preprocessing in one model; AutoModel and local-dir: give embed's vectors."""
    from transformers import AutoImageProcessor, AutoModel

    from embedpipe.models.registry import ModelEntry

    dinov2 = ModelEntry(
        name="small-dinov2",
        library="transformers",
        architecture="Dinov2Model",
        embed_dim=32,
        image_size=40,
        arch={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": 40,
        },
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    torch.manual_seed(5)
    head = ProjectionHead(in_dim=32, out_dim=8, depth=2)
    checkpoint = str(tmp_path / "ckpt")
    save_head_checkpoint(head, dinov2, checkpoint, weights="random", seed=2)
    expected = _embed_cli(photos, checkpoint, tmp_path / "e1")
    out = tmp_path / "published"
    assert publish_checkpoint(checkpoint, str(out), PublishSettings()).max_difference <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_architecture"] == "Dinov2Model"

    processor = AutoImageProcessor.from_pretrained(str(out), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    ids, pictures = _decoded(photos)
    with torch.no_grad():
        got = model(**processor(images=pictures, return_tensors="pt")).numpy()
    np.testing.assert_allclose(got, np.stack([expected[i] for i in ids]), atol=1e-4)
    again = _embed_cli(photos, f"local-dir:{out}", tmp_path / "e2")
    for image_id, vector in again.items():
        np.testing.assert_allclose(vector, expected[image_id], atol=1e-6)


def test_a_bare_head_safetensors_given_with_model_is_one_short_line(
    head_checkpoint, photos, tmp_path, capsys
):
    from conftest import TINY_OPEN_CLIP

    config = tmp_path / "m.toml"
    inline = json.dumps(TINY_OPEN_CLIP).replace('":', '" =')
    config.write_text(
        '[models.tiny]\nlibrary = "open_clip"\narchitecture = "embedpipe-tiny"\n'
        f"embed_dim = 64\nimage_size = 64\ntext = true\nopen_clip_config = {inline}\n"
    )
    weights = f"{head_checkpoint}/model.safetensors"
    argv = ["embed", photos, "--config", str(config), "--model", "tiny", "--weights", weights]
    assert main([*argv, "--out", str(tmp_path / "e"), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("embedpipe embed: error")]
    assert "its tensors are not this architecture's (62 missing, 6 unexpected keys" in line
    assert "look like a projection head's weights: pass the head checkpoint's folder" in line
    assert len(line) < 500 and "visual.transformer" not in err


def _chelsea(photos: str) -> dict:
    rows = datasets.read_table(photos, "images", ["image_id", "source"]).to_pylist()
    return next(r for r in rows if r["source"].endswith("chelsea.jpeg"))


def test_the_demos_printed_line_and_the_readmes_snippet_embed_a_picture(
    published, photos, checkpoint_vectors, capsys
):
    from pathlib import Path

    from embedpipe.publish.usage import example_image, load_line

    picture = _chelsea(photos)
    assert example_image(photos).startswith(str(Path(photos).parent / "src"))
    namespace: dict = {}
    exec(load_line(str(published), picture["source"]), namespace)  # as pasted
    assert capsys.readouterr().out.startswith("tensor([[")
    expected = checkpoint_vectors[picture["image_id"]]
    got = namespace["model"].embed(Image.open(picture["source"])).numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "Auto" in c]
    code = code.replace('"published"', json.dumps(str(published)))
    namespace = {}
    exec(code.replace('"photo.jpg"', json.dumps(picture["source"])), namespace)
    np.testing.assert_allclose(namespace["embedding"].numpy()[0], expected, atol=1e-4)


def test_a_nested_head_publishes_its_prefixes_and_evaluate_reports_them(
    tiny_entry, photos, tmp_path, capsys, monkeypatch
):
    """A head trained with nested_dims, published: evaluate reports recall@K per prefix for
    the published form (and embeddings it wrote) as for the checkpoint."""
    from embedpipe.evaluate.nested import trained_nested_dims

    torch.manual_seed(5)
    head = ProjectionHead(in_dim=64, out_dim=16, width=32, depth=2, activation="relu")
    checkpoint = str(tmp_path / "ckpt")
    settings = {"train": {"epochs": 1, "nested_dims": [4, 8]}}
    save_head_checkpoint(head, tiny_entry, checkpoint, settings, weights="random", seed=7)
    out = tmp_path / "pub"
    publish_checkpoint(checkpoint, str(out), PublishSettings())
    weights = f"local-dir:{out}"
    assert trained_nested_dims(weights) == (4, 8) == trained_nested_dims(checkpoint)
    _hub_cache(tmp_path / "hub", "org/nested-head", out)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert trained_nested_dims("hf-hub:org/nested-head") == (4, 8)
    assert trained_nested_dims("hf-hub:org/not-cached") == ()
    assert trained_nested_dims("hf-hub:org/na..me") == ()
    _embed_cli(photos, weights, tmp_path / "emb")
    assert trained_nested_dims(str(tmp_path / "emb")) == (4, 8)

    argv = ["evaluate", photos, "--weights", weights, "--weights", checkpoint]
    argv += ["--tasks", "image_retrieval", "--query-split", "test", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    runs = json.loads((tmp_path / "eval" / ".embedpipe" / "metrics.json").read_text())["models"]
    assert "image_image_recall@1_dim4" in runs[1]["metrics"]
    assert runs[0]["metrics"] == pytest.approx(runs[1]["metrics"], abs=1e-6)
