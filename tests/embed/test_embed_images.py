import io

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_same_embeddings
from PIL import Image

from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets, storage
from embedpipe.data.ingest import ingest_images
from embedpipe.embed import images as embed
from embedpipe.embed import loader, runtime
from embedpipe.embed.images import embed_images
from embedpipe.embed.texts import embed_texts
from embedpipe.models.loading import load_model, save_model
from embedpipe.models.precision import precision_for
from embedpipe.models.registry import get_entry


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_entry, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_model(load_model(tiny_entry, "random"), str(path))
    return str(path)


@pytest.fixture(scope="module")
def sharded_images(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "images"
    ingest_images(
        [str(demo_dir)], str(out), IngestSettings(workers=1, rows_per_shard=150, row_group_rows=40)
    )
    return str(out)


def settings(checkpoint, **overrides):
    return EmbedSettings(**{"weights": checkpoint, "batch_size": 32, "num_workers": 0, **overrides})


def first_bytes_by_id(images_uri):
    table = datasets.read_table(images_uri, "images", columns=["image_id", "image"])
    found = {}
    for image_id, data in zip(
        table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True
    ):
        found.setdefault(image_id, data)
    return found


def test_embeddings_equal_a_direct_open_clip_forward(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path
):
    result = embed_images(
        sharded_images, str(tmp_path / "e"), settings(tiny_checkpoint), tiny_entry
    )
    table = datasets.read_table(result.out_uri, "embeddings")
    images = first_bytes_by_id(sharded_images)
    assert table.column("image_id").to_pylist() == list(images)  # every id once, in order
    assert result.embedded == len(images) == 404
    model, _, preprocess = open_clip.create_model_and_transforms("embedpipe-tiny")
    model.load_state_dict(load_model(tiny_entry, tiny_checkpoint).module.state_dict())
    model.eval()
    pixels = torch.stack(
        [preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for data in images.values()]
    )
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    ours = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_schema_metadata_names_model_dimension_weights_and_normalisation(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path
):
    result = embed_images(
        sharded_images, str(tmp_path / "e"), settings(tiny_checkpoint, normalize=False), tiny_entry
    )
    manifest = datasets.read_manifest(result.out_uri, "embeddings")
    schema = pq.read_schema(str(tmp_path / "e" / manifest["shards"][0]["path"]))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert schema.metadata[b"embedpipe.model"] == b"tiny"
    assert schema.metadata[b"embedpipe.dim"] == b"64"
    assert schema.metadata[b"embedpipe.weights"] == tiny_checkpoint.encode()
    assert schema.metadata[b"embedpipe.normalized"] == b"false"
    vectors = np.stack(datasets.read_table(result.out_uri).column("embedding").to_pylist())
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_dataloader_workers_give_the_same_result(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path
):
    inline = embed_images(
        sharded_images, str(tmp_path / "a"), settings(tiny_checkpoint), tiny_entry
    )
    workers = embed_images(
        sharded_images, str(tmp_path / "b"), settings(tiny_checkpoint, num_workers=2), tiny_entry
    )
    assert_same_embeddings(
        datasets.read_table(workers.out_uri), datasets.read_table(inline.out_uri)
    )


def test_select_limits_the_images(sharded_images, tiny_entry, tiny_checkpoint, tmp_path):
    ids = datasets.read_table(sharded_images, columns=["image_id"]).column(0).to_pylist()[:25:5]
    datasets.write_table(str(tmp_path / "sel"), pa.table({"image_id": ids}), "selection")
    result = embed_images(
        sharded_images,
        str(tmp_path / "e"),
        settings(tiny_checkpoint),
        tiny_entry,
        select_uri=str(tmp_path / "sel"),
    )
    assert datasets.read_table(result.out_uri).column("image_id").to_pylist() == ids


def die_on_third_shard(monkeypatch):
    """Kill embed (as Ctrl-C would) when it is about to publish its third shard."""
    real = embed._publish
    calls = []

    def publish(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "_publish", publish)
    return lambda: monkeypatch.setattr(embed, "_publish", real)


def kill_after_two_shards(sharded_images, out, config, entry, monkeypatch):
    revive = die_on_third_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_images(sharded_images, out, config, entry)
    with pytest.raises(datasets.DatasetError):
        datasets.read_table(out)  # nothing half-written is visible
    revive()


def test_a_killed_run_resumes_after_the_last_finished_shard(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path, monkeypatch
):
    clean = embed_images(
        sharded_images, str(tmp_path / "clean"), settings(tiny_checkpoint), tiny_entry
    )
    out = str(tmp_path / "resumed")
    kill_after_two_shards(sharded_images, out, settings(tiny_checkpoint), tiny_entry, monkeypatch)
    resumed = embed_images(sharded_images, out, settings(tiny_checkpoint), tiny_entry)
    assert resumed.resumed_shards == 2
    assert_same_embeddings(datasets.read_table(out), datasets.read_table(clean.out_uri))
    assert not storage.list_files(datasets.side_path(out, embed.PROGRESS_DIR))


def test_a_killed_run_with_random_weights_resumes_with_the_same_model(
    sharded_images, tiny_entry, tmp_path, monkeypatch
):
    config = settings("random")
    clean = embed_images(sharded_images, str(tmp_path / "clean"), config, tiny_entry)
    out = str(tmp_path / "resumed")
    kill_after_two_shards(sharded_images, out, config, tiny_entry, monkeypatch)
    resumed = embed_images(sharded_images, out, config, tiny_entry)
    assert resumed.resumed_shards == 2
    # shards from before and after the kill come from one model, the clean run's
    assert_same_embeddings(datasets.read_table(out), datasets.read_table(clean.out_uri))


def test_another_seed_does_not_resume_and_gives_another_model(
    sharded_images, tiny_entry, tmp_path, monkeypatch
):
    out = str(tmp_path / "e")
    kill_after_two_shards(sharded_images, out, settings("random", seed=0), tiny_entry, monkeypatch)
    reseeded = embed_images(sharded_images, out, settings("random", seed=1), tiny_entry)
    assert reseeded.resumed_shards == 0
    clean = embed_images(
        sharded_images, str(tmp_path / "clean"), settings("random", seed=1), tiny_entry
    )
    assert_same_embeddings(datasets.read_table(out), datasets.read_table(clean.out_uri))
    first_seed = embed_images(
        sharded_images, str(tmp_path / "seed0"), settings("random", seed=0), tiny_entry
    )
    vectors = [
        np.stack(datasets.read_table(uri).column("embedding").to_pylist())
        for uri in (out, first_seed.out_uri)
    ]
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)


