"""A published head (the transformers model ``embedpipe publish`` writes for a head
checkpoint) read back by embedpipe: its entry from ``config.json``, the backbone's image
tower and the head from ``model.safetensors``, run by the same open_clip code as the
checkpoint, so ``embed --weights local-dir:DIR`` writes the checkpoint's embeddings."""

from __future__ import annotations

import os
from typing import Any

import torch

from embedpipe.models.backends.base import WEIGHTS_NAME, folder_config
from embedpipe.models.registry import ModelEntry, ModelError

HEAD_MODEL_TYPE = "embedpipe_head"
HEAD_KEYS = ("in_dim", "depth", "width", "out_dim", "activation", "normalize")


def read_head_config(folder: str) -> dict[str, Any] | None:
    """``folder/config.json`` when it is a published head's, else None."""
    config = folder_config(folder)
    return config if config and config.get("model_type") == HEAD_MODEL_TYPE else None


def head_entry(config: dict[str, Any], name: str, source: str) -> ModelEntry:
    """The entry of a published head: its backbone's, named ``name``, of the head's size."""
    try:
        backbone = ModelEntry.model_validate(config["backbone"])
        return backbone.model_copy(update={"name": name, "embed_dim": int(config["out_dim"])})
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(
            f"{source}: config.json does not describe a published head: {error}"
        ) from None


class ImageTower(torch.nn.Module):
    """An open_clip image tower with ``encode_image``, as the open_clip backend calls it."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def load_published_head(folder: str, source: str, device: str):
    """``(backbone entry, HeadOnBackbone)`` built from a published head folder."""
    from safetensors.torch import load_file

    from embedpipe.models.heads import HeadOnBackbone, ProjectionHead

    config = read_head_config(folder)
    if config is None:
        raise ModelError(f"{source}: not a published head (no embedpipe_head config.json)")
    head_entry(config, "", source)  # a clear error for a config that is not one
    backbone = ModelEntry.model_validate(config["backbone"])
    head = ProjectionHead(**{key: config[key] for key in HEAD_KEYS})
    path = os.path.join(folder, WEIGHTS_NAME)
    try:
        state = load_file(path)
        if backbone.library == "transformers":
            tower = _transformers_tower(config, _part(state, "visual."), source)
        else:
            visual = _open_clip_tower(config, source)
            visual.load_state_dict(_part(state, "visual."), strict=True)
            tower = ImageTower(visual)
        head.layers.load_state_dict(_part(state, "head."), strict=True)
    except (OSError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: not this published head's weights: {first}") from None
    module = HeadOnBackbone(tower, head, bool(config.get("normalize_input", True)))
    return backbone, module.to(device).eval()


def _open_clip_tower(config: dict[str, Any], source: str) -> torch.nn.Module:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    model_cfg = config.get("open_clip_model_cfg") or {}
    if "vision_cfg" not in model_cfg:
        raise ModelError(f"{source}: a published head needs its open_clip_model_cfg")
    visual = _build_vision_tower(
        model_cfg["embed_dim"],
        CLIPVisionCfg(**model_cfg["vision_cfg"]),
        quick_gelu=model_cfg.get("quick_gelu", False),
    )
    if config.get("preprocess_cfg"):
        visual.preprocess_cfg = dict(config["preprocess_cfg"])
    return visual


def _transformers_tower(
    config: dict[str, Any], state: dict[str, torch.Tensor], source: str
) -> torch.nn.Module:
    """The backbone through transformers' own loading: ``save_pretrained`` may store its
    tensors under the class's checkpoint names, which ``from_pretrained`` maps back."""
    import tempfile

    import transformers
    from safetensors.torch import save_file

    settings = dict(config.get("transformers_config") or {})
    architecture = config.get("transformers_architecture", "")
    if "model_type" not in settings or not hasattr(transformers, architecture):
        raise ModelError(f"{source}: a published head needs its transformers backbone config")
    backbone_config = transformers.AutoConfig.for_model(**settings)
    with tempfile.TemporaryDirectory(prefix="embedpipe-backbone-") as folder:
        backbone_config.save_pretrained(folder)
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        model_class = getattr(transformers, architecture)
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = ", ".join(f"{len(value)} {key}" for key, value in info.items() if value)
    if problems:
        raise ModelError(f"{source}: the backbone's weights do not fit {architecture} ({problems})")
    return model


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
