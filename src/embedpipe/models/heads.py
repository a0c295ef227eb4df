"""Projection heads on a frozen backbone, and the model that runs backbone then head.

A head checkpoint is a directory whose ``config.json`` says ``"kind": "head"`` and
names the backbone: its registry entry, its weights and whether the embeddings the
head learnt from were normalised. ``load_model`` builds both from it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KIND = "head"


class ProjectionHead(nn.Module):
    """``depth`` linear layers with GELU between them: in_dim -> width ... -> out_dim."""

    def __init__(self, in_dim: int, depth: int, width: int, out_dim: int):
        super().__init__()
        sizes = [in_dim, *([width] * (depth - 1)), out_dim]
        layers: list[nn.Module] = []
        for index, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(size_in, size_out))
        self.layers = nn.Sequential(*layers)
        self.config = {"in_dim": in_dim, "depth": depth, "width": width, "out_dim": out_dim}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class HeadOnBackbone(nn.Module):
    """Backbone features (normalised if the head learnt from normalised ones), then the head."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead, normalize_input: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize_input = normalize_input

    def project(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if self.normalize_input:
            features = F.normalize(features, dim=-1)
        return self.head(features)
