"""Training under hostile input: a diverged run, resumes with other inputs, an output
folder that is not a training's, damaged checkpoints, numbers that would mean nothing."""

import json

import numpy as np
import pytest
import torch
from conftest import head_train
from safetensors.torch import load_file

from embedpipe.cli import main
from embedpipe.config import EvaluateSettings
from embedpipe.core.finite import NonFiniteError
from embedpipe.train import checkpoint as ckpt
from embedpipe.train.divergence import Diverged
from embedpipe.train.stage import train_model


@pytest.fixture(scope="module")
def inputs(tune_inputs):
    return {"splits_uri": tune_inputs["splits"], "embeddings_uri": tune_inputs["embeddings"]}


def _files(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("micro_batch", [0, 4])  # plain, and gradient caching
def test_a_diverging_run_stops_naming_the_step_and_publishes_no_broken_weights(
    tune_inputs, inputs, frozen_entry, tmp_path, micro_batch
):
    out = tmp_path / "model"
    config = head_train(
        lr=1e3, steps=12, warmup_steps=1, checkpoint_every=1, val_every=0, micro_batch=micro_batch
    )
    with pytest.raises(Diverged, match=r"^step \d+: the (loss|gradient norm) is (nan|inf)") as e:
        train_model(tune_inputs["images"], str(out), config, frozen_entry, **inputs)
    assert "\n" not in str(e.value)
    assert not (out / "model.safetensors").exists()  # nothing published as the model
    for _, folder in ckpt.complete_checkpoints(str(out), "last"):
        for tensor in load_file(f"{folder}/model.safetensors").values():
            assert torch.isfinite(tensor).all()
        state = ckpt.read_training_state(folder)
        assert all(torch.isfinite(t).all() for t in state["training_weights"].values())


def test_the_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteError, match="weight b holds NaN"):
        ckpt.write_checkpoint(str(tmp_path / "c"), {"x": 1}, weights)
    state = {"training_weights": {"w": torch.tensor([float("inf")])}}
    with pytest.raises(NonFiniteError, match="weight w holds NaN or inf"):
        ckpt.write_checkpoint(str(tmp_path / "c"), {"x": 1}, {"a": torch.ones(1)}, state, [])
    assert not (tmp_path / "c").exists()


def _other_embeddings(tune_inputs, out, seed: int, model: str = "") -> str:
    from embedpipe.core import datasets, storage

    ids = datasets.read_table(tune_inputs["embeddings"], columns=["image_id"]).column(0)
    matrix = np.random.default_rng(seed).normal(size=(len(ids), 32)).astype(np.float32)
    import pyarrow as pa

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 32)
    datasets.write_table(str(out), pa.table({"image_id": ids, "embedding": vectors}), "embeddings")
    if model:
        manifest = datasets.read_manifest(str(out))
        manifest.update(model=model, weights="random", seed=seed)
        storage.write_json(datasets.side_path(str(out), datasets.MANIFEST_NAME), manifest)
    return str(out)


def test_resuming_on_other_inputs_is_refused_naming_the_input(
    demo_catalog, tune_inputs, inputs, frozen_entry, tmp_path
):
    from embedpipe.config import SplitSettings
    from embedpipe.data.split import create_concept_splits

    out = str(tmp_path / "model")
    config = head_train(steps=4, checkpoint_every=2, val_every=2)
    train_model(tune_inputs["images"], out, config, frozen_entry, **inputs)
    before = _files(tmp_path / "model")
    other = _other_embeddings(tune_inputs, tmp_path / "emb-seed-1", seed=1)
    with pytest.raises(ValueError, match=r"trained on another --embeddings \(the same kind"):
        train_model(
            tune_inputs["images"], out, config, frozen_entry, **{**inputs, "embeddings_uri": other}
        )
    relabelled = _other_embeddings(tune_inputs, tmp_path / "emb-model", seed=0, model="frozen")
    with pytest.raises(ValueError, match=r"another --embeddings .*given now: .*model frozen"):
        train_model(
            tune_inputs["images"],
            out,
            config,
            frozen_entry,
            **{**inputs, "embeddings_uri": relabelled},
        )
    splits = str(tmp_path / "splits-seed-5")
    create_concept_splits(demo_catalog, splits, SplitSettings(seed=5))
    with pytest.raises(ValueError, match=r"^\S+: holds a checkpoint trained on another --splits"):
        train_model(
            tune_inputs["images"], out, config, frozen_entry, **{**inputs, "splits_uri": splits}
        )
    assert _files(tmp_path / "model") == before  # nothing touched
    again = train_model(tune_inputs["images"], out, config, frozen_entry, **inputs)
    assert again.resumed_from_step == 4  # the same inputs resume


