"""Recall@K of each prefix of a nested (Matryoshka) model.

A model trained with ``[train].nested_dims`` records them in its checkpoint's
``config.json``; embeddings record the weights that made them. For such a model the
retrieval tasks run again on the first N dimensions of every vector (renormalised), and
their recall@K metrics are reported with ``_dimN`` appended to clip_benchmark's names,
e.g. ``image_image_recall@1_dim32``.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedpipe.core import datasets, storage
from embedpipe.core.datasets import MANIFEST_NAME
from embedpipe.core.schemas import EMBEDDINGS_KIND
from embedpipe.models import heads
from embedpipe.models.backends.base import CONFIG_NAME
from embedpipe.models.loading import HF_HUB, LOCAL_DIR
from embedpipe.models.published_head import HEAD_MODEL_TYPE

log = logging.getLogger(__name__)

RECALL_TASKS = ("retrieval", "image_retrieval")


def _checkpoint_config(uri: str) -> dict[str, Any]:
    """The config.json of a checkpoint; empty for a registry name, "random", a published
    model or anything else."""
    path = storage.join(uri, CONFIG_NAME) if uri else ""
    if not path or not storage.exists(path):
        return {}
    found = storage.read_json(path)
    return found if isinstance(found, dict) else {}


def trained_nested_dims(source: str) -> tuple[int, ...]:
    """The prefixes the model behind ``source`` (a checkpoint, a published head, or
    embeddings either made) was trained to embed with; empty for any other model."""
    config = _checkpoint_config(source) or _published_config(source)
    if not config and source and storage.exists(datasets.side_path(source, MANIFEST_NAME)):
        source = str(datasets.read_manifest(source, EMBEDDINGS_KIND).get("weights", ""))
        config = _checkpoint_config(source) or _published_config(source)
    if config.get("model_type") == HEAD_MODEL_TYPE:
        return tuple(int(dim) for dim in config.get("nested_dims") or ())
    return heads.trained_nested_dims(config)


def _published_config(source: str) -> dict[str, Any]:
    """The config.json of a published model (a published head records its nested_dims
    there), read where it lies: a hub repo only from the local cache, nothing downloaded."""
    if source.startswith(LOCAL_DIR):
        return _checkpoint_config(source[len(LOCAL_DIR) :])
    if source.startswith(HF_HUB):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source[len(HF_HUB) :], CONFIG_NAME)
        return _checkpoint_config(os.path.dirname(cached)) if isinstance(cached, str) else {}
    return {}


class _PrefixEncoder:
    """An encoder whose text vectors are cut to the prefix and renormalised."""

    def __init__(self, encoder: Any, dim: int):
        self._encoder, self._dim = encoder, dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def texts(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self._encoder.texts(texts), dtype=np.float32)[:, : self._dim]
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def prefix_recalls(
    evaluation: Any, encoder: Any, vectors: torch.Tensor, tasks: list[str]
) -> dict[str, float]:
    """recall@K of every trained prefix shorter than ``vectors``, for the retrieval
    ``tasks`` that ran on the whole vectors."""
    from embedpipe.evaluate.sources import MissingGroundTruth

    dims = [d for d in trained_nested_dims(encoder.source) if d < vectors.shape[1]]
    metrics: dict[str, float] = {}
    for dim in dims:
        cut = F.normalize(vectors[:, :dim].float(), dim=-1)
        for task in (t for t in tasks if t in RECALL_TASKS):
            run = SimpleNamespace(metrics={}, columns={})
            try:
                getattr(evaluation, task)(_PrefixEncoder(encoder, dim), cut, run)
            except MissingGroundTruth as reason:
                log.info("dim %d: %s", dim, reason)
                continue
            metrics |= {f"{k}_dim{dim}": v for k, v in run.metrics.items() if "recall@" in k}
    return metrics
