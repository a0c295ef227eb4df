"""Signal encoders (``library = "signal"``): built from the entry's ``arch``, random
weights (seeded by the caller) or an embedpipe checkpoint directory. They take no
pixels and no text."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME, PreprocessSpec, Transform
from embedpipe.models.registry import ModelEntry, ModelError


def _not_an_image_model(entry: ModelEntry) -> ModelError:
    return ModelError(f"{entry.name}: a signal encoder takes signals, not images or texts")


class SignalBackend:
    load_errors: tuple[type[Exception], ...] = (OSError, RuntimeError, ValueError)

    def create(self, entry: ModelEntry, source: str | None) -> torch.nn.Module:
        from embedpipe.models.signal_encoders import build_signal_encoder

        if source is not None:
            raise ModelError(
                f"{entry.name}: a signal encoder has no pretrained weights; pass weights "
                f"'random' (with a seed) or a checkpoint directory, not '{source}'"
            )
        return build_signal_encoder(entry)

    def load_checkpoint(self, entry: ModelEntry, directory: str) -> torch.nn.Module:
        from embedpipe.models.signal_encoders import build_signal_encoder

        config_path, weights_path = Path(directory, CONFIG_NAME), Path(directory, WEIGHTS_NAME)
        if not (config_path.is_file() and weights_path.is_file()):
            raise ModelError(
                f"{directory}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        saved = ModelEntry.model_validate(json.loads(config_path.read_text())["entry"])
        if (saved.architecture, saved.arch, saved.embed_dim) != (
            entry.architecture,
            entry.arch,
            entry.embed_dim,
        ):
            raise ModelError(
                f"{directory}: checkpoint of {saved.name} ({saved.architecture} {saved.arch}, "
                f"{saved.embed_dim} dims), not of {entry.name}; pass it without --model"
            )
        module = build_signal_encoder(saved)
        module.load_state_dict(load_file(str(weights_path)), strict=True)
        return module

    def save_checkpoint(self, entry: ModelEntry, module: torch.nn.Module, directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        meta = {"entry": entry.model_dump(mode="json")}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def eval_transform(self, entry: ModelEntry, module: torch.nn.Module) -> Transform:
        def no_pixels(image):
            raise _not_an_image_model(entry)

        return no_pixels

    def preprocess_spec(self, entry: ModelEntry, module: torch.nn.Module) -> PreprocessSpec:
        raise _not_an_image_model(entry)

    def encode_images(
        self, entry: ModelEntry, module: torch.nn.Module, pixels: torch.Tensor
    ) -> torch.Tensor:
        raise _not_an_image_model(entry)

    def encode_texts(
        self, module: torch.nn.Module, tokenizer: Callable, texts: list[str], device: torch.device
    ) -> torch.Tensor:
        raise ModelError("a signal encoder takes signals, not texts")

    def load_tokenizer(self, entry: ModelEntry, tokenizer_dir: str) -> Callable:
        raise _not_an_image_model(entry)
