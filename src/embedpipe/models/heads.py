"""Projection heads trained on a frozen backbone's embeddings, and their checkpoints.

A head checkpoint is a directory with ``config.json``::

    {"kind": "head", "backbone": {registry entry of the backbone}, "head": {"in_dim": 512,
     "out_dim": 128, "width": 512, "depth": 2, "activation": "gelu", "normalize": true}}

and ``model.safetensors`` holding the MLP's state dict. The published transformers
model (``embedpipe.publish.modeling_embedpipe_head``) builds the same layers.
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
from safetensors.torch import load_file, save_file

from embedpipe.core import storage
from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME
from embedpipe.models.registry import ModelEntry, ModelError

HEAD_KIND = "head"
ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}


def head_layers(
    in_dim: int, out_dim: int, width: int = 0, depth: int = 1, activation: str = "gelu"
) -> torch.nn.Sequential:
    """``depth`` linear layers: in_dim -> width (x depth-1, each followed by the activation)
    -> out_dim. Depth 1 is a single linear projection."""
    if depth < 1:
        raise ModelError(f"head depth must be at least 1, got {depth}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"head activation '{activation}': known {', '.join(ACTIVATIONS)}")
    sizes = [in_dim] + [width or in_dim] * (depth - 1) + [out_dim]
    layers: list[torch.nn.Module] = []
    for index, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if index < depth - 1:
            layers.append(ACTIVATIONS[activation]())
    return torch.nn.Sequential(*layers)


class ProjectionHead(torch.nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 0,
        depth: int = 1,
        activation: str = "gelu",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.config = {
            "in_dim": in_dim,
            "out_dim": out_dim,
            "width": width,
            "depth": depth,
            "activation": activation,
            "normalize": normalize,
        }
        self.layers = head_layers(in_dim, out_dim, width, depth, activation)
        self.normalize = normalize

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        projected = self.layers(embeddings)
        return torch.nn.functional.normalize(projected, dim=-1) if self.normalize else projected


def save_head_checkpoint(
    head: ProjectionHead, backbone: ModelEntry, out_uri: str, extra: dict[str, Any] | None = None
) -> str:
    """Write a head checkpoint at ``out_uri`` (local or s3://); config.json comes last.
    ``extra`` (e.g. the resolved training settings) is stored in config.json beside it."""
    out_uri = storage.normalize(out_uri)
    config = {
        **(extra or {}),
        "kind": HEAD_KIND,
        "backbone": backbone.model_dump(mode="json"),
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


def is_head_config(config: dict[str, Any]) -> bool:
    return config.get("kind") == HEAD_KIND


def load_head_checkpoint(directory: str) -> tuple[ProjectionHead, ModelEntry, dict[str, Any]]:
    """The head, its backbone's entry and the whole config.json of a local checkpoint dir."""
    config_path, weights_path = Path(directory, CONFIG_NAME), Path(directory, WEIGHTS_NAME)
    if not (config_path.is_file() and weights_path.is_file()):
        raise ModelError(f"{directory}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads(config_path.read_text())
    if not is_head_config(config):
        raise ModelError(f"{config_path}: not a head checkpoint (kind is not '{HEAD_KIND}')")
    backbone = config.get("backbone") or config.get("entry")
    if not isinstance(backbone, dict):
        raise ModelError(f"{config_path}: 'backbone' must hold the backbone's registry entry")
    try:
        entry = ModelEntry(**backbone)
        head = ProjectionHead(**config["head"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{config_path}: invalid head checkpoint config: {error}") from None
    head.load_state_dict(load_file(str(weights_path)), strict=True)
    return head.eval(), entry, config
