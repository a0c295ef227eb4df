"""Which model a set of files is: a checkpoint's identity is a digest of what defines its
model (the model keys of ``config.json`` and the weights); a published folder records the
identity of the checkpoint it was made from in its config file, under ``PUBLISH_RECORD``.

Evaluation writes each model's identity beside its metrics, so publish picks the
published checkpoint's numbers by identity, and refuses a destination holding another
checkpoint's model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from embedpipe.core import storage
from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME

PUBLISH_RECORD = "embedpipe_publish"
# The config file a published folder is loaded from: open_clip's layout, or transformers'.
PUBLISHED_CONFIGS = ("open_clip_config.json", CONFIG_NAME)
# Keys of a checkpoint's config.json that describe the model, not its training.
MODEL_KEYS = ("kind", "entry", "model_cfg", "backbone", "head", "image", "signal")


def checkpoint_identity(directory: str) -> str:
    """``sha256:HEX`` of the model keys of ``directory/config.json`` and its weights."""
    config = json.loads(Path(directory, CONFIG_NAME).read_text(encoding="utf-8"))
    model = {key: config[key] for key in MODEL_KEYS if key in config}
    digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
    with open(os.path.join(directory, WEIGHTS_NAME), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def publish_record(folder: str) -> dict[str, Any] | None:
    """What a local published folder records of its publish (checkpoint identity, files),
    or None when its config file has no such record (or the folder no config)."""
    for name in PUBLISHED_CONFIGS:
        path = Path(folder, name)
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            record = config.get(PUBLISH_RECORD) if isinstance(config, dict) else None
            return record if isinstance(record, dict) else None
    return None


def weights_identity(weights: str) -> str | None:
    """The identity of the model ``weights`` names: a checkpoint folder's digest, or the
    checkpoint a published folder (``local-dir:``) was made from; None for the rest
    (registry names, tags, random weights, embeddings)."""
    from embedpipe.models.loading import LOCAL_DIR, RANDOM_WEIGHTS, fetch_weights

    if not weights or weights == RANDOM_WEIGHTS:
        return None
    published = weights.startswith(LOCAL_DIR)
    location = weights[len(LOCAL_DIR) :] if published else weights
    if ":" in location.split("://")[0]:
        return None  # hf-hub: and other schemes
    marker = PUBLISHED_CONFIGS if published else (CONFIG_NAME,)
    try:
        if storage.is_s3(location) and not any(
            storage.exists(storage.join(location, name)) for name in marker
        ):
            return None
        local = fetch_weights(location)
        record = publish_record(local)
        if record is not None or published:
            return str(record["checkpoint"]) if record and "checkpoint" in record else None
        if os.path.isfile(os.path.join(local, CONFIG_NAME)) and os.path.isfile(
            os.path.join(local, WEIGHTS_NAME)
        ):
            return checkpoint_identity(local)
    except (OSError, ValueError, storage.StorageError):
        return None
    return None
