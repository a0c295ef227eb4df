"""Multi-dimensional numeric cells of an Arrow column as numpy arrays, one per row.

Hugging Face ``datasets`` stores an ``Array2D``/``Array3D`` feature as an Arrow
extension type over nested lists (``list<list<list<float>>>``); Parquet keeps
the nesting, and the extension's name and shape in the field's metadata, so a
reader that has not imported ``datasets`` sees plain nested lists. Nested
``fixed_size_list`` columns and ``Sequence(Sequence(...))`` features are the
same data. This module unwraps all of them and reads a batch's cells without a
Python object per number.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EXTENSION_NAME = b"ARROW:extension:name"
EXTENSION_METADATA = b"ARROW:extension:metadata"


def storage_type(kind: pa.DataType) -> pa.DataType:
    """The plain Arrow type under an extension type (``datasets``' ArrayND), else ``kind``."""
    return kind.storage_type if isinstance(kind, pa.ExtensionType) else kind


def storage_array(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def is_list(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def is_number(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def numeric_depth(kind: pa.DataType) -> int:
    """How many list levels wrap a number type (0 for a number, -1 for anything else)."""
    kind = storage_type(kind)
    depth = 0
    while is_list(kind):
        kind, depth = kind.value_type, depth + 1
    return depth if is_number(kind) else -1


def leaf_type(kind: pa.DataType) -> pa.DataType:
    kind = storage_type(kind)
    while is_list(kind):
        kind = kind.value_type
    return kind


def declared_shape(field: pa.Field) -> tuple[int | None, ...] | None:
    """The per-row shape a column declares: a ``datasets`` ArrayND's (registered, or read
    from the field metadata without ``datasets``), or nested ``fixed_size_list`` sizes
    (None where a level's length may vary); None when it declares nothing."""
    kind = field.type
    shape = getattr(kind, "shape", None) if isinstance(kind, pa.ExtensionType) else None
    metadata = field.metadata or {}
    if shape is None and metadata.get(EXTENSION_NAME, b"").startswith(b"datasets.features"):
        try:
            shape = json.loads(metadata[EXTENSION_METADATA])[0]
        except (KeyError, ValueError, IndexError, TypeError):
            shape = None
    if shape is not None:
        return tuple(None if size is None else int(size) for size in shape)
    sizes: list[int | None] = []
    kind = storage_type(kind)
    while is_list(kind):
        sizes.append(kind.list_size if pa.types.is_fixed_size_list(kind) else None)
        kind = kind.value_type
    return tuple(sizes) if any(size is not None for size in sizes) else None


def _offsets_and_child(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Offsets into the (unsliced) child for each entry of a list array, and that child."""
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        offsets = (array.offset + np.arange(len(array) + 1, dtype=np.int64)) * size
        return offsets, array.values
    return array.offsets.to_numpy().astype(np.int64), array.values


class NestedCells:
    """Per-row numpy arrays of a column of ``depth`` nested numeric lists: ``cell(row)`` is
    the row's array (float32, or uint8 when the column holds uint8), its shape regular,
    a string saying why not (ragged lists), or None for a null cell."""

    def __init__(self, array: pa.Array | pa.ChunkedArray, depth: int) -> None:
        array = storage_array(array)
        self.depth = depth
        self.null = array.is_null().to_numpy(zero_copy_only=False)
        self.levels: list[np.ndarray] = []
        current = array
        for _ in range(depth):
            offsets, current = _offsets_and_child(current)
            self.levels.append(offsets)
        if current.type in (pa.uint8(), pa.float32()) and current.null_count == 0:
            self.leaf = current.to_numpy()  # no copy
        else:
            filled = pc.fill_null(current.cast(pa.float64()), np.nan)  # a null number: NaN
            with np.errstate(over="ignore"):  # past float32's range: inf, then rejected
                self.leaf = filled.to_numpy().astype(np.float32)

    def cell(self, row: int) -> np.ndarray | str | None:
        if self.null[row]:
            return None
        start, end = row, row + 1
        shape = []
        for offsets in self.levels:
            lengths = np.diff(offsets[start : end + 1])
            if lengths.size and (lengths != lengths[0]).any():
                return (
                    f"is ragged: its dimension {len(shape) + 1} varies in length from "
                    f"{lengths.min()} to {lengths.max()}"
                )
            shape.append(int(lengths[0]) if lengths.size else 0)
            start, end = int(offsets[start]), int(offsets[end])
        return self.leaf[start:end].reshape(shape)
