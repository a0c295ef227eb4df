"""What a model library must provide, and the checkpoint file names backends share."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from embedpipe.models.registry import ModelEntry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMBEDPIPE_NAME = "embedpipe.json"  # beside a Hugging Face save_pretrained folder

Transform = Callable[[Image.Image], torch.Tensor]


def folder_config(folder: str) -> dict | None:
    """``folder/config.json`` as a JSON object, or None where it is missing or unreadable
    (a folder of another kind)."""
    path = Path(folder, CONFIG_NAME)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model's eval transform does, in open_clip's ``PreprocessCfg`` terms, so
    that pixels can be prepared with tensor ops on any device."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # "shortest" then centre crop, "longest" then pad, "squash"
    fill_color: int = 0


class Backend(Protocol):
    """One model library. Stateless: every call takes the registry entry."""

    # Errors from loading weights that mean "these weights cannot be had" (offline,
    # missing, wrong), reported to the user as a ModelError with a hint.
    load_errors: tuple[type[Exception], ...]

    def create(self, entry: ModelEntry, source: str | None) -> torch.nn.Module:
        """The module from the library's own ``source`` (tag, hub id, file); None: random."""
        ...

    def load_checkpoint(self, entry: ModelEntry, directory: str) -> torch.nn.Module:
        """The module from a local checkpoint directory written by ``save_checkpoint``."""
        ...

    def save_checkpoint(
        self, entry: ModelEntry, module: torch.nn.Module, directory: Path
    ) -> None: ...

    def eval_transform(self, entry: ModelEntry, module: torch.nn.Module) -> Transform: ...

    def preprocess_spec(self, entry: ModelEntry, module: torch.nn.Module) -> PreprocessSpec:
        """The same preprocessing as ``eval_transform``, as data."""
        ...

    def encode_images(
        self, entry: ModelEntry, module: torch.nn.Module, pixels: torch.Tensor
    ) -> torch.Tensor: ...

    def encode_texts(
        self, module: torch.nn.Module, tokenizer: Callable, texts: list[str], device: torch.device
    ) -> torch.Tensor: ...

    def load_tokenizer(self, entry: ModelEntry, tokenizer_dir: str) -> Callable: ...
