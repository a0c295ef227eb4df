"""The evaluation report: one self-contained HTML page (plots and thumbnails inline as
base64) that the Kubeflow UI shows as the evaluate step's HTML artifact."""

from __future__ import annotations

import html
import json
import math

import numpy as np

from embedpipe.core import datasets
from embedpipe.evaluate import plots


def render_report(truth, config, runs, vectors_of, images_uri, metadata_uri) -> str:
    """The report's HTML: metrics side by side, skipped tasks, recall@K curves, projections,
    the runs' figures and the most anomalous images (plots and thumbnails inline)."""
    esc = html.escape
    names = [run.name for run in runs]
    parts = [
        page_head("embedpipe evaluation"),
        f"<h1>Evaluation</h1><p>{truth.table.num_rows} images from {esc(metadata_uri)}</p>",
        metrics_table({run.name: run.metrics for run in runs}),
    ]
    skipped = [(run.name, t, r) for run in runs for t, r in run.skipped.items()]
    if skipped:
        items = "".join(f"<li>{esc(n)}: {esc(t)}: {esc(r)}</li>" for n, t, r in skipped)
        parts.append(f"<h2>Skipped</h2><ul>{items}</ul>")
    curves = _recall_curves(runs, config.recall_k)
    if curves:
        parts.append("<h2>Recall@K</h2>" + image_tag(plots.recall_plot(curves)))
    parts.append("<h2>Embeddings</h2>")
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(truth.table.num_rows)[: config.plot_points])
    groups = (
        truth.strings("category")
        if truth.has("category")
        else np.full(truth.table.num_rows, "all", dtype=object)
    )[sample].tolist()
    for name in names:
        points, method = plots.project(vectors_of[name][sample], config.projection, config.seed)
        title = f"{name}: {method}, coloured by category"
        parts.append(image_tag(plots.projection_plot(points, [str(g) for g in groups], title)))
    for run in runs:
        for title, png in run.figures:
            parts.append(f"<h2>{esc(title)}: {esc(run.name)}</h2>" + image_tag(png))
    parts.append(_anomaly_section(runs, images_uri))
    parts.append("</body></html>")
    return "".join(parts)


def _recall_curves(runs, ks) -> dict[str, dict[str, dict[int, float]]]:
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for family in ("image_retrieval_recall", "text_retrieval_recall", "image_image_recall"):
        for run in runs:
            points = {k: run.metrics[f"{family}@{k}"] for k in ks if f"{family}@{k}" in run.metrics}
            if points:
                curves.setdefault(family, {})[run.name] = points
    return curves


def _anomaly_section(runs, images_uri: str) -> str:
    wanted = {a["image_id"] for run in runs for a in run.anomalies}
    if not wanted:
        return ""
    found = datasets.image_bytes(images_uri, wanted) if images_uri else {}
    parts = ["<h2>Most anomalous images (kNN distance)</h2>"]
    if not images_uri:
        parts.append("<p>No images dataset given (--images): ids only.</p>")
    for run in runs:
        cells = []
        for item in run.anomalies:
            label = (
                f"{html.escape(item['image_id'][:10])}<br>kNN {item['knn']:.3f}"
                f"<br>IF {item['isolation']:.3f}"
            )
            data = found.get(item["image_id"])
            picture = image_tag(plots.thumbnail(data), "jpeg", "") if data else ""
            cells.append(f"<span>{picture}<br>{label}</span>")
        parts.append(f"<h3>{html.escape(run.name)}</h3><div class='thumbs'>{''.join(cells)}</div>")
    return "".join(parts)


def page_head(title: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}figure{display:inline-block;margin:0.5em}"
        ".thumbs span{display:inline-block;margin:3px;font-size:11px;text-align:center}"
        "</style></head><body>"
    )


def metrics_table(metrics_of: dict[str, dict]) -> str:
    """Every metric a row, every model a column."""
    esc = html.escape
    names = list(dict.fromkeys(k for metrics in metrics_of.values() for k in metrics))
    head = "".join(f"<th>{esc(model)}</th>" for model in metrics_of)
    body = "".join(
        f"<tr><td>{esc(k)}</td>"
        + "".join(f"<td>{format_value(metrics.get(k))}</td>" for metrics in metrics_of.values())
        + "</tr>"
        for k in names
    )
    return f"<h2>Metrics</h2><table><tr><th>metric</th>{head}</tr>{body}</table>"


def image_tag(data: str, kind: str = "png", wrap: str = "figure") -> str:
    tag = f"<img src='data:image/{kind};base64,{data}'>"
    return f"<{wrap}>{tag}</{wrap}>" if wrap else tag


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return html.escape(json.dumps(value))
