"""combine: per-category hard-negative datasets -> one dataset, optionally sampled.

Rows are put in (category, query_id) order before sampling, so the result does
not depend on the order the per-category outputs arrive in (a ParallelFor
collects them in any order); sampling draws ``num_samples`` rows without
replacement with a seeded generator.

Each category's mining summary (filter counts and score distributions, from its
manifest) goes into one HTML report (``.embedpipe/mining_report.html``) and the
totals into the metrics; a sample does not change them (they describe the mining).
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.config import CombineSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.schemas import NEGATIVES_KIND, NEGATIVES_SCHEMA
from embedpipe.mining.report import REPORT_HTML, render_mining_report, total_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CombineResult:
    out_uri: str
    rows: int
    categories: int
    skipped_categories: dict[str, str] = field(default_factory=dict)
    rows_per_category: dict[str, int] = field(default_factory=dict)
    # the categories' mining counts summed (queries, window, dropped_<filter>, ...)
    mining_totals: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        counts = {f"rows_{category}": n for category, n in self.rows_per_category.items()}
        return {
            "rows": self.rows,
            "categories": self.categories,
            "skipped_categories": len(self.skipped_categories),
            **counts,
            **{f"mined_{key}": n for key, n in self.mining_totals.items()},
        }


@outputs.writes_output(inputs=("inputs",))
def combine_negatives(inputs: list[str], out_uri: str, config: CombineSettings) -> CombineResult:
    num_samples, seed = config.num_samples, config.seed
    tables, skipped, summaries = [], {}, []
    for uri in inputs:
        mining = datasets.verify_dataset(uri, NEGATIVES_KIND).get("mining", {})
        summaries.append(mining)
        if mining.get("skipped"):
            skipped[mining["category"]] = mining["skipped"]
        tables.append(datasets.read_table(uri, NEGATIVES_KIND))
    table = pa.concat_tables(tables) if tables else NEGATIVES_SCHEMA.empty_table()
    table = table.sort_by([("category", "ascending"), ("query_id", "ascending")])
    if 0 < num_samples < table.num_rows:
        rng = np.random.default_rng(seed)
        table = table.take(np.sort(rng.choice(table.num_rows, num_samples, replace=False)))
    counts = pc.value_counts(table.column("category")).to_pylist()
    per_category = {c["values"]: c["counts"] for c in counts}
    out_uri = storage.normalize(out_uri)
    result = CombineResult(
        out_uri,
        table.num_rows,
        len(per_category),
        skipped,
        dict(sorted(per_category.items())),
        total_counts(summaries),
    )
    report = render_mining_report(summaries)
    storage.write_bytes(datasets.side_path(out_uri, REPORT_HTML), report.encode("utf-8"))
    datasets.write_table(
        out_uri,
        table,
        NEGATIVES_KIND,
        extra={
            "num_samples": num_samples,
            "seed": seed,
            "skipped_categories": skipped,
            "rows_per_category": result.rows_per_category,
            "mining_totals": result.mining_totals,
        },
    )
    log.info(
        "combined %d rows from %d categories (%d skipped)",
        result.rows,
        result.categories,
        len(skipped),
    )
    return result
