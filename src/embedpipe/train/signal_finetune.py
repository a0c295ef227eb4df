"""image_signal, mode finetune: the open_clip image tower fine-tuned jointly with a signal
encoder on each image and its own signal.

The image tower is the registry model's visual tower (``[train].model`` with
``[train].weights``; its text tower takes no part and is not kept), fed pixels decoded from
the images dataset as ``train.finetune`` decodes them; the signal tower is a registry
signal encoder (``[train].signal_model``). Both map into the image tower's ``embed_dim``:
a signal encoder started from random weights gets its output projection sized to it (the
"projection to the shared dimension" of AstroCLIP's spectrum encoder); one started from a
checkpoint must already have it. Loss, validation (held-out image -> signal recall@K,
``val_recall_at_K``) and nested prefixes are those of the head mode (``pairs_signal``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.embed.signals import padded_batch
from embedpipe.models.registry import ModelEntry
from embedpipe.models.signal_encoders import SignalEncoder
from embedpipe.models.two_towers import FINETUNE_MODE
from embedpipe.train import losses
from embedpipe.train.data import (
    Examples,
    ImageStore,
    PixelDataset,
    UndecodableImage,
    collate_rows,
)
from embedpipe.train.finetune import build, init_scale
from embedpipe.train.nested import nested_loss
from embedpipe.train.optim import param_groups
from embedpipe.train.pairs_signal import (
    IMAGE_SIGNAL_KIND,
    SignalPairTask,
    at_least_fp32,
    build_encoder,
)


class SignalFinetuneModule(nn.Module):
    """The open_clip visual tower, the signal encoder, and the loss's learnable logit scale
    and bias; the module DDP wraps."""

    def __init__(
        self,
        visual: nn.Module,
        encoder: SignalEncoder,
        init_scale: float,
        init_bias: float | None,
    ):
        super().__init__()
        self.visual, self.encoder = visual, encoder
        self.logit_scale = nn.Parameter(torch.full([], init_scale))
        self.logit_bias = None if init_bias is None else nn.Parameter(torch.full([], init_bias))

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_fp32(self.visual(pixels)), dim=-1)

    def signal(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_fp32(self.encoder(values, lengths)), dim=-1)

    def forward(self, pixels: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        return (
            self.image(pixels),
            self.signal(values, lengths),
            None,
            self.logit_scale.exp(),
            self.logit_bias,
        )


def signal_entry_for(config: TrainSettings, embed_dim: int, models: dict | None):
    """The signal encoder, its output the image tower's ``embed_dim`` wide."""
    entry, encoder = build_encoder(config, models, embed_dim)
    if entry.embed_dim != embed_dim:
        raise ConfigError(
            f"signal_weights: {config.signal_weights} embeds signals in {entry.embed_dim} "
            f"dims, but the image tower {config.model} embeds in {embed_dim}; start the "
            "signal encoder from random weights (its projection is then sized to match)"
        )
    return entry, encoder


class ImageSignalFinetuneTask(SignalPairTask):
    """Batches of example rows: each image's pixels and its own signal."""

    def __init__(
        self,
        entry: ModelEntry,
        config: TrainSettings,
        examples: Examples,
        images_uri: str,
        device: torch.device,
        loss_options: dict,
        models: dict | None = None,
    ):
        self.entry, self.config, self.examples, self.device = entry, config, examples, device
        if config.out_dim:
            raise ConfigError(
                f"out_dim: image_signal finetune embeds in the image tower's {entry.embed_dim} "
                "dims; leave out_dim 0"
            )
        model, _ = build(entry, config, str(device))  # only its visual tower is kept
        self.signal_entry, encoder = signal_entry_for(config, entry.embed_dim, models)
        self.use_signals(images_uri, encoder)
        self.nested_dims = config.nested_dims
        self.module = SignalFinetuneModule(
            model.module.visual,
            encoder.to(device),
            init_scale(config.loss),
            losses.init_logit_bias(config.loss),
        ).to(device)
        wanted = {examples.image_ids[r] for r in np.concatenate([self.train_rows, self.queries])}
        self.images_uri = images_uri
        self.dataset = PixelDataset(
            ImageStore(images_uri, wanted), examples.image_ids, model.transform
        )
        self.loss = nested_loss(
            losses.get_loss(config.loss, **loss_options), config.nested_dims, entry.embed_dim
        )

    def param_groups(self) -> list[dict]:
        # The visual tower is pretrained (tower_lr); the signal encoder and the logit scale
        # and bias start here (lr).
        new = {name for name, _ in self.module.named_parameters()}
        new = {name for name in new if not name.startswith("visual.")}
        return param_groups(self.module, new, self.config)

    def input_batches(self, micro_batches: list[list[int]]) -> Iterator:
        """(rows, pixels) per list of rows, decoded in the loader's workers; an image that
        does not decode is one line naming it."""
        loader = DataLoader(
            self.dataset,
            batch_sampler=[[int(r) for r in rows] for rows in micro_batches],
            num_workers=self.config.num_workers,
            collate_fn=collate_rows,
            pin_memory=self.device.type == "cuda",
        )
        try:
            yield from loader
        except UndecodableImage as error:
            raise UndecodableImage.from_loader(error) from None

    def batches(self, epoch: int, micro_batches: list[list[int]]) -> Iterator[dict]:
        for rows, pixels in self.input_batches(micro_batches):
            values, lengths = padded_batch(self.signals, rows.tolist())
            yield {
                "rows": rows,
                "pixels": pixels.to(self.device, non_blocking=True),
                "values": values.to(self.device),
                "lengths": lengths.to(self.device),
            }

    def features_of(self, forward: nn.Module, batch: dict) -> tuple:
        return forward(batch["pixels"], batch["values"], batch["lengths"])

    def flops_per_sample(self, batch: dict) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            self.module(batch["pixels"][:1], batch["values"][:1], batch["lengths"][:1])
        return 3.0 * counter.get_total_flops()

    def weights(self) -> dict[str, torch.Tensor]:
        state = {
            f"image.{k}": v.detach().clone() for k, v in self.module.visual.state_dict().items()
        }
        state |= self.signal_weights()
        if self.module.logit_bias is not None:
            state["logit_bias"] = self.module.logit_bias.detach().clone()
        return state

    def checkpoint_config(self) -> dict:
        return {
            "kind": IMAGE_SIGNAL_KIND,
            "image": {
                "mode": FINETUNE_MODE,
                "entry": self.entry.model_dump(mode="json"),
                "weights": self.config.weights,
            },
            "signal": self.signal_record(),
        }
