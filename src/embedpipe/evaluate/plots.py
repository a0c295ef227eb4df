"""Report figures as inline PNG (base64), drawn with matplotlib's Agg backend."""

from __future__ import annotations

import base64
import io

import numpy as np


def _figure(width: float = 6.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def project(vectors: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP when asked (or auto and installed), else PCA."""
    if method in ("auto", "umap") and len(vectors) > 15:
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError("projection = umap, but umap-learn is not installed") from None
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed)
            return np.asarray(reducer.fit_transform(vectors)), "UMAP"
    centred = vectors - vectors.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T, "PCA"


def projection_plot(points: np.ndarray, groups: list[str], title: str) -> str:
    plt, figure = _figure()
    axes = figure.add_subplot()
    names = sorted(set(groups))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    group_array = np.asarray(groups, dtype=object)
    for k, name in enumerate(names):
        mask = group_array == name
        axes.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(k % 20), label=name)
    if len(names) <= 20:
        axes.legend(fontsize=7, markerscale=2, loc="best")
    axes.set_title(title, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    return _png(plt, figure)


def recall_plot(curves: dict[str, dict[str, dict[int, float]]]) -> str:
    """curves: metric family -> model -> {K: recall}."""
    plt, figure = _figure(4.0 * max(len(curves), 1), 3.6)
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    for k, (family, per_model) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), k + 1)
        for model, points in per_model.items():
            ks = sorted(points)
            axes.plot(ks, [points[x] for x in ks], marker="o", label=model)
        axes.set_xscale("log")
        # the measured Ks as plain ticks: a log axis would label them 2x10^0, 3x10^0...
        measured = sorted({x for points in per_model.values() for x in points})
        axes.xaxis.set_major_locator(FixedLocator(measured))
        axes.xaxis.set_major_formatter(FixedFormatter([str(x) for x in measured]))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xlabel("K")
        axes.set_ylabel("recall@K")
        axes.set_ylim(0, 1.02)
        axes.set_title(family, fontsize=10)
        axes.legend(fontsize=7)
    return _png(plt, figure)


def confusion_plot(matrix: np.ndarray, labels: list[str], title: str) -> str:
    plt, figure = _figure(6.0, 5.4)
    axes = figure.add_subplot()
    totals = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    if len(labels) <= 30:
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    return _png(plt, figure)


def thumbnail(data: bytes, size: int = 96) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prediction_plot(
    truth: np.ndarray, predicted: dict[str, dict[str, np.ndarray]], title: str
) -> str:
    """Predicted against true values: one panel per embedding source, one colour per
    model (``predicted``: source -> model -> values, NaN where not scored)."""
    plt, figure = _figure(4.0 * max(len(predicted), 1), 3.8)
    known = truth[~np.isnan(truth)]
    low, high = (float(known.min()), float(known.max())) if len(known) else (0.0, 1.0)
    for k, (source, per_model) in enumerate(predicted.items()):
        axes = figure.add_subplot(1, len(predicted), k + 1)
        for model, values in per_model.items():
            scored = ~np.isnan(values) & ~np.isnan(truth)
            axes.scatter(truth[scored], values[scored], s=6, alpha=0.6, label=model)
        axes.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axes.set_xlabel("true")
        axes.set_ylabel("predicted")
        axes.set_title(f"{title} from {source}", fontsize=10)
        axes.legend(fontsize=7, markerscale=2)
    return _png(plt, figure)


def signal_plot(values: np.ndarray, width: float = 1.6, height: float = 0.9) -> str:
    """A small line plot of one signal, for a report's list of anomalies."""
    plt, figure = _figure(width, height)
    axes = figure.add_subplot()
    axes.plot(np.arange(len(values)), values, linewidth=0.7)
    axes.set_axis_off()
    return _png(plt, figure)
