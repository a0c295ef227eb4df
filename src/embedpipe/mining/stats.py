"""Score statistics of one category's mining: quantiles and a shared-bin histogram of the
queries' positive scores, the written negatives' scores and the scores the filters
dropped, small enough for the dataset's manifest and the KFP metadata."""

from __future__ import annotations

import numpy as np

QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}
HISTOGRAM_BINS = 30


def summarize(values: np.ndarray) -> dict[str, float]:
    """Count, mean, quantiles and maximum (finite values only; only the count when none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"count": 0}
    figures = np.quantile(values, list(QUANTILES.values()))
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 4),
        **{name: round(float(v), 4) for name, v in zip(QUANTILES, figures, strict=True)},
        "max": round(float(values.max()), 4),
    }


def histogram(series: dict[str, np.ndarray], bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of each series over the same bins, spanning every finite value."""
    finite = {name: np.asarray(v, np.float64) for name, v in series.items()}
    finite = {name: v[np.isfinite(v)] for name, v in finite.items()}
    every = np.concatenate(list(finite.values())) if finite else np.zeros(0)
    if not every.size:
        return {"edges": [], **{name: [] for name in finite}}
    low, high = float(every.min()), float(every.max())
    if high <= low:
        low, high = low - 0.005, high + 0.005
    edges = np.linspace(low, high, bins + 1)
    return {
        "edges": [round(float(e), 5) for e in edges],
        **{name: np.histogram(v, edges)[0].tolist() for name, v in finite.items()},
    }


def score_statistics(positive: np.ndarray, negative: np.ndarray, dropped: np.ndarray) -> dict:
    """The category's positive, negative and dropped score distributions."""
    series = {"positive": positive, "negative": negative, "dropped": dropped}
    return {
        **{name: summarize(values) for name, values in series.items()},
        "histogram": histogram(series),
    }
