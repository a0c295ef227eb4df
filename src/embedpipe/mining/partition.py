"""partition: each category's images and vectors, in memory or as a dataset of its own.

The mining fan-out reads its inputs once here (``partition_by_category``); each
per-category task then reads only its slice. `embedpipe mine`, one process for
every category, keeps the slices in memory instead (``split_by_category``):
writing them out only to read them back would cost as much again as reading the
inputs.
"""

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.core import datasets, outputs, storage
from embedpipe.core.schemas import EMBEDDINGS_KIND, PARTITION_KIND, PARTITIONS_KIND

META_COLUMNS = ["image_id", "category", "concept", "split"]
PARTITIONS_JSON = "partitions.json"
# Partitions are an internal hand-over: vectors travel as raw little-endian float32 in a
# fixed-width binary column, which Parquet writes and reads far faster than a list column,
# named like the embeddings so that it is stored uncompressed (floats do not shrink).
# They are written as they came, and normalised when mined, like vectors that never left
# memory.
VECTOR_COLUMN = "embedding"


@dataclass(frozen=True)
class Partition:
    """One category's distinct images in image_id order: ``table`` holds META_COLUMNS;
    their vectors are rows ``rows`` of ``embeddings``, a ``fixed_size_list<float32>``
    column, gathered only when asked for, so one category's copy is alive at a time."""

    category: str
    table: pa.Table
    embeddings: pa.ChunkedArray
    rows: np.ndarray

    def vectors(self) -> np.ndarray:
        """The (n, dim) vectors, unit-normalised (cosine similarity as inner product)."""
        matrix = gather_rows(self.embeddings, self.rows)
        faiss.normalize_L2(matrix)
        return matrix


def list_categories(metadata_uri: str) -> list[str]:
    table = datasets.read_table(metadata_uri, columns=["category"])
    return sorted(pc.unique(table.column("category")).to_pylist())


def split_by_category(metadata_uri: str, embeddings_uri: str) -> dict[str, Partition]:
    """Each category's distinct images with their vectors (a category of the metadata
    without vectors gets an empty partition)."""
    datasets.verify_dataset(metadata_uri)
    datasets.verify_dataset(embeddings_uri, EMBEDDINGS_KIND)
    meta = datasets.read_table(metadata_uri, columns=META_COLUMNS)
    image_ids = meta.column("image_id")
    first_rows = pc.index_in(pc.unique(image_ids), value_set=image_ids).to_numpy()
    meta = meta.take(np.sort(first_rows))
    names = sorted(pc.unique(meta.column("category")).to_pylist())
    embeddings = datasets.read_table(embeddings_uri, EMBEDDINGS_KIND)
    # Arrow joins cannot carry fixed-size-list columns: look the vectors up by id, in
    # (category, image_id) order worked out on the metadata, and copy each vector once,
    # straight out of the Arrow buffers into its category's matrix.
    vector_rows = pc.index_in(meta.column("image_id"), value_set=embeddings.column("image_id"))
    meta = meta.append_column("vector_row", vector_rows).filter(pc.is_valid(vector_rows))
    meta = meta.sort_by([("category", "ascending"), ("image_id", "ascending")])
    rows = meta.column("vector_row").to_numpy()
    meta = meta.drop_columns(["vector_row"])
    present, counts = np.unique(
        meta.column("category").to_numpy(zero_copy_only=False), return_counts=True
    )
    starts = dict(zip(present.tolist(), (np.cumsum(counts) - counts).tolist(), strict=True))
    sizes = dict(zip(present.tolist(), counts.tolist(), strict=True))
    column = embeddings.column("embedding")
    return {
        name: Partition(
            name,
            meta.slice(starts.get(name, 0), sizes.get(name, 0)),
            column,
            rows[starts.get(name, 0) : starts.get(name, 0) + sizes.get(name, 0)],
        )
        for name in names
    }


