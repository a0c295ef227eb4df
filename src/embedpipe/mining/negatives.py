"""Every category mined and combined in one process: what the mining fan-out (partition ->
mine per category -> combine) writes, for a tuning trial that re-mines with its own
filters and for the step that re-mines with the best ones."""

from __future__ import annotations

from embedpipe.config import CombineSettings, MineSettings
from embedpipe.core import outputs, storage
from embedpipe.mining.combine import CombineResult, combine_negatives
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import split_by_category


@outputs.writes_output(inputs=("metadata_uri", "embeddings_uri", "categories_uri"))
def mine_negatives(
    metadata_uri: str,
    embeddings_uri: str,
    out_uri: str,
    mine: MineSettings,
    combine: CombineSettings,
    categories_uri: str,
) -> CombineResult:
    """Mine every category of ``metadata_uri`` (image ids with category, concept and split)
    over ``embeddings_uri`` with ``mine`` into ``categories_uri/category-NNNNN``, and
    combine them with ``combine`` into ``out_uri`` (with its mining report): the rows the
    pipeline's fan-out writes from the same inputs and settings."""
    categories_uri = storage.normalize(categories_uri)
    partitions = split_by_category(metadata_uri, embeddings_uri)
    mined = []
    for number, category in enumerate(sorted(partitions)):
        mined.append(storage.join(categories_uri, f"category-{number:05d}"))
        mine_category(partitions[category], mined[-1], mine)
    return combine_negatives(mined, out_uri, combine)
