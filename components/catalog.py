from kfp.dsl import Dataset, Input, Metrics, Output


def catalog(
    images: Input[Dataset],
    num_train: int,
    train_fraction: float,
    seed: int,
    relative: bool,
    catalog: Output[Dataset],
    metrics: Output[Metrics],
):
    """Image shards -> train/test catalog (Parquet plus PerVA-layout JSON).

    num_train 0 means "use train_fraction": kfp.local cannot pass None parameters.
    """
    from embedpipe.config import CatalogSettings
    from embedpipe.data.catalog import build_catalog

    config = CatalogSettings(
        num_train=num_train or None, train_fraction=train_fraction, seed=seed, relative=relative
    )
    result = build_catalog(images.path, catalog.path, config)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    catalog.metadata["kind"] = "catalog"
    catalog.metadata["mode"] = result.mode
