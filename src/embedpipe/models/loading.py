"""Build a registered model and load its weights; save and reload checkpoints.

Weights come from:

- ``""``: the entry's own source (an open_clip pretrained tag, ``hf-hub:ID`` or a
  transformers hub id); offline this fails with a message that says so;
- ``"random"``: the architecture with random weights drawn from ``seed`` (tests, smoke
  runs): the same seed gives the same model, so a resumed run goes on with it;
- a local directory: an embedpipe checkpoint (``config.json`` + ``model.safetensors``)
  or a Hugging Face ``save_pretrained`` folder;
- a local checkpoint file (open_clip ``.pt``/``.bin``/``.safetensors``);
- an ``s3://`` prefix holding either kind of folder, downloaded once to a cache;
- ``local-dir:DIR`` (DIR local or s3://) or ``hf-hub:ORG/NAME``: a model published in
  open_clip's Hugging Face layout, or a published head (``published_head``);
  ``entry_for_weights`` builds its entry, no registry needed.

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
from embedpipe.models.heads import HEAD_KIND
from embedpipe.models.published_head import head_entry, load_published_head, read_head_config
from embedpipe.models.registry import ModelEntry, ModelError
from embedpipe.models.two_towers import (
    IMAGE_SIGNAL_KIND,
    image_tower_entry,
    load_tower,
    signal_tower_folder,
)
from embedpipe.models.weights_files import damaged_weights_named

__all__ = [
    "CACHE_DIR",
    "CONFIG_NAME",
    "EMBEDPIPE_NAME",
    "RANDOM_WEIGHTS",
    "WEIGHTS_NAME",
    "LoadedModel",
    "checkpoint_entry",
    "entry_for_weights",
    "fetch_weights",
    "load_model",
    "register_open_clip_config",
    "save_model",
]

RANDOM_WEIGHTS = "random"
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
CACHE_DIR = Path(os.environ.get("EMBEDPIPE_CACHE", Path.home() / ".cache" / "embedpipe"))


@dataclass
class LoadedModel:
    entry: ModelEntry
    module: torch.nn.Module
    transform: Transform
    weights_source: str
    tokenizer_dir: str = ""
    _tokenizer: Callable | None = field(default=None, repr=False)
    backbone_entry: ModelEntry | None = None  # a head checkpoint: the model under the head

    @property
    def backend(self) -> Backend:
        return backend_for(self.backbone_entry or self.entry)

    def _image_model(self) -> tuple[ModelEntry, torch.nn.Module]:
        """The entry and module that see the pixels: a head's backbone, else the model."""
        if self.backbone_entry is not None:
            return self.backbone_entry, self.module.backbone
        return self.entry, self.module

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.backend.preprocess_spec(*self._image_model())

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backend.encode_images(*self._image_model(), pixels)
        return self.module.project(features) if self.backbone_entry is not None else features

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.entry.text or self.backbone_entry is not None:
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


def _published_source(source: str) -> str:
    """``local-dir:s3://...`` downloaded once, as ``local-dir:LOCAL``; other sources as given."""
    if source.startswith(LOCAL_DIR):
        location = source[len(LOCAL_DIR) :]
        if storage.is_s3(location) and not any(
            storage.exists(storage.join(location, name))
            for name in (OPEN_CLIP_CONFIG_NAME, CONFIG_NAME)
        ):  # publish writes the config last: without it the prefix is no (whole) model
            raise ModelError(f"{source}: no published model here (no {OPEN_CLIP_CONFIG_NAME})")
        return LOCAL_DIR + fetch_weights(location)
    return source


