"""Gradient caching: a contrastive batch larger than memory (``[train].micro_batch``).

As GradCache (Gao et al., 2021) and sentence-transformers' ``CachedMultipleNegativesRankingLoss``:

1. embed every micro-batch without a graph, remembering the random state before each;
2. compute the loss on the whole contrastive batch from those features, and its gradient
   with respect to the features (the losses gather features across ranks here, once);
3. run each micro-batch again with a graph, under the random state of its first pass (so
   dropout draws the same masks), and back-propagate its slice of the feature gradient.

Only one micro-batch of activations is alive at a time, and the parameter gradients equal
those of one step on the whole batch. A task exposes the two halves of its loss:
``features_of(forward, batch)`` returns a tuple whose per-sample entries are tensors with a
batch dimension and whose shared entries (logit scale, bias) are 0-d tensors or None;
``loss_from(features, batch)`` computes the loss from such a tuple.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn


class CachedTask(Protocol):
    def features_of(self, forward: nn.Module, batch: dict) -> tuple: ...

    def loss_from(self, features: tuple, batch: dict) -> torch.Tensor: ...


class RandomState:
    """The CPU random state and that of the batch's GPU at one moment, to run code under
    them again later without disturbing the current ones (GradCache's ``RandContext``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device else None

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        devices = [self.device] if self.device else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _device_of(batch: dict) -> torch.device:
    tensors = (v for v in batch.values() if isinstance(v, torch.Tensor))
    return next((t.device for t in tensors if t.device.type == "cuda"), torch.device("cpu"))


def split_batch(batch: dict, size: int) -> list[dict]:
    """``batch`` in pieces of ``size`` rows: every tensor with one row per sample is sliced,
    everything else (None, a bandit arm) is shared by the pieces."""
    rows = len(batch["rows"])
    pieces = []
    for start in range(0, rows, size):
        pieces.append(
            {
                key: value[start : start + size] if _per_sample(value, rows) else value
                for key, value in batch.items()
            }
        )
    return pieces


def _per_sample(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows


def _joined(pieces: list) -> torch.Tensor | None:
    """One leaf the loss differentiates: per-sample pieces concatenated, a shared value
    (the same in every piece) taken once."""
    first = pieces[0]
    if first is None:
        return None
    value = torch.cat(pieces) if first.ndim >= 1 else first
    return value.detach().requires_grad_(value.is_floating_point())


def cached_backward(
    task: CachedTask,
    forward: nn.Module,
    batch: dict,
    micro_batch: int,
    autocast: Callable[[], Any],
    synchronise: bool = True,
    divide: float = 1.0,
) -> torch.Tensor:
    """Accumulate into the parameters' ``.grad`` the gradient of ``loss / divide`` over the
    whole ``batch``, holding one micro-batch of activations at a time; returns the loss.

    Under DistributedDataParallel only the last re-run synchronises gradients, and only when
    ``synchronise`` (the last accumulation step)."""
    pieces = split_batch(batch, micro_batch)
    device = _device_of(batch)
    states, outputs = [], []
    with torch.no_grad():
        for piece in pieces:
            states.append(RandomState(device))
            with autocast():
                outputs.append(task.features_of(forward, piece))
    leaves = tuple(_joined(list(column)) for column in zip(*outputs, strict=True))
    with autocast():
        loss = task.loss_from(leaves, batch)
    (loss / divide).backward()
    del outputs
    no_sync = getattr(forward, "no_sync", None)
    start = 0
    for index, (piece, state) in enumerate(zip(pieces, states, strict=True)):
        last = index == len(pieces) - 1
        rows = len(piece["rows"])
        quiet = no_sync is not None and not (last and synchronise)
        with no_sync() if quiet else contextlib.nullcontext():
            with state.replayed(), autocast():
                features = task.features_of(forward, piece)
            tensors, gradients = [], []
            for output, leaf in zip(features, leaves, strict=True):
                if output is None or leaf is None or leaf.grad is None:
                    continue
                if output.ndim >= 1:
                    gradient = leaf.grad[start : start + rows]
                elif last:  # a shared value: its whole gradient, once
                    gradient = leaf.grad
                else:
                    continue
                tensors.append(output)
                gradients.append(gradient.to(output.dtype))
            torch.autograd.backward(tensors, gradients)
        start += rows
    return loss.detach()
