"""Pixel preparation: what a loader worker makes of one encoded image, and how a batch
of those becomes the model's input on its device.

Two ways (``[embed].preprocess``):

- ``pil``: Pillow decodes and the model's own transform resizes in the workers: exact
  to open_clip, the default on CPU;
- ``device``: workers pass JPEG bytes (other formats, and JPEGs Pillow must rotate or
  convert, decoded to uint8 by Pillow); the main process decodes the JPEGs in batches
  on the model's device (nvjpeg on CUDA) and resizes, crops and normalises there
  (``device_pixels``): the default on GPU. The same code runs on CPU tensors.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from embedpipe.core.images import (
    DEFAULT_LIMITS,
    ImageLimits,
    ImageRejected,
    decode_rgb,
    error_reason,
    open_checked,
    orientation,
)
from embedpipe.embed import device_pixels
from embedpipe.models.backends.base import PreprocessSpec
from embedpipe.models.loading import LoadedModel

# What a worker hands over for one image: ready model input (float, the Pillow path),
# JPEG bytes for the device, Pillow-decoded uint8 pixels (HWC), or why it failed.
READY, JPEG, PIXELS, ERROR = "ready", "jpeg", "pixels", "error"


def decode(
    data: bytes, draft_size: int | None, limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """RGB pixels as displayed; ImageRejected (a ValueError) for an image over the caps
    (one that an older ingest let through) instead of gigabytes of resize."""
    return decode_rgb(data, limits, draft_size)


def decode_error(error: Exception) -> str:
    """The rejection reason: the caps' own, or Pillow's without object addresses."""
    if isinstance(error, ImageRejected):
        return str(error)
    return f"cannot decode image: {error_reason(error)}"


class PilPixels:
    """Pillow decoding and the model's own transform: exact to open_clip."""

    def __init__(self, transform, draft_size: int | None):
        self.transform = transform
        self.draft_size = draft_size

    def __call__(self, data: bytes) -> tuple[str, torch.Tensor]:
        return READY, self.transform(decode(data, self.draft_size))


class DevicePixels:
    """JPEGs go to the device as bytes; other formats, and JPEGs that need Pillow's
    conversions (CMYK, EXIF rotation), are decoded here to uint8."""

    def __call__(self, data: bytes) -> tuple[str, torch.Tensor]:
        if data.startswith(device_pixels.JPEG_MAGIC) and _plain_jpeg(data):
            return JPEG, torch.from_numpy(np.frombuffer(data, np.uint8).copy())
        return PIXELS, torch.from_numpy(np.array(decode(data, None)))


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG the device may decode as it is: RGB or grey, upright, within the size caps
    (checked from the header, as decode() does)."""
    try:
        with open_checked(data, DEFAULT_LIMITS) as image:
            return image.mode in ("RGB", "L") and orientation(image) == 1
    except ImageRejected:  # decode() rejects it, with the reason
        return False


def preparer(
    model: LoadedModel, preprocess: str, draft_decode: bool
) -> Callable[[bytes], tuple[str, object]]:
    """What the workers run on each encoded image for ``preprocess`` (pil or device)."""
    if preprocess == "device":
        return DevicePixels()
    return PilPixels(model.transform, model.entry.image_size if draft_decode else None)


def collate_items(items: list[tuple]) -> dict:
    """Items (shard, row, source, kind, payload) -> one batch, payloads grouped by kind."""
    ready = [payload for *_, kind, payload in items if kind == READY]
    return {
        "shards": torch.tensor([item[0] for item in items]),
        "rows": torch.tensor([item[1] for item in items]),
        "sources": [item[2] for item in items],
        "kinds": [item[3] for item in items],
        "ready": torch.stack(ready) if ready else None,
        "encoded": [payload for *_, kind, payload in items if kind in (JPEG, PIXELS)],
        "errors": [payload for *_, kind, payload in items if kind == ERROR],
    }


@dataclass
class DeviceBatch:
    """One batch on the device: ``pixels`` for the items at ``ok``, the others failed."""

    shards: torch.Tensor
    rows: torch.Tensor
    pixels: torch.Tensor | None
    ok: list[int]
    failed: list[tuple[int, str, str]]  # position, source, reason


def to_device(
    batch: dict, spec: PreprocessSpec, device: torch.device, dtype: torch.dtype
) -> DeviceBatch:
    """A collated batch as model input in ``dtype`` on ``device``."""
    sources, kinds = batch["sources"], batch["kinds"]
    errors = iter(batch["errors"])
    failed = [(i, sources[i], next(errors)) for i, kind in enumerate(kinds) if kind == ERROR]
    if batch["ready"] is not None:  # the Pillow path: model input made in the workers
        ok = [i for i, kind in enumerate(kinds) if kind == READY]
        pixels = batch["ready"].to(device, non_blocking=True).to(dtype)
        return DeviceBatch(batch["shards"], batch["rows"], pixels, ok, failed)
    positions = [i for i, kind in enumerate(kinds) if kind in (JPEG, PIXELS)]
    encoded = dict(zip(positions, batch["encoded"], strict=True))
    jpeg_at = [i for i in positions if kinds[i] == JPEG]
    jpegs = device_pixels.decode_jpegs([encoded[i] for i in jpeg_at], device)
    decoded = dict(zip(jpeg_at, jpegs, strict=True))
    ok, images = [], []
    for i in positions:
        if kinds[i] == PIXELS:
            image = encoded[i].to(device, non_blocking=True).permute(2, 0, 1)
        elif isinstance(decoded[i], Exception):  # the device's decoder refused it: ask Pillow
            try:
                image = torch.from_numpy(np.array(decode(encoded[i].numpy().tobytes(), None)))
            except Exception as error:  # reported, never fatal
                failed.append((i, sources[i], decode_error(error)))
                continue
            image = image.to(device).permute(2, 0, 1)
        else:
            image = decoded[i]
        ok.append(i)
        images.append(image)
    pixels = device_pixels.preprocess(images, spec, dtype) if images else None
    return DeviceBatch(batch["shards"], batch["rows"], pixels, ok, failed)
