"""Run a pipeline on this machine: kfp.local's SubprocessRunner in this interpreter."""

from __future__ import annotations

import os
import sys
import warnings

from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.pipelines import pipeline_module
from embedpipe.pipelines.progress import LOG_DIR, LocalRun, Progress


def run_locally(
    name: str, settings: Settings, *, verbose: bool = False, progress: Progress | None = None
) -> dict[str, str]:
    """Run pipeline ``name`` to completion; return every output artifact's URI.

    Keys are ``task/output``: conditional steps (taxonomy) have no pipeline-level
    output, so the run folder is read for what each task wrote. ``progress`` (by default
    on stdout) shows a line per task; each task's output goes to a log file under the
    run folder (``progress.log_dir``), and also to stdout when ``verbose``. A failed task
    raises ``PipelineFailed`` naming it, its cause and its log file.
    """
    from kfp import local

    progress = progress if progress is not None else Progress(sys.stdout)
    module = pipeline_module(name)
    # KFP retries are for pods that die on a cluster; kfp.local would retry a data or
    # config error with back-off, so a local run has none.
    without_retries = settings.cluster.model_copy(update={"retries": 0})
    pipeline = module.build_pipeline(settings.model_copy(update={"cluster": without_retries}))
    arguments = module.run_arguments(settings)
    pipeline_root = os.path.abspath(settings.global_.pipeline_root)
    # use_venv=False: components run in this environment, where embedpipe is installed,
    # which is what our image holds too; kfp.local's warning about that is expected.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        with LocalRun(pipeline, progress, verbose=verbose) as run:
            try:
                task = pipeline(**arguments)
            except RuntimeError as error:  # kfp.local's: names the task, not the cause
                raise run.failure(error) from None
    run_dir = os.path.dirname(os.path.dirname(next(iter(task.outputs.values())).uri))
    outputs = task_outputs(run_dir)
    storage.write_json(_latest_path(settings, name), outputs)
    return outputs


def _latest_path(settings: Settings, name: str) -> str:
    return os.path.join(os.path.abspath(settings.global_.pipeline_root), f"latest-{name}.json")


def latest_outputs(settings: Settings, name: str) -> dict[str, str] | None:
    """The outputs of the last successful local run of pipeline ``name``, if any."""
    path = _latest_path(settings, name)
    return storage.read_json(path) if os.path.exists(path) else None


def local_inputs(settings: Settings, wanted: dict[str, tuple[str, str]]) -> dict[str, str]:
    """``NAME_uri`` for each wanted input: ``[paths].NAME`` where set, else the output
    ``wanted[NAME] = (pipeline, task/output)`` of the latest local run of that pipeline."""
    given = {}
    for name, (pipeline, output) in wanted.items():
        uri = getattr(settings.paths, name)
        if not uri:
            latest = latest_outputs(settings, pipeline)
            if latest is None:
                raise ConfigError(
                    f"[paths].{name} is not set and no local {pipeline} run was found; run "
                    f"`embedpipe run {pipeline}` first or set it"
                )
            uri = latest[output]
        given[f"{name}_uri"] = storage.normalize(uri)
    return given


def task_outputs(run_dir: str) -> dict[str, str]:
    """``task/output`` -> path for everything kfp.local wrote under one run folder."""
    found = {}
    for task in sorted(os.listdir(run_dir)):
        task_dir = os.path.join(run_dir, task)
        if task == LOG_DIR or not os.path.isdir(task_dir):
            continue
        for output in sorted(os.listdir(task_dir)):
            if output != "executor_output.json":
                found[f"{task}/{output}"] = os.path.join(task_dir, output)
    return found
