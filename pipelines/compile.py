"""Compile every pipeline to KFP IR YAML."""

from __future__ import annotations

import os
import shutil
import tempfile

import yaml
from kfp import compiler

from embedpipe.config import Settings
from embedpipe.core import storage
from embedpipe.pipelines import PIPELINE_NAMES, pipeline_module


def read_pipeline_spec(package: str | os.PathLike) -> dict:
    """The pipeline spec of a compiled file (its first document; the platform spec follows)."""
    with open(package, encoding="utf-8") as handle:
        return next(doc for doc in yaml.safe_load_all(handle) if doc)


def compiled_stage_settings(package: str | os.PathLike) -> dict[str, dict]:
    """Stage -> the settings compiled into its step, as its first step (check_settings)
    received them: what a run's overrides are validated against."""
    spec = read_pipeline_spec(package)
    check = spec["root"]["dag"]["tasks"]["check-settings"]
    return check["inputs"]["parameters"]["settings"]["runtimeValue"]["constant"]


def compile_pipelines(settings: Settings, out_dir: str) -> list[str]:
    written = []
    for name in PIPELINE_NAMES:
        path = os.path.join(out_dir, f"{name}.yaml")
        # The compiler picks the format from the file name, so it writes a .yaml of its own.
        with tempfile.TemporaryDirectory() as folder, storage.atomic_output(path) as tmp_path:
            compiled = os.path.join(folder, f"{name}.yaml")
            compiler.Compiler().compile(pipeline_module(name).build_pipeline(settings), compiled)
            shutil.copyfile(compiled, tmp_path)
        written.append(path)
    return written
