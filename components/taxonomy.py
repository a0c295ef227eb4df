from kfp.dsl import Dataset, Input, Metrics, Output


def taxonomy(
    images: Input[Dataset],
    table: str,
    name_column: str,
    side_table: str,
    side_table_key: str,
    kingdom: str,
    split_mode: str,
    test_fraction: float,
    val_fraction: float,
    min_images_per_species: int,
    keep_genus_in_train: bool,
    seed: int,
    taxonomy: Output[Dataset],
    metrics: Output[Metrics],
):
    """Species names -> accepted taxa, tree, rank keys, taxon splits, indexes with captions."""
    from embedpipe.config import TaxonomySettings
    from embedpipe.taxonomy.stage import build_taxonomy

    config = TaxonomySettings(
        table=table,
        name_column=name_column,
        side_table=side_table,
        side_table_key=side_table_key,
        kingdom=kingdom,
        split_mode=split_mode,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        min_images_per_species=min_images_per_species,
        keep_genus_in_train=keep_genus_in_train,
        seed=seed,
    )
    result = build_taxonomy(images.path, table, taxonomy.path, config)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    taxonomy.metadata["kind"] = "taxonomy"
