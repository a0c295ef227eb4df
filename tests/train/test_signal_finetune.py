"""pairs image_signal, mode finetune: the open_clip image tower fine-tuned jointly with a
signal encoder on the signals demo (images and spectra of the same galaxies). Its loss is
open_clip's across the two towers, it learns (held-out cross-modal recall@1 rises), it
resumes mid-epoch to the weights of an uninterrupted run, its checkpoint evaluates."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from open_clip import loss as open_clip_loss
from safetensors.torch import load_file

from embedpipe.config import ConfigError, IngestSettings, TrainSettings
from embedpipe.core import datasets
from embedpipe.data.demo_signals import SIGNALS_NAME, SignalDemoSpec, generate_signal_demo
from embedpipe.models.registry import ModelEntry
from embedpipe.train.data import load_examples
from embedpipe.train.signal_finetune import ImageSignalFinetuneTask
from embedpipe.train.stage import train_model
from tests.train.test_learning import write_selection

# A smaller open_clip config than the suite's tiny one: 16 patches of 16 px per 64 px image.
MICRO_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def micro_entry() -> ModelEntry:
    return ModelEntry(
        name="micro_clip",
        library="open_clip",
        architecture="embedpipe-micro-clip",
        embed_dim=32,
        image_size=64,
        text=True,
        open_clip_config=MICRO_CLIP,
    )


@pytest.fixture(scope="module")
def galaxies(tmp_path_factory):
    """The signals demo ingested with its spectra, every fourth object held out whole."""
    from embedpipe.data.ingest import ingest_images

    root = tmp_path_factory.mktemp("signal-finetune")
    generate_signal_demo(str(root / "data"), SignalDemoSpec(objects=16, views=3, bins=128))
    images = str(root / "images")
    ingest_images(
        [str(root / "data")],
        images,
        IngestSettings(workers=1, signals=str(root / "data" / SIGNALS_NAME), signal_key="source"),
    )
    table = datasets.read_table(images, "images", ["image_id", "concept"])
    ids, concepts = table.column("image_id").to_pylist(), table.column("concept").to_pylist()
    held_out = sorted(set(concepts))[::4]
    splits = write_selection(
        str(root / "splits"), ids, ["val" if c in held_out else "train" for c in concepts]
    )
    return {"root": root, "images": images, "splits": splits}


def settings(**overrides) -> TrainSettings:
    values = dict(
        model="micro_clip",
        weights="random",
        mode="finetune",
        pairs="image_signal",
        signal_column="spectrum",
        signal_model="signal_cnn_small",
        loss="infonce",
        lr=1e-3,
        tower_lr=1e-4,  # a ViT from random weights collapses at 1e-3
        batch_size=32,
        steps=80,
        val_every=40,
        num_workers=0,
        device="cpu",
        precision="fp32",
    )
    return TrainSettings(**(values | overrides))


def task_for(galaxies, entry, config) -> ImageSignalFinetuneTask:
    examples = load_examples(galaxies["images"], config, galaxies["splits"])
    return ImageSignalFinetuneTask(
        entry, config, examples, galaxies["images"], torch.device("cpu"), {}
    )


@pytest.mark.parametrize(
    ("name", "theirs"),
    [("infonce", open_clip_loss.ClipLoss()), ("pairwise_sigmoid", open_clip_loss.SigLipLoss())],
)
def test_loss_is_open_clips_on_the_two_towers(galaxies, micro_entry, name, theirs):
    task = task_for(galaxies, micro_entry, settings(loss=name))
    batch = next(task.batches(0, [task.train_rows[:12].tolist()]))
    assert batch["pixels"].shape == (12, 3, 64, 64)
    image, signal, _, scale, bias = task.features_of(task.module, batch)
    assert image.shape == signal.shape == (12, 32)  # the signal projection sized to the tower
    ours = task.loss_from((image, signal, None, scale, bias), batch)
    extra = () if bias is None else (bias,)
    assert torch.isclose(ours, theirs(image, signal, scale, *extra), rtol=1e-5, atol=1e-6)
    ours.backward()
    for tower in (task.module.visual, task.module.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


@pytest.fixture(scope="module")
def trained(galaxies, micro_entry):
    out = galaxies["root"] / "model"
    result = train_model(
        galaxies["images"], str(out), settings(), micro_entry, splits_uri=galaxies["splits"]
    )
    return out, result


def test_finetuning_raises_held_out_cross_modal_recall(trained, micro_entry):
    out, result = trained
    assert result.best_metric == "val_recall_at_1"
    assert result.best_value >= result.untrained_value + 0.1, result
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "image_signal"
    assert config["image"]["mode"] == "finetune"
    assert config["image"]["entry"] == micro_entry.model_dump(mode="json")
    assert config["signal"]["entry"]["name"] == "signal_cnn_small"
    assert config["signal"]["entry"]["embed_dim"] == 32
    weights = load_file(out / "model.safetensors")
    assert {key.split(".")[0] for key in weights} == {"image", "signal", "logit_scale"}
    assert "image.conv1.weight" in weights and "signal.proj.weight" in weights


def test_the_checkpoint_evaluates_untrained_and_trained_side_by_side(
    trained, galaxies, micro_entry
):
    """`embedpipe evaluate` on the checkpoint: the trained towers beat the untrained ones,
    and the checkpoint's tower, fed the decoded pixels, gives the recall its training
    validated with."""
    from embedpipe.cli import main
    from embedpipe.evaluate.image_signal import TrainedTowers
    from embedpipe.train.pairs_signal import cross_modal_recall
    from embedpipe.train.signal_towers import untrained_task

    out, _ = trained
    report = galaxies["root"] / "evaluation"
    argv = ["evaluate", galaxies["splits"], "--images", galaxies["images"]]
    assert main([*argv, "--weights", str(out), "--out", str(report)]) == 0
    written = json.loads((report / ".embedpipe" / "metrics.json").read_text())
    before, after = (model["metrics"] for model in written["models"])
    assert [model["model"] for model in written["models"]] == ["untrained", "trained"]
    assert after["image_to_signal_recall@5"] > before["image_to_signal_recall@5"]
    assert "redshift_r2" in written["models"][1]["regression"]["signal"]["ridge"]

    towers = TrainedTowers(str(out))
    config = TrainSettings(**towers.config["train"])
    examples = load_examples(galaxies["images"], config, galaxies["splits"])
    task = untrained_task(towers.config, config, examples, galaxies["images"])
    rows = task.queries.tolist()
    with torch.no_grad():
        image = towers.image(task.image_inputs(rows))
        signal = towers.signal(*(part for part in _signals(task, rows)))
    keys = examples.concept_keys()
    objects = np.array([sorted(set(keys)).index(keys[row]) for row in rows])
    recall = cross_modal_recall(image, signal, objects, (1,), "val_")["val_recall_at_1"]
    assert recall == pytest.approx(towers.config["metrics"]["val_recall_at_1"], abs=1.1 / len(rows))


def _embedded(folder) -> dict[str, np.ndarray]:
    table = datasets.read_table(str(folder), columns=["image_id", "embedding"])
    return dict(
        zip(
            table.column("image_id").to_pylist(),
            table.column("embedding").to_numpy(zero_copy_only=False),
            strict=True,
        )
    )


def test_the_finetuned_towers_embed_and_publish_in_open_clips_layout(trained, galaxies, tmp_path):
    """`embed --weights CKPT` is the fine-tuned image tower; published, open_clip itself
    loads it and gives the same embeddings, and `embed-signal` the same signal tower."""
    import open_clip
    from PIL import Image

    from embedpipe.cli import main

    out, _ = trained
    images = galaxies["images"]
    published = tmp_path / "published"
    assert main(["publish", str(out), "--out", str(published), "--check-images", images]) == 0
    names = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md",
            "signal_encoder/config.json", "signal_encoder/model.safetensors"} <= names  # fmt: skip
    described = json.loads((published / "open_clip_config.json").read_text())
    assert described["embedpipe_signal_tower"]["folder"] == "signal_encoder"
    card = (published / "README.md").read_text()
    assert "fine-tuned, in open_clip's layout" in card and "use `encode_image`" in card
    assert "get_tokenizer" not in card

    for weights, folder in ((str(out), "ckpt"), (f"local-dir:{published}", "pub")):
        assert main(["embed", images, "--weights", weights, "--out", str(tmp_path / folder)]) == 0
        assert main(["embed-signal", images, "--column", "spectrum", "--weights",
                     weights.removeprefix("local-dir:"), "--out",
                     str(tmp_path / f"{folder}-signal")]) == 0  # fmt: skip
    checkpoint, republished = _embedded(tmp_path / "ckpt"), _embedded(tmp_path / "pub")
    assert checkpoint.keys() == republished.keys()
    for image_id, vector in checkpoint.items():
        np.testing.assert_allclose(republished[image_id], vector, atol=1e-5)
    signals = _embedded(tmp_path / "ckpt-signal"), _embedded(tmp_path / "pub-signal")
    for image_id, vector in signals[0].items():
        np.testing.assert_allclose(signals[1][image_id], vector, atol=1e-5)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{published}")
    model.eval()
    some = datasets.read_table(images, columns=["image_id", "image"]).slice(0, 4)
    import io

    for image_id, cell in zip(some.column("image_id").to_pylist(),
                              some.column("image").to_pylist(), strict=True):  # fmt: skip
        picture = Image.open(io.BytesIO(cell["bytes"] if isinstance(cell, dict) else cell))
        with torch.no_grad():
            ours = model.encode_image(
                preprocess(picture.convert("RGB")).unsqueeze(0), normalize=True
            )
        np.testing.assert_allclose(ours[0].numpy(), checkpoint[image_id], atol=1e-4)


def _signals(task, rows):
    from embedpipe.embed.signals import padded_batch

    return padded_batch(task.signals, rows)


@pytest.mark.parametrize("loss", ["infonce", "multipos_sigmoid"])
def test_a_cached_step_equals_one_plain_step_in_float64(galaxies, micro_entry, loss):
    from gradcache_cases import cached_gradients, max_difference, uncached_gradients

    task = task_for(galaxies, micro_entry, settings(loss=loss, nested_dims=(8,)))
    task.module.double()
    batch = next(task.batches(0, [task.train_rows[:12].tolist()]))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    plain = uncached_gradients(task.module, task, batch)
    cached = cached_gradients(task.module, task.module, task, batch, micro_batch=4)
    assert any(name.startswith("visual.") for name in cached)
    assert any(name.startswith("encoder.") for name in cached)
    assert max_difference(plain, cached) < 1e-6


def test_a_killed_nested_run_resumes_mid_epoch_to_the_same_weights(
    galaxies, micro_entry, monkeypatch
):
    from embedpipe.train import checkpoint as ckpt

    root = galaxies["root"]
    config = settings(steps=5, checkpoint_every=4, val_every=0, nested_dims=(16,), micro_batch=8)
    common = dict(splits_uri=galaxies["splits"])
    train_model(galaxies["images"], str(root / "whole"), config, micro_entry, **common)
    from conftest import killed_after_a_checkpoint

    killed_after_a_checkpoint(
        monkeypatch,
        lambda: train_model(galaxies["images"], str(root / "cut"), config, micro_entry, **common),
    )
    ((step, folder),) = ckpt.complete_checkpoints(str(root / "cut"), "last")
    state = torch.load(f"{folder}/training_state.pt", weights_only=True)
    assert step == 4 and state["epoch"] == 1 and state["position"] == 1  # mid-epoch
    resumed = train_model(galaxies["images"], str(root / "cut"), config, micro_entry, **common)
    assert resumed.resumed_from_step == 4 and resumed.steps == 5
    whole, cut = (load_file(root / name / "model.safetensors") for name in ("whole", "cut"))
    assert whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key
    history = json.loads((root / "cut" / ".embedpipe" / "metrics.json").read_text())["history"]
    assert "val_recall_at_1_dim16" in history[-1]


def test_settings_the_towers_cannot_meet_are_one_line_errors(galaxies, micro_entry, tmp_path):
    from embedpipe.models.backends.signal import SignalBackend
    from embedpipe.models.registry import get_entry
    from embedpipe.models.signal_encoders import build_signal_encoder

    entry = get_entry("signal_cnn_small")
    SignalBackend().save_checkpoint(entry, build_signal_encoder(entry), tmp_path)
    with pytest.raises(ConfigError, match=r"signal_weights: .* in 128 dims, but the image tower"):
        task_for(galaxies, micro_entry, settings(signal_weights=str(tmp_path)))
    with pytest.raises(ConfigError, match="out_dim: image_signal finetune embeds in"):
        task_for(galaxies, micro_entry, settings(out_dim=16))


def test_two_gloo_processes_follow_the_loss_curve_of_one(galaxies, tmp_path):
    """`--nproc-per-node 2` under torchrun, each rank half of every global batch: the
    losses gather features across the ranks, so the curve is the one process's."""
    import subprocess
    import sys

    config = tmp_path / "micro.toml"
    inline = json.dumps(MICRO_CLIP).replace('":', '" =')
    config.write_text(
        '[models.micro_clip]\nlibrary = "open_clip"\narchitecture = "embedpipe-micro-clip"\n'
        f"embed_dim = 32\nimage_size = 64\ntext = true\nopen_clip_config = {inline}\n"
    )
    common = [
        "train", galaxies["images"], "--config", str(config), "--splits", galaxies["splits"],
        "--mode", "finetune", "--pairs", "image_signal", "--signal-column", "spectrum",
        "--signal-model", "signal_cnn_small", "--model", "micro_clip", "--weights", "random",
        "--loss", "multipos_sigmoid", "--steps", "3", "--lr", "1e-3", "--tower-lr", "1e-4",
        "--num-workers", "0", "--val-every", "0", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    runs = {1: ["--batch-size", "16"], 2: ["--batch-size", "8"]}
    for procs, batch in runs.items():
        argv = [
            *common,
            *batch,
            "--nproc-per-node",
            str(procs),
            "--out",
            str(tmp_path / str(procs)),
        ]
        done = subprocess.run(
            [sys.executable, "-m", "embedpipe", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-2000:]

    def curve(folder):
        metrics = json.loads((tmp_path / folder / ".embedpipe" / "metrics.json").read_text())
        return [r["loss"] for r in metrics["history"] if "loss" in r]

    assert len(curve("2")) == 3
    assert curve("2") == pytest.approx(curve("1"), abs=1e-4)
    one, two = (load_file(tmp_path / n / "model.safetensors") for n in ("1", "2"))
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-4, rtol=1e-4)


def test_a_corrupt_image_is_one_line_naming_its_id(galaxies, micro_entry, tmp_path):
    import pyarrow as pa

    from embedpipe.core import storage

    chosen = datasets.read_table(galaxies["images"]).slice(0, 8)
    bad = chosen.column("image_id")[3].as_py()
    column = chosen.schema.get_field_index("image")
    data = chosen.column("image").to_pylist()
    data[3] = data[3][:100]
    damaged = chosen.set_column(column, chosen.schema.field(column), pa.array(data, pa.binary()))
    images = str(tmp_path / "images")
    datasets.write_table(images, damaged, "images")
    manifest = datasets.read_manifest(images)
    manifest["signals"] = datasets.read_manifest(galaxies["images"])["signals"]
    storage.write_json(datasets.side_path(images, datasets.MANIFEST_NAME), manifest)
    config = settings(steps=1, batch_size=8, num_workers=1, val_every=0)
    with pytest.raises(ValueError) as error:
        train_model(images, str(tmp_path / "model"), config, micro_entry)
    assert str(error.value).startswith(f"{images}: image {bad} cannot be decoded (")
    assert "\n" not in str(error.value)