def test_changed_settings_do_not_reuse_finished_shards(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path, monkeypatch
):
    out = str(tmp_path / "e")
    kill_after_two_shards(sharded_images, out, settings(tiny_checkpoint), tiny_entry, monkeypatch)
    again = embed_images(
        sharded_images, out, settings(tiny_checkpoint, normalize=False), tiny_entry
    )
    assert again.resumed_shards == 0


def test_text_embeddings_equal_open_clip(tiny_entry, tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red disc\na photo of a blue star\n\na photo of a red disc\n")
    result = embed_texts(str(prompts), str(tmp_path / "t"), settings(tiny_checkpoint), tiny_entry)
    table = datasets.read_table(result.out_uri, "text-embeddings")
    assert table.column("text").to_pylist() == ["a photo of a red disc", "a photo of a blue star"]
    model = load_model(tiny_entry, tiny_checkpoint)
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("embedpipe-tiny")(table.column("text").to_pylist())
        expected = torch.nn.functional.normalize(model.module.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_pylist()), expected.numpy(), rtol=1e-5, atol=1e-5
    )


def test_transformers_backbone_embeds(sharded_images, tmp_path):
    entry = get_entry("dinov2_small")
    ids = datasets.read_table(sharded_images, columns=["image_id"]).column(0).to_pylist()[:6]
    datasets.write_table(str(tmp_path / "sel"), pa.table({"image_id": ids}), "selection")
    result = embed_images(
        sharded_images,
        str(tmp_path / "e"),
        EmbedSettings(weights="random", batch_size=4, num_workers=0),
        entry,
        select_uri=str(tmp_path / "sel"),
    )
    vectors = np.stack(datasets.read_table(result.out_uri).column("embedding").to_pylist())
    assert vectors.shape == (6, 384)


