"""Run a pipeline on this machine: kfp.local's SubprocessRunner in this interpreter."""

from __future__ import annotations

import os
import warnings

from embedpipe.config import Settings
from embedpipe.pipelines import pipeline_module


def run_locally(name: str, settings: Settings) -> dict[str, str]:
    """Run pipeline ``name`` to completion; return its output artifacts' URIs."""
    from kfp import local

    module = pipeline_module(name)
    pipeline = module.build_pipeline(settings)
    arguments = module.run_arguments(settings)
    pipeline_root = os.path.abspath(settings.global_.pipeline_root)
    # use_venv=False: components run in this environment, where embedpipe is installed,
    # which is what our image holds too; kfp.local's warning about that is expected.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        task = pipeline(**arguments)
    return {output: artifact.uri for output, artifact in task.outputs.items()}
