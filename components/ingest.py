from kfp.dsl import Dataset, Metrics, Output


def ingest(
    sources: list[str],
    settings: dict,
    overrides: dict,
    images: Output[Dataset],
    metrics: Output[Metrics],
):
    """Images from folders, tar archives or s3:// prefixes -> Parquet image shards."""
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import IMAGES_KIND
    from embedpipe.data.ingest import ingest_images

    config = stage_settings("ingest", settings, overrides)
    result = ingest_images(sources, images.path, config)
    log_metrics(metrics, result)
    images.metadata.update(kind=IMAGES_KIND, rows=result.images)
