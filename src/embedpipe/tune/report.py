"""The tuning report: optimisation history and parameter importances (PNG), the trials."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def history_png(trials: list[dict], metric: str, direction: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    figure, axes = plt.subplots(figsize=(5.5, 3.2))
    if done:
        numbers = [t["number"] for t in done]
        values = [t["value"] for t in done]
        pick = max if direction == "maximize" else min
        best = [pick(values[: i + 1]) for i in range(len(values))]
        axes.scatter(numbers, values, label="trial", zorder=3)
        axes.step(numbers, best, where="post", color="tab:red", label="best so far")
        axes.legend()
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title("optimisation history")
    png = _png(figure)
    plt.close(figure)
    return png


def importances_png(found: dict[str, float]) -> bytes:
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 0.6 + 0.4 * max(1, len(found))))
    names = list(found)[::-1]
    axes.barh(names, [found[name] for name in names])
    axes.set_xlabel("importance (PED-ANOVA)")
    axes.set_title("parameter importances" if found else "parameter importances: too few trials")
    png = _png(figure)
    plt.close(figure)
    return png


def render_report(
    trials: list[dict], found: dict[str, float], metric: str, direction: str
) -> tuple[str, dict[str, bytes]]:
    """The HTML page (PNGs inline) and the PNGs by file name."""
    images = {
        "history.png": history_png(trials, metric, direction),
        "importances.png": importances_png(found),
    }
    columns = [c for c in (trials[0] if trials else {}) if c not in ("out_uri", "error")]

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"<td>{html.escape('' if value is None else text)}</td>"

    rows = "".join("<tr>" + "".join(cell(trial[c]) for c in columns) + "</tr>" for trial in trials)
    head = "".join(f"<th>{html.escape(c.removeprefix('param_'))}</th>" for c in columns)
    figures = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in images.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe tuning</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td,th{padding:2px 8px;"
        "text-align:left}img{margin:4px}</style></head><body>"
        f"<h1>Tuning: {html.escape(direction)} {html.escape(metric)}</h1>{figures}"
        f"<h2>Trials</h2><table><tr>{head}</tr>{rows}</table></body></html>"
    )
    return page, images
