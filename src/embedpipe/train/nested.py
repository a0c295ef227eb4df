"""Nested (Matryoshka) embeddings: ``[train].nested_dims``.

As Matryoshka Representation Learning (Kusupati et al., 2022) and sentence-transformers'
``MatryoshkaLoss``: the loss is the sum, with equal weights, of the wrapped loss on each
prefix of the embedding (renormalised) and on the whole embedding, so the first N
dimensions alone are an embedding too. Each prefix goes through the wrapped loss as any
features do, so gathering across ranks and gradient caching work unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from embedpipe.config import ConfigError


def prefix(features: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """The first ``dim`` dimensions of each row, renormalised."""
    return None if features is None else F.normalize(features[..., :dim], dim=-1)


class NestedLoss(nn.Module):
    """``loss`` summed over the prefixes ``dims`` and the whole embedding."""

    def __init__(self, loss: nn.Module, dims: tuple[int, ...]):
        super().__init__()
        self.loss = loss
        self.dims = tuple(sorted(set(dims)))

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale=None,
        logit_bias=None,
        labels=None,
        negative_features=None,
    ) -> torch.Tensor:
        full = image_features.shape[-1]
        total = self.loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            labels=labels,
            negative_features=negative_features,
        )
        for dim in self.dims:
            if dim >= full:
                continue
            total = total + self.loss(
                prefix(image_features, dim),
                prefix(text_features, dim),
                logit_scale,
                logit_bias,
                labels=labels,
                negative_features=prefix(negative_features, dim),
            )
        return total


def nested_loss(loss: nn.Module, dims: tuple[int, ...], full: int) -> nn.Module:
    """``loss`` itself when ``dims`` is empty; else the nested loss, once every dimension is
    known to fit the embedding of ``full`` dimensions."""
    if not dims:
        return loss
    too_large = [dim for dim in dims if dim > full]
    if too_large:
        raise ConfigError(
            f"nested_dims: {too_large[0]} is larger than the embedding dimension {full}"
        )
    return NestedLoss(loss, dims)


OVERALL_RECALL = re.compile(r"^val_(text_)?recall_at_\d+$")


def prefix_recalls(
    recall: Callable[[torch.Tensor], dict[str, float]], vectors: torch.Tensor, dims
) -> dict[str, float]:
    """The overall validation recall of each prefix shorter than ``vectors``, under
    Katib-safe names: ``val_recall_at_1_dim32``."""
    metrics: dict[str, float] = {}
    for dim in dims:
        if dim < vectors.shape[1]:
            found = recall(prefix(vectors, dim))
            metrics |= {f"{k}_dim{dim}": v for k, v in found.items() if OVERALL_RECALL.match(k)}
    return metrics
