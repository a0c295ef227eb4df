"""Build a registered model and load its weights; save and reload checkpoints.

Weights come from:

- ``""``: the entry's own source (an open_clip pretrained tag, ``hf-hub:ID`` or a
  transformers hub id); offline this fails with a message that says so;
- ``"random"``: the architecture with random weights (tests, smoke runs);
- a local directory: an embedpipe checkpoint (``config.json`` + ``model.safetensors``)
  or a Hugging Face ``save_pretrained`` folder;
- a local checkpoint file (open_clip ``.pt``/``.bin``/``.safetensors``);
- an ``s3://`` prefix holding either kind of folder, downloaded once to a cache.

Checkpoints are written as a directory with ``config.json`` (the registry
entry, plus the architecture config) and ``model.safetensors``; no pickles.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedpipe.core import storage
from embedpipe.models.registry import ModelEntry, ModelError

RANDOM_WEIGHTS = "random"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMBEDPIPE_NAME = "embedpipe.json"  # beside a Hugging Face save_pretrained folder
CACHE_DIR = Path(os.environ.get("EMBEDPIPE_CACHE", Path.home() / ".cache" / "embedpipe"))


@dataclass
class LoadedModel:
    entry: ModelEntry
    module: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    weights_source: str
    tokenizer_dir: str = ""
    _tokenizer: Callable | None = field(default=None, repr=False)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.entry.library == "open_clip":
            return self.module.encode_image(pixels)
        if self.entry.text:
            features = self.module.get_image_features(pixel_values=pixels)
            return features if torch.is_tensor(features) else features.pooler_output
        return self.module(pixel_values=pixels).pooler_output

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.entry.text:
            raise ModelError(f"{self.entry.name}: an image-only model has no text tower")
        tokenizer = self.tokenizer()
        device = next(self.module.parameters()).device
        if self.entry.library == "open_clip":
            return self.module.encode_text(tokenizer(texts).to(device))
        tokens = tokenizer(
            texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
        ).to(device)
        features = self.module.get_text_features(**tokens)
        return features if torch.is_tensor(features) else features.pooler_output

    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.entry, self.tokenizer_dir)
        return self._tokenizer


def _load_tokenizer(entry: ModelEntry, tokenizer_dir: str) -> Callable:
    try:
        if entry.library == "open_clip":
            import open_clip

            if tokenizer_dir:
                return open_clip.tokenizer.HFTokenizer(tokenizer_dir)
            return open_clip.get_tokenizer(entry.architecture)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir or entry.pretrained)
    except OSError as error:
        if entry.hub_tokenizer and not tokenizer_dir:
            raise ModelError(
                f"{entry.name}: its tokenizer comes from the Hugging Face hub and could not be "
                f"fetched ({type(error).__name__}); offline, save it with "
                "AutoTokenizer.save_pretrained(DIR) elsewhere and pass tokenizer_dir=DIR"
            ) from error
        raise ModelError(f"{entry.name}: cannot load tokenizer: {error}") from error


def fetch_weights(uri: str) -> str:
    """A local path for ``uri``: s3:// prefixes are downloaded once into the cache."""
    if not storage.is_s3(uri):
        return uri
    target = CACHE_DIR / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if target.is_dir():
        return str(target)
    files = storage.list_files(uri)
    if not files:
        raise ModelError(f"{uri}: no weight files under this prefix")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        prefix = storage.normalize(uri) + "/"
        for entry in files:
            local = staging / entry.uri[len(prefix) :]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(entry.uri))
        os.replace(staging, target)  # complete downloads only: a reader never sees half
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_model(
    entry: ModelEntry, weights: str = "", device: str = "cpu", tokenizer_dir: str = ""
) -> LoadedModel:
    source = weights or entry.pretrained
    local = fetch_weights(source) if source != RANDOM_WEIGHTS else source
    if entry.library == "open_clip":
        module, transform = _open_clip(entry, local, source)
    else:
        module, transform = _transformers(entry, local, source)
    module = module.to(device).eval()
    return LoadedModel(entry, module, transform, source, tokenizer_dir)


