from kfp.dsl import Dataset, Input, Markdown, Metrics, Output


def split(
    catalog: Input[Dataset],
    settings: dict,
    overrides: dict,
    splits: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Catalog -> concept-level train/val splits, with a per-category report."""
    import shutil

    from embedpipe.config import stage_settings
    from embedpipe.core.datasets import side_path
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import SPLITS_KIND
    from embedpipe.data.split import REPORT_MD, create_concept_splits

    config = stage_settings("split", settings, overrides)
    result = create_concept_splits(catalog.path, splits.path, config)
    log_metrics(metrics, result)
    shutil.copyfile(side_path(splits.path, REPORT_MD), report.path)
    splits.metadata["kind"] = SPLITS_KIND
