"""Image <-> signal evaluation against independent numpy computations: retrieval as
clip_benchmark's image-text retrieval, kNN and Ridge R² by brute force and closed form."""

import numpy as np
import pytest
import torch

from embedpipe.evaluate.cross_modal import regression_r2, retrieval_recall, with_both


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 8))
    signal = image + rng.normal(scale=1.0, size=image.shape)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    signal /= np.linalg.norm(signal, axis=1, keepdims=True)
    ours = retrieval_recall(torch.from_numpy(image), torch.from_numpy(signal), (1, 5))
    scores = image @ signal.T
    for k in (1, 5):
        to_signal = [i in np.argsort(-scores[i])[:k] for i in range(40)]
        to_image = [j in np.argsort(-scores[:, j])[:k] for j in range(40)]
        assert ours[f"image_to_signal_recall@{k}"] == pytest.approx(np.mean(to_signal))
        assert ours[f"signal_to_image_recall@{k}"] == pytest.approx(np.mean(to_image))
    assert 0 < ours["image_to_signal_recall@1"] < ours["image_to_signal_recall@5"] <= 1


def r2(truth, predicted):
    return 1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()


def test_regression_r2_matches_closed_form_and_brute_force():
    rng = np.random.default_rng(1)
    image, signal = rng.normal(size=(60, 5)), rng.normal(size=(60, 3))
    target = image[:, 0] * 2 + signal[:, 1] + rng.normal(scale=0.1, size=60)
    target[3] = np.nan  # an unknown target is left out
    train = np.arange(60) < 40
    test = ~train
    ours = regression_r2(with_both(image, signal), {"redshift": target}, train, test, k=5)
    known = ~np.isnan(target)
    fit, score = train & known, test & known
    for source, matrix in with_both(image, signal).items():
        x, y = matrix[fit], target[fit]
        scaled = (x - x.mean(0)) / x.std(0)  # the Ridge probe standardises on the fit rows
        mean_y = y.mean()
        weights = np.linalg.solve(scaled.T @ scaled + np.eye(x.shape[1]), scaled.T @ (y - mean_y))
        ridge = ((matrix[score] - x.mean(0)) / x.std(0)) @ weights + mean_y
        assert ours[source]["ridge"]["redshift_r2"] == pytest.approx(r2(target[score], ridge))
        x = matrix[fit]
        unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
        near = np.argsort(-(unit(matrix[score]) @ unit(x).T), axis=1)[:, :5]
        knn = y[near].mean(1)
        assert ours[source]["knn"]["redshift_r2"] == pytest.approx(r2(target[score], knn))
    assert ours["both"]["ridge"]["redshift_r2"] > ours["image"]["ridge"]["redshift_r2"]
