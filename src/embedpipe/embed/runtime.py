"""Where and how a model embeds: the device, its precision (``models.precision``), the
batch size and the number of decoding workers, and ``Inference``, a loaded model made
ready to embed. Shared by embed, embed-text and evaluate."""

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from embedpipe.config import EmbedSettings
from embedpipe.models.loading import LoadedModel
from embedpipe.models.precision import INFERENCE, precision_for
from embedpipe.models.registry import ModelEntry

CPU_BATCH = 64
GPU_BATCH = 256


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_preprocess(preprocess: str, device: torch.device) -> str:
    if preprocess == "auto":
        return "device" if device.type == "cuda" else "pil"
    return preprocess


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_batch_size(config: EmbedSettings, entry: ModelEntry, device: torch.device) -> int:
    if config.batch_size:
        return config.batch_size
    if device.type != "cuda":
        return CPU_BATCH
    if entry.max_batch_b200 and "B200" in torch.cuda.get_device_name(device):
        return entry.max_batch_b200
    return min(GPU_BATCH, entry.max_batch_b200 or GPU_BATCH)


def default_workers(device: torch.device, preprocess: str) -> int:
    """Decoding processes: on CPU they share the cores with the model; on GPU, workers
    that only read bytes for nvjpeg need fewer than workers that run Pillow."""
    cores = available_cores()
    if device.type != "cuda":
        return max(1, cores // 4)
    if preprocess == "device":
        return max(1, min(8, cores // 2))
    return max(1, min(16, cores - 1))


def resolve_workers(config: EmbedSettings, device: torch.device, preprocess: str) -> int:
    if config.num_workers is not None:
        return config.num_workers
    return default_workers(device, preprocess)


@dataclass(frozen=True)
class LoaderOptions:
    """How the loader reads: ``preprocess`` (resolved: pil or device), decoding worker
    processes (0: inline), JPEG draft decoding, and L2-normalised vectors."""

    preprocess: str = "pil"
    workers: int = 0
    draft_decode: bool = False
    normalize: bool = True


def loader_options(config: EmbedSettings, device: torch.device) -> LoaderOptions:
    """The loader's options of an embed run on ``device``."""
    preprocess = resolve_preprocess(config.preprocess, device)
    workers = resolve_workers(config, device, preprocess)
    return LoaderOptions(preprocess, workers, config.draft_decode, config.normalize)


@dataclass
class Inference:
    """A loaded model made ready to embed on a device: weights cast, maybe compiled."""

    model: LoadedModel
    device: torch.device
    autocast: torch.dtype | None
    input_dtype: torch.dtype
    batch_size: int
    compiled: bool = False
    _encode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.autocast, enabled=self.autocast is not None
            ),
        ):
            yield

    def encode_images(self, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
        count = len(pixels)
        if self.compiled and count < self.batch_size:  # one shape: no recompiling
            pixels = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, self.batch_size - count))
        features = (self._encode or self.model.encode_images)(pixels)[:count].float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_texts(self, texts: list[str], normalize: bool) -> torch.Tensor:
        features = self.model.encode_texts(texts).float()
        return F.normalize(features, dim=-1) if normalize else features


def ready_for_inference(
    model: LoadedModel,
    device: torch.device,
    precision: str,
    batch_size: int,
    compile: bool = False,
) -> Inference:
    """``model`` (on ``device``) in the inference meaning of ``precision``: its weights
    cast, its inputs in the weights' dtype, autocast where the name says so."""
    chosen = precision_for(precision, device, INFERENCE)
    chosen.cast(model.module)
    inference = Inference(model, device, chosen.autocast, chosen.weights, batch_size)
    if compile:
        inference.compiled = True
        inference._encode = torch.compile(model.encode_images)
    return inference


def prepare_inference(model: LoadedModel, config: EmbedSettings, device: torch.device) -> Inference:
    batch_size = resolve_batch_size(config, model.entry, device)
    return ready_for_inference(model, device, config.precision, batch_size, config.compile)
