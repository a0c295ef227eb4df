"""embed-signal on an images dataset with signal columns: the vectors a direct forward
gives, rows with missing or non-finite signals skipped and listed, a killed run that
resumes to the same output, and one-line refusals."""

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_embeddings, flat_tree

from embedpipe.cli import main
from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets, storage
from embedpipe.core.rejected import REJECTED_NAME
from embedpipe.core.schemas import SIGNAL_EMBEDDINGS_KIND
from embedpipe.data.ingest import ingest_images
from embedpipe.embed import images as images_stage
from embedpipe.embed.signals import embed_signals
from embedpipe.models.loading import load_model, save_model
from embedpipe.models.registry import ModelEntry, ModelError, get_entry

FIXED = 48
ENTRY = ModelEntry(
    name="tiny_signal",
    library="signal",
    architecture="signal_transformer",
    embed_dim=24,
    arch={"slice_length": 8, "slice_overlap": 3, "width": 32, "depth": 2, "heads": 4},
)
# Rows (in dataset order) whose signal is skipped, and why.
BROKEN = {1: "missing signal", 4: "non-finite", 10: "non-finite", 13: "below the encoder's minimum"}


def signal_rows(count: int) -> tuple[list, list]:
    rng = np.random.default_rng(0)
    spectra = [
        (rng.normal(size=int(rng.integers(30, 90))) * rng.uniform(0.1, 50)).tolist()
        for _ in range(count)
    ]
    spectra[1] = None
    spectra[4][7] = float("nan")
    spectra[10][0] = float("inf")
    spectra[13] = spectra[13][:5]
    fixed = rng.normal(size=(count, FIXED)).astype(np.float32)
    return spectra, fixed


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """20 images in 3 shards, with a variable-length `spectrum` and a fixed-length
    `trace` column, as ingest writes them."""
    root = tmp_path_factory.mktemp("signals")
    source = flat_tree(root / "src", categories=2, concepts=2, images=5)
    ingest_images([str(source)], str(root / "plain"), IngestSettings(workers=1))
    table = datasets.read_table(str(root / "plain"))
    spectra, fixed = signal_rows(table.num_rows)
    table = table.append_column("spectrum", pa.array(spectra, pa.list_(pa.float32())))
    trace = pa.FixedSizeListArray.from_arrays(pa.array(fixed.reshape(-1)), FIXED)
    table = table.append_column("trace", trace)
    datasets.write_table(str(root / "images"), table, "images", rows_per_shard=8)
    return str(root / "images")


def config(**changes) -> EmbedSettings:
    return EmbedSettings(**{"weights": "random", "seed": 3, "batch_size": 4, **changes})


def vectors(table: pa.Table) -> np.ndarray:
    dim = table.schema.field("embedding").type.list_size
    return np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, dim)


def test_signal_embeddings_equal_a_direct_forward_of_each_signal(images, tmp_path):
    result = embed_signals(images, str(tmp_path / "e"), config(), "spectrum", ENTRY)
    table = datasets.read_table(result.out_uri, SIGNAL_EMBEDDINGS_KIND)
    source = datasets.read_table(images, columns=["image_id", "spectrum"])
    kept = [row for row in range(source.num_rows) if row not in BROKEN]
    assert table.column("image_id").to_pylist() == [
        source.column("image_id")[row].as_py() for row in kept
    ]
    assert (result.embedded, result.rejected, result.dim) == (16, 4, 24)
    encoder = load_model(ENTRY, "random", seed=3).module
    with torch.inference_mode():
        expected = [
            F.normalize(encoder(torch.tensor([source.column("spectrum")[row].as_py()])), dim=-1)
            for row in kept
        ]
    np.testing.assert_allclose(vectors(table), torch.cat(expected).numpy(), rtol=0, atol=1e-5)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 24)
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert metadata["embedpipe.model"] == "tiny_signal" and metadata["embedpipe.dim"] == "24"
    assert metadata["embedpipe.modality"] == "signal"
    assert metadata["embedpipe.signal_column"] == "spectrum"
    assert json.loads(metadata["embedpipe.normalized"]) is True
    manifest = datasets.read_manifest(result.out_uri)
    assert (manifest["column"], manifest["seed"], manifest["rows"]) == ("spectrum", 3, 16)


def test_missing_and_non_finite_signals_are_skipped_and_listed(images, tmp_path):
    result = embed_signals(images, str(tmp_path / "e"), config(), "spectrum", ENTRY)
    rejected = datasets.read_table_file(datasets.side_path(result.out_uri, REJECTED_NAME), None)
    ids = datasets.read_table(images, columns=["image_id"]).column("image_id").to_pylist()
    sources = datasets.read_table(images, columns=["source"]).column("source").to_pylist()
    assert rejected.column("source").to_pylist() == [sources[row] for row in BROKEN]
    reasons = rejected.column("reason").to_pylist()
    for reason, (row, why) in zip(reasons, BROKEN.items(), strict=True):
        assert reason.startswith(f"image {ids[row]}, column 'spectrum': ") and why in reason


