"""Tuning on one machine: an Optuna study whose trials train in this process.

The study lives in ``OUT/.embedpipe/study.db`` (SQLite), so running the same command
again resumes it: finished trials stay, a trial that was interrupted (Ctrl-C, or a kill
that left it running) is run again with the same parameters in the same folder, where
training resumes from its last checkpoint. Each trial trains into ``OUT/runs/trial-NNNN``;
validation metrics feed a median pruner as they come. A space with ``mine.KEY`` filters
re-mines each trial's negatives first, from the splits and embeddings with ``[mine]`` and
the trial's values on top, into ``OUT/mined/trial-NNNN`` (its ``negatives`` are what the
trial trains on, its ``mining_report.html`` what the filters dropped).

Outputs: ``OUT/trials`` (a dataset, one row per trial), ``OUT/best.json`` (the best
parameters, its value and trial), ``OUT/report.html`` with ``history.png`` and
``importances.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.compute as pc
from optuna.trial import TrialState

from embedpipe.config import (
    CombineSettings,
    ConfigError,
    MineSettings,
    SearchDimension,
    TrainSettings,
    TuneSettings,
)
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import EMBEDDINGS_KIND
from embedpipe.models.registry import ModelEntry
from embedpipe.train.inputs import TrainInputs
from embedpipe.tune.space import (
    check_search,
    grid_values,
    searches_mining,
    split_params,
    trial_mine_settings,
    trial_settings,
)

log = logging.getLogger(__name__)

STUDY_NAME = "embedpipe-tune"
STUDY_FILE = "study.db"
TRIALS_KIND = "tune_trials"
# user attributes of a trial
OUT_ATTR, ERROR_ATTR, INTERRUPTED_ATTR, RESUMES_ATTR = "out_uri", "error", "interrupted", "resumes"
NEGATIVES_ATTR, NEGATIVES_COUNT_ATTR = "negatives_uri", "negatives"


@dataclass(frozen=True)
class TuneResult(StageMetrics):
    out_uri: str
    metric: str
    direction: str
    best_value: float
    best_trial: int
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    trials_run_now: int
    seconds: float
    best_params: dict[str, Any] = field(default_factory=dict)


def best_path(out_uri: str) -> str:
    return os.path.join(out_uri, "best.json")


def _sampler(
    tune: TuneSettings, space: dict[str, SearchDimension], trials_before: int = 0
) -> optuna.samplers.BaseSampler:
    """The seeded sampler; a resumed study (``trials_before`` trials already stored) seeds
    it with ``seed + trials_before``, so it does not draw the first run's values again."""
    seed = tune.seed + trials_before
    if tune.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.algorithm == "grid":
        grid = {key: grid_values(dimension) for key, dimension in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    # multivariate: what Katib's Optuna suggestion runs as "multivariate-tpe"
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _suggest(trial: optuna.Trial, key: str, dimension: SearchDimension) -> Any:
    if dimension.type == "categorical":
        return trial.suggest_categorical(key, list(dimension.choices))
    if dimension.type == "int":
        return trial.suggest_int(
            key,
            int(dimension.low),
            int(dimension.high),
            step=int(dimension.step or 1),
            log=dimension.log,
        )
    return trial.suggest_float(
        key, dimension.low, dimension.high, step=dimension.step, log=dimension.log
    )


@dataclass(frozen=True)
class Mining:
    """What a trial re-mines from when the space names [mine] filters: the metadata and
    embeddings the mining read, and the [mine] and [combine] settings its values go on."""

    metadata: str
    embeddings: str
    mine: MineSettings
    combine: CombineSettings


def _search_identity(
    tune: TuneSettings, train: TrainSettings, space: dict, mining: Mining | None = None
) -> str:
    """What a resumed study must share with the one in the folder."""
    identity = {
        "space": {k: v.model_dump(mode="json") for k, v in space.items()},
        "metric": tune.metric,
        "direction": tune.direction,
        "algorithm": tune.algorithm,
        "seed": tune.seed,
        "train": train.model_dump(mode="json"),
    }
    if mining is not None:
        identity["mine"] = mining.mine.model_dump(mode="json")
        identity["combine"] = mining.combine.model_dump(mode="json")
    return json.dumps(identity, sort_keys=True)


def _open_study(out_uri: str, tune: TuneSettings, train: TrainSettings, space: dict, mining=None):
    os.makedirs(datasets.side_path(out_uri), exist_ok=True)
    url = f"sqlite:///{os.path.abspath(datasets.side_path(out_uri, STUDY_FILE))}"
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=tune.pruning_startup_trials)
        if tune.pruning
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=url,
        study_name=STUDY_NAME,
        direction=tune.direction,
        sampler=_sampler(tune, space),
        pruner=pruner,
        load_if_exists=True,
    )
    trials_before = len(study.get_trials(deepcopy=False))
    if trials_before:
        study.sampler = _sampler(tune, space, trials_before)
    identity = _search_identity(tune, train, space, mining)
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", identity)
    elif stored != identity:
        raise ConfigError(
            f"{out_uri}: holds a study of another search (space, metric, algorithm, seed, "
            "[train] or [mine] settings differ); give another --out, or delete that folder "
            "to start over"
        )
    return study


