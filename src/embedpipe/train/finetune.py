"""finetune: an open_clip model of the registry trained on image-text or image-image pairs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.models.loading import LoadedModel, fetch_weights, load_model
from embedpipe.models.precision import TRAINING, precision_for
from embedpipe.models.registry import ModelEntry
from embedpipe.train import losses
from embedpipe.train.data import (
    Examples,
    ImageStore,
    PixelDataset,
    UndecodableImage,
    caption_for,
    positive_for,
    rows_by_concept,
)
from embedpipe.train.nested import nested_loss, prefix_recalls
from embedpipe.train.optim import param_groups
from embedpipe.train.task import TaskDefaults
from embedpipe.train.validation import image_recall, text_recall, validation_rows


def check_model(entry: ModelEntry, config: TrainSettings) -> None:
    """What can be said of the model before it is built."""
    if entry.library != "open_clip":
        raise ConfigError(
            f"model: finetune trains open_clip models; {entry.name} is a {entry.library} "
            "model (train a projection head on its embeddings: --mode head)"
        )
    if config.image_text and not entry.text:
        raise ConfigError(
            f"model: {entry.name} has no text tower, so it cannot train on image-text pairs "
            "(use --pairs image_image)"
        )
    if config.weights and config.weights != "random":
        local = fetch_weights(config.weights)
        saved_path = os.path.join(local, "config.json")
        if os.path.isdir(local) and os.path.isfile(saved_path):
            with open(saved_path) as handle:
                saved = json.load(handle)
            architecture = saved.get("entry", {}).get("architecture")
            if saved.get("kind") == "head" or architecture != entry.architecture:
                what = "a projection head" if saved.get("kind") == "head" else architecture
                raise ConfigError(
                    f"weights: {config.weights} is a checkpoint of {what}, not of "
                    f"{entry.architecture} (model {entry.name})"
                )


class DualEncoder(nn.Module):
    """The open_clip model with what the loss needs; the module DDP wraps."""

    def __init__(self, clip: nn.Module, image_text: bool):
        super().__init__()
        self.clip = clip
        self.image_text = image_text

    def forward(self, pixels: torch.Tensor, second: torch.Tensor):
        clip = self.clip
        image = clip.encode_image(pixels, normalize=True)
        if self.image_text:
            other = clip.encode_text(second, normalize=True)
        else:
            other = clip.encode_image(second, normalize=True)
        bias = getattr(clip, "logit_bias", None)
        return image, other, clip.logit_scale.exp(), bias


def build(entry: ModelEntry, config: TrainSettings, device: str) -> tuple[LoadedModel, set[str]]:
    """The model in train mode, towers locked as asked; the names of parameters new to it."""
    model = load_model(entry, config.weights, device, config.tokenizer_dir)
    clip = model.module
    clip.train()
    new: set[str] = set()
    bias = losses.init_logit_bias(config.loss)
    if bias is not None and getattr(clip, "logit_bias", None) is None:
        # SigLIP's initialisation for a model that was not trained with a sigmoid loss.
        clip.logit_scale.data.fill_(losses.init_logit_scale(config.loss))
        clip.logit_bias = nn.Parameter(torch.full([], bias, device=clip.logit_scale.device))
        new.add("logit_bias")
    if config.lock_image:
        clip.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
    if config.lock_text and hasattr(clip, "lock_text_tower"):
        clip.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers)
    if config.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return model, new


def flops_per_sample(wrapped: nn.Module, pixels: torch.Tensor, second: torch.Tensor) -> float:
    """Forward + backward FLOPs of one sample (3x the counted forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        wrapped(pixels[:1], second[:1])
    return 3.0 * counter.get_total_flops()


def init_scale(loss: str) -> float:
    value = losses.init_logit_scale(loss)
    return math.log(1 / 0.07) if value is None else value


class PairsDataset(PixelDataset):
    """Item (row, second) -> (row, pixels, pixels of ``second`` or an empty tensor)."""

    def __getitem__(self, item: tuple[int, int]):
        row, second = item
        other = self._pixels(second) if second >= 0 else torch.empty(0)
        return row, self._pixels(row), other


def _collate_pairs(items):
    rows = torch.tensor([row for row, _, _ in items], dtype=torch.int64)
    pixels = torch.stack([p for _, p, _ in items])
    others = [o for _, _, o in items]
    return rows, pixels, torch.stack(others) if others[0].numel() else None


class FinetuneTask(TaskDefaults):
    """Batches of images with captions (or second images), the loss, and validation."""

    def __init__(
        self,
        entry: ModelEntry,
        config: TrainSettings,
        examples: Examples,
        images_uri: str,
        device: torch.device,
        loss_options: dict,
    ):
        self.entry, self.config, self.examples, self.device = entry, config, examples, device
        self.model, self.new = build(entry, config, str(device))
        self.module = DualEncoder(self.model.module, config.image_text)
        if not config.image_text:  # image pairs: the text tower takes no part
            for name, parameter in self.model.module.named_parameters():
                if not name.startswith("visual.") and not name.startswith("logit_"):
                    parameter.requires_grad_(False)
        self.train_rows = examples.rows("train")
        self.same_concept = rows_by_concept(examples, self.train_rows)
        self.queries, self.candidates = validation_rows(examples)
        wanted = set(examples.image_ids[r] for r in self.train_rows.tolist())
        wanted |= set(examples.image_ids[r] for r in self.candidates.tolist())
        self.images_uri = images_uri
        self.store = ImageStore(images_uri, wanted)
        self.tokenizer = self.model.tokenizer() if config.image_text else None
        self.loss = nested_loss(
            losses.get_loss(config.loss, **loss_options), config.nested_dims, entry.embed_dim
        )
        self.dataset = PairsDataset(self.store, examples.image_ids, self.model.transform)

    def param_groups(self) -> list[dict]:
        named = {f"clip.{n}" for n in self.new}
        return param_groups(self.module, named, self.config)

    def batches(self, epoch: int, micro_batches: list[list[int]]) -> Iterator:
        config, examples = self.config, self.examples
        items = []
        for rows in micro_batches:
            if config.image_text:
                items.append([(row, -1) for row in rows])
            else:
                items.append(
                    [
                        (row, positive_for(examples, row, self.same_concept, config.seed, epoch))
                        for row in rows
                    ]
                )
        loader = DataLoader(
            self.dataset,
            batch_sampler=items,
            num_workers=config.num_workers,
            collate_fn=_collate_pairs,
            pin_memory=self.device.type == "cuda",
        )
        try:
            yield from self._device_batches(loader)
        except UndecodableImage as error:
            raise UndecodableImage.from_loader(error) from None

    def _device_batches(self, loader: DataLoader) -> Iterator:
        config, examples = self.config, self.examples
        for rows, pixels, others in loader:
            if config.image_text:
                texts = [
                    caption_for(examples, row, config.templates, config.seed)
                    for row in rows.tolist()
                ]
                others = self.tokenizer(texts)
            yield {
                "rows": rows,
                "pixels": pixels.to(self.device, non_blocking=True),
                "second": others.to(self.device, non_blocking=True),
            }

    def features_of(self, forward: nn.Module, batch: dict) -> tuple:
        return forward(batch["pixels"], batch["second"])

    def loss_from(self, features: tuple, batch: dict) -> torch.Tensor:
        image, other, scale, bias = features
        labels = torch.from_numpy(self.examples.labels[batch["rows"].numpy()]).to(self.device)
        return self.loss(image.float(), other.float(), scale.float(), bias, labels=labels)

    def flops_per_sample(self, batch: dict) -> float:
        return flops_per_sample(self.module, batch["pixels"], batch["second"])

    @torch.no_grad()
    def evaluate(self, autocast) -> dict[str, float]:
        if not len(self.queries):
            return {}
        clip = self.model.module
        clip.eval()
        images = self._candidate_vectors()
        recall = partial(
            image_recall, self.examples, self.queries, self.candidates, ks=self.config.val_k
        )
        metrics = recall(images) | prefix_recalls(recall, images, self.config.nested_dims)
        if self.config.image_text:
            captions: dict[str, int] = {}
            for row in self.queries.tolist():
                captions.setdefault(
                    caption_for(self.examples, row, self.config.templates, self.config.seed), row
                )
            with autocast():
                texts = clip.encode_text(self.tokenizer(list(captions)).to(self.device))
            texts = F.normalize(texts.float(), dim=-1).cpu()
            metrics |= text_recall(
                self.examples,
                self.queries,
                self.candidates,
                images,
                texts,
                list(captions.values()),
                self.config.val_k,
            )
        clip.train()
        return metrics

    def _candidate_vectors(self) -> torch.Tensor:
        """The validation gallery embedded by the embedding engine's loader, in the
        training meaning of the precision (the loop's autocast)."""
        from embedpipe.embed.loader import vectors_for
        from embedpipe.embed.runtime import Inference, LoaderOptions

        precision = precision_for(self.config.precision, self.device, TRAINING)
        inference = Inference(
            self.model, self.device, precision.autocast, torch.float32, self.config.batch_size
        )
        ids = [self.examples.image_ids[row] for row in self.candidates.tolist()]
        options = LoaderOptions(workers=self.config.num_workers)
        return torch.from_numpy(vectors_for(self.images_uri, ids, inference, options))

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.module.state_dict()

    def training_weights(self) -> dict[str, torch.Tensor]:
        return self.weights()

    def load_training_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.module.load_state_dict(state, strict=True)

    def checkpoint_config(self) -> dict:
        import open_clip

        model_cfg = dict(open_clip.get_model_config(self.entry.architecture) or {})
        bias = getattr(self.model.module, "logit_bias", None)
        if bias is not None:
            model_cfg["init_logit_bias"] = float(losses.init_logit_bias(self.config.loss) or -10)
        return {
            "kind": "finetune",
            "entry": self.entry.model_dump(mode="json"),
            "model_cfg": model_cfg,
        }
