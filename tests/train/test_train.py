"""The train stage: settings checked before a model is built, checkpoints that resume
mid-epoch to the same weights, trained models that load through the registry."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import head_train, killed_after_a_checkpoint, lock_held_elsewhere
from safetensors.torch import load_file

from embedpipe.cli import main
from embedpipe.config import ConfigError, SplitSettings, TrainSettings, load_settings
from embedpipe.core import datasets
from embedpipe.models.registry import ModelEntry
from embedpipe.train import checkpoint as ckpt
from embedpipe.train.loop import metric_line
from embedpipe.train.stage import train_model


@pytest.fixture(scope="session")
def demo_splits(demo_catalog, tmp_path_factory) -> str:
    from embedpipe.data.split import create_concept_splits

    out = tmp_path_factory.mktemp("train-splits") / "splits"
    create_concept_splits(demo_catalog, str(out), SplitSettings())
    return str(out)


def write_embeddings(uri: str, ids: list[str], matrix: np.ndarray, model: str = "") -> str:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    table = pa.table({"image_id": ids, "embedding": vectors})
    datasets.write_table(uri, table, "embeddings")
    if model:  # as embed records it
        manifest = datasets.read_manifest(uri)
        manifest.update(model=model, weights="random", normalized=True)
        from embedpipe.core import storage

        storage.write_json(datasets.side_path(uri, datasets.MANIFEST_NAME), manifest)
    return uri


@pytest.fixture(scope="session")
def demo_embeddings(demo_images, tmp_path_factory) -> str:
    ids = list(
        dict.fromkeys(
            datasets.read_table(demo_images, "images", ["image_id"]).column(0).to_pylist()
        )
    )
    matrix = np.random.default_rng(0).normal(size=(len(ids), 32)).astype(np.float32)
    return write_embeddings(str(tmp_path_factory.mktemp("train-emb") / "emb"), ids, matrix)


@pytest.fixture(scope="session")
def backbone_entry() -> ModelEntry:
    """A stand-in backbone for heads whose embeddings the test writes itself."""
    return ModelEntry(
        name="frozen", library="transformers", architecture="Frozen", embed_dim=32, image_size=32
    )


def test_bad_combinations_are_errors_naming_the_setting():
    with pytest.raises(ValueError, match="loss: triplet"):
        TrainSettings(loss="triplet")  # image-text fine-tuning
    TrainSettings(loss="triplet", mode="head", pairs="image_image")
    with pytest.raises(ValueError, match="loss"):
        TrainSettings(loss="hinge")
    with pytest.raises(ValueError, match="mode"):
        TrainSettings(mode="lora")
    with pytest.raises(ValueError, match="lock_image_unlocked_groups: needs lock_image"):
        TrainSettings(lock_image_unlocked_groups=2)
    with pytest.raises(ValueError, match="templates"):
        TrainSettings(templates=("a photo of {thing}",))
    with pytest.raises(ValueError, match="labels"):
        TrainSettings(labels="tribe")


def test_the_config_file_has_a_train_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nloss = "multipos_sigmoid"\npos_weight = 2.0\nlabels = "genus"\n')
    config = load_settings(str(path)).train
    assert (config.loss, config.pos_weight, config.labels) == ("multipos_sigmoid", 2.0, "genus")
    path.write_text('[train]\nmode = "head"\nloss = "triplet"\nmargin = "0.3"\n')
    with pytest.raises(ConfigError, match=r"\[train\].margin"):
        load_settings(str(path))


def test_metric_lines_are_katib_safe():
    line = metric_line({"step": 3, "loss": 0.5, "val_recall_at_1": 0.25, "band": "hard"})
    assert line == "step=3 loss=0.5 val_recall_at_1=0.25"
    assert not any(c in line for c in "/.@" if c != ".") and "@" not in line


def test_checks_before_any_model_is_built(demo_images, demo_splits, tiny_entry, tmp_path):
    text_free = tiny_entry.model_copy(update={"text": False, "name": "tiny-image"})
    with pytest.raises(ConfigError, match="model: tiny-image has no text tower"):
        train_model(demo_images, str(tmp_path / "a"), TrainSettings(weights="random"), text_free)
    empty = tmp_path / "sel"
    ids = datasets.read_table(demo_splits, columns=["image_id"]).column(0).to_pylist()[:3]
    import pyarrow as pa

    datasets.write_table(str(empty), pa.table({"image_id": ids, "split": ["val"] * 3}), "selection")
    with pytest.raises(ConfigError, match="training split is empty"):
        train_model(
            demo_images,
            str(tmp_path / "b"),
            TrainSettings(weights="random"),
            tiny_entry,
            splits_uri=str(empty),
        )
    with pytest.raises(ConfigError, match="labels: genus labels come from a taxonomy index"):
        train_model(
            demo_images,
            str(tmp_path / "c"),
            TrainSettings(weights="random", loss="multipos_sigmoid", labels="genus"),
            tiny_entry,
        )
    with pytest.raises(ConfigError, match="mode: head trains on frozen embeddings"):
        train_model(
            demo_images,
            str(tmp_path / "d"),
            TrainSettings(mode="head", pairs="image_image"),
            tiny_entry,
        )


def test_a_checkpoint_of_another_architecture_is_refused(tiny_entry, tmp_path):
    from embedpipe.models.loading import load_model, save_model

    save_model(load_model(tiny_entry, "random"), str(tmp_path / "ckpt"))
    other = tiny_entry.model_copy(update={"architecture": "ViT-S-32-alt", "name": "small"})
    with pytest.raises(ConfigError, match=r"weights: .* checkpoint of embedpipe-tiny"):
        train_model(
            "unused", str(tmp_path / "o"), TrainSettings(weights=str(tmp_path / "ckpt")), other
        )


def _head_settings(**changes) -> TrainSettings:
    resumable = dict(steps=9, checkpoint_every=4, val_every=3, warmup_steps=2)
    return head_train(**{**resumable, **changes})


class Crash(Exception):
    pass


def test_a_killed_run_resumes_mid_epoch_to_the_same_weights(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path, monkeypatch
):
    config = _head_settings()
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    whole = train_model(demo_images, str(tmp_path / "whole"), config, backbone_entry, **inputs)
    assert whole.steps == 9

    cut = str(tmp_path / "cut")  # dies right after the step-4 checkpoint
    killed_after_a_checkpoint(
        monkeypatch, lambda: train_model(demo_images, cut, config, backbone_entry, **inputs), Crash
    )
    ((step, folder),) = ckpt.complete_checkpoints(str(tmp_path / "cut"), "last")
    state = torch.load(f"{folder}/training_state.pt", weights_only=True)
    per_epoch = 326 // 16  # training rows of the demo split // batch
    assert step == 4 and state["position"] == 4 and state["position"] < per_epoch  # mid-epoch

    resumed = train_model(demo_images, str(tmp_path / "cut"), config, backbone_entry, **inputs)
    assert resumed.resumed_from_step == 4 and resumed.steps == 9
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = json.loads((tmp_path / "cut" / ".embedpipe" / "metrics.json").read_text())
    whole_history = json.loads((tmp_path / "whole" / ".embedpipe" / "metrics.json").read_text())
    assert [r["loss"] for r in history["history"] if "loss" in r] == pytest.approx(
        [r["loss"] for r in whole_history["history"] if "loss" in r], abs=0
    )


def test_resuming_with_other_settings_is_refused(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path
):
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    train_model(demo_images, str(tmp_path / "o"), _head_settings(steps=4), backbone_entry, **inputs)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_model(
            demo_images,
            str(tmp_path / "o"),
            _head_settings(steps=4, lr=0.5),
            backbone_entry,
            **inputs,
        )


def head_run(images, splits, embeddings, out) -> list[str]:
    return [
        "train", images, "--splits", splits, "--embeddings", embeddings, "--mode", "head",
        "--pairs", "image_image", "--model", "clip_vitb32", "--loss", "multipos_sigmoid",
        "--steps", "3", "--batch-size", "16", "--depth", "1", "--out-dim", "16",
        "--num-workers", "0", "--val-every", "0", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_a_second_training_of_the_same_output_is_refused_naming_the_lock(
    demo_images, demo_splits, demo_embeddings, tmp_path, capsys
):
    out = tmp_path / "model"
    run = head_run(demo_images, demo_splits, demo_embeddings, out)
    assert main(run) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with lock_held_elsewhere(out) as (pid, lock_path):
        capsys.readouterr()
        assert main(run) == 1
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and f"pid {pid}" in error and str(lock_path) in error
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != lock_path}
        assert after == before  # the first run's model and checkpoints are untouched
    assert main(run) == 0  # its holder is gone: the stale lock is taken over
    assert not lock_path.exists()


def test_a_second_multi_process_training_is_refused_before_torchrun_starts(
    demo_images, demo_splits, demo_embeddings, tmp_path, capsys
):
    out = tmp_path / "model"
    run = [*head_run(demo_images, demo_splits, demo_embeddings, out), "--nproc-per-node", "2"]
    with lock_held_elsewhere(out) as (pid, _):
        assert main(run) == 1
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and f"pid {pid}" in error and "torchrun" not in error
        assert [p.name for p in out.rglob("*")] == [".embedpipe", "lock"]


def test_a_run_that_lost_its_lock_publishes_no_further_checkpoint(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path
):
    from embedpipe.core.locks import OutputLockedError

    out = tmp_path / "model"
    lock_path = out / ".embedpipe" / "lock"

    def taken_over(step, metrics):  # as if another run took the lock after a missed lease
        record = json.loads(lock_path.read_text())
        lock_path.write_text(json.dumps({**record, "token": "another run"}))

    config = _head_settings(steps=9, val_every=3, checkpoint_every=4)
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    with pytest.raises(OutputLockedError, match="lost its lock"):
        train_model(
            demo_images, str(out), config, backbone_entry, **inputs, on_validation=taken_over
        )
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
    assert json.loads(lock_path.read_text())["token"] == "another run"  # left to its holder


def test_a_multi_process_run_that_lost_its_lock_stops_its_workers(
    demo_images, demo_splits, demo_embeddings, tmp_path, capsys, monkeypatch
):
    import threading
    import time

    from embedpipe.core import locks
    from embedpipe.train import launch

    monkeypatch.setattr(locks, "LEASE_SECONDS", 2.5)  # refreshed, and checked, every 0.5 s
    monkeypatch.setattr(launch, "LOCK_CHECK_SECONDS", 0.2)
    out = tmp_path / "model"
    lock_path = out / ".embedpipe" / "lock"
    run = [*head_run(demo_images, demo_splits, demo_embeddings, out), "--nproc-per-node", "2"]
    run[run.index("--steps") + 1] = "1000000"  # runs until stopped

    def take_over_once_training() -> None:  # as another run would after a missed lease
        deadline = time.monotonic() + 240
        while not (out / "checkpoints").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        record = json.loads(lock_path.read_text())
        lock_path.write_text(json.dumps({**record, "token": "another run"}))

    thief = threading.Thread(target=take_over_once_training)
    thief.start()
    started = time.monotonic()
    assert main([*run, "--checkpoint-every", "20"]) == 1
    thief.join()
    assert "lost its lock" in capsys.readouterr().err
    assert time.monotonic() - started < 200
    assert json.loads(lock_path.read_text())["token"] == "another run"


def test_an_output_inside_an_input_is_refused(demo_images, demo_splits, demo_embeddings, capsys):
    out = f"{demo_embeddings}/model"
    assert main(head_run(demo_images, demo_splits, demo_embeddings, out)) == 1
    error = capsys.readouterr().err
    assert f"lies inside the input {demo_embeddings}" in error
    assert not datasets.storage.exists(out)


def test_triplet_head_bandit_logs_pulls_per_band(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path
):
    from embedpipe.config import MineSettings
    from embedpipe.mining.mine import mine_category
    from embedpipe.mining.partition import partition_by_category

    parts = partition_by_category(demo_splits, demo_embeddings, str(tmp_path / "parts"))
    category = sorted(parts)[0]
    negatives = str(tmp_path / "neg")
    mine_category(parts[category], negatives, MineSettings(gpu=False, top_k=5))
    config = _head_settings(loss="triplet", steps=12, exploration=0.5, hard_negative_share=0.5)
    result = train_model(
        demo_images,
        str(tmp_path / "t"),
        config,
        backbone_entry,
        splits_uri=demo_splits,
        embeddings_uri=demo_embeddings,
        negatives_uri=negatives,
    )
    metrics = json.loads((tmp_path / "t" / ".embedpipe" / "metrics.json").read_text())
    bandit = metrics["bandit"]
    assert set(bandit) == {"easy", "medium", "hard"}
    assert sum(band["pulls"] for band in bandit.values()) == 12
    assert all(band["pulls"] >= 1 for band in bandit.values())  # UCB tries every arm
    assert result.steps == 12
    assert all("band" in r for r in metrics["history"] if "loss" in r)


def test_a_finetuned_sigmoid_checkpoint_embeds_without_model(
    demo_images, demo_splits, tiny_entry, tmp_path
):
    """`embed --weights CKPT`: the entry comes from the checkpoint; the logit bias a sigmoid
    loss added loads strictly."""
    from embedpipe.models.loading import load_model
    from embedpipe.models.registry import ModelEntry

    config = TrainSettings(
        weights="random",
        loss="pairwise_sigmoid",
        steps=2,
        batch_size=8,
        num_workers=0,
        val_every=0,
    )
    out = tmp_path / "ft"
    train_model(demo_images, str(out), config, tiny_entry, splits_uri=demo_splits)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["loss"] == "pairwise_sigmoid" and saved["kind"] == "finetune"
    assert "logit_bias" in load_file(out / "model.safetensors")
    state = torch.load(
        out / "checkpoints" / "last-00000002" / "training_state.pt", weights_only=True
    )
    assert state["step"] == 2 and "optimizer" in state

    emb = tmp_path / "emb"
    argv = [
        "embed",
        demo_images,
        "--weights",
        str(out),
        "--out",
        str(emb),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ]
    assert main(argv) == 0
    table = datasets.read_table(str(emb), "embeddings")
    assert table.schema.field("embedding").type.list_size == 64
    model = load_model(ModelEntry.model_validate(saved["entry"]), str(out))
    assert float(model.module.logit_bias) == pytest.approx(
        float(load_file(out / "model.safetensors")["logit_bias"])
    )


@pytest.mark.parametrize("backbone", ["saved", "random seed 3"])
def test_a_head_checkpoint_embeds_backbone_then_head(demo_images, tiny_entry, tmp_path, backbone):
    """Embedding through the head checkpoint gives the head applied to the embeddings it was
    trained on: its backbone is rebuilt with the same weights (a random one, the same seed)."""
    from embedpipe.config import EmbedSettings
    from embedpipe.embed.images import embed_images
    from embedpipe.models.loading import load_model, save_model

    if backbone == "saved":
        save_model(load_model(tiny_entry, "random"), str(tmp_path / "backbone"))
        settings = EmbedSettings(weights=str(tmp_path / "backbone"), num_workers=0, device="cpu")
    else:
        settings = EmbedSettings(weights="random", seed=3, num_workers=0, device="cpu")
    embed_images(demo_images, str(tmp_path / "emb"), settings, tiny_entry)
    config = _head_settings(steps=3, val_every=0, checkpoint_every=0)
    train_model(
        demo_images,
        str(tmp_path / "head"),
        config,
        tiny_entry,
        embeddings_uri=str(tmp_path / "emb"),
    )
    argv = [
        "embed",
        demo_images,
        "--weights",
        str(tmp_path / "head"),
        "--out",
        str(tmp_path / "headed"),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-normalize",
    ]
    assert main(argv) == 0
    headed = datasets.read_table(str(tmp_path / "headed"), "embeddings")
    assert headed.schema.field("embedding").type.list_size == 16
    from embedpipe.models.heads import ProjectionHead

    head = ProjectionHead(64, 2, 32, 16)
    head.load_state_dict(load_file(tmp_path / "head" / "model.safetensors"))
    frozen = datasets.read_table(str(tmp_path / "emb"), "embeddings")
    vectors = np.stack(frozen.column("embedding").to_numpy(zero_copy_only=False))
    with torch.no_grad():
        expected = head(torch.from_numpy(vectors.astype(np.float32))).numpy()
    got = np.stack(headed.column("embedding").to_numpy(zero_copy_only=False))
    assert headed.column("image_id").to_pylist() == frozen.column("image_id").to_pylist()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    saved = json.loads((tmp_path / "head" / "config.json").read_text())["backbone"]
    assert (saved["weights"], saved["seed"]) == (
        ("random", 3) if backbone != "saved" else (str(tmp_path / "backbone"), 0)
    )


def test_two_gloo_processes_follow_the_loss_curve_of_one(
    demo_images, demo_splits, demo_embeddings, tmp_path
):
    """`--nproc-per-node 2` trains under torchrun (gloo on CPU), each rank half of
    every global batch; the losses gather features, so the curve is the one process's."""
    import subprocess
    import sys

    common = [
        "train", demo_images, "--splits", demo_splits, "--embeddings", demo_embeddings,
        "--mode", "head", "--pairs", "image_image", "--model", "clip_vitb32",
        "--loss", "multipos_sigmoid", "--steps", "5", "--lr", "1e-2", "--depth", "2",
        "--width", "32", "--out-dim", "16", "--num-workers", "0", "--val-every", "0",
        "--device", "cpu",
    ]  # fmt: skip
    one = [*common, "--batch-size", "16", "--nproc-per-node", "1", "--out", str(tmp_path / "1")]
    two = [*common, "--batch-size", "8", "--nproc-per-node", "2", "--out", str(tmp_path / "2")]
    assert main(one) == 0
    done = subprocess.run(
        [sys.executable, "-m", "embedpipe", *two], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count('"steps": 5') == 1  # rank 0's result, printed by the launcher
    assert "trained clip_vitb32: 5 steps" in done.stderr  # the workers log at INFO

    def curve(folder):
        metrics = json.loads((tmp_path / folder / ".embedpipe" / "metrics.json").read_text())
        return [r["loss"] for r in metrics["history"] if "loss" in r]

    assert len(curve("2")) == 5
    assert curve("2") == pytest.approx(curve("1"), abs=1e-4)
    a = load_file(tmp_path / "1" / "model.safetensors")
    b = load_file(tmp_path / "2" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


def test_the_train_component_trains_in_two_processes_the_same_way(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path
):
    """The component takes the command line's torchrun route: the same workers, the lock
    held by the launching process, the model and its metrics at the step's output."""
    import types

    from embedpipe.components.train import train

    logged = {}
    metrics = types.SimpleNamespace(log_metric=logged.__setitem__)

    def artifact(path):
        return types.SimpleNamespace(path=str(path), uri=str(path), metadata={})

    out = tmp_path / "model"
    train(
        images=artifact(demo_images), splits=artifact(demo_splits), negatives=artifact(""),
        embeddings=artifact(demo_embeddings),
        settings=head_train(nproc_per_node=2, val_every=0).model_dump(mode="json"),
        overrides={}, model_entry=backbone_entry.model_dump_json(), models="{}",
        model=artifact(out),
        metrics=metrics, report=artifact(tmp_path / "report.html"),
    )  # fmt: skip
    assert logged["steps"] == 6
    assert (out / "model.safetensors").exists() and not (out / ".embedpipe" / "lock").exists()