def _hub_head_folder(source: str) -> str | None:
    """The local snapshot of an ``hf-hub:`` repo holding a published head (from the
    Hugging Face cache offline), or None when the repo is not one."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = source[len(HF_HUB) :]
    try:
        config = Path(hf_hub_download(repo_id, CONFIG_NAME)).parent
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        return None
    if read_head_config(str(config)) is None:
        return None
    try:
        return snapshot_download(repo_id)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise ModelError(
            f"{source}: cannot fetch the published head's files ({type(error).__name__}); "
            "offline, download the repo and pass local-dir:DIR"
        ) from None


def _read_published_config(source: str) -> dict:
    if source.startswith(LOCAL_DIR):
        path = Path(source[len(LOCAL_DIR) :], OPEN_CLIP_CONFIG_NAME)
        if not path.is_file():
            raise ModelError(
                f"{source}: no {OPEN_CLIP_CONFIG_NAME} in this folder (nor the config.json of "
                "a published head)"
            )
        text = path.read_text(encoding="utf-8")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            text = Path(hf_hub_download(source[len(HF_HUB) :], OPEN_CLIP_CONFIG_NAME)).read_text()
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
            raise ModelError(
                f"{source}: cannot fetch {OPEN_CLIP_CONFIG_NAME} ({type(error).__name__}); "
                "offline, download the repo and pass local-dir:DIR"
            ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelError(f"{source}: {OPEN_CLIP_CONFIG_NAME} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{source}: {OPEN_CLIP_CONFIG_NAME} has no 'model_cfg' object")
    return config


def entry_for_weights(weights: str) -> ModelEntry | None:
    """The entry of a published model (``local-dir:DIR`` or ``hf-hub:ORG/NAME``), read from
    its ``open_clip_config.json``; None for every other kind of weights."""
    if not weights.startswith((LOCAL_DIR, HF_HUB)):
        return None
    source = _published_source(weights)
    identifier = weights.split(":", 1)[1].rstrip("/")
    name = identifier.rsplit("/", 1)[-1] or identifier
    folder = source[len(LOCAL_DIR) :] if source.startswith(LOCAL_DIR) else None
    if source.startswith(HF_HUB):
        folder = _hub_head_folder(source)
    head = read_head_config(folder) if folder else None
    if head is not None:  # a published head: the transformers form of a head checkpoint
        return head_entry(head, name, weights)
    config = _read_published_config(source)
    model_cfg, preprocess = config["model_cfg"], config.get("preprocess_cfg") or {}
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
    size = preprocess.get("size") or model_cfg.get("vision_cfg", {}).get("image_size")
    text_cfg = model_cfg.get("text_cfg") or {}
    fields = {
        "name": name,
        "library": "open_clip",
        "architecture": f"{name}-{digest}",  # its own name: never a built-in's config
        "pretrained": source,
        "embed_dim": model_cfg.get("embed_dim"),
        "image_size": size[0] if isinstance(size, list | tuple) else size,
        "text": bool(text_cfg),
        "hub_tokenizer": bool(text_cfg.get("hf_tokenizer_name")),
        "open_clip_config": model_cfg,
        "resize": "squash" if preprocess.get("resize_mode") == "squash" else "shortest",
    }
    fields.update({key: tuple(preprocess[key]) for key in ("mean", "std") if key in preprocess})
    try:
        return ModelEntry(**fields)
    except ValueError as error:
        raise ModelError(
            f"{weights}: {OPEN_CLIP_CONFIG_NAME} does not describe a model: {error}"
        ) from None


def checkpoint_entry(weights: str) -> ModelEntry | None:
    """The model entry a checkpoint directory carries in its ``config.json`` (a trained
    model or a head), or None when ``weights`` is not such a directory."""
    if not weights or weights == RANDOM_WEIGHTS:
        return None
    if storage.is_s3(weights) and not storage.exists(storage.join(weights, CONFIG_NAME)):
        return None
    local = fetch_weights(weights)
    path = os.path.join(local, CONFIG_NAME)
    if not (os.path.isdir(local) and os.path.isfile(path)):
        return None
    try:
        saved = json.loads(Path(path).read_text())
        if saved.get("kind") == IMAGE_SIGNAL_KIND:  # pairs image_signal: its image tower
            return image_tower_entry(saved, weights)
        if saved.get("kind") == HEAD_KIND:
            backbone = ModelEntry.model_validate(saved["backbone"]["entry"])
            out_dim = saved["head"]["out_dim"]
            return backbone.model_copy(
                update={"name": f"{backbone.name}+head", "embed_dim": out_dim}
            )
        return ModelEntry.model_validate(saved["entry"]) if "entry" in saved else None
    except ModelError:  # ours already names the checkpoint and says what is wrong
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{weights}: unreadable {CONFIG_NAME}: {error}") from error


def _load_head(entry: ModelEntry, local: str, source: str, device: str, tokenizer_dir: str):
    from safetensors.torch import load_file

    from embedpipe.models.heads import HeadOnBackbone, ProjectionHead, backbone_of

    saved = json.loads(Path(local, CONFIG_NAME).read_text())
    described = backbone_of(saved)
    backbone_entry = ModelEntry.model_validate(described["entry"])
    backbone = load_model(
        backbone_entry, described["weights"], device, tokenizer_dir, described["seed"]
    )
    head = ProjectionHead(**saved["head"])
    head.load_state_dict(load_file(os.path.join(local, WEIGHTS_NAME)), strict=True)
    module = HeadOnBackbone(backbone.module, head, described["normalized"])
    module = module.to(device).eval()
    headed = entry if entry.embed_dim == head.config["out_dim"] else checkpoint_entry(local)
    return LoadedModel(
        headed, module, backbone.transform, source, tokenizer_dir, backbone_entry=backbone_entry
    )


def load_model(
    entry: ModelEntry,
    weights: str = "",
    device: str = "cpu",
    tokenizer_dir: str = "",
    seed: int = 0,
) -> LoadedModel:
    """The model with its weights. A checkpoint directory is loaded strictly against the
    config it carries; a head checkpoint loads its backbone, then the head. A damaged
    weights file is a ModelError naming it."""
    with damaged_weights_named(weights or entry.pretrained):
        return _load_model(entry, weights, device, tokenizer_dir, seed)


def _load_model(
    entry: ModelEntry, weights: str, device: str, tokenizer_dir: str, seed: int
) -> LoadedModel:
    source = weights or entry.pretrained
    if source.startswith(LOCAL_DIR):
        local = _published_source(source)
    else:
        local = fetch_weights(source) if source != RANDOM_WEIGHTS else source
    if entry.signal:  # a published two-tower model: its signal_encoder/ subfolder
        local = signal_tower_folder(local) or local
    folder = local[len(LOCAL_DIR) :] if local.startswith(LOCAL_DIR) else local
    if source.startswith(HF_HUB):
        folder = _hub_head_folder(source) or folder
    if read_head_config(folder) is not None:
        backbone_entry, module = load_published_head(folder, source, device)
        transform = backend_for(backbone_entry).eval_transform(backbone_entry, module.backbone)
        return LoadedModel(
            entry, module, transform, source, tokenizer_dir, backbone_entry=backbone_entry
        )
    if os.path.isfile(os.path.join(local, CONFIG_NAME)):
        kind = json.loads(Path(local, CONFIG_NAME).read_text()).get("kind")
        if kind == HEAD_KIND:
            return _load_head(entry, local, source, device, tokenizer_dir)
        if kind == IMAGE_SIGNAL_KIND:  # the tower ``entry`` asks for
            return load_tower(entry, local, source, device, tokenizer_dir)
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
            f"{entry.name}: cannot load weights '{source}': {_load_failure(error)}. Offline, "
            "pass weights= a local directory or s3:// prefix holding a checkpoint, or 'random'"
        ) from error
    transform = backend.eval_transform(entry, module)
    module = module.to(device).eval()
    return LoadedModel(entry, module, transform, source, tokenizer_dir)


def _load_failure(error: Exception) -> str:
    """One line of why weights did not load: a state-dict mismatch is counted, not listed."""
    import re

    text = str(error)
    if "Error(s) in loading state_dict" not in text:
        return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    missing = re.findall(r'"([^"]+)"', text.partition("Missing key(s)")[2].partition("\n")[0])
    unexpected = re.findall(r'"([^"]+)"', text.partition("Unexpected key(s)")[2].partition("\n")[0])
    counts = (len(missing), "missing"), (len(unexpected), "unexpected")
    counts += ((text.count("size mismatch for"), "of another shape"),)
    parts = ", ".join(f"{count} {what}" for count, what in counts if count)
    example = (unexpected or missing or [""])[0]
    said = f"its tensors are not this architecture's ({parts or 'mismatched'} keys"
    said += f", e.g. {example})" if example else ")"
    if unexpected and all(key.startswith("layers.") for key in unexpected):
        said += "; these look like a projection head's weights: pass the head checkpoint's folder"
    return said


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
