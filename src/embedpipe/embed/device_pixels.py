"""The model's preprocessing as tensor ops on any device: JPEG decoding with
torchvision (nvjpeg on CUDA), then resize, crop and normalise as open_clip's eval
transform does (``PreprocessSpec``).

Images travel as uint8 and become float only on the device. Results match the
Pillow path closely (antialiased resizing, rounded back to uint8 as Pillow does), not
bit for bit; the CPU default stays on the exact Pillow path.
"""

from collections import defaultdict

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from embedpipe.models.backends.base import PreprocessSpec

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """RGB uint8 CHW images on ``device``, decoded in one batch; when the batch is refused
    each file is tried alone, and a file that fails is returned as its exception."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | Exception] = []
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                decoded.append(error)
        return decoded


def _interpolation(spec: PreprocessSpec) -> InterpolationMode:
    return (
        InterpolationMode.BILINEAR
        if spec.interpolation == "bilinear"
        else InterpolationMode.BICUBIC
    )


def _keep_ratio_size(height: int, width: int, target: tuple[int, int], longest: float) -> list[int]:
    # open_clip's ResizeKeepRatio: scale by the shorter (longest=0) or longer (1) side ratio.
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return [round(height / ratio), round(width / ratio)]


def _pad_to(images: torch.Tensor, size: tuple[int, int], fill: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    if not (pad_h or pad_w):
        return images
    padding = [
        pad_w // 2,
        pad_h // 2,
        (pad_w + 1) // 2,
        (pad_h + 1) // 2,
    ]  # left, top, right, bottom
    return TF.pad(images, padding, fill=fill)


def resize_and_crop(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of one size -> uint8 (N, 3, *size) as open_clip's eval
    transform resizes and crops."""
    height, width = images.shape[-2:]
    target = spec.size
    mode = _interpolation(spec)
    if spec.resize_mode == "squash":
        return TF.resize(images, list(target), interpolation=mode, antialias=True)
    if spec.resize_mode == "longest":
        size = _keep_ratio_size(height, width, target, 1.0)
        resized = TF.resize(images, size, interpolation=mode, antialias=True)
        return TF.center_crop(_pad_to(resized, target, spec.fill_color), list(target))
    if target[0] == target[1]:  # torchvision's Resize(int): the shorter side to size
        resized = TF.resize(images, [target[0]], interpolation=mode, antialias=True)
    else:  # open_clip uses ResizeKeepRatio with its default (bicubic) here
        size = _keep_ratio_size(height, width, target, 0.0)
        resized = TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, list(target))


def preprocess(
    images: list[torch.Tensor], spec: PreprocessSpec, dtype: torch.dtype
) -> torch.Tensor:
    """RGB uint8 CHW images of any sizes (all on one device) -> the model's input batch."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, image in enumerate(images):
        by_size[tuple(image.shape)].append(position)
    prepared: list[torch.Tensor | None] = [None] * len(images)
    for positions in by_size.values():  # one resize call per distinct size
        resized = resize_and_crop(torch.stack([images[p] for p in positions]), spec)
        for position, image in zip(positions, resized, strict=True):
            prepared[position] = image
    batch = torch.stack(prepared).float().div_(255)
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std).to(dtype)
