"""Signals: numeric measurements stored beside each image, in the images dataset itself.

A *signal* is a float array per image (a spectrum, a light curve, a sensor
trace), stored as a ``list<float32>`` column; a *scalar target* is one number
per image (redshift, stellar mass), stored as a ``float64`` column. They come
from a side table joined per image (``[ingest].signals``, Parquet or CSV,
matched on ``image_id`` or on the image's source path), or from the columns of a
Hugging Face dataset source (``data.hf_sources``).

A signal column has a fixed length when its table declares it
(``fixed_size_list`` in Parquet or Arrow, ``Sequence(length=N)`` or
``Array2D((N, 1))`` in Hugging Face ``datasets``) or when
``[ingest].signal_length`` is set (then every signal column must have that
length). An image whose signal is missing (no row in the
table, or a null cell), empty, holds a non-finite value, or has the wrong
length for a fixed-length column is rejected with the reason, like a corrupt
image; a scalar target may be null (an unknown target) but not NaN or infinite.

A 2-D signal column (a ``datasets`` ``Array2D`` such as AstroCLIP's spectra of
shape (7781, 1), or nested lists) is flattened when one of its two dimensions
is 1; a declared shape with neither dimension 1 is refused by name, and a row
whose own shape has neither is rejected with the reason.

A CSV cell cannot hold a list: there a signal is written as a JSON array of
numbers (``"[0.5, 1.25, 3]"``); a column whose cells are all JSON arrays is a
signal column, numeric columns are scalar targets.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embedpipe.core import storage
from embedpipe.core.schemas import IMAGES_OPTIONAL_FIELDS, IMAGES_SCHEMA
from embedpipe.data.nested_arrays import (
    NestedCells,
    declared_shape,
    is_list,
    numeric_depth,
    storage_array,
    storage_type,
)

SIGNAL_TYPE = pa.list_(pa.float32())
SCALAR_TYPE = pa.float64()
RESERVED_COLUMNS = frozenset(IMAGES_SCHEMA.names) | {f.name for f in IMAGES_OPTIONAL_FIELDS}
KEY_CHOICES = ("image_id", "source")


class SignalError(ValueError):
    """A signals table or a signal column cannot be used; the message names file and column."""


@dataclass(frozen=True)
class SignalColumn:
    name: str
    scalar: bool  # one number per image (a target), else a float array (a signal)
    length: int | None = None  # a fixed-length signal's number of values

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, SCALAR_TYPE if self.scalar else SIGNAL_TYPE)

    def describe(self) -> dict[str, Any]:
        if self.scalar:
            return {"kind": "scalar"}
        return {"kind": "signal", "length": self.length}


def column_of(
    name: str,
    kind: pa.DataType,
    where: str,
    signal_length: int,
    shape: tuple[int | None, ...] | None = None,
) -> SignalColumn:
    """The signal or scalar column that an Arrow column of ``kind`` (declaring ``shape`` per
    row, if it does) becomes, or a SignalError."""
    if name in RESERVED_COLUMNS:
        raise SignalError(
            f"{where}: column {name!r} has the name of an images dataset column; "
            "rename it to take it as a signal"
        )
    kind = storage_type(kind)
    depth = numeric_depth(kind)
    if depth == 0:
        return SignalColumn(name, scalar=True)
    if depth in (1, 2):
        declared = _declared_length(name, where, shape if depth == 2 else None, kind)
        if declared is not None and signal_length and declared != signal_length:
            raise SignalError(
                f"{where}: column {name!r} declares {declared} values per row, "
                f"but signal_length is {signal_length}"
            )
        return SignalColumn(name, scalar=False, length=declared or signal_length or None)
    nested = " (nested lists)" if is_list(kind) and is_list(kind.value_type) else ""
    raise SignalError(
        f"{where}: column {name!r} is {kind}{nested}; a signal column holds numbers (a scalar "
        "target), flat lists of numbers (a signal) or 2-D arrays with a dimension of 1; "
        "name the wanted columns in signal_columns"
    )


def _declared_length(
    name: str, where: str, shape: tuple[int | None, ...] | None, kind: pa.DataType
) -> int | None:
    """The values per row a 1-D list or a 2-D array column declares, if it does."""
    if shape is None:
        return kind.list_size if pa.types.is_fixed_size_list(kind) else None
    rows, columns = shape
    if rows is not None and columns is not None and 1 not in shape:
        raise SignalError(
            f"{where}: column {name!r} holds 2-D arrays of shape {rows}x{columns}; a signal is "
            "1-D: a 2-D signal column must have a dimension of 1, as Array2D((N, 1)) has"
        )
    if columns == 1:
        return rows
    if rows == 1:
        return columns
    return None


def columns_of(
    schema: pa.Schema,
    where: str,
    skip: Iterable[str],
    selected: Sequence[str] | None,
    signal_length: int,
) -> list[SignalColumn]:
    """The signal and scalar columns of ``schema``: those in ``selected`` it has, or, when
    ``selected`` is None, every column but ``skip`` and the images dataset's own names
    (``source``, ``label``, ...: metadata the images dataset already has)."""
    skipped = set(skip) | RESERVED_COLUMNS
    names = [
        n for n in schema.names if (n in selected if selected is not None else n not in skipped)
    ]
    return [
        column_of(name, schema.field(name).type, where, signal_length, _shape(schema.field(name)))
        for name in names
    ]


def _shape(field: pa.Field) -> tuple[int | None, ...] | None:
    """A 2-D array column's declared per-row shape, None for other columns."""
    shape = declared_shape(field) if numeric_depth(field.type) == 2 else None
    return shape if shape is not None and len(shape) == 2 else None


