"""One precision table: each stage (embed, evaluate, train), on each precision name, runs
the dtype it documents. Checked on CPU, where bf16 weights and bf16/fp16 autocast run:
a global hook records, at every linear layer the model calls, its weights' dtype and the
autocast in force."""

import contextlib

import pyarrow as pa
import pytest
import torch
from conftest import flat_tree

from embedpipe.config import EmbedSettings, EvaluateSettings, IngestSettings, TrainSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import SPLITS_KIND
from embedpipe.data.ingest import ingest_images
from embedpipe.embed.images import embed_images
from embedpipe.evaluate.sources import ModelSource, open_source
from embedpipe.models.loading import load_model, save_model
from embedpipe.models.precision import INFERENCE, TRAINING, precision_for
from embedpipe.train.stage import train_model

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (weights, autocast) of each name on CPU, as DECISIONS 5 and the settings' help state them
INFERENCE_ON_CPU = {
    "fp32": (F32, None),
    "amp_bf16": (F32, BF16),
    "bf16": (BF16, None),
    "pure_bf16": (BF16, None),
    "fp16": (F32, F16),
    "auto": (F32, None),
}
# training feeds fp32 inputs and losses, so bf16 weights train under bf16 autocast
TRAINING_ON_CPU = {
    "fp32": (F32, None),
    "amp_bf16": (F32, BF16),
    "bf16": (BF16, BF16),
    "pure_bf16": (BF16, BF16),
    "auto": (F32, None),
}


@contextlib.contextmanager
def linear_calls():
    """(weights dtype, autocast dtype or None) of every nn.Linear call in this process."""
    seen: set[tuple[torch.dtype, torch.dtype | None]] = set()

    def record(module, inputs):
        if isinstance(module, torch.nn.Linear):
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.add((module.weight.dtype, autocast))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("precision")
    out = root / "images"
    flat_tree(root / "src", categories=2, concepts=2, images=3)
    ingest_images([str(root / "src")], str(out), IngestSettings(workers=1))
    return str(out)


@pytest.fixture(scope="module")
def tiny_weights(tiny_entry, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("precision-ckpt") / "ckpt"
    torch.manual_seed(0)
    save_model(load_model(tiny_entry, "random"), str(path))
    return str(path)


def test_the_table_resolves_auto_by_device_and_use():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name, (weights, autocast) in INFERENCE_ON_CPU.items():
        chosen = precision_for(name, cpu, INFERENCE)
        assert (chosen.weights, chosen.autocast) == (weights, autocast), name
    for name, (weights, autocast) in TRAINING_ON_CPU.items():
        chosen = precision_for(name, cpu, TRAINING)
        assert (chosen.weights, chosen.autocast) == (weights, autocast), name
    # on CUDA, auto is bf16 weights for inference (embed and evaluate alike), bf16 autocast
    # with fp32 weights for training
    assert precision_for("auto", cuda, INFERENCE).weights == BF16
    assert precision_for("auto", cuda, INFERENCE).autocast is None
    assert precision_for("auto", cuda, TRAINING).weights == F32
    assert precision_for("auto", cuda, TRAINING).autocast == BF16


def test_the_settings_offer_the_table_s_names():
    from typing import get_args

    from embedpipe.models.precision import TABLE

    for settings in (EmbedSettings, EvaluateSettings, TrainSettings):
        names = set(get_args(settings.model_fields["precision"].annotation))
        assert "auto" in names and names - {"auto"} <= set(TABLE), settings.__name__
    assert set(get_args(EvaluateSettings.model_fields["precision"].annotation)) == set(
        get_args(EmbedSettings.model_fields["precision"].annotation)
    )


@pytest.mark.parametrize("name", list(INFERENCE_ON_CPU))
def test_embed_runs_the_precision_it_documents(name, few_images, tiny_entry, tmp_path):
    config = EmbedSettings(
        weights="random", device="cpu", precision=name, num_workers=0, batch_size=4
    )
    with linear_calls() as seen:
        result = embed_images(few_images, str(tmp_path / "emb"), config, tiny_entry)
    assert result.embedded == 12
    assert seen == {INFERENCE_ON_CPU[name]}


@pytest.mark.parametrize("name", list(INFERENCE_ON_CPU))
def test_evaluate_runs_the_precision_it_documents(name, few_images, tiny_weights):
    """The evaluate fix: bf16 (and auto on a GPU) cast the weights, as embed does; before,
    evaluate borrowed embed's autocast alone and ran those in fp32."""
    config = EvaluateSettings(device="cpu", precision=name, batch_size=4)
    encoder = open_source(ModelSource(tiny_weights), config, few_images)
    ids = datasets.read_table(few_images, "images", ["image_id"]).column(0).to_pylist()
    with linear_calls() as seen:
        vectors = encoder.images(ids)
        texts = encoder.texts(["a photo of a cat", "a photo of a dog"])
    assert vectors.shape == (12, 64) and texts.shape == (2, 64)
    assert seen == {INFERENCE_ON_CPU[name]}


@pytest.fixture(scope="module")
def held_out_concept(few_images, tmp_path_factory) -> str:
    """The images of concept1 of each category held out for validation."""
    table = datasets.read_table(few_images, "images", ["image_id", "concept"])
    split = ["val" if c == "concept1" else "train" for c in table.column("concept").to_pylist()]
    selection = pa.table({"image_id": table.column("image_id"), "split": split})
    out = str(tmp_path_factory.mktemp("precision-splits") / "splits")
    datasets.write_table(out, selection, SPLITS_KIND)
    return out


@pytest.mark.parametrize("name", list(TRAINING_ON_CPU))
def test_train_runs_the_precision_it_documents(
    name, few_images, held_out_concept, tiny_entry, tmp_path
):
    """The training steps and the validation (which embeds through the loader) alike."""
    config = TrainSettings(
        weights="random",
        device="cpu",
        precision=name,
        steps=1,
        batch_size=4,
        num_workers=0,
        val_every=1,
    )
    with linear_calls() as seen:
        result = train_model(
            few_images, str(tmp_path / "out"), config, tiny_entry, held_out_concept
        )
    assert result.steps == 1 and result.best_metric  # trained, and validated
    assert seen == {TRAINING_ON_CPU[name]}
