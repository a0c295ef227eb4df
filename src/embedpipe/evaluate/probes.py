"""Probes on frozen embeddings (scikit-learn) and embedding anomaly scores."""

from __future__ import annotations

import numpy as np


def linear_probe(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    c: float,
    max_iter: int,
    seed: int,
) -> np.ndarray:
    """Predicted labels of ``test`` by a logistic regression fit on ``train``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit(train, train_labels)
    return model.predict(test)


def regression_probe(
    train: np.ndarray, train_values: np.ndarray, test: np.ndarray, alpha: float
) -> np.ndarray:
    """Predicted values of ``test`` by Ridge (least squares when ``alpha`` is 0)."""
    from sklearn.linear_model import LinearRegression, Ridge

    model = Ridge(alpha=alpha) if alpha > 0 else LinearRegression()
    model.fit(train, train_values)
    return model.predict(test)


def r2(truth: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(truth, predicted))


def isolation_scores(vectors: np.ndarray, trees: int, seed: int) -> np.ndarray:
    """IsolationForest anomaly score per vector: higher is more anomalous
    (the negated ``score_samples``)."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=trees, random_state=seed).fit(vectors)
    return -forest.score_samples(vectors)
