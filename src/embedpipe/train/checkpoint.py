"""Training checkpoints: directories published atomically, locally or on s3://.

A checkpoint is ``config.json`` (the model entry, the architecture config, the resolved
train settings), ``model.safetensors``, and for resumable ones ``training_state.pt``
(optimizer, scheduler, RNG states, step, data position; tensors and plain containers
only, so ``torch.load(weights_only=True)`` reads it) and ``history.json``.

A run's output folder::

    OUT/config.json, OUT/model.safetensors     the trained model (best, else last)
    OUT/checkpoints/last-00000100/             the latest resumable checkpoint
    OUT/checkpoints/last-00000050/             the one before it (a fallback)
    OUT/checkpoints/best-00000080/             the best by the named metric
    OUT/.embedpipe/metrics.json                result, history, bandit pulls

Files go to a staging folder first and are published with ``config.json`` last: a
folder without it is incomplete and ignored. Older checkpoints are deleted only after
a newer one is complete, so a kill at any moment leaves one to resume from; the last
resumable checkpoint before the latest is kept too, to resume from should the latest be
damaged (``resume_damaged``).
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
from embedpipe.core.finite import NonFiniteError, first_nonfinite_tensor
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
    resumable_weights = (training_state or {}).get("training_weights", {})
    broken = first_nonfinite_tensor(weights) or first_nonfinite_tensor(resumable_weights)
    if broken is not None:
        raise NonFiniteError(
            f"{target_uri}: not written: weight {broken} holds NaN or infinity (training diverged)"
        )
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


def remove_older(out_uri: str, kind: str, keep_step: int, keep_previous: bool = False) -> None:
    """Delete the checkpoints of ``kind`` but the one of ``keep_step`` (and with
    ``keep_previous`` the newest complete one before it: a fallback should that be damaged)."""
    keep = {keep_step}
    if keep_previous:
        earlier = [step for step, _ in complete_checkpoints(out_uri, kind) if step < keep_step]
        keep |= set(earlier[-1:])
    root = storage.join(out_uri, CHECKPOINTS_DIR)
    for entry in storage.list_files(root) if storage.exists(root) else []:
        folder = entry.uri[len(root) :].strip("/").split("/")[0]
        match = _STEP_DIR.match(folder)
        if match and match.group(1) == kind and int(match.group(2)) not in keep:
            storage.delete(entry.uri)
    if not storage.is_s3(root):
        for name in os.listdir(root):
            match = _STEP_DIR.match(name)
            folder = os.path.join(root, name)
            if match and match.group(1) == kind and int(match.group(2)) not in keep:
                shutil.rmtree(folder, ignore_errors=True)


class DamagedCheckpoint(ValueError):
    """A checkpoint's file is empty, truncated or not what a training writes."""


# keys every training state holds; a file without them is not a resumable checkpoint
_STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "position", "training_weights")


def _damaged(uri: str, name: str, error: BaseException | str) -> DamagedCheckpoint:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    first_line = next((line for line in str(reason).splitlines() if line.strip()), "empty")
    return DamagedCheckpoint(f"{storage.join(uri, name)}: damaged ({first_line[:200]})")


def read_config(uri: str) -> dict[str, Any]:
    try:
        config = json.loads(storage.read_bytes(storage.join(uri, CONFIG_NAME)))
    except ValueError as error:
        raise _damaged(uri, CONFIG_NAME, error) from None
    if not isinstance(config, dict):
        raise _damaged(uri, CONFIG_NAME, "not a JSON object")
    return config


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    if storage.is_s3(uri):
        from safetensors.torch import load

        return load(storage.read_bytes(storage.join(uri, WEIGHTS_NAME)))
    return load_file(storage.join(uri, WEIGHTS_NAME))


def read_training_state(uri: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(storage.join(uri, STATE_NAME))
        state = torch.load(io.BytesIO(data), weights_only=True)
    except FileNotFoundError:
        raise _damaged(uri, STATE_NAME, "missing") from None
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError, UnicodeDecodeError
        raise _damaged(uri, STATE_NAME, error) from None
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise _damaged(uri, STATE_NAME, f"no {missing[0]!r}: not a training state")
    return state


def read_history(uri: str) -> list[dict]:
    try:
        history = json.loads(storage.read_bytes(storage.join(uri, HISTORY_NAME)))
    except FileNotFoundError:
        raise _damaged(uri, HISTORY_NAME, "missing") from None
    except ValueError as error:
        raise _damaged(uri, HISTORY_NAME, error) from None
    if not (isinstance(history, list) and all(isinstance(r, dict) for r in history)):
        raise _damaged(uri, HISTORY_NAME, "not a list of records")
    return history


def copy_model(source_uri: str, target_uri: str) -> None:
    """Publish a checkpoint's model (weights, then config) at ``target_uri``."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-model-") as folder:
        staging = Path(folder)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (staging / name).write_bytes(storage.read_bytes(storage.join(source_uri, name)))
        _publish_files(staging, target_uri)


def write_metrics(out_uri: str, payload: dict[str, Any]) -> None:
    storage.write_json(datasets.side_path(out_uri, METRICS_NAME), payload)
