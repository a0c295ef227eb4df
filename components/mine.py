from kfp.dsl import Dataset, Input, Metrics, Output


def partition(
    metadata: Input[Dataset], embeddings: Input[Dataset], partitions: Output[Dataset]
) -> list:
    """Each category's images and vectors as a slice of its own; returns the categories."""
    from embedpipe.mining.mine import partition_by_category

    return sorted(partition_by_category(metadata.path, embeddings.path, partitions.path))


def mine(
    partitions: Input[Dataset],
    category: str,
    top_k: int,
    query_splits: list,
    candidate_splits: list,
    band_names: list,
    band_quantiles: list,
    index: str,
    exact_max: int,
    seed: int,
    negatives: Output[Dataset],
    metrics: Output[Metrics],
):
    """Hard negatives for one category (one ParallelFor iteration)."""
    from embedpipe.config import MineSettings
    from embedpipe.mining.mine import mine_category, read_partitions

    config = MineSettings(
        top_k=top_k,
        query_splits=tuple(query_splits),
        candidate_splits=tuple(candidate_splits),
        band_names=tuple(band_names),
        band_quantiles=tuple(band_quantiles),
        index=index,
        exact_max=exact_max,
        seed=seed,
    )
    result = mine_category(read_partitions(partitions.path)[category], negatives.path, config)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    negatives.metadata.update(category=category, skipped=result.skipped)


def combine(
    per_category: Input[list[Dataset]],
    num_samples: int,
    seed: int,
    combined: Output[Dataset],
    metrics: Output[Metrics],
):
    """Per-category negatives (collected from the fan-out) -> one dataset."""
    from embedpipe.mining.combine import combine_negatives

    result = combine_negatives([d.path for d in per_category], combined.path, num_samples, seed)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    combined.metadata["skipped_categories"] = result.skipped_categories


def to_hf(
    negatives: Input[Dataset],
    images: Input[Dataset],
    max_positives: int,
    seed: int,
    hf_dataset: Output[Dataset],
):
    """Negatives + image bytes -> a Hugging Face Dataset (save_to_disk)."""
    from embedpipe.mining.to_hf import export_to_hf

    rows = export_to_hf(negatives.path, images.path, hf_dataset.path, max_positives, seed)
    hf_dataset.metadata.update(format="huggingface-datasets", rows=rows)
