"""partition: each category's images and vectors as a dataset of its own.

The mining fan-out reads its inputs once here; each per-category task then reads
only its slice.
"""

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.core import datasets, storage
from embedpipe.core.schemas import EMBEDDINGS_KIND, PARTITION_KIND, PARTITIONS_KIND

META_COLUMNS = ["image_id", "category", "concept", "split"]
PARTITIONS_JSON = "partitions.json"
# Partitions are an internal hand-over: vectors travel as raw little-endian float32 in a
# fixed-width binary column, which Parquet writes and reads far faster than a list column.
VECTOR_COLUMN = "vector"


def list_categories(metadata_uri: str) -> list[str]:
    table = datasets.read_table(metadata_uri, columns=["category"])
    return sorted(pc.unique(table.column("category")).to_pylist())


@datasets.writes_output(inputs=("metadata_uri", "embeddings_uri"))
def partition_by_category(metadata_uri: str, embeddings_uri: str, out_uri: str) -> dict[str, str]:
    """Write each category's distinct images with their vectors as a dataset of its own.

    The fan-out reads the inputs once here; each per-category task then reads only its
    slice. Returns category -> partition URI (a category without vectors gets an empty one).
    """
    out_uri = storage.normalize(out_uri)
    datasets.verify_dataset(metadata_uri)
    datasets.verify_dataset(embeddings_uri, EMBEDDINGS_KIND)
    meta = datasets.read_table(metadata_uri, columns=META_COLUMNS)
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(meta.column("image_id").to_pylist()):
        first_row.setdefault(image_id, row)
    meta = meta.take(pa.array(sorted(first_row.values()), pa.int64()))
    vectors = datasets.read_table(embeddings_uri, EMBEDDINGS_KIND)
    # Arrow joins cannot carry fixed-size-list columns: look the vectors up by id, in
    # (category, image_id) order worked out on the metadata, so the vectors move once.
    vector_row = {
        image_id: row for row, image_id in enumerate(vectors.column("image_id").to_pylist())
    }
    meta = meta.filter(pc.is_in(meta.column("image_id"), vectors.column("image_id")))
    meta = meta.sort_by([("category", "ascending"), ("image_id", "ascending")])
    rows = np.array([vector_row[i] for i in meta.column("image_id").to_pylist()], np.int64)
    ordered = np.ascontiguousarray(embedding_matrix(vectors.column("embedding"))[rows])
    joined = meta.append_column(VECTOR_COLUMN, _as_fixed_binary(ordered))
    categories = joined.column("category").to_numpy(zero_copy_only=False)
    folders = {}
    for number, category in enumerate(list_categories(metadata_uri)):
        members = np.flatnonzero(categories == category)
        folders[category] = f"category-{number:05d}"
        part = joined.slice(members[0], len(members)) if len(members) else joined.slice(0, 0)
        datasets.write_table(
            storage.join(out_uri, folders[category]),
            part,
            PARTITION_KIND,
            extra={"category": category},
        )
    # Folder names, not paths: a cluster task sees the artifact under a path of its own.
    storage.write_json(datasets.side_path(out_uri, PARTITIONS_JSON), folders)
    datasets.finish_bundle(out_uri, PARTITIONS_KIND, sorted(folders.values()), {})
    return read_partitions(out_uri)


def read_partitions(out_uri: str) -> dict[str, str]:
    """Category -> partition URI, for partitions written at ``out_uri``."""
    out_uri = storage.normalize(out_uri)
    datasets.read_manifest(out_uri, PARTITIONS_KIND)
    folders = storage.read_json(datasets.side_path(out_uri, PARTITIONS_JSON))
    return {category: storage.join(out_uri, folder) for category, folder in folders.items()}


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An (n, dim) float32 array of a ``fixed_size_list<float32>`` embedding column
    (a view, not a copy, when the column is one chunk)."""
    dim = column.type.list_size
    parts = [
        chunk.values.to_numpy(zero_copy_only=False)[
            chunk.offset * dim : (chunk.offset + len(chunk)) * dim
        ].reshape(-1, dim)
        for chunk in column.chunks
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _as_fixed_binary(matrix: np.ndarray) -> pa.Array:
    width = matrix.shape[1] * matrix.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(matrix), [None, pa.py_buffer(matrix.astype("<f4", copy=False))]
    )


def partition_vectors(table: pa.Table) -> np.ndarray:
    """The partition's vectors, unit-normalised (cosine similarity as inner product)."""
    array = table.column(VECTOR_COLUMN).combine_chunks()
    width = array.type.byte_width
    raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    raw = raw[array.offset * width : (array.offset + len(array)) * width]
    matrix = raw.view("<f4").reshape(len(array), width // 4).astype(np.float32)
    faiss.normalize_L2(matrix)
    return matrix
