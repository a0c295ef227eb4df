"""Tuning on the cluster: ``[tune]`` as a Katib Experiment (kubeflow.org/v1beta1, Katib
v0.19), built from the typed models of ``kubeflow-katib-api``, and the launcher that
creates it under a deterministic name, follows it and returns the best parameters.

Each trial runs ``embedpipe train`` with the trial's parameters as flags, as a Kubeflow
Trainer TrainJob (``torch-distributed`` runtime) or a batch Job, on the GPU pool. Katib's
StdOut collector reads the ``name=value`` lines training prints (``METRIC_FILTER``).

A space with ``mine.KEY`` filters (Katib parameter ``mine_KEY``) makes each trial pod
re-mine first: ``sh -c "embedpipe mine SPLITS EMBEDDINGS --out LOCAL --KEY=VALUE ... &&
embedpipe combine LOCAL/negatives/* --out LOCAL2 && torchrun -m embedpipe train ...
--negatives LOCAL2"``, in a node-local folder (every node of a multi-node trial mines the
same rows: mining is deterministic). Katib's collector redirects only the training's
output, the last command of the line, to the file it reads.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kubeflow_katib_api import models as katib

from embedpipe.config import (
    ClusterSettings,
    CombineSettings,
    ConfigError,
    MineSettings,
    SearchDimension,
    TrainSettings,
    TuneSettings,
)
from embedpipe.kube import api as kube
from embedpipe.kube import objects
from embedpipe.train.inputs import TrainInputs
from embedpipe.tune.space import check_search, mine_key

log = logging.getLogger(__name__)

KATIB_API = "kubeflow.org/v1beta1"
ALGORITHMS = {"tpe": "multivariate-tpe", "random": "random", "grid": "grid"}
# Two groups, name and value, as Katib's collector takes them; the value always parses as
# a float (Katib's default filter also matches an empty value, which kills the collector).
METRIC_FILTER = r"([a-z][a-z0-9_]*)=([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
KATIB_UNSAFE = re.compile(r"[/.@]")
TRIAL_NAME = "trialName"
# A trial's command line (after ``embedpipe``) for its inputs, output, [train] settings and
# a placeholder per searched key: the command line's own writer,
# ``embedpipe.cli.stages.train_arguments``, handed in by the caller.
TrainCommand = Callable[[TrainInputs, str, TrainSettings, dict[str, str]], list[str]]
# And, for a trial that re-mines, ``mine_arguments`` (metadata, embeddings, output, [mine],
# placeholders of the searched [mine] keys) and ``combine_arguments`` (inputs, output,
# [combine]) of ``embedpipe.cli.stages``.
MineCommand = Callable[[str, str, str, MineSettings, dict[str, str]], list[str]]
CombineCommand = Callable[[list[str], str, CombineSettings], list[str]]
# Katib's own defaults for TrainJob trials (v0.19), spelled out so the Experiment reads
# the same on any Katib version that runs it.
TRAINJOB_SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
TRAINJOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
# Where a trial that searches [mine] filters re-mines, in its own pod.
TRIAL_MINING = "/tmp/embedpipe-trial-mining"
TRAINJOB_PRIMARY_POD = {
    "jobset.sigs.k8s.io/replicatedjob-name": "node",
    "batch.kubernetes.io/job-completion-index": "0",
}


def _text(value: Any) -> str:
    return format(value, ".10g") if isinstance(value, float) else str(value)


def parameter_name(key: str) -> str:
    """A space key as a Katib parameter (``mine.margin`` -> ``mine_margin``): names of
    placeholders, ``${trialParameters.NAME}``, keep to letters, digits and ``_``."""
    return key.replace(".", "_")


def _parameter(key: str, dimension: SearchDimension) -> katib.V1beta1ParameterSpec:
    key = parameter_name(key)
    if dimension.type == "categorical":
        return katib.V1beta1ParameterSpec(
            name=key,
            parameter_type="categorical",
            feasible_space=katib.V1beta1FeasibleSpace(list=[_text(c) for c in dimension.choices]),
        )
    as_type = int if dimension.type == "int" else float
    space = katib.V1beta1FeasibleSpace(
        min=_text(as_type(dimension.low)),
        max=_text(as_type(dimension.high)),
        step=_text(as_type(dimension.step)) if dimension.step is not None else None,
        distribution="logUniform" if dimension.log else "uniform",
    )
    return katib.V1beta1ParameterSpec(
        name=key,
        parameter_type="int" if dimension.type == "int" else "double",
        feasible_space=space,
    )


def check_katib(
    tune: TuneSettings, train: TrainSettings, mine: MineSettings | None = None
) -> dict[str, SearchDimension]:
    """check_search, and what Katib adds: flags Katib can substitute (no true/false
    settings), metric names its collector accepts."""
    space = check_search(tune, train, mine)
    for key, dimension in space.items():
        if any(isinstance(choice, bool) for choice in dimension.choices):
            raise ConfigError(
                f"[tune].space.{key}: a true/false setting is a --x/--no-x flag, which a "
                "Katib trial cannot substitute; search it with the optuna backend"
            )
    if KATIB_UNSAFE.search(tune.metric):
        raise ConfigError(f"[tune].metric: {tune.metric!r} has '/', '.' or '@'")
    return space


def build_experiment(
    name: str,
    tune: TuneSettings,
    train: TrainSettings,
    inputs: TrainInputs,
    out: str,
    image: str,
    cluster: ClusterSettings,
    namespace: str = "",
    *,
    command: TrainCommand,
    mine_command: MineCommand | None = None,
    combine_command: CombineCommand | None = None,
    mine: MineSettings | None = None,
    combine: CombineSettings | None = None,
) -> katib.V1beta1Experiment:
    """The Experiment; ``out`` is the prefix under which each trial writes its model
    (``OUT/<trial name>``). A trial that searches [mine] filters re-mines from the splits
    and the embeddings of ``inputs`` with ``mine`` and ``combine`` (their defaults when
    None) first."""
    space = check_katib(tune, train, mine)
    trial_out = f"{out.rstrip('/')}/${{trialParameters.{TRIAL_NAME}}}"
    placeholders = {key: f"${{trialParameters.{parameter_name(key)}}}" for key in space}
    searched = {key: value for key, value in placeholders.items() if not mine_key(key)}
    searched_mine = {mine_key(key): value for key, value in placeholders.items() if mine_key(key)}
    train_inputs, setup = inputs.for_mode(train.mode), ""
    if searched_mine:
        commands = (mine_command, combine_command)
        mining = (mine or MineSettings(), combine or CombineSettings())
        setup, negatives = trial_mining(inputs, *mining, searched_mine, *commands)
        train_inputs = replace(train_inputs, negatives=negatives)
    arguments = command(train_inputs, trial_out, train, searched)
    if tune.trial_template == "trainjob":
        trial = objects.train_job(
            "",
            image,
            arguments,
            cluster,
            runtime=tune.runtime,
            num_nodes=tune.trial_num_nodes,
            gpus_per_node=tune.trial_gpus_per_node,
            timeout_minutes=tune.trial_timeout_minutes,
            setup=setup,
        )
        template_extra = dict(
            primary_container_name=objects.PRIMARY_CONTAINER,
            primary_pod_labels=dict(TRAINJOB_PRIMARY_POD),
            success_condition=TRAINJOB_SUCCESS,
            failure_condition=TRAINJOB_FAILURE,
        )
    else:
        trial = objects.batch_job(
            "",
            image,
            arguments,
            cluster,
            gpus=tune.trial_gpus_per_node,
            timeout_minutes=tune.trial_timeout_minutes,
            setup=setup,
        )
        template_extra = dict(primary_container_name=objects.JOB_CONTAINER)
    trial_spec = objects.as_dict(trial)
    trial_spec.pop("metadata", None)  # Katib names each trial's object itself
    trial_parameters = [
        katib.V1beta1TrialParameterSpec(
            name=parameter_name(key),
            description=f"[mine].{mine_key(key)}" if mine_key(key) else f"[train].{key}",
            reference=parameter_name(key),
        )
        for key in space
    ] + [
        katib.V1beta1TrialParameterSpec(
            name=TRIAL_NAME,
            description="the trial's name: its model goes to OUT/<trial name>",
            reference="${trialSpec.Name}",
        )
    ]
    strategy = "max" if tune.direction == "maximize" else "min"
    algorithm_settings = (
        [katib.V1beta1AlgorithmSetting(name="random_state", value=str(tune.seed))]
        if tune.algorithm in ("tpe", "random")
        else None
    )
    return katib.V1beta1Experiment(
        api_version=KATIB_API,
        kind="Experiment",
        metadata=katib.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=namespace or None, labels=dict(objects.LABELS)
        ),
        spec=katib.V1beta1ExperimentSpec(
            objective=katib.V1beta1ObjectiveSpec(
                type=tune.direction,
                objective_metric_name=tune.metric,
                metric_strategies=[katib.V1beta1MetricStrategy(name=tune.metric, value=strategy)],
            ),
            algorithm=katib.V1beta1AlgorithmSpec(
                algorithm_name=ALGORITHMS[tune.algorithm], algorithm_settings=algorithm_settings
            ),
            parallel_trial_count=tune.parallel_trials,
            max_trial_count=tune.n_trials,
            max_failed_trial_count=tune.max_failed_trials,
            metrics_collector_spec=katib.V1beta1MetricsCollectorSpec(
                collector=katib.V1beta1CollectorSpec(kind="StdOut"),
                source=katib.V1beta1SourceSpec(
                    filter=katib.V1beta1FilterSpec(metrics_format=[METRIC_FILTER])
                ),
            ),
            parameters=[_parameter(key, dimension) for key, dimension in space.items()],
            trial_template=katib.V1beta1TrialTemplate(
                retain=False,
                trial_parameters=trial_parameters,
                trial_spec=trial_spec,
                **template_extra,
            ),
        ),
    )


def trial_mining(
    inputs: TrainInputs,
    mine: MineSettings,
    combine: CombineSettings,
    searched: dict[str, str],
    mine_command: MineCommand | None,
    combine_command: CombineCommand | None,
) -> tuple[str, str]:
    """(the shell line a trial pod re-mines with, the negatives it writes): ``embedpipe
    mine`` over the splits and the embeddings with ``mine`` and the trial's placeholders
    (``searched``: [mine] key -> placeholder), then ``embedpipe combine``, in
    ``TRIAL_MINING``."""
    if mine_command is None or combine_command is None:
        raise TypeError("a search of [mine] filters needs mine_command and combine_command")
    if not (inputs.splits and inputs.embeddings):
        raise ConfigError(
            "[tune].space: searching [mine] filters re-mines each trial's negatives: "
            "give the splits (--splits) and the embeddings (--embeddings) mining reads"
        )
    mined, negatives = f"{TRIAL_MINING}/mined", f"{TRIAL_MINING}/negatives"
    mine_line = mine_command(inputs.splits, inputs.embeddings, mined, mine, searched)
    every_category = "EMBEDPIPE_EVERY_CATEGORY"  # the shell's glob, which quoting would hide
    combine_line = combine_command([every_category], negatives, combine)
    line = " && ".join(
        [
            f"rm -rf {shlex.quote(TRIAL_MINING)}",
            shlex.join(["embedpipe", *mine_line]),
            shlex.join(["embedpipe", *combine_line]).replace(
                every_category, f"{shlex.quote(mined)}/negatives/*"
            ),
        ]
    )
    return line, negatives


def experiment_dict(experiment: katib.V1beta1Experiment) -> dict[str, Any]:
    """The Experiment as the API server takes it (camelCase, unset fields left out)."""
    return experiment.to_dict()


@dataclass(frozen=True)
class KatibResult:
    experiment: str
    namespace: str
    attached: bool
    best_trial: str
    best_value: float
    best_params: dict[str, Any] = field(default_factory=dict)
    trials: int = 0
    trials_succeeded: int = 0
    trials_failed: int = 0
    trials_early_stopped: int = 0


def _typed(value: str, dimension: SearchDimension) -> Any:
    if dimension.type == "int":
        return int(float(value))
    if dimension.type == "float":
        return float(value)
    for choice in dimension.choices:
        if _text(choice) == value:
            return choice
    raise KubeErrorValue(f"Katib assigned {value!r}, which is none of {list(dimension.choices)}")


class KubeErrorValue(kube.KubeError):
    pass


def best_of(experiment: dict[str, Any], tune: TuneSettings, space: dict) -> tuple:
    """(trial name, value, parameters as [train] holds them) of the current optimal trial."""
    optimal = (experiment.get("status") or {}).get("currentOptimalTrial") or {}
    assignments = {a["name"]: a["value"] for a in optimal.get("parameterAssignments") or []}
    if not optimal.get("bestTrialName") or not assignments:
        raise kube.KubeError(
            f"Experiment {experiment['metadata']['name']} succeeded without an optimal trial "
            f"(did any trial print {tune.metric}=...?)"
        )
    metrics = {m["name"]: m for m in (optimal.get("observation") or {}).get("metrics") or []}
    strategy = "max" if tune.direction == "maximize" else "min"
    found = metrics.get(tune.metric, {})
    value = float(found.get(strategy) or found.get("latest") or "nan")
    params = {
        key: _typed(assignments[parameter_name(key)], dimension) for key, dimension in space.items()
    }
    return optimal["bestTrialName"], value, params


class _Progress:
    """Logs the Experiment's counts when they change, and each trial's new state."""

    def __init__(self, trials: kube.Objects, name: str):
        self.trials, self.name = trials, name
        self.counts: tuple = ()
        self.states: dict[str, str] = {}

    def __call__(self, experiment: dict[str, Any]) -> None:
        status = experiment.get("status") or {}
        counts = tuple(
            status.get(k, 0) for k in ("trials", "trialsRunning", "trialsSucceeded", "trialsFailed")
        )
        if counts == self.counts:
            return
        self.counts = counts
        log.info(
            "Experiment %s: %d trials, %d running, %d succeeded, %d failed",
            self.name,
            *counts,
        )
        for trial in self.trials.list(f"katib.kubeflow.org/experiment={self.name}"):
            trial_name = trial["metadata"]["name"]
            conditions = (trial.get("status") or {}).get("conditions") or []
            state = next(
                (c["type"] for c in reversed(conditions) if str(c.get("status")) == "True"), ""
            )
            if state and self.states.get(trial_name) != state:
                self.states[trial_name] = state
                params = {
                    a["name"]: a["value"]
                    for a in (trial.get("spec") or {}).get("parameterAssignments") or []
                }
                log.info("trial %s: %s %s", trial_name, state, params)


def _finished(experiment: dict[str, Any]) -> bool:
    failed = kube.condition(experiment, "Failed")
    if failed:
        raise kube.KubeError(
            f"Katib Experiment {experiment['metadata']['name']} failed: "
            f"{failed.get('reason', '')}: {failed.get('message', '')}"
        )
    return kube.condition(experiment, "Succeeded") is not None


def run_experiment(
    api_client,
    body: dict[str, Any],
    tune: TuneSettings,
    space: dict[str, SearchDimension],
    namespace: str,
) -> KatibResult:
    """Create the Experiment (or re-attach to it), follow it to the end, return the best."""
    name = body["metadata"]["name"]
    body["metadata"].pop("namespace", None)
    experiments = kube.Objects(api_client, kube.EXPERIMENT, namespace)
    trials = kube.Objects(api_client, kube.TRIAL, namespace)
    _, attached = experiments.create_or_attach(body)
    log.info(
        "%s Katib Experiment %s in %s", "following" if attached else "created", name, namespace
    )
    try:
        final = kube.wait_for(
            experiments,
            name,
            _finished,
            timeout_s=tune.timeout_minutes * 60,
            poll_s=tune.poll_seconds,
            progress=_Progress(trials, name),
        )
    except TimeoutError as error:
        # Its trials hold GPUs: a search nobody waits for is deleted, not left running.
        experiments.delete(name)
        raise kube.KubeError(f"{error}; deleted it and its trials") from None
    trial, value, params = best_of(final, tune, space)
    status = final.get("status") or {}
    return KatibResult(
        experiment=name,
        namespace=namespace,
        attached=attached,
        best_trial=trial,
        best_value=value,
        best_params=params,
        trials=int(status.get("trials", 0)),
        trials_succeeded=int(status.get("trialsSucceeded", 0)),
        trials_failed=int(status.get("trialsFailed", 0)),
        trials_early_stopped=int(status.get("trialsEarlyStopped", 0)),
    )


def launch_search(
    name: str,
    tune: TuneSettings,
    train: TrainSettings,
    inputs: TrainInputs,
    out: str,
    image: str,
    cluster: ClusterSettings,
    api_client=None,
    *,
    command: TrainCommand,
    mine_command: MineCommand | None = None,
    combine_command: CombineCommand | None = None,
    mine: MineSettings | None = None,
    combine: CombineSettings | None = None,
) -> KatibResult:
    """Build the Experiment and run it in ``[tune].namespace`` (or the pod's)."""
    space = check_katib(tune, train, mine)
    namespace = tune.namespace or kube.current_namespace()
    experiment = build_experiment(
        name, tune, train, inputs, out, image, cluster,
        command=command, mine_command=mine_command, combine_command=combine_command,
        mine=mine, combine=combine,
    )  # fmt: skip
    api_client = api_client or kube.connect()
    return run_experiment(api_client, experiment_dict(experiment), tune, space, namespace)
