"""open_clip models: pretrained tags, ``hf-hub:`` ids, checkpoint files and custom configs."""

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embedpipe.models.backends.base import CONFIG_NAME, WEIGHTS_NAME, PreprocessSpec, Transform
from embedpipe.models.registry import ModelEntry, ModelError


def register_open_clip_config(entry: ModelEntry) -> None:
    """Make a custom architecture from the entry known to open_clip (idempotent)."""
    import open_clip

    if entry.open_clip_config is None or open_clip.get_model_config(entry.architecture):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, f"{entry.architecture}.json")
        path.write_text(json.dumps(entry.open_clip_config))
        open_clip.add_model_config(str(path))


class OpenClipBackend:
    load_errors: tuple[type[Exception], ...] = (OSError, RuntimeError, ValueError)

    def create(self, entry: ModelEntry, source: str | None) -> torch.nn.Module:
        import open_clip

        register_open_clip_config(entry)
        if source is None:
            return open_clip.create_model(entry.architecture, pretrained=None)
        if source.startswith(("hf-hub:", "local-dir:")):  # config and weights from there
            return open_clip.create_model(source)
        return open_clip.create_model(
            entry.architecture, pretrained=source, require_pretrained=True
        )

    def load_checkpoint(self, entry: ModelEntry, directory: str) -> torch.nn.Module:
        import open_clip

        config_path = Path(directory) / CONFIG_NAME
        weights_path = Path(directory) / WEIGHTS_NAME
        if not (config_path.is_file() and weights_path.is_file()):
            raise ModelError(
                f"{directory}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        saved = json.loads(config_path.read_text())
        architecture = saved.get("entry", {}).get("architecture")
        if architecture != entry.architecture:
            raise ModelError(f"{directory}: checkpoint of {architecture}, not {entry.architecture}")
        register_open_clip_config(entry)
        # A model trained with a sigmoid loss carries a logit bias its base config may lack;
        # it is built as saved, so the strict load below holds for it too.
        bias = (saved.get("model_cfg") or {}).get("init_logit_bias")
        extra = {"init_logit_bias": bias} if bias is not None else {}
        module = open_clip.create_model(entry.architecture, pretrained=None, **extra)
        module.load_state_dict(load_file(str(weights_path)), strict=True)
        return module

    def save_checkpoint(self, entry: ModelEntry, module: torch.nn.Module, directory: Path) -> None:
        import open_clip

        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        meta = {
            "entry": entry.model_dump(mode="json"),
            "model_cfg": open_clip.get_model_config(entry.architecture),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def eval_transform(self, entry: ModelEntry, module: torch.nn.Module) -> Transform:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        config = PreprocessCfg(**module.visual.preprocess_cfg)
        return image_transform_v2(config, is_train=False)

    def preprocess_spec(self, entry: ModelEntry, module: torch.nn.Module) -> PreprocessSpec:
        config = module.visual.preprocess_cfg
        size = config["size"]
        return PreprocessSpec(
            size=(size, size) if isinstance(size, int) else tuple(size),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation="bilinear" if config.get("interpolation") == "bilinear" else "bicubic",
            resize_mode=config.get("resize_mode") or "shortest",
            fill_color=config.get("fill_color", 0),
        )

    def encode_images(
        self, entry: ModelEntry, module: torch.nn.Module, pixels: torch.Tensor
    ) -> torch.Tensor:
        return module.encode_image(pixels)

    def encode_texts(
        self, module: torch.nn.Module, tokenizer: Callable, texts: list[str], device: torch.device
    ) -> torch.Tensor:
        return module.encode_text(tokenizer(texts).to(device))

    def load_tokenizer(self, entry: ModelEntry, tokenizer_dir: str) -> Callable:
        import open_clip

        if tokenizer_dir:
            return open_clip.tokenizer.HFTokenizer(tokenizer_dir)
        if entry.pretrained.startswith(("hf-hub:", "local-dir:")):  # a published model's own
            return open_clip.get_tokenizer(entry.pretrained)
        return open_clip.get_tokenizer(entry.architecture)
