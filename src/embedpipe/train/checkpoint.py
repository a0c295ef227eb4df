"""Training checkpoints: directories published atomically, locally or on s3://.

A checkpoint is ``config.json`` (the model entry, the architecture config, the resolved
train settings), ``model.safetensors``, and for resumable ones ``training_state.pt``
(optimizer, scheduler, RNG states, step, data position; tensors and plain containers
only, so ``torch.load(weights_only=True)`` reads it) and ``history.json``.

A run's output folder::

    OUT/config.json, OUT/model.safetensors     the trained model (best, else last)
    OUT/checkpoints/last-00000100/             the latest resumable checkpoint
    OUT/checkpoints/best-00000080/             the best by the named metric
    OUT/.embedpipe/metrics.json                result, history, bandit pulls

Files go to a staging folder first and are published with ``config.json`` last: a
folder without it is incomplete and ignored. Older checkpoints are deleted only after
a newer one is complete, so a kill at any moment leaves one to resume from.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from embedpipe.core import datasets, outputs, storage
from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME
from embedpipe.train.report import METRICS_NAME

STATE_NAME = "training_state.pt"
HISTORY_NAME = "history.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^(last|best)-(\d{8})$")


def _publish_files(staging: Path, target_uri: str) -> None:
    outputs.verify_output_held(target_uri)  # a run that lost its lock publishes nothing
    names = sorted(os.listdir(staging), key=lambda name: name == CONFIG_NAME)
    for name in names:
        with storage.atomic_output(storage.join(target_uri, name)) as path:
            shutil.copyfile(staging / name, path)


def write_checkpoint(
    target_uri: str,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    training_state: dict[str, Any] | None = None,
    history: list[dict] | None = None,
) -> None:
    with tempfile.TemporaryDirectory(prefix="embedpipe-ckpt-") as folder:
        staging = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(state, str(staging / WEIGHTS_NAME))
        if training_state is not None:
            torch.save(training_state, staging / STATE_NAME)
        if history is not None:
            (staging / HISTORY_NAME).write_text(json.dumps(history))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        _publish_files(staging, target_uri)


def step_dir(out_uri: str, kind: str, step: int) -> str:
    return storage.join(out_uri, CHECKPOINTS_DIR, f"{kind}-{step:08d}")


def complete_checkpoints(out_uri: str, kind: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint of ``kind``, oldest first."""
    root = storage.join(out_uri, CHECKPOINTS_DIR)
    found = set()
    for entry in storage.list_files(root) if storage.exists(root) else []:
        relative = entry.uri[len(root) :].strip("/").split("/")
        if len(relative) == 2 and relative[1] == CONFIG_NAME:
            match = _STEP_DIR.match(relative[0])
            if match and match.group(1) == kind:
                found.add((int(match.group(2)), storage.join(root, relative[0])))
    return sorted(found)


def remove_older(out_uri: str, kind: str, keep_step: int) -> None:
    root = storage.join(out_uri, CHECKPOINTS_DIR)
    for entry in storage.list_files(root) if storage.exists(root) else []:
        folder = entry.uri[len(root) :].strip("/").split("/")[0]
        match = _STEP_DIR.match(folder)
        if match and match.group(1) == kind and int(match.group(2)) != keep_step:
            storage.delete(entry.uri)
    if not storage.is_s3(root):
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            folder = os.path.join(root, name)
            if match and match.group(1) == kind and int(match.group(2)) != keep_step:
                shutil.rmtree(folder, ignore_errors=True)


def read_config(uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(uri, CONFIG_NAME))


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    if storage.is_s3(uri):
        from safetensors.torch import load

        return load(storage.read_bytes(storage.join(uri, WEIGHTS_NAME)))
    return load_file(storage.join(uri, WEIGHTS_NAME))


def read_training_state(uri: str) -> dict[str, Any]:
    data = storage.read_bytes(storage.join(uri, STATE_NAME))
    return torch.load(io.BytesIO(data), weights_only=True)


def read_history(uri: str) -> list[dict]:
    return json.loads(storage.read_bytes(storage.join(uri, HISTORY_NAME)))


def copy_model(source_uri: str, target_uri: str) -> None:
    """Publish a checkpoint's model (weights, then config) at ``target_uri``."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-model-") as folder:
        staging = Path(folder)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (staging / name).write_bytes(storage.read_bytes(storage.join(source_uri, name)))
        _publish_files(staging, target_uri)


def write_metrics(out_uri: str, payload: dict[str, Any]) -> None:
    storage.write_json(datasets.side_path(out_uri, METRICS_NAME), payload)
