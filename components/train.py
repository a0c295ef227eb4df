from typing import Optional

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def train(
    images: Input[Dataset],
    splits: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    model_entry: str,
    models: str,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    negatives: Optional[Input[Dataset]] = None,  # noqa: UP045 (KFP reads Optional only)
):
    """Fine-tune a model or train a projection head: mined hard negatives in the batch,
    validation recall@K on held-out concepts, curves in the report. ``negatives`` is
    absent where no mining ran (images paired with signals).

    ``model_entry`` is the registry entry of ``[train].model`` (the head's backbone in head
    mode) as JSON, resolved when the pipeline is compiled; ``models`` the config's
    ``[models.NAME]`` entries as JSON (e.g. a signal encoder of its own). Every GPU the
    pod has is used (torchrun) when ``nproc_per_node`` asks for more than one process.
    """
    import json

    from embedpipe.config import stage_settings
    from embedpipe.models.registry import ModelEntry
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.train.launch import launch_training
    from embedpipe.train.report import record_training_outputs

    config = stage_settings("train", settings, overrides)
    entry = ModelEntry.model_validate_json(model_entry)
    mined = negatives.path if negatives is not None else ""
    inputs = TrainInputs(images.path, splits.path, mined, embeddings.path)
    launch_training(inputs.for_mode(config.mode), model.path, config, entry, json.loads(models))
    record_training_outputs(model, metrics, report.path, config, entry.name)


def train_job(
    images: Input[Dataset],
    splits: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    trainer_image: str,
    cluster: dict,
    run_id: str,
    task_name: str,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    negatives: Optional[Input[Dataset]] = None,  # noqa: UP045 (KFP reads Optional only)
):
    """Train past one node (data image): a Kubeflow Trainer TrainJob of ``[train].num_nodes``
    pods with ``accelerator_limit`` GPUs each runs ``embedpipe train`` under torchrun,
    writing the model to this step's output. The TrainJob's name comes from the run and
    the task, so a retried pod follows the job already there; it fails with the job's
    reason."""
    from embedpipe.cli.stages import train_arguments
    from embedpipe.config import ClusterSettings, stage_settings
    from embedpipe.kube import api as kube
    from embedpipe.kube.objects import as_dict, object_name
    from embedpipe.kube.objects import train_job as build_train_job
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.train.report import record_training_outputs

    config = stage_settings("train", settings, overrides)
    placement = ClusterSettings.model_validate(cluster)
    mined = negatives.uri if negatives is not None else ""
    inputs = TrainInputs(images.uri, splits.uri, mined, embeddings.uri)
    job = build_train_job(
        object_name("embedpipe-train", run_id, task_name),
        trainer_image,
        train_arguments(inputs.for_mode(config.mode), model.uri, config),
        placement,
        num_nodes=config.num_nodes,
        gpus_per_node=config.accelerator_limit,
    )
    kube.run_train_job(
        kube.connect(),
        as_dict(job),
        kube.current_namespace(),
        timeout_s=placement.launcher_timeout_minutes * 60,
        poll_s=placement.launcher_poll_seconds,
    )
    # the job's rank 0 wrote the model and its metrics at this step's output
    record_training_outputs(model, metrics, report.path, config, config.model)
    model.metadata["train_job"] = job.metadata.name
