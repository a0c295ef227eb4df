from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate(
    metadata: Input[Dataset],
    select: Input[Dataset],
    images: Input[Dataset],
    baseline: Input[Dataset],
    model: Input[Model],
    settings: dict,
    overrides: dict,
    models: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """The untrained and the trained model side by side on the images of ``select`` (e.g.
    dedup's kept images): ``baseline`` (the embeddings the training started from) and
    ``model`` (a trained checkpoint); ground truth (splits, concepts) from ``metadata``.

    ``models`` is the config's ``[models.NAME]`` entries as JSON, for registry lookups.
    """
    import json
    import shutil

    from embedpipe.embed.openmp import passive_wait

    passive_wait()  # before torch loads
    from embedpipe.config import stage_settings
    from embedpipe.core import storage
    from embedpipe.core.datasets import side_path
    from embedpipe.core.results import log_metrics
    from embedpipe.core.schemas import EVALUATION_KIND
    from embedpipe.evaluate.sources import EmbeddingsSource, ModelSource
    from embedpipe.evaluate.stage import CONFUSION_NAME, REPORT_NAME, evaluate_models

    config = stage_settings("evaluate", settings, overrides)
    sources = [
        EmbeddingsSource(baseline.path, name="untrained"),
        ModelSource(model.path, name="trained"),
    ]
    result = evaluate_models(
        sources,
        metadata.path,
        evaluation.path,
        config,
        images.path,
        json.loads(models),
        select.path,
    )
    log_metrics(metrics, result)
    for matrix in storage.read_json(side_path(evaluation.path, CONFUSION_NAME)).values():
        confusion.log_confusion_matrix(matrix["labels"], matrix["matrix"])
        break  # one matrix per artifact: the first model's
    shutil.copyfile(side_path(evaluation.path, REPORT_NAME), report.path)
    evaluation.metadata.update(kind=EVALUATION_KIND, models=result.models, skipped=result.skipped)
