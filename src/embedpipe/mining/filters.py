"""False-negative-safe selection: which searched candidates become a query's negatives.

A query's candidates are the images of *other* concepts of its category, ranked by
similarity (rank 1 = the most similar); its positives are the other candidates of its
own concept. As in sentence-transformers' ``mine_hard_negatives`` and NV-Retriever:

1. the rank window keeps ranks ``rank_min`` to ``config.last_rank`` (ranks count before
   any score filter, as sentence-transformers' docs state them);
2. the score filters drop, in this order, a candidate scoring above
   ``positive - margin``, above ``positive - |positive| * relative_margin``, or above
   ``max_score``; each dropped candidate counts for the first filter that drops it;
3. ``top`` takes the ``top_k`` most similar candidates left, ``random`` draws ``top_k``
   of them with a seeded generator; either way they are written in rank order.

The query's positive score is the mean similarity to its positives (sentence-transformers
takes the minimum over several positives; with concepts of dozens of images the minimum
follows one outlier, a mislabelled image would make it drop nearly every negative). A
query without positives is not margin-filtered.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from embedpipe.config import MineSettings

SCORE_FILTERS = ("margin", "relative_margin", "max_score")
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Filtered:
    """The candidates left per query (``pool``, a mask over the searched neighbours) and
    what the window and the filters took away."""

    pool: np.ndarray
    skipped_rank_min: int  # other-concept candidates ranked before rank_min
    window: int  # other-concept candidates ranked rank_min to last_rank
    dropped: dict[str, int]  # score filter -> candidates it dropped from the window
    dropped_scores: np.ndarray  # their scores


def positive_scores(
    queries: np.ndarray,
    query_codes: np.ndarray,
    query_is_candidate: np.ndarray,
    candidates: np.ndarray,
    candidate_codes: np.ndarray,
) -> np.ndarray:
    """Each query's mean similarity to its positives (the candidates of its concept, itself
    excluded); NaN for a query without positives. Exact, in float64: the sum of a concept's
    vectors dotted with the query, less the query's own term."""
    order = np.argsort(candidate_codes, kind="stable")
    codes, starts = np.unique(candidate_codes[order], return_index=True)
    counts = np.diff(np.append(starts, len(order)))
    grouped = candidates[order]  # np.add.reduceat over rows is ten times slower than this
    bounds = zip(starts, starts + counts, strict=True)
    sums = np.stack([grouped[a:b].sum(axis=0, dtype=np.float64) for a, b in bounds])
    del grouped
    slot = np.searchsorted(codes, query_codes).clip(max=len(codes) - 1)
    has_concept = codes[slot] == query_codes
    totals = np.empty(len(queries))
    for begin in range(0, len(queries), CHUNK_ROWS):
        rows = slice(begin, begin + CHUNK_ROWS)
        chunk = queries[rows].astype(np.float64)
        totals[rows] = np.einsum("ij,ij->i", chunk, sums[slot[rows]])
        own = query_is_candidate[rows]
        totals[rows] -= np.where(own, np.einsum("ij,ij->i", chunk, chunk), 0.0)
    mates = np.where(has_concept, counts[slot], 0) - query_is_candidate
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mates > 0, totals / mates, np.nan)


def _over_limits(scores: np.ndarray, positive: np.ndarray, config: MineSettings):
    """(filter, mask of the scores above its limit) for each score filter that is set."""
    positive = positive[:, None]
    if config.margin is not None:  # sentence-transformers' form: score + margin > positive
        yield "margin", scores + config.margin > positive
    if config.relative_margin is not None:
        yield "relative_margin", scores > positive - np.abs(positive) * config.relative_margin
    if config.max_score is not None:
        yield "max_score", scores > config.max_score


def filter_candidates(
    neighbours: np.ndarray,
    scores: np.ndarray,
    query_codes: np.ndarray,
    candidate_codes: np.ndarray,
    positive: np.ndarray,
    config: MineSettings,
) -> Filtered:
    """The rank window and the score filters over one search's results (``neighbours``:
    candidate numbers per query, -1 where the search found fewer)."""
    other = (neighbours >= 0) & (candidate_codes[neighbours.clip(min=0)] != query_codes[:, None])
    rank = np.cumsum(other, axis=1)
    before = other & (rank < config.rank_min)
    pool = other & ~before & (rank <= config.last_rank)
    window = int(pool.sum())
    dropped, dropped_scores = dict.fromkeys(SCORE_FILTERS, 0), []
    for name, over in _over_limits(scores, positive, config):
        drop = pool & over
        dropped[name] = int(drop.sum())
        dropped_scores.append(scores[drop])
        pool &= ~drop
    return Filtered(
        pool,
        int(before.sum()),
        window,
        dropped,
        np.concatenate(dropped_scores) if dropped_scores else np.zeros(0, np.float32),
    )


def choose(pool: np.ndarray, config: MineSettings, category: str) -> np.ndarray:
    """The ``top_k`` candidates each query gets from its pool: the first ones (``top``) or
    a seeded draw (``random``: the same seed and category draw the same)."""
    if config.sampling == "top":
        return pool & (np.cumsum(pool, axis=1) <= config.top_k)
    rng = sampling_rng(config.seed, category)
    keys = np.where(pool, rng.random(pool.shape), np.inf)
    drawn = np.argsort(keys, axis=1, kind="stable")[:, : config.top_k]
    chosen = np.zeros_like(pool)
    np.put_along_axis(chosen, drawn, True, axis=1)
    return chosen & pool


def sampling_rng(seed: int, category: str) -> np.random.Generator:
    """The generator of one category's random draws: from the seed and the category's
    name, so the fan-out's order and the other categories change nothing."""
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
