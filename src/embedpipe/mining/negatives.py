"""Every category mined and combined in one process: what the mining fan-out (partition ->
mine per category -> combine) writes, for a tuning trial that re-mines with its own
filters and for the step that re-mines with the best ones.

``OUT/categories/category-NNNNN`` holds each category's negatives (as ``embedpipe mine``
writes them), ``OUT/negatives`` the combined dataset with its mining report.
"""

from __future__ import annotations

from embedpipe.config import CombineSettings, MineSettings
from embedpipe.core import outputs, storage
from embedpipe.mining.combine import CombineResult, combine_negatives
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import split_by_category

COMBINED = "negatives"


def combined_uri(out_uri: str) -> str:
    """Where ``mine_negatives`` writes the combined negatives under ``out_uri``."""
    return storage.join(storage.normalize(out_uri), COMBINED)


@outputs.writes_output(inputs=("metadata_uri", "embeddings_uri"))
def mine_negatives(
    metadata_uri: str,
    embeddings_uri: str,
    out_uri: str,
    mine: MineSettings,
    combine: CombineSettings,
) -> CombineResult:
    """Mine every category of ``metadata_uri`` (image ids with category, concept and split)
    over ``embeddings_uri`` with ``mine``, and combine them with ``combine``: the same rows
    the pipeline's fan-out writes from the same inputs and settings."""
    out_uri = storage.normalize(out_uri)
    partitions = split_by_category(metadata_uri, embeddings_uri)
    mined = []
    for number, category in enumerate(sorted(partitions)):
        mined.append(storage.join(out_uri, "categories", f"category-{number:05d}"))
        mine_category(partitions[category], mined[-1], mine)
    return combine_negatives(mined, combined_uri(out_uri), combine)
