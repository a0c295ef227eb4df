"""KFP pipelines. Each module defines ``build_pipeline(settings)`` and
``run_arguments(settings)``; kfp is imported only when a pipeline is built."""

import importlib
from types import ModuleType

PIPELINE_MODULES = {
    "preprocess": "embedpipe.pipelines.preprocess",
    "mine": "embedpipe.pipelines.mine",
    "train": "embedpipe.pipelines.train",
    "tune": "embedpipe.pipelines.tune",
    "evaluate": "embedpipe.pipelines.evaluate",
    "end_to_end": "embedpipe.pipelines.end_to_end",
}
PIPELINE_NAMES = tuple(PIPELINE_MODULES)


def pipeline_module(name: str) -> ModuleType:
    if name not in PIPELINE_MODULES:
        raise ValueError(f"unknown pipeline '{name}'; known: {', '.join(PIPELINE_NAMES)}")
    return importlib.import_module(PIPELINE_MODULES[name])
