from typing import NamedTuple, Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def tune(
    images: Input[Dataset],
    splits: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    train_settings: dict,
    train_overrides: dict,
    mine_settings: dict,
    mine_overrides: dict,
    combine_settings: dict,
    combine_overrides: dict,
    model_entry: str,
    models: str,
    study: Output[Artifact],
    trials: Output[Dataset],
    best: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    negatives: Optional[Input[Dataset]] = None,  # noqa: UP045 (KFP reads Optional only)
) -> NamedTuple("TuneOutputs", [("best_overrides", dict), ("best_mine_overrides", dict)]):
    """Search [train] settings (and [mine] filters, ``mine.KEY``, each trial re-mining its
    negatives from ``splits`` and ``embeddings``) with Optuna, every trial training in this
    pod (GPU image); ``best_overrides`` is the run's [train] overrides with the best
    parameters on top, for the final training step, ``best_mine_overrides`` the run's
    [mine] overrides with the best filters on top, for the step that re-mines with them.

    ``study`` holds the SQLite study, each trial's model (runs/), its negatives (mined/)
    and the report's PNGs; ``models`` is the config's ``[models.NAME]`` entries as JSON.
    """
    import json
    import shutil
    from collections import namedtuple

    from embedpipe.config import stage_settings
    from embedpipe.core import datasets, storage
    from embedpipe.models.registry import ModelEntry
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.tune.space import split_params
    from embedpipe.tune.study import best_path, tune_model

    config = stage_settings("tune", settings, overrides)
    train = stage_settings("train", train_settings, train_overrides)
    mine = stage_settings("mine", mine_settings, mine_overrides)
    combine = stage_settings("combine", combine_settings, combine_overrides)
    entry = ModelEntry.model_validate_json(model_entry)
    inputs = TrainInputs(
        images.path, splits.path, negatives.path if negatives else "", embeddings.path
    )
    result = tune_model(
        inputs.images,
        study.path,
        config,
        train,
        entry,
        **inputs.keywords(),
        mine=mine,
        combine=combine,
        models=json.loads(models),
    )
    table = datasets.read_table(f"{study.path}/trials")
    datasets.write_table(trials.path, table, "tune_trials")
    shutil.copyfile(best_path(study.path), best.path)
    shutil.copyfile(f"{study.path}/report.html", report.path)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    for name, value in result.best_params.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(f"best_{name}", value)
    best.metadata.update(json.loads(storage.read_bytes(best.path)))
    best_train, best_mine = split_params(result.best_params)
    outputs = namedtuple("TuneOutputs", ["best_overrides", "best_mine_overrides"])
    return outputs({**train_overrides, **best_train}, {**mine_overrides, **best_mine})


def tune_katib(
    images: Input[Dataset],
    splits: Input[Dataset],
    embeddings: Input[Dataset],
    settings: dict,
    overrides: dict,
    train_settings: dict,
    train_overrides: dict,
    mine_settings: dict,
    mine_overrides: dict,
    combine_settings: dict,
    combine_overrides: dict,
    trial_image: str,
    cluster: dict,
    run_id: str,
    task_name: str,
    trials: Output[Artifact],
    best: Output[Artifact],
    metrics: Output[Metrics],
    negatives: Optional[Input[Dataset]] = None,  # noqa: UP045 (KFP reads Optional only)
) -> NamedTuple("TuneOutputs", [("best_overrides", dict), ("best_mine_overrides", dict)]):
    """Search [train] settings (and [mine] filters, ``mine.KEY``: each trial re-mines its
    negatives in its pod first) with a Katib Experiment (data image): create it under a
    name derived from the run and the task (a retried pod follows the one already there),
    log its trials, fail with its own reason, output the best parameters, split as the
    optuna step splits them.

    Each trial writes its model under ``trials`` (``<trials>/<trial name>``).
    """
    import json
    from collections import namedtuple

    from embedpipe.cli.stages import combine_arguments, mine_arguments, train_arguments
    from embedpipe.config import ClusterSettings, stage_settings
    from embedpipe.kube.objects import object_name
    from embedpipe.train.inputs import TrainInputs
    from embedpipe.tune.katib import launch_search
    from embedpipe.tune.space import split_params

    config = stage_settings("tune", settings, overrides)
    train = stage_settings("train", train_settings, train_overrides)
    mine = stage_settings("mine", mine_settings, mine_overrides)
    combine = stage_settings("combine", combine_settings, combine_overrides)
    inputs = TrainInputs(images.uri, splits.uri, negatives.uri if negatives else "", embeddings.uri)
    result = launch_search(
        object_name("embedpipe-tune", run_id, task_name),
        config,
        train,
        inputs,
        trials.uri,
        trial_image,
        ClusterSettings.model_validate(cluster),
        command=train_arguments,
        mine_command=mine_arguments,
        combine_command=combine_arguments,
        mine=mine,
        combine=combine,
    )
    summary = {
        "params": result.best_params,
        "value": result.best_value,
        "trial": result.best_trial,
        "metric": config.metric,
        "direction": config.direction,
        "experiment": result.experiment,
        "namespace": result.namespace,
        "out_uri": f"{trials.uri.rstrip('/')}/{result.best_trial}",
    }
    with open(best.path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    best.metadata.update(summary)
    metrics.log_metric("best_value", result.best_value)
    for name in ("trials", "trials_succeeded", "trials_failed", "trials_early_stopped"):
        metrics.log_metric(name, getattr(result, name))
    for name, value in result.best_params.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(f"best_{name}", value)
    best_train, best_mine = split_params(result.best_params)
    outputs = namedtuple("TuneOutputs", ["best_overrides", "best_mine_overrides"])
    return outputs({**train_overrides, **best_train}, {**mine_overrides, **best_mine})
