from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def dedup(
    images: Input[Dataset],
    splits: Input[Dataset],
    hash: str,
    hash_size: int,
    max_distance: int,
    workers: int,
    drop: str,
    report_groups: int,
    dedup: Output[Dataset],
    kept: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Perceptual-hash duplicate groups, cross-split leakage, kept selection, HTML report."""
    import shutil

    from embedpipe.config import DedupSettings
    from embedpipe.core.datasets import side_path
    from embedpipe.data.dedup import REPORT_HTML, find_duplicates

    config = DedupSettings(
        hash=hash,
        hash_size=hash_size,
        max_distance=max_distance,
        workers=workers,
        drop=drop,
        report_groups=report_groups,
    )
    result = find_duplicates(images.path, dedup.path, config, splits.path, kept.path)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    shutil.copyfile(side_path(dedup.path, REPORT_HTML), report.path)
    kept.metadata["kind"] = "selection"
