from kfp.dsl import Dataset, Input, Metrics, Output


def embed(
    images: Input[Dataset],
    select: Input[Dataset],
    settings: dict,
    overrides: dict,
    model_entry: str,
    embeddings: Output[Dataset],
    metrics: Output[Metrics],
):
    """Images (those in ``select``) -> Parquet embeddings.

    ``model_entry`` is the registry entry of ``[embed].model`` as JSON, resolved when the
    pipeline is compiled (custom ``[models.NAME]`` entries live in the config file). JSON
    text, not a dict: KFP turns every number of a dict into a float, and a free-form
    architecture config needs its integers.
    """
    from embedpipe.config import stage_settings
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import EMBEDDINGS_KIND
    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import ModelEntry

    config = stage_settings("embed", settings, overrides)
    entry = ModelEntry.model_validate_json(model_entry)
    result = embed_images(images.path, embeddings.path, config, entry, select.path)
    log_metrics(metrics, result)
    embeddings.metadata.update(kind=EMBEDDINGS_KIND, model=entry.name, dim=entry.embed_dim)
