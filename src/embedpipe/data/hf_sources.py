"""Hugging Face ``datasets`` folders as ingest sources: rows of an image plus signal columns.

Two layouts are recognised, as AstroCLIP's and FMB's data ship:

- ``save_to_disk``: a folder with ``state.json`` and ``dataset_info.json`` (one
  dataset), or ``dataset_dict.json`` and a folder per split; read with
  ``datasets.load_from_disk`` (memory-mapped Arrow, read a batch at a time);
- Parquet shards: a folder whose only files are ``*.parquet`` (and README /
  JSON metadata), or whose ``data/`` folder holds them (the Hub layout,
  ``data/train-00000-of-00002.parquet``); streamed with ``pyarrow.dataset``,
  so it may be an ``s3://`` prefix.

The image column is ``image`` if there is one, else the first column of the
``Image`` feature (``{bytes, path}``), else the first 3-D array column; it holds
encoded bytes, or a path read when the bytes are absent, or pixel arrays
(``Array3D``/``Array2D``, nested lists of numbers) that ``data.array_images``
turns into PNG bytes. String columns ``category`` and ``concept`` place the
rows when present; otherwise category is the folder's name and each row its own
concept. A split named like one of ``split_dirnames`` (from the dataset dict,
or a shard's name prefix) fills the ``split`` column. Every other column is a
signal or scalar target (``data.signals``), or only those in ``signal_columns``.
A row's source is ``<folder>::<split or shard>/<row number>``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from embedpipe.core import storage
from embedpipe.data.array_images import ArrayImageColumn, ArrayLayoutError, is_array_image
from embedpipe.data.nested_arrays import numeric_depth
from embedpipe.data.signals import ColumnValues, SignalColumn, columns_of
from embedpipe.data.sources import LayoutError, Member, Placement

HF_KIND = "huggingface"
STATE_JSON = "state.json"
INFO_JSON = "dataset_info.json"
DICT_JSON = "dataset_dict.json"
PLACE_COLUMNS = ("category", "concept")
BATCH_ROWS = 64
METADATA_FILES = re.compile(r"(?i)^(readme(\.md)?|.*\.json|\.gitattributes|license.*)$")
SHARD_SPLIT = re.compile(r"^([A-Za-z]+)[-_.]")


@dataclass(frozen=True)
class HfPart:
    name: str  # split name, or the shard group's name
    split: str | None  # the split column's value
    uri: str  # save_to_disk: the dataset folder; parquet: unused
    files: tuple[str, ...] = ()  # parquet shard URIs


@dataclass(frozen=True)
class HfDataset:
    root: str
    form: str  # "save_to_disk" | "parquet"
    parts: tuple[HfPart, ...]
    image_column: str
    signal_columns: tuple[SignalColumn, ...]
    max_image_bytes: int
    image_array: ArrayImageColumn | None = None  # when the images are stored as pixel arrays

    def schema(self, part: HfPart) -> pa.Schema:
        if self.form == "parquet":
            return _parquet_dataset(part.files).schema
        return _load(part.uri).data.schema


def _entries(root: str) -> tuple[set[str], set[str]]:
    """(file names, folder names) directly in ``root``."""
    fs, path = storage.arrow_filesystem(root)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    files, folders = set(), set()
    for info in fs.get_file_info(selector):
        (folders if info.type == pafs.FileType.Directory else files).add(info.base_name)
    return files, folders


def _parquet_dataset(files: Sequence[str]) -> pads.Dataset:
    fs, _ = storage.arrow_filesystem(files[0])
    return pads.dataset([storage.arrow_filesystem(f)[1] for f in files], filesystem=fs)


def _load(uri: str):
    import datasets  # heavy; only for save_to_disk sources

    if storage.is_s3(uri):
        raise LayoutError(f"{uri}: a save_to_disk folder is read from a local path only")
    return datasets.load_from_disk(uri)


def _split(name: str, split_dirnames: Sequence[str]) -> str | None:
    return name if name in split_dirnames else None


def find_parts(root: str, split_dirnames: Sequence[str]) -> tuple[str, list[HfPart]] | None:
    """The layout and parts of a Hugging Face dataset folder, None for another source."""
    if storage.file_type(root) != pafs.FileType.Directory:
        return None
    files, folders = _entries(root)
    if STATE_JSON in files and INFO_JSON in files:
        return "save_to_disk", [HfPart("rows", None, root)]
    if DICT_JSON in files:
        splits = storage.read_json(storage.join(root, DICT_JSON)).get("splits", [])
        parts = [HfPart(s, _split(s, split_dirnames), storage.join(root, s)) for s in splits]
        if not parts:
            raise LayoutError(f"{storage.join(root, DICT_JSON)}: lists no splits")
        return "save_to_disk", parts
    folder = root
    visible = {name for name in folders if not name.startswith(".")}
    if visible == {"data"} and not any(name.endswith(".parquet") for name in files):
        folder = storage.join(root, "data")
        files, folders = _entries(folder)
        visible = {name for name in folders if not name.startswith(".")}
    shards = sorted(name for name in files if name.endswith(".parquet"))
    others = [n for n in files if not n.endswith(".parquet") and not METADATA_FILES.match(n)]
    if not shards or visible or others:
        return None
    groups: dict[str, list[str]] = {}
    for name in shards:
        match = SHARD_SPLIT.match(name)
        groups.setdefault(match.group(1) if match else "rows", []).append(name)
    parts = []
    for group, names in groups.items():
        uris = tuple(storage.join(folder, name) for name in names)
        parts.append(HfPart(group, _split(group, split_dirnames), folder, uris))
    return "parquet", parts


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        return "bytes" in names
    return False


def image_column_of(schema: pa.Schema, where: str) -> tuple[str, ArrayImageColumn | None]:
    """The image column's name, and its array plan when it holds pixel arrays."""
    if "image" in schema.names:
        field = schema.field("image")
        if is_array_image(field.type):
            return "image", _array_column(field, where)
        if not _is_image_type(field.type):
            raise LayoutError(
                f"{where}: column 'image' is {field.type}; ingest reads encoded images (the "
                "Image feature's bytes or raw file bytes) or pixel arrays (Array2D, Array3D, "
                "nested lists of numbers)"
            )
        return "image", None
    for field in schema:
        if pa.types.is_struct(field.type) and _is_image_type(field.type):
            return field.name, None
    for field in schema:
        if numeric_depth(field.type) == 3:
            return field.name, _array_column(field, where)
    raise LayoutError(
        f"{where}: no image column (an Image feature, a binary column named 'image', or a "
        f"3-D pixel array column); columns: {', '.join(schema.names)}"
    )


