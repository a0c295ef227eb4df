"""NaN and infinity never pass as numbers: a diverged model's weights and the embeddings
it makes are refused where they would be written or read, naming what made them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class NonFiniteError(ValueError):
    """Weights, a loss or embeddings hold NaN or infinity."""


def _count_nonfinite(values: Any) -> int:
    """NaN and infinite entries of a numpy array or torch tensor."""
    if hasattr(values, "detach"):  # torch
        import torch

        return int((~torch.isfinite(values.detach())).sum()) if values.is_floating_point() else 0
    array = np.asarray(values)
    return int((~np.isfinite(array)).sum()) if np.issubdtype(array.dtype, np.floating) else 0


def check_embeddings(vectors: Any, model: str, where: str = "") -> None:
    """Refuse embeddings with NaN or infinity: ``model`` made them (a diverged model)."""
    bad = _count_nonfinite(vectors)
    if bad:
        place = f"{where}: " if where else ""
        raise NonFiniteError(
            f"{place}model {model} produced non-finite embeddings ({bad} NaN/inf values in "
            f"{len(vectors)} vectors): its weights are broken (a diverged training?)"
        )


def first_nonfinite_tensor(weights: Mapping[str, Any]) -> str | None:
    """The name of the first tensor holding NaN or infinity, or None."""
    return next((name for name, value in weights.items() if _count_nonfinite(value)), None)
