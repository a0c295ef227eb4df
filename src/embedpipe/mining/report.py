"""The mining HTML report: per category, what the rank window and each false-negative
filter took away, and the positive, negative and dropped score distributions.

Built by ``combine`` from the summaries each category's ``mine`` wrote into its
manifest; self-contained (histograms are inline SVG, no plotting library in the data
image) so the Kubeflow UI can show it as an ``HTML`` artifact.
"""

from __future__ import annotations

import html

from embedpipe.mining.filters import SCORE_FILTERS

REPORT_HTML = "mining_report.html"
COUNTS = (
    ("queries", "queries"),
    ("window", "in rank window"),
    ("skipped_rank_min", "before rank_min"),
    *((f"dropped_{name}", f"dropped: {name}") for name in SCORE_FILTERS),
    ("negatives", "negatives written"),
    ("short_queries", "queries short of top_k"),
    ("queries_without_positives", "queries without positives"),
)
SERIES = (("positive", "#0984e3"), ("negative", "#d63031"), ("dropped", "#636e72"))
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.category { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
.key span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }
"""


def total_counts(summaries: list[dict]) -> dict[str, int]:
    """Every count of COUNTS summed over the categories."""
    return {key: sum(int(s.get(key, 0)) for s in summaries) for key, _ in COUNTS}


def _settings_line(filters: dict) -> str:
    def shown(key):
        value = filters.get(key)
        return "off" if value is None else html.escape(str(value))

    return (
        f"top_k {shown('top_k')}, ranks {shown('rank_min')} to {shown('rank_max')}, "
        f"margin {shown('margin')}, relative_margin {shown('relative_margin')}, "
        f"max_score {shown('max_score')}, sampling {shown('sampling')}. Positive score: a "
        "query's mean similarity to its positives; ranks count other-concept candidates "
        "before the filters; a dropped candidate counts for the first filter that drops it."
    )


def _histogram_svg(histogram: dict, width: int = 360, height: int = 120) -> str:
    edges = histogram.get("edges") or []
    if len(edges) < 2:
        return "<p>no scores</p>"
    bins = len(edges) - 1
    tallest = max(max(histogram.get(name) or [0]) for name, _ in SERIES) or 1
    plot_height = height - 18
    parts = [f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    for name, colour in SERIES:
        counts = histogram.get(name) or []
        if not any(counts):
            continue
        points = []
        for number, count in enumerate(counts):
            y = plot_height - plot_height * count / tallest
            points += [(width * number / bins, y), (width * (number + 1) / bins, y)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(
            f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{path}'/>"
        )
    parts.append(
        f"<text x='0' y='{height - 3}' font-size='10'>{edges[0]:.3f}</text>"
        f"<text x='{width}' y='{height - 3}' font-size='10' text-anchor='end'>"
        f"{edges[-1]:.3f}</text></svg>"
    )
    return "".join(parts)


def _distribution_rows(scores: dict) -> str:
    names = ("count", "mean", "min", "p05", "p25", "median", "p75", "p95", "max")
    rows = ["<tr><th>scores</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"]
    for series, _ in SERIES:
        figures = scores.get(series, {})
        cells = "".join(f"<td>{figures.get(n, '')}</td>" for n in names)
        rows.append(f"<tr><td>{series}</td>{cells}</tr>")
    return "".join(rows)


def render_mining_report(summaries: list[dict]) -> str:
    """One page for the categories' summaries (each ``mine`` manifest's ``mining``)."""
    summaries = sorted(summaries, key=lambda s: s.get("category", ""))
    escape = html.escape
    filters = next((s["filters"] for s in summaries if s.get("filters")), {})
    totals = total_counts(summaries)
    dropped = sum(totals[f"dropped_{name}"] for name in SCORE_FILTERS)
    key = "".join(f"<span style='background:{colour}'></span>{name}" for name, colour in SERIES)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>embedpipe mining</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Hard negatives: {len(summaries)} categories, {totals['negatives']} negatives, "
        f"{dropped} candidates dropped by the filters</h1>",
        f"<p>{_settings_line(filters)}</p>",
        "<h2>Per category</h2><table><tr><th>category</th><th>index</th><th>recall</th>",
        "".join(f"<th>{escape(label)}</th>" for _, label in COUNTS),
        "</tr>",
    ]
    for summary in [*summaries, {"category": "all", **totals}]:
        reason = summary.get("skipped")
        parts.append(
            f"<tr><td>{escape(str(summary.get('category', '')))}</td>"
            f"<td>{escape(str(summary.get('index', '')))}</td>"
            f"<td>{summary.get('recall', '')}</td>"
        )
        if reason:
            parts.append(f"<td colspan='{len(COUNTS)}'>skipped: {escape(reason)}</td></tr>")
            continue
        parts.append("".join(f"<td>{summary.get(k, 0)}</td>" for k, _ in COUNTS) + "</tr>")
    parts.append(f"</table><h2>Score distributions</h2><p class='key'>{key}</p>")
    for summary in summaries:
        scores = summary.get("scores") or {}
        if summary.get("skipped") or not scores:
            continue
        parts.append(
            f"<div class='category'><h3>{escape(summary['category'])}</h3>"
            f"{_histogram_svg(scores.get('histogram', {}))}"
            f"<table>{_distribution_rows(scores)}</table></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
