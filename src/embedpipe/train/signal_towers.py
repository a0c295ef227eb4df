"""The two towers of an image_signal checkpoint, and the untrained towers of its training.

A checkpoint's ``config.json`` says how its image tower was trained: ``"image": {"mode":
"finetune", "entry": ...}`` holds an open_clip visual tower (weights ``image.*``, taking
pixels), otherwise (head mode, no ``mode`` key) a projection head on raw frozen embeddings
(weights ``image_head.*``); the signal encoder's weights are ``signal.*`` in both.
"""

from __future__ import annotations

import torch
from torch import nn

from embedpipe.config import TrainSettings
from embedpipe.models.heads import ProjectionHead
from embedpipe.models.registry import ModelEntry
from embedpipe.models.signal_encoders import SignalEncoder, build_signal_encoder
from embedpipe.train.data import Examples

FINETUNE_IMAGE_MODE = "finetune"


def image_mode(config: dict) -> str:
    return config["image"].get("mode", "head")


def weights_under(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def image_tower(config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The checkpoint's image tower with its weights: the fine-tuned open_clip visual tower
    (pixels in) or the head (raw frozen embeddings in)."""
    if image_mode(config) == FINETUNE_IMAGE_MODE:
        from embedpipe.models.loading import RANDOM_WEIGHTS, load_model

        entry = ModelEntry.model_validate(config["image"]["entry"])
        visual = load_model(entry, RANDOM_WEIGHTS).module.visual
        visual.load_state_dict(weights_under(weights, "image."), strict=True)
        return visual
    head = config["image"]["head"]
    module = ProjectionHead(
        head["in_dim"], head["depth"], head["width"], head["out_dim"], head["activation"]
    )
    module.load_state_dict(weights_under(weights, "image_head."))
    return module


def signal_tower(config: dict, weights: dict[str, torch.Tensor]) -> SignalEncoder:
    encoder = build_signal_encoder(ModelEntry.model_validate(config["signal"]["entry"]))
    encoder.load_state_dict(weights_under(weights, "signal."))
    return encoder


def untrained_task(
    config: dict,
    settings: TrainSettings,
    examples: Examples,
    images_uri: str,
    device=None,
    models: dict | None = None,
):
    """The training's task as at step 0 (rebuilt from its settings and seed): its
    ``module`` holds the untrained towers, its ``image_inputs(rows)`` what they take;
    ``models``: ``[models.NAME]`` entries (a signal encoder declared in a config file)."""
    device = device or torch.device("cpu")
    if image_mode(config) == FINETUNE_IMAGE_MODE:
        from embedpipe.train.signal_finetune import ImageSignalFinetuneTask

        entry = ModelEntry.model_validate(config["image"]["entry"])
        return ImageSignalFinetuneTask(
            entry, settings, examples, images_uri, device, {}, models=models
        )
    from embedpipe.train.pairs_signal import ImageSignalTask

    entry = ModelEntry.model_validate(config["image"]["backbone"]["entry"])
    embeddings = config["image"]["embeddings"]
    return ImageSignalTask(entry, settings, examples, images_uri, embeddings, device, {}, models)
