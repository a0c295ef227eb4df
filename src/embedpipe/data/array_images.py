"""Images stored as pixel arrays (``datasets`` ``Array3D``/``Array2D``, nested lists in
Parquet), as AstroCLIP's and FMB's data ship them, turned into 8-bit PNG bytes.

Layout: a 2-D cell is one band (grey); a 3-D cell whose last dimension is 1 or 3
is channels-last (HWC), else one whose first dimension is 1 or 3 is
channels-first (CHW). One band becomes a grey PNG, three an RGB PNG with the
bands in stored order as R, G, B. Other band counts are refused by name: keep
three bands first (``datasets``' ``map``) or store encoded images.

Values: a ``uint8`` array is taken as it is. Any other number type is scaled per
image, all bands together (so colours keep their ratios), as astronomy cutout
viewers do: the 1st and 99th percentiles of the image's values map to 0 and
255, values outside clip, and the result rounds to the nearest integer; when
those percentiles are equal, the minimum and maximum are used instead, and a
constant image is black. An image with a NaN or infinite value is rejected with
the reason, like a corrupt file.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from embedpipe.data.nested_arrays import NestedCells, declared_shape, numeric_depth

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0
BANDS = (1, 3)
# After PNG's row filters, LZ matching gains under 1% on noisy cutouts and photos here,
# while Huffman-only coding is 1.6-2.5x faster than Pillow's default.
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}


class ArrayLayoutError(ValueError):
    """A shape that is no 1- or 3-band picture; the message says which and how to fix it."""


def is_array_image(kind: pa.DataType) -> bool:
    return numeric_depth(kind) in (2, 3)


def channel_axis(shape: tuple[int | None, ...]) -> int | None:
    """The axis holding the bands (None for a 2-D, one-band array), or ArrayLayoutError."""
    if len(shape) == 2:
        return None
    if len(shape) == 3:
        if shape[2] in BANDS:
            return 2
        if shape[0] in BANDS:
            return 0
    shown = "x".join("?" if size is None else str(size) for size in shape)
    raise ArrayLayoutError(
        f"holds arrays of shape {shown}; a picture is 2-D (one band) or 3-D with 1 or 3 bands "
        "first or last (HWC or CHW); keep three bands first (datasets' map) or store "
        "encoded images"
    )


@dataclass(frozen=True)
class ArrayImageColumn:
    name: str
    depth: int  # 2 (HW) or 3 (HWC or CHW)
    shape: tuple[int | None, ...] | None  # declared per-row shape, if any

    @classmethod
    def of(cls, field: pa.Field, where: str) -> ArrayImageColumn:
        """The column's plan; a fully declared shape that is no picture is refused here
        (a shape known only per row is checked per row)."""
        depth = numeric_depth(field.type)
        shape = declared_shape(field)
        if shape is not None and None not in shape:
            try:
                channel_axis(shape)
            except ArrayLayoutError as error:
                raise ArrayLayoutError(f"{where}: image column {field.name!r} {error}") from None
        return cls(field.name, depth, shape)

    def encode(self, column: pa.Array | pa.ChunkedArray) -> list[bytes | str | None]:
        """Per row: PNG bytes, the reason the row is rejected, or None for a null cell."""
        cells = NestedCells(column, self.depth)
        return [_png_or_reason(cells.cell(row)) for row in range(len(cells.null))]


def _png_or_reason(cell: np.ndarray | str | None) -> bytes | str | None:
    if cell is None or isinstance(cell, str):
        return None if cell is None else f"the image array {cell}"
    try:
        axis = channel_axis(cell.shape)
    except ArrayLayoutError as error:
        return f"the image array {error}"
    if axis == 0:
        cell = np.moveaxis(cell, 0, 2)
    if axis is not None and cell.shape[2] == 1:
        cell = cell[:, :, 0]
    if cell.size == 0:
        return f"the image array has no pixels (shape {cell.shape})"
    pixels = to_uint8(cell)
    if isinstance(pixels, str):
        return pixels
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), "L" if pixels.ndim == 2 else "RGB")
    image.save(buffer, "PNG", **PNG_OPTIONS)
    return buffer.getvalue()


def to_uint8(values: np.ndarray) -> np.ndarray | str:
    """8-bit pixels of an image's values by the rule above, or the reason it is rejected."""
    if values.dtype == np.uint8:
        return values
    finite = np.isfinite(values)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        return (
            f"the image array has {int((~finite).sum())} non-finite value(s) "
            f"(first at {first}: {values[first]})"
        )
    values = values.astype(np.float64)
    low, high = np.percentile(values, (LOW_PERCENTILE, HIGH_PERCENTILE))
    if high <= low:
        low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)
