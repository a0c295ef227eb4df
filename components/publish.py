from kfp.dsl import Dataset, Input, Model, Output


def publish(
    checkpoint: Input[Model],
    images: Input[Dataset],
    dedup: Input[Dataset],
    evaluation: Input[Dataset],
    settings: dict,
    overrides: dict,
    published: Output[Model],
):
    """A trained checkpoint -> open_clip's Hugging Face layout (a projection head: a
    transformers custom model) with a model card of its lineage and evaluation, checked by
    reloading it; pushed to the Hub when ``push`` names a repo (token from a Secret)."""
    from embedpipe.config import stage_settings
    from embedpipe.core.datasets import side_path
    from embedpipe.evaluate.stage import METRICS_NAME
    from embedpipe.publish.stage import publish_checkpoint

    config = stage_settings("publish", settings, overrides)
    result = publish_checkpoint(
        checkpoint.path,
        published.path,
        config,
        side_path(evaluation.path, METRICS_NAME),
        [images.path, dedup.path],
        images.path,
    )
    published.metadata.update(
        kind=result.kind, parameters=result.parameters, pushed=result.pushed, files=result.files
    )