def die_on_second_shard(monkeypatch):
    """Kill the run as it publishes its second shard (embed-signal publishes through the
    image stage's shard writer)."""
    real, calls = images_stage._publish, []

    def publish(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(images_stage, "_publish", publish)
    return lambda: monkeypatch.setattr(images_stage, "_publish", real)


def test_a_killed_run_resumes_to_the_same_output(images, tmp_path, monkeypatch):
    clean = embed_signals(images, str(tmp_path / "clean"), config(), "spectrum", ENTRY)
    out = str(tmp_path / "resumed")
    revive = die_on_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_signals(images, out, config(), "spectrum", ENTRY)
    with pytest.raises(datasets.DatasetError):
        datasets.read_table(out)  # nothing half-written is visible
    revive()
    resumed = embed_signals(images, out, config(), "spectrum", ENTRY)
    assert resumed.resumed_shards == 1 and resumed.rejected == clean.rejected == 4
    assert_same_embeddings(datasets.read_table(out), datasets.read_table(clean.out_uri))
    assert not storage.list_files(datasets.side_path(out, images_stage.PROGRESS_DIR))
    revive = die_on_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_signals(images, str(tmp_path / "reseeded"), config(), "spectrum", ENTRY)
    revive()
    reseeded = embed_signals(images, str(tmp_path / "reseeded"), config(seed=4), "spectrum", ENTRY)
    assert reseeded.resumed_shards == 0  # another model: nothing of the killed run is kept


def test_a_fixed_length_column_and_encoder(images, tmp_path):
    entry = get_entry("signal_cnn_small").model_copy(
        update={"arch": {**get_entry("signal_cnn_small").arch, "signal_length": FIXED}}
    )
    result = embed_signals(images, str(tmp_path / "e"), config(), "trace", entry)
    assert (result.embedded, result.rejected) == (20, 0)
    table = datasets.read_table(result.out_uri)
    source = datasets.read_table(images, columns=["trace"]).column("trace").combine_chunks()
    encoder = load_model(entry, "random", seed=3).module
    with torch.inference_mode():
        expected = F.normalize(encoder(torch.tensor(source.to_pylist())), dim=-1)
    np.testing.assert_allclose(vectors(table), expected.numpy(), rtol=0, atol=1e-5)


def test_the_command_takes_a_checkpoint_without_model_and_refuses_in_one_line(
    images, tmp_path, capsys
):
    checkpoint = save_model(load_model(ENTRY, "random", seed=3), str(tmp_path / "ckpt"))
    out = str(tmp_path / "cli")
    argv = ["embed-signal", images, "--column", "spectrum", "--out", out]
    assert main([*argv, "--weights", checkpoint, "--dim", "16", "--batch-size", "5"]) == 0
    full = embed_signals(images, str(tmp_path / "full"), config(), "spectrum", ENTRY)
    prefix = vectors(datasets.read_table(full.out_uri))  # normalised 24-d
    written = vectors(datasets.read_table(out))
    assert written.shape == (16, 16)
    unnormalised = embed_signals(
        images, str(tmp_path / "raw"), config(normalize=False), "spectrum", ENTRY
    )
    raw = vectors(datasets.read_table(unnormalised.out_uri))
    np.testing.assert_allclose(prefix, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    expected = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-5)
    capsys.readouterr()

    fixed = str(tmp_path / "fixed-ckpt")
    entry = ENTRY.model_copy(update={"arch": {**ENTRY.arch, "signal_length": 64}})
    save_model(load_model(entry, "random"), fixed)
    refusals = {
        "--weights=" + fixed: r"part-00000-\w+\.parquet: column 'spectrum': signals of length "
        r"\d+, but tiny_signal takes signals of length 64 only",
        "--model=clip_vitb32": "clip_vitb32 is an image model; embed-signal needs a signal",
        "--weights=nowhere": "signal_transformer, signal_cnn",  # --model's default
    }
    for flag, message in refusals.items():
        assert main([*argv[:-1], str(tmp_path / "refused"), flag]) == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert main([*argv[:2], "--column", "width", "--out", out, "--weights", checkpoint]) == 1
    assert "column 'width' is int32, not a signal" in capsys.readouterr().err


def test_an_image_model_is_refused_by_the_library_too(images, tmp_path):
    with pytest.raises(ModelError, match="clip_vitb32 is an image model"):
        embed_signals(images, str(tmp_path / "e"), config(), "spectrum", get_entry("clip_vitb32"))
