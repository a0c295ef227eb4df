"""Hugging Face transformers models: hub ids and ``save_pretrained`` folders."""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from embedpipe.models.backends.base import EMBEDPIPE_NAME, PreprocessSpec, Transform
from embedpipe.models.registry import ModelEntry


def _features(output) -> torch.Tensor:
    # get_*_features returns a model output in transformers 5, a tensor in 4.
    return output if torch.is_tensor(output) else output.pooler_output


class TransformersBackend:
    load_errors: tuple[type[Exception], ...] = (OSError,)

    def create(self, entry: ModelEntry, source: str | None) -> torch.nn.Module:
        import transformers

        model_class = getattr(transformers, entry.architecture)
        if source is None:
            config_class = getattr(transformers, entry.architecture.replace("Model", "Config"))
            return model_class(config_class(**entry.arch))
        return model_class.from_pretrained(source)

    def load_checkpoint(self, entry: ModelEntry, directory: str) -> torch.nn.Module:
        return self.create(entry, directory)

    def save_checkpoint(self, entry: ModelEntry, module: torch.nn.Module, directory: Path) -> None:
        module.save_pretrained(directory, safe_serialization=True)
        meta = {"entry": entry.model_dump(mode="json")}
        (directory / EMBEDPIPE_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def eval_transform(self, entry: ModelEntry, module: torch.nn.Module) -> Transform:
        from torchvision import transforms

        size = entry.image_size
        bicubic = transforms.InterpolationMode.BICUBIC
        resize = (
            [transforms.Resize((size, size), interpolation=bicubic)]
            if entry.resize == "squash"
            else [transforms.Resize(size, interpolation=bicubic), transforms.CenterCrop(size)]
        )
        return transforms.Compose(
            [*resize, transforms.ToTensor(), transforms.Normalize(entry.mean, entry.std)]
        )

    def preprocess_spec(self, entry: ModelEntry, module: torch.nn.Module) -> PreprocessSpec:
        size = entry.image_size
        return PreprocessSpec((size, size), entry.mean, entry.std, "bicubic", entry.resize)

    def encode_images(
        self, entry: ModelEntry, module: torch.nn.Module, pixels: torch.Tensor
    ) -> torch.Tensor:
        if entry.text:
            return _features(module.get_image_features(pixel_values=pixels))
        return module(pixel_values=pixels).pooler_output

    def encode_texts(
        self, module: torch.nn.Module, tokenizer: Callable, texts: list[str], device: torch.device
    ) -> torch.Tensor:
        tokens = tokenizer(
            texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
        ).to(device)
        return _features(module.get_text_features(**tokens))

    def load_tokenizer(self, entry: ModelEntry, tokenizer_dir: str) -> Callable:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir or entry.pretrained)