def _array_column(field: pa.Field, where: str) -> ArrayImageColumn:
    try:
        return ArrayImageColumn.of(field, where)
    except ArrayLayoutError as error:
        raise LayoutError(str(error)) from None


def plan_hf_dataset(
    root: str,
    split_dirnames: Sequence[str],
    selected: Sequence[str],
    signal_length: int,
    max_image_bytes: int,
) -> HfDataset | None:
    found = find_parts(root, split_dirnames)
    if found is None:
        return None
    form, parts = found
    probe = HfDataset(root, form, tuple(parts), "", (), max_image_bytes)
    schema = probe.schema(parts[0])
    image_column, image_array = image_column_of(schema, root)
    skip = {image_column, *PLACE_COLUMNS, "split"}
    chosen = [name for name in selected if name in schema.names] if selected else None
    columns = columns_of(schema, root, skip, chosen, signal_length)
    return HfDataset(
        root, form, tuple(parts), image_column, tuple(columns), max_image_bytes, image_array
    )


def _batches(dataset: HfDataset, part: HfPart) -> Iterator[pa.RecordBatch | pa.Table]:
    if dataset.form == "parquet":
        yield from _parquet_dataset(part.files).to_batches(batch_size=BATCH_ROWS)
        return
    yield from _load(part.uri).with_format("arrow").iter(batch_size=BATCH_ROWS)


def _image_cells(column: pa.Array, image_array: ArrayImageColumn | None) -> tuple[list, list]:
    """(bytes, the reason the row is rejected, or None; path or None) per row."""
    if image_array is not None:
        return image_array.encode(column), [None] * len(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        names = {column.type.field(i).name for i in range(column.type.num_fields)}
        data = column.field("bytes").to_pylist()
        paths = column.field("path").to_pylist() if "path" in names else [None] * len(column)
        valid = column.is_valid().to_pylist()
        return [d if v else None for d, v in zip(data, valid, strict=True)], paths
    return column.to_pylist(), [None] * len(column)


def hf_members(dataset: HfDataset) -> Iterator[Member]:
    """One member per row, in order; its signal values ride along."""
    category_default = posixpath.basename(dataset.root.rstrip("/")) or "rows"
    rows = 0
    for part in dataset.parts:
        index = 0
        for batch in _batches(dataset, part):
            names = batch.schema.names
            data, paths = _image_cells(batch.column(dataset.image_column), dataset.image_array)
            nothing = [None] * batch.num_rows
            places = {
                n: batch.column(n).to_pylist() if n in names else nothing for n in PLACE_COLUMNS
            }
            values = {
                c.name: ColumnValues(batch.column(c.name), c.scalar)
                for c in dataset.signal_columns
                if c.name in names
            }
            for row in range(batch.num_rows):
                relative = f"{part.name}/{index}"
                source = f"{dataset.root}::{relative}"
                category, concept = places["category"][row], places["concept"][row]
                placement = Placement(
                    part.split,
                    str(category) if category is not None else category_default,
                    str(concept) if concept is not None else f"{part.name}-{index}",
                )
                signals = {name: column.value(row) for name, column in values.items()}
                read, reason = _reader(dataset, data[row], paths[row])
                yield Member(source, relative, placement, read, reason, signals)
                index += 1
                rows += 1
    if rows == 0:
        raise LayoutError(f"{dataset.root}: the dataset has no rows")


def _reader(dataset: HfDataset, data: bytes | str | None, path: str | None):
    if isinstance(data, str):  # a pixel array that makes no picture: the reason
        return None, data
    if data is None and path:
        absolute = storage.is_s3(path) or posixpath.isabs(path)
        uri = path if absolute else storage.join(dataset.root, path)
        if not storage.exists(uri):
            return None, f"the image has no bytes and its path {path!r} does not exist"
        return (lambda uri=uri: storage.read_bytes(uri)), None
    if data is None:
        return None, "the image cell is empty"
    if len(data) > dataset.max_image_bytes:
        return None, f"image is {len(data)} bytes, over max_image_bytes={dataset.max_image_bytes}"
    return (lambda data=data: data), None
