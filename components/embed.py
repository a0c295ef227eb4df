from kfp.dsl import Dataset, Input, Metrics, Output


def embed(
    images: Input[Dataset],
    select: Input[Dataset],
    settings: dict,
    overrides: dict,
    model_entry: str,
    embeddings: Output[Dataset],
    metrics: Output[Metrics],
    group: int = 0,
    groups: int = 1,
):
    """Images (those in ``select``) -> Parquet embeddings; with ``groups`` > 1, only the
    ``group``-th contiguous group of the input shards (one task of the fan-out).

    ``model_entry`` is the registry entry of ``[embed].model`` as JSON, resolved when the
    pipeline is compiled (custom ``[models.NAME]`` entries live in the config file). JSON
    text, not a dict: KFP turns every number of a dict into a float, and a free-form
    architecture config needs its integers.
    """
    from embedpipe.embed.openmp import passive_wait

    passive_wait()  # before torch loads
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import EMBEDDINGS_KIND
    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import ModelEntry

    config = stage_settings("embed", settings, overrides)
    entry = ModelEntry.model_validate_json(model_entry)
    result = embed_images(
        images.path, embeddings.path, config, entry, select.path, shard_group=(group, groups)
    )
    log_metrics(metrics, result)
    embeddings.metadata.update(kind=EMBEDDINGS_KIND, model=entry.name, dim=entry.embed_dim)


def merge_embeddings(parts: Input[list[Dataset]], embeddings: Output[Dataset]):
    """The fan-out's embeddings as one dataset: the parts' shards in group order, linked
    (or copied server-side on S3) into it, never rewritten."""
    from embedpipe.core.datasets import merge_datasets, read_manifest
    from embedpipe.core.schemas import EMBEDDINGS_KIND

    ordered = sorted(
        (part.path for part in parts),
        key=lambda path: read_manifest(path, EMBEDDINGS_KIND)["shard_group"][0],
    )
    manifest = merge_datasets(ordered, embeddings.path, EMBEDDINGS_KIND)
    embeddings.metadata.update(kind=EMBEDDINGS_KIND, model=manifest["model"], rows=manifest["rows"])
