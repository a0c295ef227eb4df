"""What makes a training the same run when it is started again on the same ``--out``.

A rerun resumes only a checkpoint of the same settings (``loop.resumable``) trained on
the same inputs: each input's identity is read from its manifest (kind, rows, the model,
weights and seed that made embeddings, and the content: shard names are content hashes).
And a run writes only into an empty folder or an earlier output of a training, never over
a user's files.
"""

from __future__ import annotations

from typing import Any

from embedpipe.config import ConfigError
from embedpipe.core import datasets, storage
from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME

# the flag that names each input of train_model
INPUT_FLAGS = {
    "images_uri": "IMAGES",
    "splits_uri": "--splits",
    "negatives_uri": "--negatives",
    "embeddings_uri": "--embeddings",
    "captions_uri": "--captions",
}
_MANIFEST_IDENTITY = ("kind", "rows", "model", "weights", "seed", "normalized", "dim")
# what a training writes into its output: the model, checkpoints/, side files
_TRAINING_FILES = {CONFIG_NAME, WEIGHTS_NAME}
_TRAINING_FOLDERS = {"checkpoints", datasets.SIDE_DIR}


class InputsChanged(ValueError):
    """The output holds a checkpoint trained on other inputs."""


def dataset_identity(uri: str) -> dict[str, Any]:
    manifest = datasets.read_manifest(uri)
    identity = {key: manifest[key] for key in _MANIFEST_IDENTITY if key in manifest}
    identity["content"] = [shard["path"] for shard in manifest["shards"]]
    for part in manifest.get("parts", []):
        identity.setdefault("parts", {})[part] = dataset_identity(
            storage.join(storage.normalize(uri), part)
        )
    return identity


def input_identities(uris: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    """The identity of each input given, keyed by its flag."""
    return {INPUT_FLAGS.get(name, name): dataset_identity(uri) for name, uri in uris.items() if uri}


def _describe(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "none"
    shown = [f"{key} {identity[key]}" for key in _MANIFEST_IDENTITY if key in identity]
    return ", ".join(shown) or "a dataset"


def check_same_inputs(
    out_uri: str, saved: dict[str, Any] | None, current: dict[str, dict[str, Any]]
) -> None:
    """Refuse to resume a checkpoint trained on other inputs, naming the first that differs.
    A checkpoint written before inputs were recorded (``saved`` None) is not checked."""
    if saved is None:
        return
    for flag in sorted(set(saved) | set(current)):
        before, now = saved.get(flag), current.get(flag)
        if before == now:
            continue
        if before and now and _describe(before) == _describe(now):
            what = "the same kind and size, other content"
        else:
            what = f"the checkpoint's: {_describe(before)}; given now: {_describe(now)}"
        raise InputsChanged(
            f"{out_uri}: holds a checkpoint trained on another {flag} ({what}); give the "
            "inputs it was trained on to resume it, or another --out to start over"
        )


def settings_difference(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The settings that differ, but for those a resumed run may change."""
    from embedpipe.train.loop import RUNTIME_ONLY

    return sorted(
        key
        for key in set(saved) | set(settings)
        if key not in RUNTIME_ONLY and saved.get(key) != settings.get(key)
    )


def check_training_output(
    out_uri: str, settings: dict[str, Any], inputs: dict[str, dict[str, Any]]
) -> None:
    """Refuse an ``--out`` holding files a training does not write (a user's folder, a
    dataset, a model saved by other means), or the model of a training with other settings
    or inputs, before anything in it is touched."""
    root = storage.normalize(out_uri)
    if not storage.exists(root):
        return
    foreign = []
    has_config = has_weights = has_checkpoint = False
    for entry in storage.list_files(root):
        relative = entry.uri[len(root) :].lstrip("/")
        top = relative.split("/")[0]
        if relative == f"{datasets.SIDE_DIR}/{datasets.MANIFEST_NAME}":
            foreign.append(relative)  # a dataset's folder
        elif relative in _TRAINING_FILES:
            has_config = has_config or relative == CONFIG_NAME
            has_weights = has_weights or relative == WEIGHTS_NAME
        elif top not in _TRAINING_FOLDERS or "/" not in relative:
            foreign.append(relative)
        elif top == "checkpoints" and relative.endswith(f"/{CONFIG_NAME}"):
            has_checkpoint = True
    if has_weights and not has_config and not has_checkpoint:
        # a training publishes its model only after a checkpoint: these weights are a user's
        foreign.append(WEIGHTS_NAME)
    if foreign:
        raise ConfigError(
            f"--out {out_uri}: holds files a training does not write (e.g. {foreign[0]}); "
            "train into an empty folder, or into an earlier output of this training"
        )
    if not has_config:
        return
    try:
        saved = storage.read_json(storage.join(root, CONFIG_NAME))
    except ValueError:
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("train"), dict)):
        raise ConfigError(
            f"--out {out_uri}: its {CONFIG_NAME} is not a training's (no train settings): "
            "a model saved there by other means would be overwritten; give another --out"
        )
    differ = settings_difference(saved["train"], settings)
    if differ:
        raise ConfigError(
            f"--out {out_uri}: holds the model of a training with other settings "
            f"({', '.join(differ)}); give another --out, or delete that folder to start over"
        )
    check_same_inputs(out_uri, saved.get("inputs"), inputs)
