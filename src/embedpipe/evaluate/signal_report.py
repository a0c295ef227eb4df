"""The evaluation report of images paired with signals: the untrained and the trained
towers side by side (metrics, cross-modal recall@K, predicted against true targets, each
modality's projection and its most anomalous held-out images), one self-contained HTML
page as the image report is."""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.evaluate import plots
from embedpipe.evaluate.report import image_tag, metrics_table, page_head

FAMILIES = ("image_to_signal_recall", "signal_to_image_recall")


def render_signal_report(evaluation, config, images_uri: str, metadata_uri: str) -> str:
    from embedpipe.evaluate.image_signal import flat_metrics

    esc = html.escape
    held_out = evaluation.held_out
    parts = [
        page_head("embedpipe evaluation: images and signals"),
        f"<h1>Evaluation: images and signals</h1><p>{int(held_out.sum())} held-out images "
        f"(their signals: {esc(evaluation.signal_column)}) of {len(held_out)} from "
        f"{esc(metadata_uri)}; probes fit on the other {int((~held_out).sum())}</p>",
        metrics_table({run.name: flat_metrics(run) for run in evaluation.runs}),
    ]
    curves = {
        family: {
            run.name: {k: run.metrics[f"{family}@{k}"] for k in config.recall_k}
            for run in evaluation.runs
        }
        for family in FAMILIES
    }
    parts.append("<h2>Cross-modal recall@K</h2>" + image_tag(plots.recall_plot(curves)))
    for target, truth in evaluation.targets.items():
        by_source: dict[str, dict[str, np.ndarray]] = {}
        for run in evaluation.runs:
            for (source, probe, name), values in run.predictions.items():
                if probe == "ridge" and name == target:
                    by_source.setdefault(source, {})[run.name] = values
        if by_source:
            parts.append(
                f"<h2>{esc(target)}: Ridge prediction on the held-out images</h2>"
                + image_tag(plots.prediction_plot(truth, by_source, target))
            )
    parts.append(_projections(evaluation, config))
    parts.append(_anomalies(evaluation, config, images_uri))
    parts.append("</body></html>")
    return "".join(parts)


def _projections(evaluation, config) -> str:
    rows = np.flatnonzero(evaluation.held_out)
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(rows)[: config.plot_points])
    groups = [str(evaluation.categories[row]) for row in sample]
    parts = ["<h2>Embeddings of the held-out images, per modality</h2>"]
    for run in evaluation.runs:
        for modality, vectors in run.vectors.items():
            points, method = plots.project(vectors[sample], config.projection, config.seed)
            title = f"{run.name} {modality} tower: {method}, coloured by category"
            parts.append(image_tag(plots.projection_plot(points, groups, title)))
    return "".join(parts)


def _anomalies(evaluation, config, images_uri: str) -> str:
    """Per model and modality, the held-out images whose embedding lies farthest from its
    nearest neighbours (their picture, and their signal drawn small)."""
    from embedpipe.evaluate.image_signal import anomaly_neighbours

    top = {}
    for run in evaluation.runs:
        for modality, scores in run.anomaly.items():
            order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
            shown = min(config.anomaly_top, int(np.isfinite(scores).sum()))
            top[(run.name, modality)] = order[:shown]
    wanted = {evaluation.image_ids[row] for rows in top.values() for row in rows}
    if not wanted:
        return ""
    pictures = datasets.image_bytes(images_uri, wanted)
    signals = _signals(images_uri, evaluation.signal_column, wanted)
    parts = [
        f"<h2>Most anomalous held-out images, per modality (mean distance to the "
        f"{anomaly_neighbours(config, evaluation.held_out)} nearest)</h2>"
    ]
    for (model, modality), rows in top.items():
        run = next(run for run in evaluation.runs if run.name == model)
        cells = []
        for row in rows:
            image_id = evaluation.image_ids[row]
            shown = _thumbnail(pictures.get(image_id))
            if image_id in signals:
                shown += "<br>" + image_tag(plots.signal_plot(signals[image_id]), "png", "")
            label = f"{html.escape(image_id[:10])}<br>{run.anomaly[modality][row]:.3f}"
            cells.append(f"<span>{shown}<br>{label}</span>")
        parts.append(
            f"<h3>{html.escape(model)}: {modality} tower</h3>"
            f"<div class='thumbs'>{''.join(cells)}</div>"
        )
    return "".join(parts)


def _thumbnail(data: bytes | None) -> str:
    """The picture, or nothing where it is missing or does not decode: a report lists
    anomalies, it does not fail on them."""
    from PIL import UnidentifiedImageError

    if not data:
        return ""
    try:
        return image_tag(plots.thumbnail(data), "jpeg", "")
    except (UnidentifiedImageError, OSError, ValueError):
        return ""


def _signals(images_uri: str, column: str, wanted: set[str]) -> dict[str, np.ndarray]:
    table = datasets.read_table(images_uri, IMAGES_KIND, ["image_id", column])
    table = table.filter(pc.is_in(table.column("image_id"), pa.array(sorted(wanted))))
    return {
        image_id: np.asarray(values, dtype=np.float32)
        for image_id, values in zip(
            table.column("image_id").to_pylist(), table.column(column).to_pylist(), strict=True
        )
        if values is not None
    }