def test_an_out_folder_that_is_not_a_training_output_is_refused_untouched(
    tune_inputs, inputs, frozen_entry, tmp_path, capsys
):
    from embedpipe.config import ConfigError

    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.json").write_text('{"entry": {"name": "my model"}}')
    (users / "model.safetensors").write_bytes(b"my weights")
    before = _files(users)
    config = head_train(steps=2, val_every=0)
    with pytest.raises(ConfigError, match=r"config.json is not a training's"):
        train_model(tune_inputs["images"], str(users), config, frozen_entry, **inputs)
    assert _files(users) == before
    (users / "config.json").unlink()  # the user's weights alone are not overwritten either
    with pytest.raises(ConfigError, match=r"does not write \(e.g. model.safetensors\)"):
        train_model(tune_inputs["images"], str(users), config, frozen_entry, **inputs)
    assert _files(users) == {users / "model.safetensors": b"my weights"}
    (users / "notes.txt").write_text("mine")
    before = _files(users)
    with pytest.raises(ConfigError, match=r"holds files a training does not write \(e.g."):
        train_model(tune_inputs["images"], str(users), config, frozen_entry, **inputs)
    assert _files(users) == before
    # a dataset folder is not a training output either
    dataset = _other_embeddings(tune_inputs, tmp_path / "emb", 3)
    with pytest.raises(ConfigError, match="holds files a training does not write"):
        train_model(tune_inputs["images"], dataset, config, frozen_entry, **inputs)
    # the model of a training with other settings is not overwritten
    done = tmp_path / "done"
    train_model(tune_inputs["images"], str(done), config, frozen_entry, **inputs)
    for folder in (done / "checkpoints").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    with pytest.raises(ConfigError, match=r"model of a training with other settings \(lr\)"):
        train_model(tune_inputs["images"], str(done), head_train(steps=2, val_every=0, lr=0.5),
                    frozen_entry, **inputs)  # fmt: skip
    # an earlier run of the same training is resumed (here: its model rewritten)
    assert train_model(tune_inputs["images"], str(done), config, frozen_entry, **inputs).steps == 2


