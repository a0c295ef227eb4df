from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(
    images: Input[Dataset],
    splits: Input[Dataset],
    negatives: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    model_entry: str,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Fine-tune a model or train a projection head: mined hard negatives in the batch,
    validation recall@K on held-out concepts, curves in the report.

    ``model_entry`` is the registry entry of ``[train].model`` (the head's backbone in head
    mode) as JSON, resolved when the pipeline is compiled. Every GPU the pod has is used
    (torchrun) when ``nproc_per_node`` asks for more than one process.
    """
    from embedpipe.config import stage_settings
    from embedpipe.core import storage
    from embedpipe.core.datasets import side_path
    from embedpipe.models.registry import ModelEntry
    from embedpipe.train.checkpoint import METRICS_NAME
    from embedpipe.train.distributed import processes_wanted, train_in_processes
    from embedpipe.train.report import render_report
    from embedpipe.train.stage import train_model

    config = stage_settings("train", settings, overrides)
    entry = ModelEntry.model_validate_json(model_entry)
    inputs = {
        "splits": splits.path,
        "negatives": negatives.path,
        "embeddings": embeddings.path if config.mode == "head" else None,
    }
    nproc = processes_wanted(config.nproc_per_node)
    if nproc > 1:
        spec = {"images": images.path, "out": model.path, "entry": entry.model_dump(mode="json")}
        train_in_processes(nproc, {**spec, **inputs, "settings": config.model_dump(mode="json")})
    else:
        train_model(
            images.path, model.path, config, entry, **{f"{k}_uri": v for k, v in inputs.items()}
        )
    summary = storage.read_json(side_path(model.path, METRICS_NAME))
    for name, value in summary["result"].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(name, value)
    with open(report.path, "w", encoding="utf-8") as handle:
        handle.write(render_report(summary))
    result = summary["result"]
    model.metadata.update(
        model=entry.name,
        mode=config.mode,
        loss=config.loss,
        steps=result["steps"],
        best_metric=result["best_metric"],
        best_value=result["best_value"],
    )
