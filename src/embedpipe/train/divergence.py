"""A diverged run stops: a NaN or infinite loss or gradient ends training at that step,
before the optimizer applies it, so no checkpoint ever holds the broken weights.

There is no skip-and-continue mode (AMP's loss scaler skips fp16 overflows; bf16 and
fp32 do not overflow that way, so a non-finite value here means the run diverged).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from embedpipe.core.finite import NonFiniteError
from embedpipe.train import checkpoint as ckpt


class Diverged(NonFiniteError):
    """The loss or a gradient became NaN or infinite."""


def gradient_norm(module: nn.Module) -> float:
    """The global L2 norm of the gradients (identical on every rank after DDP's all-reduce)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def stop_if_diverged(module: nn.Module, loss: float, step: int, out_uri: str) -> None:
    """Raise naming ``step`` when the (all-reduced) loss or the gradient norm is not finite."""
    what = ""
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    else:
        norm = gradient_norm(module)
        if not math.isfinite(norm):
            what = f"the gradient norm is {norm}"
    if what:
        raise Diverged(
            f"step {step}: {what}; training diverged and stopped before applying it "
            f"({_last_checkpoint(out_uri)}); lower --lr or set --grad-clip, then train "
            "into a new --out"
        )


def _last_checkpoint(out_uri: str) -> str:
    found = ckpt.complete_checkpoints(out_uri, "last")
    if not found:
        return "no checkpoint was written"
    step, uri = found[-1]
    return f"the latest checkpoint, {uri} of step {step}, holds finite weights"
