"""The untrained towers of an image_signal training, rebuilt from its checkpoint's
settings (the trained towers load through ``models.two_towers``)."""

from __future__ import annotations

import torch

from embedpipe.config import TrainSettings
from embedpipe.models.registry import ModelEntry
from embedpipe.models.two_towers import FINETUNE_MODE, image_mode
from embedpipe.train.data import Examples


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
    if image_mode(config, "checkpoint") == FINETUNE_MODE:
        from embedpipe.train.signal_finetune import ImageSignalFinetuneTask

        entry = ModelEntry.model_validate(config["image"]["entry"])
        return ImageSignalFinetuneTask(
            entry, settings, examples, images_uri, device, {}, models=models
        )
    from embedpipe.train.pairs_signal import ImageSignalTask

    entry = ModelEntry.model_validate(config["image"]["backbone"]["entry"])
    embeddings = config["image"]["embeddings"]
    return ImageSignalTask(entry, settings, examples, images_uri, embeddings, device, {}, models)