class ColumnValues:
    """Per-row values of one Arrow column as numpy: float32 arrays for a signal (a view into
    the column, no copy per row; a 2-D cell flattened, or the reason it makes no 1-D
    signal), floats for a scalar, None for a null."""

    def __init__(self, array: pa.Array | pa.ChunkedArray, scalar: bool) -> None:
        array = storage_array(array)
        self.null = array.is_null().to_numpy(zero_copy_only=False)
        self.scalar = scalar
        self.cells = NestedCells(array, 2) if numeric_depth(array.type) == 2 else None
        if self.cells is not None:
            return
        if scalar:
            self.numbers = pc.fill_null(array.cast(pa.float64()), np.nan).to_numpy()
            return
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
            start = array.offset * size
            self.offsets = start + np.arange(len(array) + 1, dtype=np.int64) * size
        else:
            self.offsets = array.offsets.to_numpy().astype(np.int64)
        child = array.values
        if child.type == pa.float32() and child.null_count == 0:
            self.numbers = child.to_numpy()  # no copy
            return
        child = pc.fill_null(child.cast(pa.float64()), np.nan)  # a null inside a list: NaN
        with np.errstate(over="ignore"):  # past float32's range: inf, then rejected
            self.numbers = child.to_numpy().astype(np.float32)

    def value(self, row: int) -> np.ndarray | float | str | None:
        if self.null[row]:
            return None
        if self.scalar:
            return float(self.numbers[row])
        if self.cells is not None:
            return _flat(self.cells.cell(row))
        return self.numbers[self.offsets[row] : self.offsets[row + 1]]


def _flat(cell: np.ndarray | str) -> np.ndarray | str:
    """A 2-D cell with a dimension of 1 as float32 values, or why it is no signal."""
    if isinstance(cell, str):
        return cell
    if 1 not in cell.shape:
        return f"has shape {cell.shape[0]}x{cell.shape[1]}; a signal is 1-D"
    return cell.reshape(-1).astype(np.float32, copy=False)


def problem(values: Mapping[str, Any], columns: Sequence[SignalColumn]) -> str | None:
    """Why an image's signal values are rejected, or None when they are whole."""
    for column in columns:
        value = values.get(column.name)
        if isinstance(value, str):  # a 2-D cell that makes no 1-D signal
            return f"signal {column.name!r} {value}"
        if column.scalar:
            if value is not None and not np.isfinite(value):
                return f"scalar {column.name!r} is not finite ({value})"
            continue
        if value is None:
            return f"signal {column.name!r} is missing"
        if len(value) == 0:
            return f"signal {column.name!r} is empty"
        if column.length is not None and len(value) != column.length:
            return f"signal {column.name!r} has {len(value)} values, expected {column.length}"
        finite = np.isfinite(value)
        if not finite.all():
            first = int(np.argmin(finite))
            return (
                f"signal {column.name!r} has {int((~finite).sum())} non-finite value(s) "
                f"(first at index {first}: {value[first]})"
            )
    return None


