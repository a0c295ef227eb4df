"""Two-tower checkpoints (``[train] pairs = "image_signal"``) read as models: each tower
on its own, from the entries the checkpoint's ``config.json`` carries (no ``--model``).

The checkpoint is a directory with ``config.json``::

    {"kind": "image_signal",
     "image": {"backbone": {backbone record, see heads.backbone_record},
               "head": {ProjectionHead config}, "embeddings": "..."},
     "signal": {"entry": {signal encoder entry}, "weights": "...", "column": "flux"},
     "train": {...}}

and ``model.safetensors`` with the image head's tensors under ``image_head.`` (its input
standardisation folded in, so it takes the backbone's embeddings as ``embed`` writes
them) and the signal encoder's under ``signal.``. The image tower is the backbone, then
the head (a ``HeadOnBackbone``, as a head checkpoint loads); the signal tower is the
encoder. A fine-tuned image tower (``"image": {"mode": "finetune", "entry": {open_clip
entry}, "weights": start weights}``, its visual state under ``image.``) is that open_clip
model with its visual tower replaced (an image-only model: its text tower was never
trained). Another ``image.mode`` is refused in one line.

A published two-tower model (``embedpipe publish``) is the image tower's transformers
folder with the signal tower in its ``signal_encoder/`` subfolder, a plain signal
checkpoint (``config.json`` with the whole entry, plus the column and length it was
trained on).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME, folder_config
from embedpipe.models.registry import ModelEntry, ModelError

IMAGE_SIGNAL_KIND = "image_signal"
IMAGE_HEAD_PREFIX, SIGNAL_PREFIX, IMAGE_PREFIX = "image_head.", "signal.", "image."
HEAD_MODE, FINETUNE_MODE = "head", "finetune"
SIGNAL_TOWER_DIR = "signal_encoder"  # a published two-tower folder's signal tower
LOCAL_DIR = "local-dir:"


def is_two_towers_config(config: Any) -> bool:
    return isinstance(config, dict) and config.get("kind") == IMAGE_SIGNAL_KIND


def read_two_towers(directory: str) -> dict[str, Any] | None:
    """``directory/config.json`` of an image_signal checkpoint (a local folder), else None."""
    config = folder_config(directory)
    return config if is_two_towers_config(config) else None


def _section(config: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    section = config.get(name)
    if not isinstance(section, dict):
        raise ModelError(f"{where}: an image_signal checkpoint's config.json has no '{name}' tower")
    return section


def image_tower_record(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``{"entry", "weights", "seed", "normalized", "head"}`` of the image tower: its
    backbone record and head shape; a ModelError for an image tower of another mode."""
    from embedpipe.models.heads import backbone_of

    image = _section(config, "image", where)
    mode = image.get("mode", HEAD_MODE)
    if mode != HEAD_MODE:
        raise ModelError(
            f"{where}: an image tower of mode '{mode}'; only head-mode image towers "
            "(a projection head on a frozen backbone) load here"
        )
    if not isinstance(image.get("head"), dict):
        raise ModelError(f"{where}: the image tower names no 'head'")
    return {**backbone_of(image), "head": image["head"]}


def image_mode(config: dict[str, Any], where: str) -> str:
    mode = _section(config, "image", where).get("mode", HEAD_MODE)
    if mode not in (HEAD_MODE, FINETUNE_MODE):
        raise ModelError(f"{where}: an image tower of unknown mode '{mode}'")
    return mode


