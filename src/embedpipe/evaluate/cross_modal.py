"""Image <-> signal evaluation: cross-modal retrieval and regression probes.

Retrieval is computed as clip_benchmark computes image-text retrieval: a score matrix of
every query against every candidate, each query's positives, and recall@K as the share
of queries with a positive among their K best candidates (``image_to_signal_recall@K``,
``signal_to_image_recall@K``; DECISIONS 6). Row i of the images and row i of the signals
come from one image; an image's positives are the signals of its object: its own, and
those of the object's other views where an object was seen more than once (as an image's
positives in clip_benchmark are all its captions).

Regression probes predict each scalar target (redshift, ...) from an embedding source
(``image``, ``signal``, or ``both`` concatenated) with a k-nearest-neighbour regressor
(cosine, uniform weights) and a Ridge probe (least squares at alpha 0) on features
standardised on the training rows, both fit on the training rows and scored by R² on the
held-out rows: ``<target>_r2`` per embedding source and probe.
"""

from __future__ import annotations

import numpy as np
import torch

from embedpipe.evaluate.probes import regression_probe

PROBES = ("knn", "ridge")


def retrieval_recall(
    image: torch.Tensor,
    signal: torch.Tensor,
    ks: tuple[int, ...],
    objects: np.ndarray | None = None,
) -> dict[str, float]:
    """Normalised ``image`` and ``signal`` rows, paired by position; ``objects[i]`` is row
    i's object (None: every row its own object)."""
    scores = image.float() @ signal.float().T
    if objects is None:
        positives = torch.eye(len(image), dtype=torch.bool)
    else:
        positives = torch.from_numpy(objects[:, None] == objects[None, :])
    metrics = {}
    for name, matrix, pairs in (
        ("image_to_signal", scores, positives),
        ("signal_to_image", scores.T, positives.T),
    ):
        for k in ks:
            top = matrix.topk(min(k, matrix.shape[1]), dim=1).indices
            hit = pairs.gather(1, top).any(dim=1)
            metrics[f"{name}_recall@{k}"] = float(hit.float().mean())
    return metrics


def probe_predictions(
    probe: str, train: np.ndarray, values: np.ndarray, test: np.ndarray, k: int, alpha: float
) -> np.ndarray:
    from sklearn.neighbors import KNeighborsRegressor

    if probe == "ridge":
        # standardised on the training rows: an untrained tower's embeddings can sit in a
        # cone so narrow that a fixed penalty alone would flatten every prediction
        shift, spread = train.mean(0), train.std(0)
        spread[spread == 0] = 1.0
        return regression_probe((train - shift) / spread, values, (test - shift) / spread, alpha)
    model = KNeighborsRegressor(n_neighbors=min(k, len(train)), metric="cosine")
    return model.fit(train, values).predict(test)


def regression_r2(
    sources: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    train: np.ndarray,
    test: np.ndarray,
    k: int = 10,
    alpha: float = 1.0,
    predictions: dict | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{source: {probe: {"<target>_r2": R²}}}``; ``train`` and ``test`` are boolean
    row masks; rows whose target is unknown (NaN) are left out of that target. Given
    ``predictions``, it receives ``{(source, probe, target): per-row prediction}`` (NaN
    outside the scored rows)."""
    from sklearn.metrics import r2_score

    result: dict[str, dict[str, dict[str, float]]] = {}
    for source, matrix in sources.items():
        for probe in PROBES:
            scores = result.setdefault(source, {}).setdefault(probe, {})
            for target, values in targets.items():
                known = ~np.isnan(values)
                fit, score = train & known, test & known
                if fit.sum() < 2 or score.sum() < 2:
                    continue
                predicted = probe_predictions(
                    probe, matrix[fit], values[fit], matrix[score], k, alpha
                )
                scores[f"{target}_r2"] = float(r2_score(values[score], predicted))
                if predictions is not None:
                    row_values = np.full(len(values), np.nan)
                    row_values[score] = predicted
                    predictions[(source, probe, target)] = row_values
    return result


def with_both(image: np.ndarray, signal: np.ndarray) -> dict[str, np.ndarray]:
    """The three embedding sources of a probe."""
    return {"image": image, "signal": signal, "both": np.concatenate([image, signal], axis=1)}