def arrays_of(rows: Sequence[Mapping[str, Any]], columns: Sequence[SignalColumn]) -> list[pa.Array]:
    """The Arrow columns of buffered rows' values (``list<float32>``, ``float64``)."""
    arrays = []
    for column in columns:
        values = [row.get(column.name) for row in rows]
        if column.scalar:
            arrays.append(pa.array(values, SCALAR_TYPE))
            continue
        lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        present = [v for v in values if v is not None]
        flat = np.concatenate(present).astype(np.float32) if present else np.zeros(0, np.float32)
        mask = pa.array([v is None for v in values])
        arrays.append(pa.ListArray.from_arrays(offsets, pa.array(flat), SIGNAL_TYPE, mask=mask))
    return arrays


def merge_columns(groups: Iterable[tuple[str, Sequence[SignalColumn]]]) -> list[SignalColumn]:
    """One column per name over several sources; the same name must mean the same kind."""
    merged: dict[str, tuple[str, SignalColumn]] = {}
    for where, columns in groups:
        for column in columns:
            if column.name not in merged:
                merged[column.name] = (where, column)
                continue
            first_where, first = merged[column.name]
            if first.scalar != column.scalar:
                raise SignalError(
                    f"{where}: column {column.name!r} is a "
                    f"{'scalar' if column.scalar else 'signal'} here but a "
                    f"{'scalar' if first.scalar else 'signal'} in {first_where}"
                )
            if first.length != column.length:
                merged[column.name] = (first_where, SignalColumn(column.name, False, None))
    return [column for _, column in merged.values()]


def read_table(uri: str, key: str) -> pa.Table:
    """A signals table as Arrow: Parquet (``.parquet``/``.pq``) or CSV (``.csv``), the key
    column as text."""
    fs, path = storage.arrow_filesystem(uri)
    lowered = uri.lower()
    try:
        if lowered.endswith((".parquet", ".pq")):
            return pq.read_table(path, filesystem=fs)
        if lowered.endswith(".csv"):
            data = storage.read_bytes(uri)
            options = pacsv.ConvertOptions(column_types={key: pa.string()})
            table = pacsv.read_csv(io.BytesIO(data), convert_options=options)
            return _decode_json_lists(uri, table)
    except (pa.ArrowInvalid, OSError) as error:
        raise SignalError(f"{uri}: not a readable signals table: {error}") from error
    raise SignalError(f"{uri}: a signals table must be a .parquet or .csv file")


def _decode_json_lists(uri: str, table: pa.Table) -> pa.Table:
    """CSV text columns whose cells are all JSON arrays become list<float64> columns."""
    for index, name in enumerate(table.schema.names):
        if not pa.types.is_string(table.schema.field(name).type):
            continue
        cells = table.column(name).to_pylist()
        if not any(isinstance(c, str) and c.lstrip().startswith("[") for c in cells):
            continue
        decoded = []
        for row, cell in enumerate(cells):
            line = row + 2  # the header is line 1
            if cell is None or not cell.strip():
                decoded.append(None)
                continue
            try:
                value = json.loads(cell)
            except json.JSONDecodeError as error:
                raise SignalError(
                    f"{uri}, line {line}: column {name!r} is not a JSON array of numbers: {error}"
                ) from error
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise SignalError(
                    f"{uri}, line {line}: column {name!r} must hold a flat JSON array of "
                    f"numbers, found {cell[:60]!r}"
                )
            decoded.append([float(v) for v in value])
        table = table.set_column(index, name, pa.array(decoded, pa.list_(pa.float64())))
    return table


