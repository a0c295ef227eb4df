from kfp.dsl import Dataset, Input, Metrics, Output


def embed(
    images: Input[Dataset],
    select: Input[Dataset],
    model_spec: str,
    weights: str,
    tokenizer_dir: str,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
    normalize: bool,
    draft_decode: bool,
    embeddings: Output[Dataset],
    metrics: Output[Metrics],
):
    """Images (those in ``select``) -> Parquet embeddings with the model ``model_spec`` names.

    ``model_spec`` is the registry entry as JSON, resolved when the pipeline is compiled.
    """
    import json

    from embedpipe.config import EmbedSettings
    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import ModelEntry

    entry = ModelEntry(**json.loads(model_spec))
    config = EmbedSettings(
        model=entry.name,
        weights=weights,
        tokenizer_dir=tokenizer_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        normalize=normalize,
        draft_decode=draft_decode,
    )
    result = embed_images(images.path, embeddings.path, config, entry, select.path)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    embeddings.metadata.update(kind="embeddings", model=entry.name, dim=entry.embed_dim)
