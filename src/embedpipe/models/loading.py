"""Build a registered model and load its weights; save and reload checkpoints.

Weights come from:

- ``""``: the entry's own source (an open_clip pretrained tag, ``hf-hub:ID`` or a
  transformers hub id); offline this fails with a message that says so;
- ``"random"``: the architecture with random weights drawn from ``seed`` (tests, smoke
  runs): the same seed gives the same model, so a resumed run goes on with it;
- a local directory: an embedpipe checkpoint (``config.json`` + ``model.safetensors``)
  or a Hugging Face ``save_pretrained`` folder;
- a local checkpoint file (open_clip ``.pt``/``.bin``/``.safetensors``);
- an ``s3://`` prefix holding either kind of folder, downloaded once to a cache.

Checkpoints are written as a directory with ``config.json`` (the registry
entry, plus the architecture config) and ``model.safetensors``; no pickles.
"""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedpipe.core import storage
from embedpipe.models.backends import Backend, backend_for
from embedpipe.models.backends.base import (
    CONFIG_NAME,
    EMBEDPIPE_NAME,
    WEIGHTS_NAME,
    PreprocessSpec,
    Transform,
)
from embedpipe.models.backends.open_clip import register_open_clip_config
from embedpipe.models.registry import ModelEntry, ModelError

__all__ = [
    "CACHE_DIR",
    "CONFIG_NAME",
    "EMBEDPIPE_NAME",
    "RANDOM_WEIGHTS",
    "WEIGHTS_NAME",
    "LoadedModel",
    "fetch_weights",
    "load_model",
    "register_open_clip_config",
    "save_model",
]

RANDOM_WEIGHTS = "random"
CACHE_DIR = Path(os.environ.get("EMBEDPIPE_CACHE", Path.home() / ".cache" / "embedpipe"))


@dataclass
class LoadedModel:
    entry: ModelEntry
    module: torch.nn.Module
    transform: Transform
    weights_source: str
    tokenizer_dir: str = ""
    _tokenizer: Callable | None = field(default=None, repr=False)

    @property
    def backend(self) -> Backend:
        return backend_for(self.entry)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.backend.preprocess_spec(self.entry, self.module)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backend.encode_images(self.entry, self.module, pixels)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.entry.text:
            raise ModelError(f"{self.entry.name}: an image-only model has no text tower")
        tokenizer = self.tokenizer()
        device = next(self.module.parameters()).device
        return self.backend.encode_texts(self.module, tokenizer, texts, device)

    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.entry, self.tokenizer_dir)
        return self._tokenizer


def _load_tokenizer(entry: ModelEntry, tokenizer_dir: str) -> Callable:
    try:
        return backend_for(entry).load_tokenizer(entry, tokenizer_dir)
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
    entry: ModelEntry,
    weights: str = "",
    device: str = "cpu",
    tokenizer_dir: str = "",
    seed: int = 0,
) -> LoadedModel:
    source = weights or entry.pretrained
    local = fetch_weights(source) if source != RANDOM_WEIGHTS else source
    backend = backend_for(entry)
    try:
        if local == RANDOM_WEIGHTS:
            module = _create_seeded(backend, entry, seed)
        elif os.path.isdir(local):
            module = backend.load_checkpoint(entry, local)
        else:
            module = backend.create(entry, local)
    except ModelError:  # ours already says what is wrong (a checkpoint of another model)
        raise
    except backend.load_errors as error:
        raise ModelError(
            f"{entry.name}: cannot load weights '{source}': {error}. Offline, pass weights= a "
            "local directory or s3:// prefix holding a checkpoint, or 'random'"
        ) from error
    transform = backend.eval_transform(entry, module)
    module = module.to(device).eval()
    return LoadedModel(entry, module, transform, source, tokenizer_dir)


def _create_seeded(backend: Backend, entry: ModelEntry, seed: int) -> torch.nn.Module:
    # A forked RNG: the caller's global random state is the same afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return backend.create(entry, None)


def save_model(model: LoadedModel, out_uri: str) -> str:
    """Write ``model`` as a checkpoint directory at ``out_uri`` (local or s3://)."""
    out_uri = storage.normalize(out_uri)
    with tempfile.TemporaryDirectory(prefix="embedpipe-save-") as staging:
        model.backend.save_checkpoint(model.entry, model.module, Path(staging))
        # The config names the checkpoint complete, so it is published last.
        names = sorted(os.listdir(staging), key=lambda n: n in (CONFIG_NAME, EMBEDPIPE_NAME))
        for name in names:
            with storage.atomic_output(storage.join(out_uri, name)) as target:
                shutil.copyfile(os.path.join(staging, name), target)
    return out_uri