class SignalTable:
    """A side table of signals, indexed by its key column (``image_id`` or ``source``)."""

    def __init__(self, uri: str, key: str, selected: Sequence[str], signal_length: int) -> None:
        self.uri = storage.normalize(uri)
        self.key = key
        table = read_table(self.uri, key)
        if key not in table.schema.names:
            raise SignalError(
                f"{self.uri}: no key column {key!r} (signal_key = {key}); the table has "
                f"{', '.join(table.schema.names)}"
            )
        key_type = table.schema.field(key).type
        if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
            raise SignalError(f"{self.uri}: key column {key!r} is {key_type}, expected text")
        chosen = [name for name in selected if name != key] if selected else None
        self.columns = columns_of(table.schema, self.uri, {key}, chosen, signal_length)
        self.row_of = self._index(table.column(key).to_pylist())
        self.values = {
            column.name: ColumnValues(table.column(column.name), column.scalar)
            for column in self.columns
        }
        self.matched: set[int] = set()

    def _index(self, keys: list[str | None]) -> dict[str, int]:
        row_of: dict[str, int] = {}
        for row, value in enumerate(keys):
            if value is None:
                raise SignalError(f"{self.uri}: column {self.key!r} is empty in row {row}")
            if value in row_of:
                raise SignalError(
                    f"{self.uri}: key {value!r} appears twice in column {self.key!r} "
                    f"(rows {row_of[value]} and {row})"
                )
            row_of[value] = row
        return row_of

    def lookup(self, image_id: str, source: str, relative_path: str) -> dict[str, Any] | str:
        """The row's values for this image, or the reason it is rejected (no row)."""
        if self.key == "image_id":
            row = self.row_of.get(image_id)
            shown = image_id
        else:
            shown = relative_path or source
            candidates = (relative_path, posixpath.normpath(relative_path), source)
            row = next((self.row_of[c] for c in candidates if c and c in self.row_of), None)
        if row is None:
            return f"no row in signals table {self.uri} with {self.key} = {shown!r}"
        self.matched.add(row)
        return {name: values.value(row) for name, values in self.values.items()}

    @property
    def rows(self) -> int:
        return len(self.row_of)


class SignalJoin:
    """What ingest attaches to each image: values from the side table and from the source's
    own columns (a Hugging Face dataset's), checked against the dataset's signal columns."""

    def __init__(self, table: SignalTable | None, columns: list[SignalColumn]) -> None:
        self.table = table
        self.columns = columns
        self.fields = [column.field for column in columns]

    @classmethod
    def plan(
        cls,
        uri: str,
        key: str,
        selected: Sequence[str],
        signal_length: int,
        source_columns: Sequence[tuple[str, Sequence[SignalColumn]]],
    ) -> SignalJoin | None:
        """None when no signals table is given and no source has signal columns."""
        table = SignalTable(uri, key, selected, signal_length) if uri else None
        groups = [*([(table.uri, table.columns)] if table else []), *source_columns]
        in_table = {column.name for column in table.columns} if table else set()
        for where, columns in source_columns:
            both = sorted(in_table & {column.name for column in columns})
            if both:
                raise SignalError(
                    f"{where}: column {both[0]!r} is also in the signals table {table.uri}; "
                    "an image takes each column from one place"
                )
        columns = merge_columns(groups)
        found = {column.name for column in columns}
        absent = [name for name in selected if name not in found]
        if absent:
            places = ", ".join(where for where, _ in groups) or "the sources"
            raise SignalError(f"signal_columns: {absent[0]!r} is not a column of {places}")
        if not columns and table is None:
            return None
        if not columns:
            raise SignalError(f"{table.uri}: no columns besides the key column {key!r}")
        return cls(table, columns)

    def values_for(
        self, own: Mapping[str, Any], image_id: str, source: str, relative_path: str
    ) -> dict[str, Any] | str:
        """An image's checked values, or the reason it is rejected."""
        values = dict(own)
        if self.table is not None:
            found = self.table.lookup(image_id, source, relative_path)
            if isinstance(found, str):
                return found
            values.update(found)
        return problem(values, self.columns) or values

    def check_matched(self) -> None:
        """A table whose keys match no image at all is a wrong table or a wrong key."""
        if self.table is not None and self.table.rows and not self.table.matched:
            example = next(iter(self.table.row_of))
            raise SignalError(
                f"{self.table.uri}: no row matches an ingested image on key column "
                f"{self.table.key!r} (first key {example!r}); check signal_key "
                f"({' or '.join(KEY_CHOICES)}) and the paths or ids in the table"
            )

    def report(self) -> dict[str, Any]:
        described = {column.name: column.describe() for column in self.columns}
        if self.table is None:
            return {"columns": described}
        return {
            "columns": described,
            "table": self.table.uri,
            "key": self.table.key,
            "table_rows": self.table.rows,
            "table_rows_matched": len(self.table.matched),
        }
