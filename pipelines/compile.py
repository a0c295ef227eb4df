"""Compile every pipeline to KFP IR YAML."""

from __future__ import annotations

import os

from kfp import compiler

from embedpipe import storage
from embedpipe.config import Settings
from embedpipe.pipelines import PIPELINE_NAMES, pipeline_module


def compile_pipelines(settings: Settings, out_dir: str) -> list[str]:
    written = []
    for name in PIPELINE_NAMES:
        path = os.path.join(out_dir, f"{name}.yaml")
        with storage.atomic_output(path) as tmp_path:
            compiler.Compiler().compile(pipeline_module(name).build_pipeline(settings), tmp_path)
        written.append(path)
    return written