@outputs.writes_output(inputs=("metadata_uri", "embeddings_uri"))
def partition_by_category(metadata_uri: str, embeddings_uri: str, out_uri: str) -> dict[str, str]:
    """Write each category's distinct images with their vectors as a dataset of its own.

    Returns category -> partition URI (a category without vectors gets an empty one).
    """
    out_uri = storage.normalize(out_uri)
    folders = {}
    partitions = split_by_category(metadata_uri, embeddings_uri)
    for number, (category, partition) in enumerate(sorted(partitions.items())):
        folders[category] = f"category-{number:05d}"
        vectors = gather_rows(partition.embeddings, partition.rows)
        table = partition.table.append_column(VECTOR_COLUMN, _as_fixed_binary(vectors))
        datasets.write_table(
            storage.join(out_uri, folders[category]),
            table,
            PARTITION_KIND,
            extra={"category": category},
        )
    # Folder names, not paths: a cluster task sees the artifact under a path of its own.
    storage.write_json(datasets.side_path(out_uri, PARTITIONS_JSON), folders)
    datasets.finish_bundle(out_uri, PARTITIONS_KIND, sorted(folders.values()), {})
    return read_partitions(out_uri)


def read_partition(uri: str) -> Partition:
    """A partition dataset written by ``partition_by_category``."""
    category = datasets.verify_dataset(uri, PARTITION_KIND)["category"]
    table = datasets.read_table(uri, PARTITION_KIND)
    embeddings = _as_float_lists(table.column(VECTOR_COLUMN))
    rows = np.arange(table.num_rows)
    return Partition(category, table.drop_columns([VECTOR_COLUMN]), embeddings, rows)


def read_partitions(out_uri: str) -> dict[str, str]:
    """Category -> partition URI, for partitions written at ``out_uri``."""
    out_uri = storage.normalize(out_uri)
    datasets.read_manifest(out_uri, PARTITIONS_KIND)
    folders = storage.read_json(datasets.side_path(out_uri, PARTITIONS_JSON))
    return {category: storage.join(out_uri, folder) for category, folder in folders.items()}


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An (n, dim) float32 array of a ``fixed_size_list<float32>`` embedding column
    (a view, not a copy, when the column is one chunk)."""
    parts = _chunk_matrices(column)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def gather_rows(column: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """``embedding_matrix(column)[rows]``, copying each vector once: straight out of the
    chunks (views of the Arrow buffers), never through a concatenated copy."""
    parts = _chunk_matrices(column)
    if len(parts) == 1:
        return parts[0][rows]
    ends = np.cumsum([len(part) for part in parts])
    chunk_of_row = np.searchsorted(ends, rows, side="right")
    by_chunk = np.argsort(chunk_of_row, kind="stable")
    bounds = np.searchsorted(chunk_of_row[by_chunk], np.arange(len(parts) + 1))
    out = np.empty((len(rows), column.type.list_size), np.float32)
    for number, part in enumerate(parts):
        wanted = by_chunk[bounds[number] : bounds[number + 1]]
        if len(wanted):
            out[wanted] = part[rows[wanted] - (ends[number] - len(part))]
    return out


def _chunk_matrices(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each chunk of a ``fixed_size_list<float32>`` column as an (n, dim) view."""
    dim = column.type.list_size
    return [
        chunk.values.to_numpy(zero_copy_only=False)[
            chunk.offset * dim : (chunk.offset + len(chunk)) * dim
        ].reshape(-1, dim)
        for chunk in column.chunks
        if len(chunk)
    ] or [np.zeros((0, dim), np.float32)]


def _as_fixed_binary(matrix: np.ndarray) -> pa.Array:
    width = matrix.shape[1] * matrix.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(matrix), [None, pa.py_buffer(matrix.astype("<f4", copy=False))]
    )


def _as_float_lists(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A fixed-width binary column of little-endian float32 vectors as the same bytes seen
    as a ``fixed_size_list<float32>`` column (no copy)."""
    dim = column.type.byte_width // 4
    return pa.chunked_array(
        [
            pa.FixedSizeListArray.from_arrays(
                pa.Array.from_buffers(
                    pa.float32(), (chunk.offset + len(chunk)) * dim, [None, chunk.buffers()[1]]
                ).slice(chunk.offset * dim),
                dim,
            )
            for chunk in column.chunks
            if len(chunk)
        ],
        type=pa.list_(pa.float32(), dim),
    )
