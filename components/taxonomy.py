from kfp.dsl import Dataset, Input, Metrics, Output


def taxonomy(
    images: Input[Dataset],
    settings: dict,
    overrides: dict,
    taxonomy: Output[Dataset],
    metrics: Output[Metrics],
):
    """Species names -> accepted taxa, tree, rank keys, taxon splits, indexes with captions."""
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import TAXONOMY_KIND
    from embedpipe.taxonomy.stage import build_taxonomy

    config = stage_settings("taxonomy", settings, overrides)
    result = build_taxonomy(images.path, config.table, taxonomy.path, config)
    log_metrics(metrics, result)
    taxonomy.metadata["kind"] = TAXONOMY_KIND