def test_s3_in_and_out(demo_dir, bucket, tiny_entry, tiny_checkpoint, tmp_path):
    subset = tmp_path / "subset" / "train"
    for path in sorted((demo_dir / "train" / "box").rglob("*.jpg"))[:10]:
        target = subset / path.relative_to(demo_dir / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    ingest_images([str(subset.parent)], f"s3://{bucket}/images", IngestSettings(workers=1))
    result = embed_images(
        f"s3://{bucket}/images", f"s3://{bucket}/emb", settings(tiny_checkpoint), tiny_entry
    )
    assert datasets.read_table(f"s3://{bucket}/emb", "embeddings").num_rows == result.embedded
    assert result.embedded == 10


def test_device_and_precision_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_device("cpu") == cpu
    # DECISIONS 5: auto is bf16 weights (no autocast) on CUDA, fp32 on CPU
    assert precision_for("auto", cpu).autocast is None
    assert precision_for("auto", cpu).weights is torch.float32
    assert precision_for("auto", cuda).autocast is None
    assert precision_for("auto", cuda).weights is torch.bfloat16
    assert precision_for("amp_bf16", cpu).autocast is torch.bfloat16
    assert precision_for("amp_bf16", cpu).weights is torch.float32
    assert precision_for("pure_bf16", cpu).weights is torch.bfloat16
    assert precision_for("fp16", cpu).autocast is torch.float16
    assert runtime.resolve_preprocess("auto", cpu) == "pil"
    assert runtime.resolve_preprocess("auto", cuda) == "device"


def test_one_loader_serves_every_shard(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path, monkeypatch
):
    loaders = []
    real = loader.DataLoader

    def counted(*args, **kwargs):
        loaders.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "DataLoader", counted)
    result = embed_images(
        sharded_images, str(tmp_path / "e"), settings(tiny_checkpoint, num_workers=2), tiny_entry
    )
    assert len(datasets.read_manifest(result.out_uri)["shards"]) >= 3
    assert len(loaders) == 1
    assert loaders[0]["persistent_workers"]


def test_compiled_model_runs_one_batch_shape_and_matches_eager(
    sharded_images, tiny_entry, tiny_checkpoint, tmp_path, monkeypatch
):
    batches = set()

    def recording_backend(graph, example_inputs):  # dynamo's real tracing, no C++ codegen
        batches.update(
            t.shape[0] for t in example_inputs if torch.is_tensor(t) and t.shape[1:] == (3, 64, 64)
        )
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: real_compile(fn, backend=recording_backend)
    )
    torch._dynamo.reset()
    compiled = embed_images(
        sharded_images, str(tmp_path / "c"), settings(tiny_checkpoint, compile=True), tiny_entry
    )
    eager = embed_images(sharded_images, str(tmp_path / "e"), settings(tiny_checkpoint), tiny_entry)
    assert_same_embeddings(
        datasets.read_table(compiled.out_uri), datasets.read_table(eager.out_uri)
    )
    assert batches == {32}  # the last, partial batch is padded: no recompiling


def test_text_embedding_streams_batches_into_shards(
    tiny_entry, tiny_checkpoint, tmp_path, monkeypatch
):
    prompts = [f"a photo of concept number {i}" for i in range(5_000)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts + prompts[:300]) + "\n")  # repeats are embedded once
    written = []
    real_write = datasets.DatasetWriter.write

    def recording(self, batch):
        written.append(batch.num_rows)
        return real_write(self, batch)

    monkeypatch.setattr(datasets.DatasetWriter, "write", recording)
    result = embed_texts(
        str(path),
        str(tmp_path / "t"),
        settings(tiny_checkpoint, batch_size=64),
        tiny_entry,
        rows_per_shard=1_000,
    )
    assert result.embedded == 5_000
    assert max(written) <= 64 and sum(written) == 5_000  # the writer is fed batch by batch
    assert len(datasets.read_manifest(result.out_uri)["shards"]) == 5
    table = datasets.read_table(result.out_uri, "text-embeddings")
    assert table.column("text").to_pylist() == prompts
    sample = slice(4_990, 5_000)
    model = load_model(tiny_entry, tiny_checkpoint)
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("embedpipe-tiny")(prompts[sample])
        expected = torch.nn.functional.normalize(model.module.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_pylist()[sample]),
        expected.numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
