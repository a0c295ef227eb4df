from kfp.dsl import Dataset, Metrics, Output


def ingest(
    sources: list[str],
    rows_per_shard: int,
    row_group_rows: int,
    workers: int,
    strip_components: int,
    split_dirnames: list[str],
    images: Output[Dataset],
    metrics: Output[Metrics],
):
    """Images from folders, tar archives or s3:// prefixes -> Parquet image shards."""
    from embedpipe.config import IngestSettings
    from embedpipe.data.ingest import ingest_images

    config = IngestSettings(
        rows_per_shard=rows_per_shard,
        row_group_rows=row_group_rows,
        workers=workers,
        strip_components=strip_components,
        split_dirnames=tuple(split_dirnames),
    )
    result = ingest_images(sources, images.path, config)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    images.metadata["kind"] = "images"
    images.metadata["rows"] = result.images
