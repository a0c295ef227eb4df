# ruff: noqa: F811 (the fixtures imported from test_train are parameters here)
"""[train].micro_batch and [train].nested_dims through the real training loop: a cached
run trains the weights of a plain run, resumes mid-epoch, and a nested head records its
prefixes in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import head_train, killed_after_a_checkpoint
from safetensors.torch import load_file
from test_train import backbone_entry, demo_embeddings, demo_splits  # noqa: F401

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.train import checkpoint as ckpt
from embedpipe.train.stage import train_model


def weights_of(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def losses_of(folder) -> list[float]:
    history = json.loads((folder / ".embedpipe" / "metrics.json").read_text())["history"]
    return [record["loss"] for record in history if "loss" in record]


@pytest.mark.parametrize("loss", ["infonce", "multipos_sigmoid", "triplet"])
def test_a_cached_head_run_trains_the_weights_of_a_plain_run(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path, loss
):
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    runs = {}
    for micro in (0, 5):
        config = head_train(loss=loss, steps=4, micro_batch=micro, val_every=0)
        out = tmp_path / f"micro{micro}"
        train_model(demo_images, str(out), config, backbone_entry, **inputs)
        runs[micro] = out
    np.testing.assert_allclose(losses_of(runs[5]), losses_of(runs[0]), rtol=1e-5)
    plain, cached = weights_of(runs[0]), weights_of(runs[5])
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)


def test_a_cached_run_resumes_mid_epoch_to_the_same_weights(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path, monkeypatch
):
    config = head_train(steps=6, checkpoint_every=3, micro_batch=4, val_every=0)
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    train_model(demo_images, str(tmp_path / "whole"), config, backbone_entry, **inputs)
    killed_after_a_checkpoint(
        monkeypatch,
        lambda: train_model(demo_images, str(tmp_path / "cut"), config, backbone_entry, **inputs),
    )
    ((step, _),) = ckpt.complete_checkpoints(str(tmp_path / "cut"), "last")
    assert step == 3
    resumed = train_model(demo_images, str(tmp_path / "cut"), config, backbone_entry, **inputs)
    assert resumed.resumed_from_step == 3
    whole, cut = weights_of(tmp_path / "whole"), weights_of(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_a_run_resumes_with_another_micro_batch_to_the_weights_of_the_whole_run(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path, monkeypatch
):
    """micro_batch trades memory for time only (gradient caching gives the gradients of
    the whole batch): a run cut at step 3 resumes on a smaller or larger memory budget."""
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    whole_config = head_train(steps=6, checkpoint_every=3, micro_batch=0, val_every=0)
    train_model(demo_images, str(tmp_path / "whole"), whole_config, backbone_entry, **inputs)
    killed_after_a_checkpoint(
        monkeypatch,
        lambda: train_model(
            demo_images, str(tmp_path / "cut"), whole_config, backbone_entry, **inputs
        ),
    )
    cached_config = head_train(steps=6, checkpoint_every=3, micro_batch=4, val_every=0)
    resumed = train_model(
        demo_images, str(tmp_path / "cut"), cached_config, backbone_entry, **inputs
    )
    assert resumed.resumed_from_step == 3
    whole, cut = weights_of(tmp_path / "whole"), weights_of(tmp_path / "cut")
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=1e-4, atol=1e-5)


def test_a_micro_batch_holding_the_whole_batch_runs_each_batch_through_the_model_once(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path, monkeypatch
):
    """Gradient caching pays a second forward pass; where one micro-batch holds the whole
    batch there is nothing to cache, and the step is the plain one."""
    from embedpipe.train.head import HeadTask

    passes = []
    features_of = HeadTask.features_of

    def counted(self, forward, batch):
        passes.append(len(batch["rows"]))
        return features_of(self, forward, batch)

    monkeypatch.setattr(HeadTask, "features_of", counted)
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    config = head_train(steps=3, batch_size=16, micro_batch=16, val_every=0)
    train_model(demo_images, str(tmp_path / "out"), config, backbone_entry, **inputs)
    assert passes == [16, 16, 16]


def test_a_cached_finetune_run_trains_the_weights_of_a_plain_run(
    demo_images, demo_splits, tiny_entry, tmp_path
):
    runs = {}
    for micro in (0, 3):
        config = TrainSettings(
            weights="random", steps=2, batch_size=6, micro_batch=micro, num_workers=0, lr=1e-4
        )
        out = tmp_path / f"micro{micro}"
        train_model(demo_images, str(out), config, tiny_entry, splits_uri=demo_splits)
        runs[micro] = out
    np.testing.assert_allclose(losses_of(runs[3]), losses_of(runs[0]), rtol=1e-5)
    plain, cached = weights_of(runs[0]), weights_of(runs[3])
    worst = max(float((cached[k].float() - plain[k].float()).abs().max()) for k in plain)
    assert worst < 1e-5


def test_a_nested_head_records_its_prefixes_and_refuses_too_large_ones(
    demo_images, demo_splits, demo_embeddings, backbone_entry, tmp_path
):
    inputs = dict(splits_uri=demo_splits, embeddings_uri=demo_embeddings)
    out = tmp_path / "nested"
    config = head_train(steps=2, nested_dims=(4, 8), val_every=2)
    train_model(demo_images, str(out), config, backbone_entry, **inputs)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["nested_dims"] == [4, 8]
    history = json.loads((out / ".embedpipe" / "metrics.json").read_text())["history"]
    last = history[-1]
    for name in ("val_recall_at_1_dim4", "val_recall_at_5_dim8", "val_recall_at_1"):
        assert 0 <= last[name] <= 1, name
    assert "val_recall_at_1_dim16" not in last  # the full dimension is val_recall_at_1
    with pytest.raises(
        ConfigError, match="nested_dims: 32 is larger than the embedding dimension 16"
    ):
        train_model(
            demo_images,
            str(tmp_path / "big"),
            head_train(steps=1, nested_dims=(8, 32)),
            backbone_entry,
            **inputs,
        )