def finetuned_entry(config: dict[str, Any], where: str) -> ModelEntry:
    """A fine-tuned image tower's open_clip entry, image-only."""
    try:
        entry = ModelEntry.model_validate(_section(config, "image", where)["entry"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{where}: unreadable image tower in config.json: {error}") from None
    return entry.model_copy(update={"text": False})


def image_tower_entry(config: dict[str, Any], where: str) -> ModelEntry:
    """The image tower's entry: its backbone's, named ``BACKBONE+head``, of the head's size;
    a fine-tuned tower's own (image-only)."""
    if image_mode(config, where) == FINETUNE_MODE:
        return finetuned_entry(config, where)
    record = image_tower_record(config, where)
    try:
        backbone = ModelEntry.model_validate(record["entry"])
        out_dim = int(record["head"]["out_dim"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{where}: unreadable image tower in config.json: {error}") from None
    return backbone.model_copy(update={"name": f"{backbone.name}+head", "embed_dim": out_dim})


def signal_tower_entry(config: dict[str, Any], where: str) -> ModelEntry:
    """The signal encoder's whole entry, as the checkpoint carries it."""
    signal = _section(config, "signal", where)
    try:
        entry = ModelEntry.model_validate(signal["entry"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{where}: unreadable signal tower in config.json: {error}") from None
    if not entry.signal:
        raise ModelError(f"{where}: the signal tower's entry {entry.name} is not a signal encoder")
    return entry


def tower_state(directory: str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one tower (``prefix`` stripped) from the checkpoint's weights."""
    from safetensors.torch import load_file

    from embedpipe.models.weights_files import damaged_weights_named

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ModelError(f"{directory}: not a checkpoint (no {WEIGHTS_NAME})")
    with damaged_weights_named(path):
        weights = load_file(path)
    state = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise ModelError(f"{path}: no '{prefix}*' tensors (the tower's weights)")
    return state


def _load_strict(module: torch.nn.Module, state: dict, where: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        from embedpipe.models.loading import _load_failure

        raise ModelError(f"{where}: {_load_failure(error)}") from None


def load_image_head(directory: str, config: dict[str, Any] | None = None):
    """``(ProjectionHead, image tower record)`` of the image_signal checkpoint at
    ``directory``: the head with its standardisation folded in."""
    from embedpipe.models.heads import ProjectionHead

    config = config or read_two_towers(directory)
    if config is None:
        raise ModelError(f"{directory}: not an image_signal checkpoint")
    record = image_tower_record(config, directory)
    try:
        head = ProjectionHead(**record["head"])
    except (TypeError, ValueError) as error:
        raise ModelError(f"{directory}: invalid image head in config.json: {error}") from None
    _load_strict(head, tower_state(directory, IMAGE_HEAD_PREFIX), f"{directory} (image head)")
    return head.eval(), record


def load_signal_encoder(directory: str, config: dict[str, Any] | None = None):
    """``(entry, SignalEncoder)`` of the image_signal checkpoint at ``directory``."""
    from embedpipe.models.signal_encoders import build_signal_encoder

    config = config or read_two_towers(directory)
    if config is None:
        raise ModelError(f"{directory}: not an image_signal checkpoint")
    entry = signal_tower_entry(config, directory)
    encoder = build_signal_encoder(entry)
    _load_strict(encoder, tower_state(directory, SIGNAL_PREFIX), f"{directory} (signal tower)")
    return entry, encoder.eval()


def same_encoder(given: ModelEntry, carried: ModelEntry) -> bool:
    """Whether ``given`` (a ``--model``) builds the encoder a checkpoint carries."""
    return (given.library, given.architecture, given.arch, given.embed_dim) == (
        carried.library,
        carried.architecture,
        carried.arch,
        carried.embed_dim,
    )


def load_tower(entry: ModelEntry, directory: str, source: str, device: str, tokenizer_dir: str):
    """The tower of the image_signal checkpoint at ``directory`` that ``entry`` asks for:
    the signal encoder for a signal entry (which must be the one it carries), else the
    image tower (backbone then head), as a ``LoadedModel``."""
    from embedpipe.models.backends.signal import SignalBackend
    from embedpipe.models.heads import HeadOnBackbone
    from embedpipe.models.loading import LoadedModel, load_model

    config = read_two_towers(directory)
    if config is None:
        raise ModelError(f"{source}: not an image_signal checkpoint")
    if entry.signal:
        carried, encoder = load_signal_encoder(directory, config)
        if not same_encoder(entry, carried):
            raise ModelError(
                f"{source}: its signal tower is {carried.name} ({carried.architecture} "
                f"{carried.arch}, {carried.embed_dim} dims), not {entry.name}; pass it "
                "without --model"
            )
        transform = SignalBackend().eval_transform(carried, encoder)
        return LoadedModel(carried, encoder.to(device).eval(), transform, source)
    if image_mode(config, source) == FINETUNE_MODE:
        return load_finetuned_tower(directory, config, source, device)
    head, record = load_image_head(directory, config)
    backbone_entry = ModelEntry.model_validate(record["entry"])
    backbone = load_model(backbone_entry, record["weights"], device, tokenizer_dir, record["seed"])
    module = HeadOnBackbone(backbone.module, head, record["normalized"]).to(device).eval()
    return LoadedModel(
        image_tower_entry(config, source),
        module,
        backbone.transform,
        source,
        tokenizer_dir,
        backbone_entry=backbone_entry,
    )


def load_finetuned_tower(directory: str, config: dict[str, Any], source: str, device: str):
    """The fine-tuned image tower as an open_clip model (a ``LoadedModel``): the entry's
    architecture built offline, its visual state from the checkpoint."""
    from embedpipe.models.loading import RANDOM_WEIGHTS, LoadedModel, load_model

    entry = finetuned_entry(config, source)
    seed = int((config.get("train") or {}).get("seed", 0))
    model = load_model(entry, RANDOM_WEIGHTS, "cpu", seed=seed)
    state = tower_state(directory, IMAGE_PREFIX)
    _load_strict(model.module.visual, state, f"{directory} (image tower)")
    return LoadedModel(entry, model.module.to(device).eval(), model.transform, source)


def _local_folder(weights: str) -> str | None:
    """The local folder ``weights`` names (a path, ``local-dir:PATH`` or an s3:// prefix
    downloaded once), or None when it names none."""
    from embedpipe.core import storage
    from embedpipe.models.loading import RANDOM_WEIGHTS, fetch_weights

    location = weights.removeprefix(LOCAL_DIR)
    if not location or location == RANDOM_WEIGHTS or ":" in location.split("://")[0]:
        return None  # hf-hub: and other schemes
    if storage.is_s3(location):
        marker = (CONFIG_NAME, f"{SIGNAL_TOWER_DIR}/{CONFIG_NAME}")
        if not any(storage.exists(storage.join(location, name)) for name in marker):
            return None
        location = fetch_weights(location)
    return location if os.path.isdir(location) else None


def signal_tower_folder(weights: str) -> str | None:
    """The local folder of a published two-tower model's signal tower
    (``DIR/signal_encoder``) when ``weights`` names such a model, else None."""
    folder = _local_folder(weights)
    if folder is None:
        return None
    tower = os.path.join(folder, SIGNAL_TOWER_DIR)
    return tower if os.path.isfile(os.path.join(tower, CONFIG_NAME)) else None


def signal_entry_for_weights(weights: str) -> ModelEntry | None:
    """The signal encoder's entry that ``weights`` carries: an image_signal checkpoint's
    signal tower, a published two-tower model's (``DIR`` or ``DIR/signal_encoder``), or a
    signal checkpoint's; None when ``weights`` carries no entry (or not a signal one)."""
    from embedpipe.models.loading import checkpoint_entry

    folder = _local_folder(weights)
    if folder is None:
        return None
    config = read_two_towers(folder)
    if config is not None:
        return signal_tower_entry(config, weights)
    tower = signal_tower_folder(weights)
    entry = checkpoint_entry(tower or folder)
    return entry if entry is not None and entry.signal else None


def signal_column_length(images_uri: str, schema, column: str) -> int | None:
    """The fixed length of the ``column`` signals: the images manifest's (ingest records
    it) or the column's ``fixed_size_list`` type; None for a variable-length column."""
    import pyarrow as pa

    from embedpipe.core import datasets

    try:
        manifest = datasets.read_manifest(images_uri)
    except (OSError, ValueError):
        manifest = {}
    declared = ((manifest.get("signals") or {}).get("columns") or {}).get(column) or {}
    if isinstance(declared.get("length"), int) and declared["length"] > 0:
        return declared["length"]
    if column in schema.names and pa.types.is_fixed_size_list(schema.field(column).type):
        return schema.field(column).type.list_size
    return None


def check_signal_length(
    encoder_length: int, column_length: int | None, weights: str, images_uri: str, column: str
) -> None:
    """A fixed-length encoder (from ``weights``) on a fixed-length column of another
    length: one line naming both, the column and the lengths."""
    if encoder_length and column_length and encoder_length != column_length:
        raise ModelError(
            f"{weights or 'the encoder'}: takes signals of length {encoder_length}, but "
            f"{images_uri} column '{column}' holds signals of length {column_length}"
        )


def write_signal_tower(directory: str, out: Path) -> ModelEntry:
    """The image_signal checkpoint's signal tower as a signal checkpoint in ``out``
    (``model.safetensors``, then ``config.json`` with the whole entry, the column it
    was trained on and its length); ``embed-signal --weights OUT`` loads it."""
    from safetensors.torch import save_file

    config = read_two_towers(directory)
    if config is None:
        raise ModelError(f"{directory}: not an image_signal checkpoint")
    entry, encoder = load_signal_encoder(directory, config)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    described = {
        "entry": entry.model_dump(mode="json"),
        "column": config["signal"].get("column", ""),
        "signal_length": encoder.arch.signal_length,
    }
    (out / CONFIG_NAME).write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
    return entry
