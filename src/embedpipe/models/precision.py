"""Precision names: what each one runs, stated once for embed, evaluate and train.

The names are open_clip's (DECISIONS 5)::

    name        weights  autocast
    fp32        fp32     -
    amp_bf16    fp32     bf16
    bf16        bf16     -          low-precision weights (all of them: open_clip's bf16
    pure_bf16   bf16     -          keeps norms in fp32, its pure_bf16 casts all)
    fp16        fp32     fp16       embed and evaluate only
    auto        on CUDA: bf16 for inference (embed, evaluate), amp_bf16 for training;
                on CPU: fp32

Inference casts its inputs to the weights' dtype. Training feeds fp32 pixels, frozen
embeddings and losses to the model, so with low-precision weights it also autocasts to
their dtype (``TRAINING`` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

INFERENCE, TRAINING = "inference", "training"
Use = Literal["inference", "training"]


@dataclass(frozen=True)
class Precision:
    name: str
    weights: torch.dtype
    autocast: torch.dtype | None

    def cast(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module with its parameters in ``weights`` (left alone at fp32)."""
        return module.to(self.weights) if self.weights != torch.float32 else module

    def autocasting(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)


TABLE = {
    "fp32": Precision("fp32", torch.float32, None),
    "amp_bf16": Precision("amp_bf16", torch.float32, torch.bfloat16),
    "bf16": Precision("bf16", torch.bfloat16, None),
    "pure_bf16": Precision("pure_bf16", torch.bfloat16, None),
    "fp16": Precision("fp16", torch.float32, torch.float16),
}
AUTO_ON_CUDA = {INFERENCE: "bf16", TRAINING: "amp_bf16"}


def resolve_name(name: str, device: torch.device, use: Use = INFERENCE) -> str:
    """The table's name for ``name`` on ``device``: ``auto`` resolved, others as given."""
    if name == "auto":
        return AUTO_ON_CUDA[use] if device.type == "cuda" else "fp32"
    if name not in TABLE:
        raise ValueError(f"precision {name!r}: expected auto or one of {', '.join(TABLE)}")
    return name


def precision_for(name: str, device: torch.device, use: Use = INFERENCE) -> Precision:
    """What ``name`` runs on ``device`` for inference (embed, evaluate) or training."""
    chosen = TABLE[resolve_name(name, device, use)]
    if use == TRAINING and chosen.autocast is None and chosen.weights != torch.float32:
        return Precision(chosen.name, chosen.weights, chosen.weights)
    return chosen
