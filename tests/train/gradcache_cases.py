"""A small two-view encoder with dropout and a task around it, for the gradient-caching
tests in one process and in two gloo processes (gradcache_dist_worker.py).

The task has the shape of the real ones (``features_of`` / ``loss_from`` over a batch
dict with ``rows``) and uses the real losses of ``embedpipe.train.losses``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from embedpipe.train import losses
from embedpipe.train.gradcache import cached_backward
from embedpipe.train.nested import NestedLoss

LOSSES = ["infonce", "pairwise_sigmoid", "pairwise_sigmoid_upwtdpos", "multipos_sigmoid", "triplet"]
IN_DIM, DIM = 8, 6


class Encoder(nn.Module):
    def __init__(self, dropout: float, with_bias: bool):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(IN_DIM, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, DIM)
        )
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0)) if with_bias else None

    def forward(self, first, second, third):
        views = [first, second] if third is None else [first, second, third]
        out = F.normalize(self.layers(torch.cat(views)), dim=-1).split(len(first))
        negative = out[2] if third is not None else None
        return out[0], out[1], negative, self.logit_scale.exp(), self.logit_bias


class Task:
    def __init__(self, loss: str, rank: int = 0, world_size: int = 1, nested=()):
        options = {"rank": rank, "world_size": world_size}
        if loss in ("pairwise_sigmoid_upwtdpos", "multipos_sigmoid"):
            options["pos_weight"] = 2.0
        self.loss = losses.get_loss(loss, **options)
        if nested:
            self.loss = NestedLoss(self.loss, nested)

    def features_of(self, forward, batch):
        return forward(batch["first"], batch["second"], batch["third"])

    def loss_from(self, features, batch):
        first, second, negative, scale, bias = features
        return self.loss(
            first, second, scale, bias, labels=batch["labels"], negative_features=negative
        )


def make_model(loss: str, dropout: float) -> Encoder:
    torch.manual_seed(0)
    model = Encoder(dropout, losses.init_logit_bias(loss) is not None).double()
    # triplet ignores the scale; a parameter without a gradient would stall DDP's reducer.
    model.logit_scale.requires_grad_(losses.init_logit_scale(loss) is not None)
    return model


def make_batch(loss: str, rows: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(rows, IN_DIM, generator=generator, dtype=torch.float64)
    second = first + 0.5 * torch.randn(rows, IN_DIM, generator=generator, dtype=torch.float64)
    third = torch.randn(rows, IN_DIM, generator=generator, dtype=torch.float64)
    return {
        "rows": torch.arange(rows),
        "first": first,
        "second": second,
        "third": third if loss == "triplet" else None,
        "labels": torch.arange(rows) % max(2, rows // 3),  # several positives per label
    }


def rank_part(batch: dict, rank: int, world_size: int) -> dict:
    size = len(batch["rows"]) // world_size
    return {
        key: value[rank * size : (rank + 1) * size] if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def no_autocast():
    return contextlib.nullcontext()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }


def uncached_gradients(model, task, batch, pieces: int = 1) -> dict[str, torch.Tensor]:
    """One plain step on the whole batch: the model run in ``pieces`` consecutive parts with
    their graphs kept (with pieces=1, one forward), the loss once on all features; the
    gradients averaged over ranks as DistributedDataParallel does."""
    model.zero_grad(set_to_none=True)
    size = -(-len(batch["rows"]) // pieces)
    parts = [
        task.features_of(model, {k: _cut(v, start, size, batch) for k, v in batch.items()})
        for start in range(0, len(batch["rows"]), size)
    ]
    features = tuple(
        None if column[0] is None else torch.cat(column) if column[0].ndim else column[0]
        for column in zip(*parts, strict=True)
    )
    task.loss_from(features, batch).backward()
    if dist.is_initialized():
        for parameter in model.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
    return gradients(model)


def _cut(value, start, size, batch):
    rows = len(batch["rows"])
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
        return value[start : start + size]
    return value


def cached_gradients(forward, model, task, batch, micro_batch: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cached_backward(task, forward, batch, micro_batch, no_autocast)
    return gradients(model)


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys(), (sorted(first), sorted(second))
    return max(float((first[k] - second[k]).abs().max()) for k in first)
