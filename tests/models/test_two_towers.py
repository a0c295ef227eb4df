"""Two-tower (image_signal) checkpoints as models: `embed --weights CKPT` embeds pictures
through the backbone and the image head, `embed-signal --weights CKPT` through the signal
tower, both equal to the towers evaluation runs, with no --model; a --model naming
another encoder, a checkpoint of another signal length and an image tower of an unknown
mode are one-line errors; signal encoders declared in the config file work for
embed-signal and training. Real data: the signals demo, ingested, embedded and trained
on with the documented commands."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_OPEN_CLIP

from embedpipe.cli import main
from embedpipe.core import datasets
from embedpipe.data.demo_signals import SIGNALS_NAME, SignalDemoSpec, generate_signal_demo
from embedpipe.embed.signals import SignalRows, padded_batch
from embedpipe.evaluate.image_signal import TrainedTowers
from embedpipe.models.loading import checkpoint_entry, load_model
from embedpipe.models.registry import ModelError, get_entry
from embedpipe.models.two_towers import signal_entry_for_weights

BINS = 128
CONFIG = f"""
[models.tiny_clip]
library = "open_clip"
architecture = "embedpipe-tiny-towers"
embed_dim = 64
image_size = 64
text = true
open_clip_config = {{TINY}}

[models.tiny_spectra]
library = "signal"
architecture = "signal_cnn"
embed_dim = 16
arch = {{ signal_length = {BINS}, channels = [8, 16], kernel_size = 5, stride = 2 }}

[embed]
model = "tiny_clip"
weights = "random"
seed = 5
batch_size = 16

