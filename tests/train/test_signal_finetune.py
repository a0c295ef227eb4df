"""pairs image_signal, mode finetune: the open_clip image tower fine-tuned jointly with a
signal encoder on the signals demo (images and spectra of the same galaxies). Its loss is
open_clip's across the two towers, it learns (held-out cross-modal recall@1 rises), it
resumes mid-epoch to the weights of an uninterrupted run, its checkpoint evaluates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip import loss as open_clip_loss
from safetensors.torch import load_file

from embedpipe.config import ConfigError, IngestSettings, TrainSettings
from embedpipe.core import datasets
from embedpipe.data.demo_signals import SIGNALS_NAME, SignalDemoSpec, generate_signal_demo
from embedpipe.models.registry import ModelEntry
from embedpipe.train import checkpoint as ckpt
from embedpipe.train.data import load_examples
from embedpipe.train.loop import Loop
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
        batch_size=32,
        steps=60,
        val_every=30,
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
    assert result.best_value >= result.untrained_value + 0.15, result
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "image_signal"
    assert config["image"]["mode"] == "finetune"
    assert config["image"]["entry"] == micro_entry.model_dump(mode="json")
    assert config["signal"]["entry"]["name"] == "signal_cnn_small"
    assert config["signal"]["entry"]["embed_dim"] == 32
    weights = load_file(out / "model.safetensors")
    assert {key.split(".")[0] for key in weights} == {"image", "signal", "logit_scale"}
    assert "image.conv1.weight" in weights and "signal.proj.weight" in weights
