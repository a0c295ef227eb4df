"""A head checkpoint published as one transformers custom model that embeds pictures: the
backbone's image tower (open_clip's, or the transformers vision model), the head and the
backbone's preprocessing in one folder
(``config.json`` with ``auto_map``, ``model.safetensors``, ``preprocessor_config.json``,
``modeling_embedpipe_head.py``), loaded with ``AutoModel`` / ``AutoImageProcessor``
and ``trust_remote_code=True``. The modeling file needs open_clip (its preprocessing, and
an open_clip backbone's tower) and transformers, not embedpipe."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedpipe.core import storage
from embedpipe.models.heads import backbone_of, load_head_checkpoint, trained_nested_dims
from embedpipe.models.loading import checkpoint_entry, load_model
from embedpipe.models.registry import ModelEntry, ModelError

MODEL_TYPE = "embedpipe_head"
MODELING_FILE = "modeling_embedpipe_head.py"
PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass
class StagedHead:
    backbone: ModelEntry
    saved: dict[str, Any]  # the checkpoint's config.json
    head: dict[str, Any]  # the head's shape
    state: dict[str, torch.Tensor]  # every published tensor (image tower and head)
    difference: float  # largest |checkpoint - reloaded| over the check images
    normalize_input: bool  # the head learnt from L2-normalised backbone features
    preprocess: dict[str, Any]  # open_clip's preprocess_cfg of the image tower


def open_clip_model_cfg(entry: ModelEntry, visual: torch.nn.Module) -> dict[str, Any]:
    """The open_clip config that builds ``visual`` again: the entry's own or the built-in
    one, with ``quick_gelu`` as the loaded tower has it (openai weights force it)."""
    import open_clip
    from open_clip.model import QuickGELU

    model_cfg = entry.open_clip_config or open_clip.get_model_config(entry.architecture)
    if not model_cfg:
        raise ModelError(f"{entry.name}: no open_clip config for {entry.architecture}")
    quick = any(isinstance(module, QuickGELU) for module in visual.modules())
    return {**model_cfg, "quick_gelu": quick}


def transformers_preprocess_cfg(entry: ModelEntry) -> dict[str, Any]:
    """The transformers backend's eval transform in open_clip's terms: bicubic resize of the
    shortest side then centre crop (or a squash), to tensor, normalise; open_clip's
    transform with these settings is the same torchvision steps."""
    size = entry.image_size
    return {
        "size": [size, size],
        "mode": "RGB",
        "mean": list(entry.mean),
        "std": list(entry.std),
        "interpolation": "bicubic",
        "resize_mode": entry.resize,
        "fill_color": 0,
    }


def public_entry(entry: ModelEntry) -> dict[str, Any]:
    """The backbone's entry as published: a ``pretrained`` that is a local path or a bucket
    (meaningless to a reader, maybe private) is left out."""
    fields = entry.model_dump(mode="json")
    pretrained = fields.get("pretrained") or ""
    if storage.is_s3(pretrained) or os.path.isabs(pretrained) or os.path.exists(pretrained):
        fields["pretrained"] = ""
    return fields


def stage_head(
    directory: str, device: str, tokenizer_dir: str, staging: Path, images: list
) -> StagedHead:
    """Write the published form of the head checkpoint at ``directory`` into ``staging``,
    reload it through transformers and compare its embeddings of ``images`` with
    embedpipe's of the checkpoint (backbone, head, normalised as ``embed`` writes them)."""
    from embedpipe.publish.modeling_embedpipe_head import (
        EmbedpipeHeadConfig,
        EmbedpipeHeadModel,
        EmbedpipeImageProcessor,
    )

    head, backbone, saved = load_head_checkpoint(directory)
    model = load_model(checkpoint_entry(directory), directory, device, tokenizer_dir)
    if backbone.library == "open_clip":
        visual = model.module.backbone.visual
        preprocess_cfg = dict(visual.preprocess_cfg)
        tower = {"open_clip_model_cfg": open_clip_model_cfg(backbone, visual)}
    else:
        visual = model.module.backbone
        preprocess_cfg = transformers_preprocess_cfg(backbone)
        tower = {
            "backbone_library": "transformers",
            "transformers_architecture": type(visual).__name__,
            "transformers_config": visual.config.to_dict(),
            # as the transformers backend takes image features (see backends/transformers)
            "transformers_features": "get_image_features" if backbone.text else "pooler_output",
        }
    config = EmbedpipeHeadConfig(
        **head.config,
        **tower,
        normalize_input=backbone_of(saved)["normalized"],
        preprocess_cfg=preprocess_cfg,
        backbone=public_entry(backbone),
        nested_dims=trained_nested_dims(saved),
    )
    EmbedpipeHeadConfig.register_for_auto_class()
    EmbedpipeHeadModel.register_for_auto_class("AutoModel")
    EmbedpipeImageProcessor.register_for_auto_class("AutoImageProcessor")
    published = EmbedpipeHeadModel(config)
    published.visual.load_state_dict(visual.state_dict(), strict=True)
    published.head.load_state_dict(head.layers.state_dict(), strict=True)
    published.save_pretrained(str(staging))
    EmbedpipeImageProcessor(preprocess_cfg=preprocess_cfg).save_pretrained(str(staging))
    state = {k: v.detach().cpu() for k, v in published.state_dict().items()}
    difference = _reload_difference(model, staging, images, device)
    return StagedHead(
        backbone, saved, head.config, state, difference, config.normalize_input, preprocess_cfg
    )


@torch.no_grad()
def _reload_difference(model, staging: Path, images: list, device: str) -> float:
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(staging), trust_remote_code=True)
    reloaded = AutoModel.from_pretrained(str(staging), trust_remote_code=True).to(device).eval()
    got = reloaded(**processor(images=images, return_tensors="pt").to(device))
    pixels = torch.stack([model.transform(image) for image in images]).to(device)
    expected = torch.nn.functional.normalize(model.encode_images(pixels).float(), dim=-1)
    return (expected - got).abs().max().item()
