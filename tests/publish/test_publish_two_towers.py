"""A published image_signal checkpoint: the image tower as one transformers model
(AutoModel + AutoImageProcessor embed a picture as `embed --weights CKPT` does), the
signal tower in `signal_encoder/` (embed-signal --weights DIR/signal_encoder, or DIR,
writes what `embed-signal --weights CKPT` writes), a card naming both towers, the shared
dimension, the signal column and length and the trained towers' metrics; a republish
replaces its own files only. Real data: the signals demo through the documented commands."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedpipe.cli import main
from embedpipe.core import datasets, storage
from embedpipe.evaluate.stage import METRICS_NAME
from tests.models.test_two_towers import prepare_towers, run, vectors_by_id

TOWER_FILES = [
    "README.md",
    "config.json",
    "model.safetensors",
    "modeling_embedpipe_head.py",
    "preprocessor_config.json",
    "signal_encoder/config.json",
    "signal_encoder/model.safetensors",
]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return prepare_towers(tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module")
def evaluation(towers):
    out = towers["root"] / "evaluation"
    run("evaluate", towers["splits"], "--images", towers["images"], "--weights",
        towers["checkpoint"], "--out", str(out), "--recall-k", "1,5")  # fmt: skip
    return datasets.side_path(str(out), METRICS_NAME)


@pytest.fixture(scope="module")
def published(towers, evaluation):
    out = towers["root"] / "published"
    run("publish", towers["checkpoint"], "--out", str(out), "--metrics", evaluation,
        "--check-images", towers["images"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference(towers, tmp_path_factory):
    """What `embed --weights CKPT` and `embed-signal --weights CKPT` write."""
    root = tmp_path_factory.mktemp("reference")
    run("embed", towers["images"], "--out", str(root / "image"), "--weights",
        towers["checkpoint"], "--precision", "fp32")  # fmt: skip
    run("embed-signal", towers["images"], "--column", "spectrum", "--out",
        str(root / "signal"), "--weights", towers["checkpoint"])  # fmt: skip
    return vectors_by_id(str(root / "image")), vectors_by_id(str(root / "signal"))


def test_one_folder_holds_the_image_model_and_the_signal_tower(published):
    files = sorted(p.relative_to(published).as_posix() for p in published.rglob("*"))
    assert [f for f in files if f != "signal_encoder"] == TOWER_FILES
    config = json.loads((published / "config.json").read_text())
    assert config["embedpipe_publish"]["files"] == TOWER_FILES
    assert config["embedpipe_signal_tower"] == {
        "folder": "signal_encoder",
        "entry": "tiny_spectra",
        "architecture": "signal_cnn",
        "embed_dim": 16,
        "column": "spectrum",
        "signal_length": 128,
    }
    signal = json.loads((published / "signal_encoder" / "config.json").read_text())
    assert signal["entry"]["name"] == "tiny_spectra" and signal["entry"]["library"] == "signal"
    assert (signal["column"], signal["signal_length"]) == ("spectrum", 128)


def test_automodel_embeds_pictures_as_embed_with_the_checkpoint(published, towers, reference):
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(published), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(published), trust_remote_code=True).eval()
    rows = datasets.read_table(towers["images"], "images", ["image_id", "image"]).to_pylist()
    pictures = [Image.open(io.BytesIO(row["image"])) for row in rows]
    with torch.no_grad():
        got = model(**processor(images=pictures, return_tensors="pt")).numpy()
    expected = np.stack([reference[0][row["image_id"]] for row in rows])
    assert got.shape == (len(rows), 16)
    print(f"published image tower vs embed --weights CKPT: max |difference| "
          f"{np.abs(got - expected).max():.2e}")  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("where", ["signal_encoder", "", "local-dir:"])
def test_embed_signal_with_the_published_signal_tower(
    published, towers, reference, tmp_path, where
):
    weights = f"{where}{published}" if where.endswith(":") else str(published / where)
    out = tmp_path / "signal"
    run("embed-signal", towers["images"], "--column", "spectrum", "--out", str(out),
        "--weights", weights.rstrip("/"))  # fmt: skip
    written = vectors_by_id(str(out))
    assert sorted(written) == sorted(reference[1])
    difference = max(np.abs(v - reference[1][i]).max() for i, v in written.items())
    print(f"published signal tower ({where or 'DIR'}) vs embed-signal --weights CKPT: "
          f"max |difference| {difference:.2e}")  # fmt: skip
    for image_id, vector in written.items():
        np.testing.assert_allclose(vector, reference[1][image_id], atol=1e-5)


def test_embed_with_the_published_folder_is_the_image_tower(published, towers, reference, tmp_path):
    out = tmp_path / "image"
    run("embed", towers["images"], "--out", str(out), "--weights", f"local-dir:{published}",
        "--precision", "fp32")  # fmt: skip
    for image_id, vector in vectors_by_id(str(out)).items():
        np.testing.assert_allclose(vector, reference[0][image_id], atol=1e-4)


def test_the_card_names_both_towers_the_space_the_signal_and_the_trained_metrics(
    published, evaluation
):
    card = (published / "README.md").read_text()
    assert "tiny_clip" in card and "tiny_spectra" in card
    assert "shared 16-d space" in card and "shared dimension 16" in card
    assert "signals of 128 values" in card and "column `spectrum`" in card
    assert "embed-signal IMAGES --column spectrum --weights PATH/signal_encoder" in card
    assert "| regression/signal/ridge | redshift_r2 |" in card  # R² per source and probe
    models = {run["model"]: run for run in storage.read_json(evaluation)["models"]}
    assert "identity" in models["trained"] and "identity" not in models["untrained"]
    trained = models["trained"]["metrics"]["image_to_signal_recall@1"]
    assert f"| evaluation | image_to_signal_recall@1 | {trained:.4f} |" in card
    assert "- image-signal" in card  # a Hub tag


def test_republishing_replaces_its_own_files_and_refuses_foreign_ones(
    published, towers, evaluation, capsys
):
    argv = ["publish", towers["checkpoint"], "--out", str(published), "--check-images",
            towers["images"]]  # fmt: skip
    before = (published / "signal_encoder" / "model.safetensors").read_bytes()
    run(*argv, "--metrics", evaluation)
    assert (published / "signal_encoder" / "model.safetensors").read_bytes() == before
    stray = published / "signal_encoder" / "notes.txt"
    stray.write_text("mine")
    capsys.readouterr()
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "files it did not write (signal_encoder/notes.txt)" in error, error
    assert stray.read_text() == "mine"
    stray.unlink()


@pytest.fixture
def hub(monkeypatch):
    from tests.publish.test_publish import FakeHub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # loopback only
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_push_commits_both_towers_at_once(towers, evaluation, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "pushed"
    run("publish", towers["checkpoint"], "--out", str(out), "--metrics", evaluation,
        "--check-images", towers["images"], "--push", "org/towers",
        "--hub-endpoint", hub.endpoint)  # fmt: skip
    assert hub.unexpected == [] and len(hub.commits) == 1
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.files() == written and sorted(written) == TOWER_FILES
    card = written["README.md"].decode()
    assert "huggingface-cli download org/towers --local-dir PATH" in card


def test_published_to_s3_the_signal_tower_loads_back(
    towers, reference, bucket, tmp_path, monkeypatch
):
    monkeypatch.setattr("embedpipe.models.loading.CACHE_DIR", tmp_path / "cache")
    out = f"s3://{bucket}/models/towers"
    run("publish", towers["checkpoint"], "--out", out, "--check-images", towers["images"])
    names = sorted(e.uri.removeprefix(out + "/") for e in storage.list_files(out))
    assert names == TOWER_FILES
    for weights in (f"local-dir:{out}", f"{out}/signal_encoder"):
        embedded = tmp_path / weights.rsplit("/", 1)[-1]
        run("embed-signal", towers["images"], "--column", "spectrum", "--out",
            str(embedded), "--weights", weights)  # fmt: skip
        for image_id, vector in vectors_by_id(str(embedded)).items():
            np.testing.assert_allclose(vector, reference[1][image_id], atol=1e-5)
