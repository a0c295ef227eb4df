from kfp.dsl import Dataset, Input, Markdown, Metrics, Output


def split(
    catalog: Input[Dataset],
    concept_frac: float,
    min_concepts_threshold: int,
    test_sample_frac: float,
    max_test_images: int,
    seed: int,
    splits: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Catalog -> concept-level train/val splits, with a per-category report."""
    import shutil

    from embedpipe.config import SplitSettings
    from embedpipe.core.datasets import side_path
    from embedpipe.data.split import REPORT_MD, create_concept_splits

    config = SplitSettings(
        concept_frac=concept_frac,
        min_concepts_threshold=min_concepts_threshold,
        test_sample_frac=test_sample_frac,
        max_test_images=max_test_images,
        seed=seed,
    )
    result = create_concept_splits(catalog.path, splits.path, config)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    shutil.copyfile(side_path(splits.path, REPORT_MD), report.path)
    splits.metadata["kind"] = "splits"
