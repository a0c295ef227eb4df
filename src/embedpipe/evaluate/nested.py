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
from embedpipe.models.loading import HF_HUB, LOCAL_DIR, OPEN_CLIP_CONFIG_NAME

log = logging.getLogger(__name__)

RECALL_TASKS = ("retrieval", "image_retrieval")


def _checkpoint_config(uri: str, name: str = CONFIG_NAME) -> dict[str, Any]:
    """The config.json (or ``name``) of a checkpoint folder; empty for a registry name,
    "random", a ``local-dir:``/``hf-hub:`` source or anything else."""
    path = storage.join(uri, name) if uri else ""
    if not path or not storage.exists(path):
        return {}
    found = storage.read_json(path)
    return found if isinstance(found, dict) else {}


def trained_nested_dims(source: str) -> tuple[int, ...]:
    """The prefixes the model behind ``source`` (a checkpoint, a published model, or
    embeddings either made) was trained to embed with; empty for any other model."""
    checkpoint, published = _checkpoint_config(source), _published_config(source)
    made = source and storage.exists(datasets.side_path(source, MANIFEST_NAME))
    if not (checkpoint or published) and made:
        source = str(datasets.read_manifest(source, EMBEDDINGS_KIND).get("weights", ""))
        checkpoint, published = _checkpoint_config(source), _published_config(source)
    if checkpoint:
        return heads.trained_nested_dims(checkpoint)
    return tuple(int(dim) for dim in published.get("nested_dims") or ())


def _published_config(source: str) -> dict[str, Any]:
    """The config of a published model, where publish records its nested_dims: a head's
    config.json, a fine-tune's open_clip_config.json; read where it lies (a hub repo only
    from the local cache), nothing downloaded."""
    for name in (CONFIG_NAME, OPEN_CLIP_CONFIG_NAME):
        if source.startswith(LOCAL_DIR):
            found = _checkpoint_config(source[len(LOCAL_DIR) :], name)
        elif source.startswith(HF_HUB):
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(source[len(HF_HUB) :], name)
            except ValueError:  # not a repo id: no model, no prefixes
                cached = None
            found = (
                _checkpoint_config(os.path.dirname(cached), name) if isinstance(cached, str) else {}
            )
        else:
            return {}
        if found:
            return found
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
