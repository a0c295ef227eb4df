"""Gradient caching ([train].micro_batch): one cached step gives the parameter gradients of
one plain step on the same samples, for every loss, in one and two gloo processes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from gradcache_cases import (
    LOSSES,
    Task,
    cached_gradients,
    make_batch,
    make_model,
    max_difference,
    uncached_gradients,
)

from embedpipe.train import gradcache
from embedpipe.train.gradcache import split_batch

WORKER = pathlib.Path(__file__).with_name("gradcache_dist_worker.py")
MICRO, PIECES = 4, 3
TOLERANCE = 1e-6


@pytest.mark.parametrize("loss", LOSSES)
def test_cached_step_equals_one_plain_step_on_the_whole_batch(loss):
    task, model = Task(loss), make_model(loss, dropout=0.0)
    batch = make_batch(loss, MICRO * PIECES)
    plain = uncached_gradients(model, task, batch)  # one forward on all 12 samples
    cached = cached_gradients(model, model, task, batch, MICRO)
    assert len(cached) >= 4  # the layers and the logit scale
    assert max_difference(plain, cached) < TOLERANCE


@pytest.mark.parametrize("loss", LOSSES)
def test_with_dropout_the_replayed_masks_keep_the_gradients_equal(loss, monkeypatch):
    task, model = Task(loss), make_model(loss, dropout=0.3)
    batch = make_batch(loss, MICRO * PIECES)
    torch.manual_seed(7)
    plain = uncached_gradients(model, task, batch, PIECES)  # same masks, graphs kept
    torch.manual_seed(7)
    cached = cached_gradients(model, model, task, batch, MICRO)
    assert max_difference(plain, cached) < TOLERANCE
    # Without restoring the random state, the re-run draws other masks: dropout is live.
    monkeypatch.setattr(gradcache.RandomState, "replayed", lambda self: _nothing())
    torch.manual_seed(7)
    unreplayed = cached_gradients(model, model, task, batch, MICRO)
    assert max_difference(plain, unreplayed) > 1e-3


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_nested_loss_is_cached_exactly_too():
    task, model = Task("infonce", nested=(2, 4)), make_model("infonce", dropout=0.0)
    batch = make_batch("infonce", MICRO * PIECES)
    plain = uncached_gradients(model, task, batch)
    assert max_difference(plain, cached_gradients(model, model, task, batch, MICRO)) < TOLERANCE


def test_uneven_micro_batches_and_a_micro_batch_over_the_batch():
    task, model = Task("pairwise_sigmoid"), make_model("pairwise_sigmoid", dropout=0.0)
    batch = make_batch("pairwise_sigmoid", 10)
    plain = uncached_gradients(model, task, batch)
    for micro in (3, 10, 64):
        assert max_difference(plain, cached_gradients(model, model, task, batch, micro)) < 1e-6


def test_split_batch_slices_per_sample_tensors_and_shares_the_rest():
    batch = {"rows": torch.arange(5), "x": torch.ones(5, 2), "third": None, "arm": 2}
    pieces = split_batch(batch, 2)
    assert [len(p["rows"]) for p in pieces] == [2, 2, 1]
    assert all(p["arm"] == 2 and p["third"] is None for p in pieces)
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])


def test_under_autocast_the_cached_step_matches_within_bf16_rounding():
    task, model = Task("infonce"), make_model("infonce", dropout=0.0).float()
    batch = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in make_batch("infonce", MICRO * PIECES).items()
    }

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    model.zero_grad(set_to_none=True)
    with autocast():
        loss = task.loss_from(task.features_of(model, batch), batch)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cached_loss = gradcache.cached_backward(task, model, batch, MICRO, autocast)
    assert abs(float(cached_loss) - float(loss.detach())) < 1e-2
    for name, parameter in model.named_parameters():
        scale = float(plain[name].abs().max())
        assert float((parameter.grad - plain[name]).abs().max()) <= 0.05 * scale + 1e-3, name


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gradcache_dist")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                "2",
                str(folder / "rendezvous"),
                str(folder / f"rank{rank}.pt"),
            ],
            env=environment,
            cwd=WORKER.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("loss", LOSSES)
def test_two_processes_cached_step_equals_plain_step(two_ranks, loss, dropout):
    for results in two_ranks:
        case = results[f"{loss}/{dropout}"]
        assert max_difference(case["plain"], case["cached"]) < TOLERANCE
    # DistributedDataParallel left both ranks with the same (averaged) gradients.
    assert (
        max_difference(
            two_ranks[0][f"{loss}/{dropout}"]["cached"], two_ranks[1][f"{loss}/{dropout}"]["cached"]
        )
        < 1e-12
    )


class _Synced(torch.nn.Module):
    """A stand-in for DistributedDataParallel's ``no_sync``: records, for each forward that
    builds a graph, whether gradients would be synchronised after it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.quiet, self.synced = module, False, []

    def forward(self, *args):
        if torch.is_grad_enabled():
            self.synced.append(not self.quiet)
        return self.module(*args)

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def quiet():
            self.quiet = True
            try:
                yield
            finally:
                self.quiet = False

        return quiet()


def test_accumulated_cached_steps_sync_once_and_average_the_batches():
    """accumulation 2 of cached steps: one synchronisation, on the last re-run of the last
    step, and the gradients of the two batches' mean loss."""
    task, model = Task("infonce"), make_model("infonce", dropout=0.0)
    batches = [make_batch("infonce", MICRO * PIECES, seed) for seed in (1, 2)]
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (task.loss_from(task.features_of(model, batch), batch) / 2).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    wrapped = _Synced(model)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        gradcache.cached_backward(task, wrapped, batch, MICRO, _nothing, synchronise=last, divide=2)
    assert wrapped.synced == [False] * (2 * PIECES - 1) + [True]
    cached = {name: p.grad for name, p in model.named_parameters()}
    assert max_difference(plain, cached) < TOLERANCE
