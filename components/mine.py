from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def partition(
    images: Input[Dataset],
    metadata: Input[Dataset],
    embeddings: Input[Dataset],
    partitions: Output[Dataset],
) -> list:
    """Each category's images and vectors as a slice of its own; returns the categories.

    The images are read only by the last step (to_hf); they are verified here, before
    any mining, so a damaged input fails the run in seconds.
    """
    from embedpipe.core.datasets import verify_dataset
    from embedpipe.core.schemas import IMAGES_KIND
    from embedpipe.mining.partition import partition_by_category

    verify_dataset(images.path, IMAGES_KIND)
    return sorted(partition_by_category(metadata.path, embeddings.path, partitions.path))


def mine(
    partitions: Input[Dataset],
    category: str,
    settings: dict,
    overrides: dict,
    negatives: Output[Dataset],
    metrics: Output[Metrics],
):
    """Hard negatives for one category (one ParallelFor iteration)."""
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import NEGATIVES_KIND
    from embedpipe.mining.mine import mine_category
    from embedpipe.mining.partition import read_partitions

    config = stage_settings("mine", settings, overrides)
    result = mine_category(read_partitions(partitions.path)[category], negatives.path, config)
    log_metrics(metrics, result)
    negatives.metadata.update(kind=NEGATIVES_KIND, category=category, skipped=result.skipped)


def combine(
    per_category: Input[list[Dataset]],
    settings: dict,
    overrides: dict,
    combined: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Per-category negatives (collected from the fan-out) -> one dataset, and the mining
    report: per category, the candidates each filter dropped and the score distributions."""
    import shutil

    from embedpipe.config import stage_settings
    from embedpipe.core.datasets import side_path
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import NEGATIVES_KIND
    from embedpipe.mining.combine import combine_negatives
    from embedpipe.mining.report import REPORT_HTML

    config = stage_settings("combine", settings, overrides)
    result = combine_negatives([d.path for d in per_category], combined.path, config)
    log_metrics(metrics, result)
    shutil.copyfile(side_path(combined.path, REPORT_HTML), report.path)
    combined.metadata.update(kind=NEGATIVES_KIND, skipped_categories=result.skipped_categories)


def to_hf(
    negatives: Input[Dataset],
    images: Input[Dataset],
    settings: dict,
    overrides: dict,
    hf_dataset: Output[Dataset],
):
    """Negatives + image bytes -> a Hugging Face Dataset (save_to_disk)."""
    from embedpipe.config import stage_settings
    from embedpipe.mining.to_hf import export_to_hf

    config = stage_settings("to_hf", settings, overrides)
    rows = export_to_hf(negatives.path, images.path, hf_dataset.path, config)
    hf_dataset.metadata.update(format="huggingface-datasets", rows=rows)


def mine_negatives(
    metadata: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    combine_settings: dict,
    combine_overrides: dict,
    negatives: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Every category mined and combined in this one step: after a search of [mine]
    filters, the negatives of the best ones (``overrides``: the run's [mine] overrides with
    the best filters on top), which the final training takes."""
    import shutil
    import tempfile

    from embedpipe.config import stage_settings
    from embedpipe.core.datasets import side_path
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import NEGATIVES_KIND
    from embedpipe.mining.negatives import mine_negatives as mine_all
    from embedpipe.mining.report import REPORT_HTML

    config = stage_settings("mine", settings, overrides)
    combine_config = stage_settings("combine", combine_settings, combine_overrides)
    with tempfile.TemporaryDirectory(prefix="embedpipe-mine-") as categories:
        result = mine_all(
            metadata.path, embeddings.path, negatives.path, config, combine_config, categories
        )
    log_metrics(metrics, result)
    shutil.copyfile(side_path(negatives.path, REPORT_HTML), report.path)
    negatives.metadata.update(kind=NEGATIVES_KIND, skipped_categories=result.skipped_categories)
