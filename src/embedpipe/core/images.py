"""Opening encoded images the one way ingest (validation, width/height) and embed (the
pixels the model sees) share.

An image's size is read from its header and checked against the caps before any
pixel is decoded: a 132-byte PNG can declare 16000x1 pixels, which open_clip's
shorter-side resize turns into gigabytes. Pixels come out as 8-bit RGB the way the
image is displayed: EXIF orientation applied, 16-bit greyscale scaled (not clipped)
to 8 bits.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedpipe.config import IngestSettings

EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


class ImageRejected(ValueError):
    """An image that cannot or must not be decoded; the message is the reason."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_aspect_ratio: float

    @classmethod
    def of(cls, settings: IngestSettings) -> ImageLimits:
        return cls(settings.max_pixels, settings.max_aspect_ratio)


# Embed refuses what a default ingest rejects, so a dataset from an older ingest is safe.
DEFAULT_LIMITS = ImageLimits.of(IngestSettings())


def error_reason(error: BaseException) -> str:
    """``Class: message`` without object reprs, so identical runs give identical reasons."""
    message = _OBJECT_REPR.sub("<data>", str(error)).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """The opened (not yet decoded) image, or ImageRejected if it is unreadable or too big."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"too many pixels: {error_reason(error)}") from None
    except Exception as error:  # Pillow raises many types for broken files
        raise ImageRejected(f"cannot decode image: {error_reason(error)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"too many pixels: {width}x{height} is over max_pixels={limits.max_pixels}"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageRejected(
            f"extreme aspect ratio: {width}x{height} is over "
            f"max_aspect_ratio={limits.max_aspect_ratio:g}"
        )
    return image


def orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is no reason to lose the picture
        return 1


def displayed_size(size: tuple[int, int], orientation_tag: int) -> tuple[int, int]:
    """Width and height as shown once EXIF orientation is applied."""
    width, height = size
    return (height, width) if orientation_tag in (5, 6, 7, 8) else (width, height)


def inspect(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """Prove an image decodes whole (JPEGs in draft mode at an eighth of their size, which
    still reads every coded block); its displayed (width, height), or ImageRejected."""
    image = open_checked(data, limits)
    with image:
        try:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return displayed_size(size, orientation(image))
        except Exception as error:
            raise ImageRejected(f"cannot decode image: {error_reason(error)}") from None


def decode_rgb(data: bytes, limits: ImageLimits, draft_size: int | None = None) -> Image.Image:
    """8-bit RGB pixels as displayed, or ImageRejected.

    ``draft_size``: JPEGs decode at a reduced scale no smaller than it (not bit-exact).
    Palette and alpha images are converted to RGB before any resize (open_clip's own
    transform resizes first, then converts).
    """
    image = open_checked(data, limits)
    with image:
        try:
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            turn = ORIENTATION_TRANSPOSE.get(orientation(image))
            rgb = _to_rgb(image)
            return rgb.transpose(turn) if turn is not None else rgb
        except Exception as error:
            raise ImageRejected(f"cannot decode image: {error_reason(error)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's convert clips 16-bit values at 255 (a white picture); scale instead.
        levels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((levels + 128) // 257).astype(np.uint8))
    return image.convert("RGB")