def _requeue_interrupted(study: optuna.Study) -> int:
    """Trials a kill left running are failed; every interrupted trial not yet requeued is
    queued again with its parameters and folder, so its training resumes there."""
    storage_ = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage_.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        storage_.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get(RESUMES_ATTR) for t in trials}
    count = 0
    for trial in trials:
        if trial.user_attrs.get(INTERRUPTED_ATTR) and trial.number not in requeued:
            user_attrs = {RESUMES_ATTR: trial.number}
            if OUT_ATTR in trial.user_attrs:
                user_attrs[OUT_ATTR] = trial.user_attrs[OUT_ATTR]
            study.enqueue_trial(trial.params, user_attrs=user_attrs)
            count += 1
    return count


def _counted(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Trials that count towards n_trials, by outcome (interrupted ones do not count)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(INTERRUPTED_ATTR)]
    return {
        "complete": [t for t in trials if t.state == TrialState.COMPLETE],
        "pruned": [t for t in trials if t.state == TrialState.PRUNED],
        "failed": [t for t in trials if t.state == TrialState.FAIL],
        "waiting": [t for t in trials if t.state == TrialState.WAITING],
    }


def trial_value(history: list[dict], metric: str, direction: str) -> float:
    """The best value of ``metric`` over a trial's validations after step 0 (the untrained
    figure is not a model the trial produced), as Katib's max/min metric strategy takes it."""
    values = [r[metric] for r in history if r.get("step", 0) > 0 and metric in r]
    if not values:
        raise RuntimeError(f"training reported no {metric} after step 0 (is validation off?)")
    return max(values) if direction == "maximize" else min(values)


def negatives_count(negatives_uri: str) -> int:
    """The negatives a mined dataset holds, over all its queries."""
    column = datasets.read_table(negatives_uri, columns=["negative_ids"]).column(0)
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def mine_trial_negatives(mining: Mining, out_uri: str, mine_params: dict[str, Any]) -> str:
    """The trial's negatives: every category re-mined with [mine] and the trial's values
    on top (``out_uri/categories``), combined (``out_uri/negatives``, their URI)."""
    from embedpipe.mining.negatives import mine_negatives

    config = trial_mine_settings(mining.mine, mine_params)
    negatives, categories = os.path.join(out_uri, "negatives"), os.path.join(out_uri, "categories")
    mine_negatives(
        mining.metadata, mining.embeddings, negatives, config, mining.combine, categories
    )
    return negatives


