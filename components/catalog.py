from kfp.dsl import Dataset, Input, Metrics, Output


def catalog(
    images: Input[Dataset],
    settings: dict,
    overrides: dict,
    catalog: Output[Dataset],
    metrics: Output[Metrics],
):
    """Image shards -> train/test catalog (Parquet plus PerVA-layout JSON)."""
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import CATALOG_KIND
    from embedpipe.data.catalog import build_catalog

    config = stage_settings("catalog", settings, overrides)
    result = build_catalog(images.path, catalog.path, config)
    log_metrics(metrics, result)
    catalog.metadata.update(kind=CATALOG_KIND, mode=result.mode)
