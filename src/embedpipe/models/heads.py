"""Projection heads on a frozen backbone, their checkpoints, and the model that runs
backbone then head.

A head checkpoint is a directory with ``model.safetensors`` (the MLP's state dict) and
``config.json``::

    {"kind": "head",
     "backbone": {"entry": {registry entry}, "weights": "...", "seed": 0,
                  "normalized": true},
     "head": {"in_dim": 512, "depth": 2, "width": 512, "out_dim": 128,
              "activation": "gelu", "normalize": false},
     ...resolved training settings...}

``backbone`` names the model whose embeddings the head learnt from, its weights (with
the seed of a ``random`` initialisation) and whether those embeddings were normalised;
``load_model`` builds both from it. The published transformers model
(``embedpipe.publish.modeling_embedpipe_head``) builds the same layers.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from embedpipe.core import storage
from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME
from embedpipe.models.registry import ModelEntry, ModelError
from embedpipe.models.weights_files import damaged_weights_named

HEAD_KIND = "head"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def head_layers(
    in_dim: int, depth: int, width: int, out_dim: int, activation: str = "gelu"
) -> nn.Sequential:
    """``depth`` linear layers, in_dim -> width (x depth-1, each followed by the
    activation) -> out_dim; depth 1 is a single linear projection."""
    if depth < 1:
        raise ModelError(f"head depth must be at least 1, got {depth}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"head activation '{activation}': known {', '.join(ACTIVATIONS)}")
    sizes = [in_dim, *([width or in_dim] * (depth - 1)), out_dim or in_dim]
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        depth: int = 1,
        width: int = 0,
        out_dim: int = 0,
        activation: str = "gelu",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.layers = head_layers(in_dim, depth, width, out_dim, activation)
        self.normalize = normalize
        self.config = {
            "in_dim": in_dim,
            "depth": depth,
            "width": width or in_dim,
            "out_dim": out_dim or in_dim,
            "activation": activation,
            "normalize": normalize,
        }

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.layers(features)
        return F.normalize(projected, dim=-1) if self.normalize else projected


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


def is_head_config(config: dict[str, Any]) -> bool:
    return config.get("kind") == HEAD_KIND


def backbone_of(config: dict[str, Any]) -> dict[str, Any]:
    """``{"entry", "weights", "seed", "normalized"}`` of a head checkpoint's config."""
    backbone = config.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("entry"), dict):
        raise ModelError("a head checkpoint's config.json must name its backbone's entry")
    return {"weights": "", "seed": 0, "normalized": True, **backbone}


def backbone_record(
    entry: ModelEntry, weights: str = "", seed: int = 0, normalized: bool = True
) -> dict[str, Any]:
    """What a head's config.json says of the backbone whose embeddings it projects."""
    return {
        "entry": entry.model_dump(mode="json"),
        "weights": weights,
        "seed": seed,
        "normalized": normalized,
    }


def save_head_checkpoint(
    head: ProjectionHead,
    backbone: ModelEntry,
    out_uri: str,
    extra: dict[str, Any] | None = None,
    *,
    weights: str = "",
    seed: int = 0,
    normalized: bool = True,
) -> str:
    """Write a head checkpoint at ``out_uri`` (local or s3://); config.json comes last.
    ``extra`` (e.g. the resolved training settings) is stored in config.json beside it."""
    out_uri = storage.normalize(out_uri)
    config = {
        **(extra or {}),
        "kind": HEAD_KIND,
        "backbone": backbone_record(backbone, weights, seed, normalized),
        "head": head.config,
    }
    with tempfile.TemporaryDirectory(prefix="embedpipe-head-") as staging:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, os.path.join(staging, WEIGHTS_NAME))
        Path(staging, CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with storage.atomic_output(storage.join(out_uri, name)) as target:
                shutil.copyfile(os.path.join(staging, name), target)
    return out_uri


def trained_nested_dims(config: dict[str, Any]) -> tuple[int, ...]:
    """The ``[train].nested_dims`` a checkpoint's ``config.json`` records; empty if none."""
    train = config.get("train")
    dims = train.get("nested_dims") if isinstance(train, dict) else None
    return tuple(int(dim) for dim in dims or ())


def load_head_checkpoint(directory: str) -> tuple[ProjectionHead, ModelEntry, dict[str, Any]]:
    """The head, its backbone's entry and the whole config.json of a local checkpoint dir."""
    config_path, weights_path = Path(directory, CONFIG_NAME), Path(directory, WEIGHTS_NAME)
    if not (config_path.is_file() and weights_path.is_file()):
        raise ModelError(f"{directory}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads(config_path.read_text())
    if not is_head_config(config):
        raise ModelError(f"{config_path}: not a head checkpoint (kind is not '{HEAD_KIND}')")
    try:
        entry = ModelEntry(**backbone_of(config)["entry"])
        head = ProjectionHead(**config["head"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{config_path}: invalid head checkpoint config: {error}") from None
    with damaged_weights_named(str(weights_path)):
        head.load_state_dict(load_file(str(weights_path)), strict=True)
    return head.eval(), entry, config
