"""Held-out retrieval metrics (DECISIONS 13), with Katib-safe names.

Image -> image recall@K: each held-out (val) query against every other image of its
category, images of training concepts included as distractors; a hit when one of the
K nearest shows the query's concept. Text -> image recall@K: each distinct caption of a
held-out image against the same images; a hit when one of the K nearest shows the
caption's concept.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.core.recall_rules import category_gallery_problem
from embedpipe.train.data import Examples

log = logging.getLogger(__name__)


def validation_rows(examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    """(queries, candidates): the val rows, and every train/val row of their categories."""
    queries = examples.rows("val")
    categories = {examples.categories[row] for row in queries.tolist()}
    candidates = np.array(
        [
            row
            for row in range(len(examples.image_ids))
            if examples.split[row] in ("train", "val") and examples.categories[row] in categories
        ],
        dtype=np.int64,
    )
    return queries, candidates


def validation_problem(
    examples: Examples, queries: np.ndarray, candidates: np.ndarray, ks: tuple[int, ...]
) -> str:
    """Why held-out recall would mean nothing here ("" when it would not): no val rows, no
    val image with another image of its concept to find, or a K past a category's gallery
    (the rule evaluate applies, ``recall_rules``)."""
    if not len(queries):
        return "the splits hold no val rows (held-out concepts) to validate on"
    keys = examples.concept_keys()
    by_concept: dict[tuple[str, str], int] = {}
    for row in candidates.tolist():
        by_concept[keys[row]] = by_concept.get(keys[row], 0) + 1
    if not any(by_concept.get(keys[row], 0) > 1 for row in queries.tolist()):
        return "no val image has another image of its concept among the candidates"
    categories = np.asarray(examples.categories, dtype=object)
    return category_gallery_problem(ks, categories[queries], categories[candidates], "val_k")


def _hits(scores: torch.Tensor, same: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    matched = same.gather(1, top)
    return {k: matched[:, :k].any(dim=1).float() for k in ks}


def image_recall(
    examples: Examples,
    queries: np.ndarray,
    candidates: np.ndarray,
    embeddings: torch.Tensor,
    ks: tuple[int, ...],
) -> dict[str, float]:
    """``embeddings``: normalised vectors of ``candidates`` (queries are among them)."""
    position = {row: i for i, row in enumerate(candidates.tolist())}
    concept = _concept_ids(examples, candidates.tolist())
    category = np.array([examples.categories[r] for r in candidates], dtype=object)
    totals = {k: 0.0 for k in ks}
    counted = 0
    per_category: dict[str, dict[int, float]] = {}
    for name in sorted(set(category[[position[q] for q in queries.tolist()]])):
        members = np.flatnonzero(category == name)
        mine = [position[q] for q in queries.tolist() if category[position[q]] == name]
        # a query whose concept has no other image cannot hit; it is left out
        mine = [q for q in mine if (concept[members] == concept[q]).sum() > 1]
        if not mine:
            continue
        local = {c: i for i, c in enumerate(members.tolist())}
        vectors = embeddings[members]
        scores = embeddings[mine] @ vectors.T
        scores[torch.arange(len(mine)), torch.tensor([local[q] for q in mine])] = -torch.inf
        same = torch.from_numpy(concept[members][None, :] == concept[mine][:, None])
        hits = _hits(scores, same, ks)
        per_category[name] = {k: float(hits[k].mean()) for k in ks}
        for k in ks:
            totals[k] += float(hits[k].sum())
        counted += len(mine)
    metrics = {f"val_recall_at_{k}": totals[k] / counted if counted else 0.0 for k in ks}
    for name, values in per_category.items():
        for k, value in values.items():
            metrics[f"val_recall_at_{k}_{_safe(name)}"] = value
    return metrics


def text_recall(
    examples: Examples,
    queries: np.ndarray,
    candidates: np.ndarray,
    image_embeddings: torch.Tensor,
    caption_embeddings: torch.Tensor,
    caption_rows: list[int],
    ks: tuple[int, ...],
) -> dict[str, float]:
    """``caption_embeddings[i]``: the caption of row ``caption_rows[i]``."""
    concept = _concept_ids(examples, candidates.tolist())
    wanted = _concept_ids(examples, caption_rows)
    scores = caption_embeddings @ image_embeddings.T
    hits = _hits(scores, torch.from_numpy(wanted[:, None] == concept[None, :]), ks)
    return {f"val_text_recall_at_{k}": float(hits[k].mean()) for k in ks}


def _concept_ids(examples: Examples, rows: list[int]) -> np.ndarray:
    keys = examples.concept_keys()
    ids = {key: n for n, key in enumerate(sorted(set(keys)))}
    return np.array([ids[keys[row]] for row in rows], dtype=np.int64)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def skip_meaningless_validation(task: Any, config: TrainSettings) -> dict[str, str]:
    """Turn validation off where its figures would mean nothing, saying why (returned as
    ``{"validation": reason}`` for the result and the report); a ``val_k`` the user set
    past a gallery is an error instead, as ``recall_k`` is in evaluate."""
    if hasattr(task, "validation_problem"):  # a task with its own validation rules
        problem = task.validation_problem()
    else:
        problem = validation_problem(task.examples, task.queries, task.candidates, config.val_k)
    if not problem:
        return {}
    if problem.startswith("val_k") and config.val_k != TrainSettings.model_fields["val_k"].default:
        raise ConfigError(problem)
    log.warning("validation skipped: %s", problem)
    task.queries = task.queries[:0]
    return {"validation": problem}