[train]
model = "tiny_clip"
mode = "head"
pairs = "image_signal"
signal_column = "spectrum"
signal_model = "tiny_spectra"
depth = 2
width = 32
lr = 0.003
batch_size = 16
steps = 12
val_every = 6
num_workers = 0
device = "cpu"
"""


def _toml_inline(table: dict) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in table.items()) + " }"


def _toml_value(value) -> str:
    return _toml_inline(value) if isinstance(value, dict) else json.dumps(value)


def run(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def prepare_towers(root, capsys=None) -> dict:
    """The signals demo (3 types x 6 objects x 2 views, 128-bin spectra), ingested, split,
    embedded by a tiny random open_clip model, and an image_signal training on it (a
    config-file signal encoder); the paths of each."""
    config = root / "towers.toml"
    config.write_text(CONFIG.replace("{TINY}", _toml_inline(TINY_OPEN_CLIP)))
    demo = root / "demo"
    generate_signal_demo(str(demo), SignalDemoSpec(objects=6, views=2, bins=BINS))
    images, catalog, splits = root / "images", root / "catalog", root / "splits"
    run("ingest", str(demo), "--out", str(images), "--signals", str(demo / SIGNALS_NAME),
        "--signal-key", "source", "--workers", "1")  # fmt: skip
    run("catalog", str(images), "--out", str(catalog))
    run("split", str(catalog), "--out", str(splits), "--concept-frac", "0.6")
    embeddings, model = root / "embeddings", root / "model"
    run("embed", str(images), "--out", str(embeddings), "--config", str(config))
    run("train", str(images), "--out", str(model), "--splits", str(splits),
        "--embeddings", str(embeddings), "--config", str(config))  # fmt: skip
    return {
        "root": root,
        "config": str(config),
        "images": str(images),
        "splits": str(splits),
        "embeddings": str(embeddings),
        "checkpoint": str(model),
    }


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return prepare_towers(tmp_path_factory.mktemp("towers"))


def vectors_by_id(uri: str) -> dict[str, np.ndarray]:
    table = datasets.read_table(uri, columns=["image_id", "embedding"])
    return dict(
        zip(
            table.column("image_id").to_pylist(),
            np.asarray(table.column("embedding").to_pylist(), np.float32),
            strict=True,
        )
    )


def test_the_checkpoint_holds_both_whole_entries(towers):
    with open(f"{towers['checkpoint']}/config.json") as handle:
        saved = json.load(handle)
    assert saved["kind"] == "image_signal"
    assert saved["signal"]["entry"]["name"] == "tiny_spectra"  # declared in the config file
    assert saved["signal"]["entry"]["arch"]["signal_length"] == BINS
    assert saved["image"]["backbone"]["entry"]["name"] == "tiny_clip"
    image = checkpoint_entry(towers["checkpoint"])
    assert (image.name, image.embed_dim, image.library) == ("tiny_clip+head", 16, "open_clip")
    assert signal_entry_for_weights(towers["checkpoint"]).name == "tiny_spectra"


def test_embed_with_the_checkpoint_is_backbone_then_image_head(towers, tmp_path):
    """Without --model or the config file: the image vectors equal the evaluation's
    trained image tower applied to the frozen embeddings the training read."""
    out = tmp_path / "image"
    run("embed", towers["images"], "--out", str(out), "--weights", towers["checkpoint"])
    written = vectors_by_id(str(out))
    frozen = vectors_by_id(towers["embeddings"])
    ids = sorted(written)
    assert len(ids) == len(frozen) == 35 and written[ids[0]].shape == (16,)
    trained = TrainedTowers(towers["checkpoint"])
    with torch.no_grad():
        expected = trained.image(torch.from_numpy(np.stack([frozen[i] for i in ids]))).numpy()
    np.testing.assert_allclose(np.stack([written[i] for i in ids]), expected, atol=1e-4)


def signals_of(images: str, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    table = datasets.read_table(images, columns=["image_id", "spectrum"])
    position = {image_id: n for n, image_id in enumerate(table.column("image_id").to_pylist())}
    rows = SignalRows.from_arrow(table.column("spectrum"))
    return padded_batch(rows, [position[i] for i in ids])


def test_embed_signal_with_the_checkpoint_is_its_signal_tower(towers, tmp_path):
    out = tmp_path / "signal"
    run("embed-signal", towers["images"], "--column", "spectrum", "--out", str(out),
        "--weights", towers["checkpoint"])  # fmt: skip
    written = vectors_by_id(str(out))
    ids = sorted(written)
    assert len(ids) == 35
    values, lengths = signals_of(towers["images"], ids)
    with torch.no_grad():
        expected = TrainedTowers(towers["checkpoint"]).signal(values, lengths).numpy()
    np.testing.assert_allclose(np.stack([written[i] for i in ids]), expected, atol=1e-5)
    # --model naming the encoder it carries is fine, as with a signal checkpoint
    again = tmp_path / "again"
    run("embed-signal", towers["images"], "--column", "spectrum", "--out", str(again),
        "--weights", towers["checkpoint"], "--model", "tiny_spectra",
        "--config", towers["config"])  # fmt: skip
    np.testing.assert_array_equal(vectors_by_id(str(again))[ids[0]], written[ids[0]])


def one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) in (1, 2)  # a model error, a settings error
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def test_a_model_flag_naming_another_encoder_is_one_line(towers, tmp_path, capsys):
    argv = ["embed-signal", towers["images"], "--column", "spectrum", "--out", str(tmp_path / "x")]
    error = one_line_error(
        capsys, *argv, "--weights", towers["checkpoint"], "--model", "signal_cnn_small"
    )
    assert re.search(
        r"--model signal_cnn_small: --weights \S+ carries the signal encoder tiny_spectra "
        r"\(signal_cnn, 16 dims\); leave out --model",
        error,
    ), error
    with pytest.raises(ModelError, match=r"its signal tower is tiny_spectra .* not signal_cnn"):
        load_model(get_entry("signal_cnn_small"), towers["checkpoint"])


def test_a_checkpoint_of_another_signal_length_names_file_column_and_lengths(
    towers, tmp_path, capsys
):
    demo, images = tmp_path / "demo", tmp_path / "images"
    generate_signal_demo(str(demo), SignalDemoSpec(objects=2, views=1, bins=64))
    run("ingest", str(demo), "--out", str(images), "--signals", str(demo / SIGNALS_NAME),
        "--signal-key", "source", "--workers", "1")  # fmt: skip
    capsys.readouterr()
    error = one_line_error(
        capsys, "embed-signal", str(images), "--column", "spectrum", "--out",
        str(tmp_path / "e"), "--weights", towers["checkpoint"],
    )  # fmt: skip
    assert error.endswith(
        f"{towers['checkpoint']}: takes signals of length {BINS}, but {images} column "
        "'spectrum' holds signals of length 64"
    ), error
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").glob("part-*"))


def test_an_image_tower_of_an_unknown_mode_is_refused_in_one_line(towers, tmp_path, capsys):
    copy = tmp_path / "lora"
    shutil.copytree(towers["checkpoint"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["image"]["mode"] = "lora"
    (copy / "config.json").write_text(json.dumps(config))
    error = one_line_error(
        capsys, "embed", towers["images"], "--out", str(tmp_path / "e"), "--weights", str(copy)
    )
    assert error == (f"embedpipe embed: error: {copy}: an image tower of unknown mode 'lora'"), (
        error
    )
    # its signal tower still loads
    out = tmp_path / "s"
    run("embed-signal", towers["images"], "--column", "spectrum", "--out", str(out),
        "--weights", str(copy))  # fmt: skip


def test_a_config_file_signal_encoder_works_for_embed_signal_by_name(towers, tmp_path):
    out = tmp_path / "named"
    run("embed-signal", towers["images"], "--column", "spectrum", "--out", str(out),
        "--model", "tiny_spectra", "--config", towers["config"])  # fmt: skip
    manifest = datasets.read_manifest(str(out))
    assert manifest["model"] == "tiny_spectra"
    assert next(iter(vectors_by_id(str(out)).values())).shape == (16,)


def test_a_config_file_signal_encoder_reaches_training_under_torchrun(towers, tmp_path):
    """The launcher hands the config file's [models.NAME] tables to its two workers. (A
    batch of 4 per process: with 16, more than the 23 training rows, the two workers'
    batches differ in size and their all-gather breaks, as with a built-in encoder.)"""
    out = tmp_path / "ddp"
    run("train", towers["images"], "--out", str(out), "--splits", towers["splits"],
        "--embeddings", towers["embeddings"], "--config", towers["config"],
        "--nproc-per-node", "2", "--steps", "2", "--val-every", "0",
        "--batch-size", "4")  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["signal"]["entry"]["name"] == "tiny_spectra"
    assert saved["signal"]["entry"]["arch"]["channels"] == [8, 16]
