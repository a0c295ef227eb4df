from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def dedup(
    images: Input[Dataset],
    splits: Input[Dataset],
    settings: dict,
    overrides: dict,
    dedup: Output[Dataset],
    kept: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Perceptual-hash duplicate groups, cross-split leakage, kept selection, HTML report."""
    import shutil

    from embedpipe.config import stage_settings
    from embedpipe.core.datasets import side_path
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import DEDUP_KIND, SELECTION_KIND
    from embedpipe.data.dedup import REPORT_HTML, find_duplicates

    config = stage_settings("dedup", settings, overrides)
    result = find_duplicates(images.path, dedup.path, config, splits.path, kept.path)
    log_metrics(metrics, result)
    shutil.copyfile(side_path(dedup.path, REPORT_HTML), report.path)
    dedup.metadata["kind"] = DEDUP_KIND
    kept.metadata["kind"] = SELECTION_KIND
