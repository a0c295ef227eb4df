"""An image_signal checkpoint published: the image tower exactly as a head publishes (one
transformers model of the backbone and the image head, see ``head_form``) and the signal
tower in its ``signal_encoder/`` subfolder, a signal checkpoint (``model.safetensors``,
``config.json`` with the whole entry, the column and signal length it was trained on)
that ``embedpipe embed-signal --weights DIR/signal_encoder`` (or ``DIR``) loads. The top
``config.json`` says where the signal tower is (``embedpipe_signal_tower``). Each tower is
checked by reloading it from the staging folder."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME
from embedpipe.models.heads import save_head_checkpoint
from embedpipe.models.loading import load_model
from embedpipe.models.registry import ModelEntry
from embedpipe.models.two_towers import (
    SIGNAL_TOWER_DIR,
    load_finetuned_tower,
    load_image_head,
    read_two_towers,
    write_signal_tower,
)
from embedpipe.publish.head_form import StagedHead, stage_head

SIGNAL_RECORD = "embedpipe_signal_tower"
CHECK_SIGNALS = 4


@dataclass
class StagedTowers:
    image: StagedHead  # the image tower, published as a head
    signal_entry: ModelEntry
    signal: dict[str, Any]  # what the top config.json records of the signal tower
    signal_state: dict[str, torch.Tensor]
    difference: float  # the larger of the two towers' reload differences


def _check_signals(encoder: torch.nn.Module) -> torch.Tensor:
    """Seeded random signals of a length the encoder takes."""
    arch = encoder.arch
    length = arch.signal_length or max(64, arch.min_signal_length)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(CHECK_SIGNALS, length, generator=generator) * 5 + 2


@torch.no_grad()
def _signal_difference(directory: str, tower: Path, entry: ModelEntry, device: str) -> float:
    """Largest difference between the checkpoint's signal tower and the published one, both
    loaded by embedpipe (normalised embeddings, as embed-signal writes them)."""
    expected_model = load_model(entry, directory, device)
    published = load_model(entry, str(tower), device)
    signals = _check_signals(expected_model.module).to(device)
    expected = F.normalize(expected_model.module(signals).float(), dim=-1)
    got = F.normalize(published.module(signals).float(), dim=-1)
    return (expected - got).abs().max().item()


def stage_two_towers(
    directory: str, device: str, tokenizer_dir: str, staging: Path, images: list
) -> StagedTowers:
    """Write the published form of the image_signal checkpoint at ``directory`` into
    ``staging``: the image tower through ``head_form.stage_head`` (from a head checkpoint
    of the same backbone record and head), the signal tower into ``signal_encoder/``."""
    config = read_two_towers(directory)
    head, record = load_image_head(directory, config)
    backbone = ModelEntry.model_validate(record["entry"])
    with tempfile.TemporaryDirectory(prefix="embedpipe-image-tower-") as folder:
        save_head_checkpoint(
            head,
            backbone,
            folder,
            {"train": config.get("train") or {}},
            weights=record["weights"],
            seed=record["seed"],
            normalized=record["normalized"],
        )
        image = stage_head(folder, device, tokenizer_dir, staging, images)
    signal = stage_signal_tower(directory, staging, CONFIG_NAME, device)
    # NaN (a broken tower) must not hide behind the other tower's number
    difference = worst(image.difference, signal.difference)
    return StagedTowers(image, signal.entry, signal.record, signal.state, difference)


@dataclass
class StagedSignal:
    entry: ModelEntry
    record: dict[str, Any]  # what the top config records of the signal tower
    state: dict[str, torch.Tensor]
    difference: float


def stage_signal_tower(directory: str, staging: Path, top_config: str, device: str):
    """The signal tower of the checkpoint at ``directory`` into ``staging/signal_encoder``,
    recorded in the published model's ``top_config`` (``config.json`` of a head form,
    ``open_clip_config.json`` of open_clip's layout), checked by reloading it."""
    tower = staging / SIGNAL_TOWER_DIR
    entry = write_signal_tower(directory, tower)
    described = json.loads((tower / CONFIG_NAME).read_text(encoding="utf-8"))
    record = {
        "folder": SIGNAL_TOWER_DIR,
        "entry": entry.name,
        "architecture": entry.architecture,
        "embed_dim": entry.embed_dim,
        "column": described["column"],
        "signal_length": described["signal_length"],
    }
    top = staging / top_config
    published = json.loads(top.read_text(encoding="utf-8"))
    published[SIGNAL_RECORD] = record
    top.write_text(json.dumps(published, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = load_file(str(tower / WEIGHTS_NAME))
    difference = _signal_difference(directory, tower, entry, device)
    return StagedSignal(entry, record, state, difference)


def write_finetuned_checkpoint(directory: str, config: dict[str, Any], out: str) -> dict:
    """A fine-tuned image tower as a fine-tuned open_clip checkpoint in ``out`` (its
    ``config.json`` returned): the whole model, its visual tower from ``directory``, so it
    publishes in open_clip's layout as any fine-tune does."""
    import open_clip
    from safetensors.torch import save_file

    model = load_finetuned_tower(directory, config, directory, "cpu")
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(Path(out, WEIGHTS_NAME)))
    saved = {
        "kind": "finetune",
        "entry": model.entry.model_dump(mode="json"),
        "model_cfg": dict(open_clip.get_model_config(model.entry.architecture) or {}),
        "train": config.get("train") or {},
    }
    Path(out, CONFIG_NAME).write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return saved


def worst(*differences: float) -> float:
    """The largest difference, NaN when any is (a broken tower must not hide)."""
    return max(differences) if all(d == d for d in differences) else float("nan")