class _Objective:
    def __init__(
        self,
        out_uri,
        tune,
        train,
        space,
        entry: ModelEntry,
        inputs: TrainInputs,
        mining=None,
        models: dict | None = None,
    ):
        self.out_uri, self.tune, self.train, self.space = out_uri, tune, train, space
        self.entry, self.inputs, self.mining, self.models = entry, inputs, mining, models
        self.run_now = 0

    def __call__(self, trial: optuna.Trial) -> float:
        from embedpipe.train import checkpoint as ckpt
        from embedpipe.train.stage import train_model

        self.run_now += 1
        params = {key: _suggest(trial, key, dim) for key, dim in self.space.items()}
        out = trial.user_attrs.get(OUT_ATTR) or os.path.join(
            self.out_uri, "runs", f"trial-{trial.number:04d}"
        )
        trial.set_user_attr(OUT_ATTR, out)
        metric = self.tune.metric

        def report(step: int, metrics: dict[str, float]) -> None:
            if step <= 0 or metric not in metrics:
                return
            trial.report(metrics[metric], step)
            if self.tune.pruning and trial.should_prune():
                raise optuna.TrialPruned(f"at step {step}: {metric}={metrics[metric]:.4g}")

        log.info("trial %d: %s", trial.number, params)
        try:
            train_params, mine_params = split_params(params)
            config = trial_settings(self.train, train_params)
            inputs = self.inputs.for_mode(config.mode)
            if self.mining is not None:
                mined = os.path.join(self.out_uri, "mined", f"trial-{trial.number:04d}")
                negatives = mine_trial_negatives(self.mining, mined, mine_params)
                trial.set_user_attr(NEGATIVES_ATTR, negatives)
                trial.set_user_attr(NEGATIVES_COUNT_ATTR, negatives_count(negatives))
                inputs = replace(inputs, negatives=negatives)
            train_model(
                inputs.images,
                out,
                config,
                self.entry,
                **inputs.keywords(),
                on_validation=report,
                models=self.models,
            )
            summary = storage.read_json(datasets.side_path(out, ckpt.METRICS_NAME))
            skipped = (summary.get("result") or {}).get("skipped", {}).get("validation")
            if skipped:
                raise RuntimeError(f"training measured no {metric}: validation skipped: {skipped}")
            return trial_value(summary["history"], metric, self.tune.direction)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:2000])
            raise