@pytest.mark.parametrize(
    "name, damage",
    [
        ("training_state.pt", b""),
        ("training_state.pt", b"\x80\x04garbage\xff\xfe not a torch file"),
        ("training_state.pt", "text, not a zip: é".encode("latin-1")),
        ("history.json", b""),
        ("history.json", b'{"step": '),
        ("config.json", b"not json"),
    ],
)
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(
    tune_inputs, inputs, frozen_entry, tmp_path, caplog, name, damage
):
    config = head_train(steps=6, checkpoint_every=2, val_every=2)
    whole = tmp_path / "whole"
    train_model(tune_inputs["images"], str(whole), config, frozen_entry, **inputs)
    steps = [step for step, _ in ckpt.complete_checkpoints(str(whole), "last")]
    assert steps == [4, 6]  # the latest and the one before it
    latest = whole / "checkpoints" / "last-00000006"
    (latest / name).write_bytes(damage)
    expected = load_file(whole / "model.safetensors")
    (whole / "model.safetensors").unlink()
    caplog.set_level("WARNING")
    again = train_model(tune_inputs["images"], str(whole), config, frozen_entry, **inputs)
    assert again.resumed_from_step == 4 and again.steps == 6
    assert f"{latest / name}: damaged" in caplog.text
    assert "resuming from the earlier checkpoint" in caplog.text
    resumed = load_file(whole / "model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_when_every_checkpoint_is_damaged_one_line_names_the_file(
    tune_inputs, inputs, frozen_entry, tmp_path, capsys
):
    out = tmp_path / "model"
    run = [
        "train", tune_inputs["images"], "--splits", inputs["splits_uri"], "--embeddings",
        inputs["embeddings_uri"], "--mode", "head", "--pairs", "image_image", "--model",
        "clip_vitb32", "--steps", "4", "--batch-size", "16", "--depth", "1", "--out-dim", "16",
        "--checkpoint-every", "2", "--val-every", "0", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(run) == 0
    for folder in (out / "checkpoints").glob("last-*"):
        (folder / "training_state.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(run) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert f"{out / 'checkpoints' / 'last-00000004' / 'training_state.pt'}: damaged" in error
    assert "(and the 1 earlier one(s) too); no earlier checkpoint to resume from" in error
    assert f"delete {out / 'checkpoints'} to start" in error


def test_without_val_rows_validation_is_a_marked_skip_not_a_zero(
    tune_inputs, inputs, frozen_entry, tmp_path
):
    import pyarrow as pa

    from embedpipe.core import datasets

    manifest = datasets.read_manifest(tune_inputs["splits"])
    table = datasets.read_table(tune_inputs["splits"])
    table = table.set_column(
        table.column_names.index("split"), "split", pa.array(["train"] * table.num_rows)
    )
    no_val = str(tmp_path / "no-val")
    datasets.write_table(no_val, table, manifest["kind"])
    out = tmp_path / "model"
    result = train_model(
        tune_inputs["images"],
        str(out),
        head_train(steps=3, val_every=1),
        frozen_entry,
        **{**inputs, "splits_uri": no_val},
    )
    assert result.best_value is None and result.untrained_value is None
    assert "best_value" not in result.metrics()
    assert result.skipped == {
        "validation": "the splits hold no val rows (held-out concepts) to validate on"
    }
    saved = json.loads((out / ".embedpipe" / "metrics.json").read_text())
    assert saved["result"]["skipped"] == result.skipped
    assert not any(k.startswith("val_") for r in saved["history"] for k in r)
    from embedpipe.train.report import render_report

    assert "Not measured" in render_report(saved) and "no val rows" in render_report(saved)


def test_a_val_k_past_a_gallery_is_the_error_evaluate_gives(
    tune_inputs, inputs, frozen_entry, tmp_path
):
    from embedpipe.config import ConfigError
    from embedpipe.core.recall_rules import category_gallery_problem

    config = head_train(steps=2, val_k=(1, 500))
    with pytest.raises(
        ConfigError,
        match=r"^val_k 500 is larger than the gallery of category '\w+' \(\d+ images\)$",
    ):
        train_model(tune_inputs["images"], str(tmp_path / "m"), config, frozen_entry, **inputs)
    assert not (tmp_path / "m").exists()
    # the same rule, worded for evaluate's recall_k
    categories = np.array(["a"] * 4 + ["b"] * 9, dtype=object)
    assert category_gallery_problem((1, 5), categories[[0, 5]], categories) == (
        "recall_k 5 is larger than the gallery of category 'a' (3 images)"
    )


def test_a_truncated_head_checkpoint_is_one_line_naming_the_file(
    tune_inputs, inputs, frozen_entry, tmp_path, capsys
):
    out = tmp_path / "head"
    train_model(tune_inputs["images"], str(out), head_train(steps=2), frozen_entry, **inputs)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["publish", str(out), "--device", "cpu", "--out", str(tmp_path / "pub")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{weights}: damaged weights file" in error
    from embedpipe.evaluate.sources import ModelSource
    from embedpipe.evaluate.stage import evaluate_models
    from embedpipe.models.registry import ModelError

    with pytest.raises(ModelError, match=f"{weights}: damaged weights file"):
        evaluate_models(
            [ModelSource(str(out))], tune_inputs["images"], str(tmp_path / "ev"),
            EvaluateSettings(device="cpu"),
        )  # fmt: skip


def test_captions_without_image_ids_are_one_line_naming_the_flag(
    tune_inputs, inputs, frozen_entry, tmp_path
):
    import pyarrow as pa

    from embedpipe.config import ConfigError
    from embedpipe.core import datasets

    negatives = str(tmp_path / "negatives")
    table = pa.table({"query_id": ["a"], "negative_ids": [["b"]]})
    datasets.write_table(negatives, table, "hard-negatives")
    with pytest.raises(ConfigError, match=r"^--captions \S+negatives: has no image_id column"):
        train_model(
            tune_inputs["images"],
            str(tmp_path / "model"),
            head_train(steps=2),
            frozen_entry,
            **inputs,
            captions_uri=negatives,
        )
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_image_in_finetuning_is_one_line_naming_its_id(
    demo_images, tiny_entry, tmp_path, num_workers
):
    """Fine-tuning decodes the images itself (in loader workers when asked): a file that
    does not decode is named by the images dataset and its id, in one line."""
    import pyarrow as pa

    from embedpipe.config import TrainSettings
    from embedpipe.core import datasets

    images = datasets.read_table(demo_images)
    chosen = images.slice(0, 8)
    bad = chosen.column("image_id")[3].as_py()
    column = chosen.schema.get_field_index("image")
    data = chosen.column("image").to_pylist()
    data[3] = data[3][:100]
    damaged = chosen.set_column(column, chosen.schema.field(column), pa.array(data, pa.binary()))
    images_uri = str(tmp_path / "images")
    datasets.write_table(images_uri, damaged, "images")
    config = TrainSettings(weights="random", pairs="image_image", steps=1, batch_size=8,
                           num_workers=num_workers, val_every=0)  # fmt: skip
    with pytest.raises(ValueError) as error:
        train_model(images_uri, str(tmp_path / "ft"), config, tiny_entry)
    assert str(error.value).startswith(f"{images_uri}: image {bad} cannot be decoded (")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_a_head_trains_validates_and_saves_with_bf16_weights(
    tune_inputs, inputs, frozen_entry, tmp_path, precision
):
    """Low-precision weights take the fp32 embeddings in validation as in training, and the
    saved head folds its (bf16) standardisation in: no dtype error from torch."""
    out = tmp_path / "model"
    config = head_train(steps=4, val_every=2, precision=precision)
    result = train_model(tune_inputs["images"], str(out), config, frozen_entry, **inputs)
    assert result.best_value is not None and 0.0 <= result.best_value <= 1.0
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_a_global_batch_past_the_training_rows_under_ddp_is_one_line():
    """Two processes need a full slice each, or the features' all-gather waits forever
    on the rank that got fewer rows: refused before any step, naming the flag."""
    from types import SimpleNamespace

    from embedpipe.config import ConfigError, TrainSettings
    from embedpipe.train.distributed import World
    from embedpipe.train.loop import Loop

    task = SimpleNamespace(train_rows=np.arange(23))
    config = TrainSettings(batch_size=16, steps=1)
    expected = (
        r"batch_size: 16 per process x 2 processes is more than the 23 training rows; "
        r"lower --batch-size to 11 or fewer"
    )
    with pytest.raises(ConfigError, match=expected):
        Loop(task, config, "unused", World(0, 2, 0), torch.device("cpu"), None, {})
