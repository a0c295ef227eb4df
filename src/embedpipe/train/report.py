"""The training report the Kubeflow UI shows: loss, learning rate and validation curves,
and in head mode the bandit's pulls per difficulty band, as one HTML page."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from embedpipe.core import storage
from embedpipe.core.datasets import side_path

METRICS_NAME = "metrics.json"  # in the trained model's .embedpipe/: result, history, curves

CURVE_GROUPS = (
    ("loss", ("loss",)),
    ("learning rate", ("lr",)),
    ("validation", ("val_recall_at_1", "val_recall_at_5", "val_text_recall_at_1")),
)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves_figure(curves: dict[str, list], title: str, keys: tuple[str, ...]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    present = [key for key in keys if curves.get(key)]
    if not present:
        return None
    figure, axes = plt.subplots(figsize=(5, 3))
    for key in present:
        steps, values = zip(*curves[key], strict=True)
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.legend()
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def _bandit_figure(bandit: dict[str, Any]):
    from matplotlib import pyplot as plt

    if not bandit:
        return None
    figure, axes = plt.subplots(figsize=(5, 3))
    axes.bar(list(bandit), [record["pulls"] for record in bandit.values()])
    axes.set_title("bandit pulls per difficulty band")
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def render_report(metrics: dict[str, Any]) -> str:
    """HTML with the curves inline (PNG), the headline figures and the bandit's pulls."""
    result, curves = metrics.get("result", {}), metrics.get("curves", {})
    try:
        images = [_curves_figure(curves, title, keys) for title, keys in CURVE_GROUPS]
        if metrics.get("bandit"):
            images.append(_bandit_figure(metrics["bandit"]))
    except ImportError:  # the data image has no matplotlib: the figures, without curves
        images = []
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in result.items()
        if key not in ("out_uri", "skipped")
    )
    skipped = "".join(
        f"<li>{html.escape(str(what))}: {html.escape(str(why))}</li>"
        for what, why in (result.get("skipped") or {}).items()
    )
    untrained = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{value:.4f}</td></tr>"
        for key, value in (metrics.get("untrained") or {}).items()
        if isinstance(value, int | float)
    )
    figures = "".join(
        f'<img alt="training curve" src="data:image/png;base64,{image}">'
        for image in images
        if image
    )
    bandit = metrics.get("bandit") or {}
    bandit_rows = "".join(
        f"<tr><th>{html.escape(band)}</th><td>{record['pulls']}</td>"
        f"<td>{record['mean_reward']:.4f}</td></tr>"
        for band, record in bandit.items()
    )
    bandit_table = (
        f"<h2>Bandit</h2><table><tr><th>band</th><th>pulls</th><th>mean reward</th></tr>"
        f"{bandit_rows}</table>"
        if bandit_rows
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe training</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td,th{padding:2px 8px;"
        "text-align:left}img{margin:4px}</style></head><body>"
        f"<h1>Training: {html.escape(str(metrics.get('model', '')))}</h1>"
        f"<table>{rows}</table>"
        + (f"<h2>Not measured</h2><ul>{skipped}</ul>" if skipped else "")
        + f"<h2>Before training</h2><table>{untrained}</table>"
        f"<h2>Curves</h2>{figures}{bandit_table}</body></html>"
    )


def record_training_outputs(model, metrics, report_path: str, config, model_name: str) -> None:
    """A finished training on its KFP outputs: the result on ``metrics`` (anything with
    ``log_metric``), the HTML report at ``report_path``, and the facts about the model on
    ``model.metadata``; the model and its metrics are at ``model.uri``."""
    summary = storage.read_json(side_path(model.uri, METRICS_NAME))
    result = summary["result"]
    for name, value in result.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(name, value)
    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write(render_report(summary))
    model.metadata.update(
        model=model_name,
        mode=config.mode,
        loss=config.loss,
        steps=result["steps"],
        best_metric=result["best_metric"],
        best_value=result["best_value"],
    )