@outputs.writes_output(inputs=TrainInputs.parameters())
def tune_model(
    images_uri: str,
    out_uri: str,
    tune: TuneSettings,
    train: TrainSettings,
    entry: ModelEntry,
    splits_uri: str | None = None,
    negatives_uri: str | None = None,
    embeddings_uri: str | None = None,
    captions_uri: str | None = None,
    *,
    mine: MineSettings | None = None,
    combine: CombineSettings | None = None,
    models: dict | None = None,
) -> TuneResult:
    """Run (or resume) the study in ``out_uri`` (a local folder) and write its outputs.
    The study holds the output's lock, so a second tune of the same folder stops at once
    instead of failing the first one's live trial.

    A space with ``mine.KEY`` filters re-mines each trial's negatives from ``splits_uri``
    and ``embeddings_uri`` with ``mine`` (and ``combine``; their defaults when None) and
    the trial's values on top; ``embeddings_uri`` reaches training only in head mode;
    ``models``: the config file's ``[models.NAME]`` entries (e.g. a signal encoder)."""
    started = time.perf_counter()
    if storage.is_s3(out_uri):
        raise ConfigError(
            f"--out {out_uri}: the study's SQLite storage needs a local folder, not s3://"
        )
    space = check_search(tune, train, mine)
    mining = None
    if searches_mining(space):
        if not (splits_uri and embeddings_uri):
            raise ConfigError(
                "[tune].space: searching [mine] filters re-mines each trial's negatives: "
                "give the splits (--splits) and the embeddings (--embeddings) mining reads"
            )
        # read by every trial: a wrong path is one error now, not a failure per trial
        datasets.verify_dataset(splits_uri)
        datasets.verify_dataset(embeddings_uri, EMBEDDINGS_KIND)
        mining = Mining(
            splits_uri, embeddings_uri, mine or MineSettings(), combine or CombineSettings()
        )
    out_uri = os.path.abspath(out_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(out_uri, tune, train, space, mining)
    requeued = _requeue_interrupted(study)
    counted = _counted(study)
    done = sum(len(counted[k]) for k in ("complete", "pruned", "failed"))
    if requeued or done:
        log.info("resuming the study in %s: %d trials done, %d to rerun", out_uri, done, requeued)
    inputs = TrainInputs(images_uri, splits_uri, negatives_uri, embeddings_uri, captions_uri)
    objective = _Objective(out_uri, tune, train, space, entry, inputs, mining, models)

    def stop_when_too_many_fail(study: optuna.Study, _trial) -> None:
        if len(_counted(study)["failed"]) > tune.max_failed_trials:
            study.stop()

    remaining = tune.n_trials - done
    if remaining > 0 and len(counted["failed"]) <= tune.max_failed_trials:
        study.optimize(
            objective,
            n_trials=remaining,
            catch=(Exception,),
            callbacks=[stop_when_too_many_fail],
            gc_after_trial=True,
        )
    counted = _counted(study)
    failed = counted["failed"]
    if len(failed) > tune.max_failed_trials:
        last = failed[-1].user_attrs.get(ERROR_ATTR, "no error recorded")
        raise RuntimeError(
            f"{len(failed)} trials failed, more than [tune].max_failed_trials "
            f"{tune.max_failed_trials}; the last: trial {failed[-1].number}: {last}"
        )
    if not counted["complete"]:
        raise RuntimeError(
            f"no trial completed ({len(counted['pruned'])} pruned, {len(failed)} failed)"
        )
    best = study.best_trial
    write_outputs(study, out_uri, tune)
    result = TuneResult(
        out_uri=out_uri,
        metric=tune.metric,
        direction=tune.direction,
        best_value=float(best.value),
        best_trial=best.number,
        trials_complete=len(counted["complete"]),
        trials_pruned=len(counted["pruned"]),
        trials_failed=len(failed),
        trials_run_now=objective.run_now,
        seconds=round(time.perf_counter() - started, 3),
        best_params=dict(best.params),
    )
    log.info("best trial %d: %s=%.4g with %s", best.number, tune.metric, best.value, best.params)
    return result


def _column(values: list[Any]) -> pa.Array:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int} or kinds <= {float} or kinds <= {str} or kinds <= {bool}:
        return pa.array(values)
    if kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def trials_table(study: optuna.Study) -> pa.Table:
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.distributions})
    columns: dict[str, pa.Array] = {
        "number": pa.array([t.number for t in trials], pa.int32()),
        "state": pa.array([t.state.name.lower() for t in trials]),
        "value": pa.array(
            [t.value if t.state == TrialState.COMPLETE else None for t in trials], pa.float64()
        ),
        "last_step": pa.array(
            [max(t.intermediate_values) if t.intermediate_values else None for t in trials],
            pa.int64(),
        ),
        "seconds": pa.array(
            [t.duration.total_seconds() if t.duration else None for t in trials], pa.float64()
        ),
        "interrupted": pa.array([bool(t.user_attrs.get(INTERRUPTED_ATTR)) for t in trials]),
        "out_uri": pa.array([t.user_attrs.get(OUT_ATTR, "") for t in trials]),
        "error": pa.array([t.user_attrs.get(ERROR_ATTR, "") for t in trials]),
    }
    if any(NEGATIVES_ATTR in t.user_attrs for t in trials):  # the trials re-mined
        columns["negatives_uri"] = pa.array([t.user_attrs.get(NEGATIVES_ATTR, "") for t in trials])
        columns["negatives"] = pa.array(
            [t.user_attrs.get(NEGATIVES_COUNT_ATTR) for t in trials], pa.int64()
        )
    for name in names:
        columns[f"param_{name}"] = _column([t.params.get(name) for t in trials])
    return pa.table(columns)


def importances(study: optuna.Study) -> dict[str, float]:
    """PED-ANOVA importances (no scikit-learn needed); empty when too few trials finished."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    try:
        with warnings.catch_warnings():  # "too few trials": the chart's title says so
            warnings.simplefilter("ignore", UserWarning)
            found = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError, ZeroDivisionError) as error:
        log.info("no parameter importances: %s", error)
        return {}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def write_outputs(study: optuna.Study, out_uri: str, tune: TuneSettings) -> None:
    from embedpipe.tune.report import render_report

    table = trials_table(study)
    datasets.write_table(os.path.join(out_uri, "trials"), table, TRIALS_KIND)
    best = study.best_trial
    storage.write_json(
        best_path(out_uri),
        {
            "params": best.params,
            "value": best.value,
            "trial": best.number,
            "metric": tune.metric,
            "direction": tune.direction,
            "out_uri": best.user_attrs.get(OUT_ATTR, ""),
            **(
                {"negatives_uri": best.user_attrs[NEGATIVES_ATTR]}
                if NEGATIVES_ATTR in best.user_attrs
                else {}
            ),
        },
    )
    found = importances(study)
    page, images = render_report(table.to_pylist(), found, tune.metric, tune.direction)
    for name, png in images.items():
        storage.write_bytes(os.path.join(out_uri, name), png)
    storage.write_bytes(os.path.join(out_uri, "report.html"), page.encode("utf-8"))