def register_open_clip_config(entry: ModelEntry) -> None:
    """Make a custom architecture from the entry known to open_clip (idempotent)."""
    import open_clip

    if entry.open_clip_config is None or open_clip.get_model_config(entry.architecture):
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, f"{entry.architecture}.json")
        path.write_text(json.dumps(entry.open_clip_config))
        open_clip.add_model_config(str(path))


def _open_clip(entry: ModelEntry, local: str, source: str):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    register_open_clip_config(entry)
    try:
        if local == RANDOM_WEIGHTS or os.path.isdir(local):
            module = open_clip.create_model(entry.architecture, pretrained=None)
            if os.path.isdir(local):
                _load_checkpoint(module, local, entry)
        elif local.startswith("hf-hub:"):
            module = open_clip.create_model(local)
        else:  # a pretrained tag, or a checkpoint file
            module = open_clip.create_model(
                entry.architecture, pretrained=local, require_pretrained=True
            )
    except (OSError, RuntimeError, ValueError) as error:
        raise ModelError(
            f"{entry.name}: cannot load weights '{source}': {error}. Offline, pass weights= a "
            "local directory or s3:// prefix holding a checkpoint, or 'random'"
        ) from error
    transform = image_transform_v2(PreprocessCfg(**module.visual.preprocess_cfg), is_train=False)
    return module, transform


def _transformers(entry: ModelEntry, local: str, source: str):
    import transformers
    from torchvision import transforms

    model_class = getattr(transformers, entry.architecture)
    config_class = getattr(transformers, entry.architecture.replace("Model", "Config"))
    try:
        if local == RANDOM_WEIGHTS:
            module = model_class(config_class(**entry.arch))
        else:
            module = model_class.from_pretrained(local)
    except OSError as error:
        raise ModelError(
            f"{entry.name}: cannot load weights '{source}': {error}. Offline, pass weights= a "
            "local directory or s3:// prefix holding a checkpoint, or 'random'"
        ) from error
    size = entry.image_size
    resize = (
        [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)]
        if entry.resize == "squash"
        else [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    )
    transform = transforms.Compose(
        [*resize, transforms.ToTensor(), transforms.Normalize(entry.mean, entry.std)]
    )
    return module, transform


def _load_checkpoint(module: torch.nn.Module, directory: str, entry: ModelEntry) -> None:
    config_path = Path(directory) / CONFIG_NAME
    weights_path = Path(directory) / WEIGHTS_NAME
    if not (config_path.is_file() and weights_path.is_file()):
        raise ModelError(f"{directory}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    saved = json.loads(config_path.read_text())
    architecture = saved.get("entry", {}).get("architecture")
    if architecture != entry.architecture:
        raise ModelError(f"{directory}: checkpoint of {architecture}, not {entry.architecture}")
    module.load_state_dict(load_file(str(weights_path)), strict=True)


def save_model(model: LoadedModel, out_uri: str) -> str:
    """Write ``model`` as a checkpoint directory at ``out_uri`` (local or s3://)."""
    out_uri = storage.normalize(out_uri)
    with tempfile.TemporaryDirectory(prefix="embedpipe-save-") as staging:
        if model.entry.library == "transformers":
            model.module.save_pretrained(staging, safe_serialization=True)
            meta = {"entry": model.entry.model_dump(mode="json")}
            Path(staging, EMBEDPIPE_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
            save_file(state, str(Path(staging, WEIGHTS_NAME)))
            import open_clip

            meta = {
                "entry": model.entry.model_dump(mode="json"),
                "model_cfg": open_clip.get_model_config(model.entry.architecture),
            }
            Path(staging, CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        # The config names the checkpoint complete, so it is published last.
        names = sorted(os.listdir(staging), key=lambda n: n in (CONFIG_NAME, EMBEDPIPE_NAME))
        for name in names:
            with storage.atomic_output(storage.join(out_uri, name)) as target:
                shutil.copyfile(os.path.join(staging, name), target)
    return out_uri
