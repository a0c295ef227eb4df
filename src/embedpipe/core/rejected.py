"""The rejected-files side file of a dataset: ``.embedpipe/rejected.parquet``, one
(source, reason) row per input that ingest or embed could not read."""

import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.core import datasets, storage
from embedpipe.core.schemas import REJECTED_SCHEMA

REJECTED_NAME = "rejected.parquet"


def write_rejected(out_uri: str, rejected: list[tuple[str, str]]) -> None:
    """Write (atomically) the rejected (source, reason) pairs of ``out_uri``; none: an
    empty file, so a reader finds it either way."""
    columns = list(zip(*rejected, strict=True)) if rejected else [[], []]
    table = pa.table(dict(zip(REJECTED_SCHEMA.names, columns, strict=True)), schema=REJECTED_SCHEMA)
    with storage.atomic_output(datasets.side_path(out_uri, REJECTED_NAME)) as path:
        pq.write_table(table, path)
