"""embed-text: captions or class prompts -> Parquet text embeddings with an image-text
model, one row per distinct text, in first-seen order.

Texts are streamed: read batch by batch, embedded in batches on the device (the same
precision and batch size rules as image embedding) and written to shards as they go,
so a run over millions of prompts holds one batch of tensors, not all of them.
"""

import io
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.schemas import TEXT_EMBEDDINGS_KIND
from embedpipe.embed.images import EmbedResult, embedding_schema
from embedpipe.embed.prefix import prefix_model
from embedpipe.embed.runtime import prepare_inference, resolve_device
from embedpipe.models.loading import load_model
from embedpipe.models.registry import ModelEntry, get_entry

TEXT_ROWS_PER_SHARD = 100_000


def iter_texts(texts_uri: str, column: str) -> Iterator[str]:
    """Texts from a .txt file (one per line) or a Parquet file/dataset column, streamed;
    blank lines and empty values are skipped."""
    if texts_uri.endswith(".txt"):
        with storage.open_input(texts_uri) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8"):
                if line.strip():
                    yield line.strip()
        return
    for batch in _parquet_batches(texts_uri, column):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _parquet_batches(texts_uri: str, column: str) -> Iterator[pa.RecordBatch]:
    if texts_uri.endswith(".parquet"):
        fs, path = storage.arrow_filesystem(texts_uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            _require_column(texts_uri, parquet.schema_arrow.names, column)
            yield from parquet.iter_batches(columns=[column])
        return
    manifest = datasets.read_manifest(texts_uri)
    shards = datasets.shard_uris(texts_uri, manifest)
    if shards:
        fs, path = storage.arrow_filesystem(shards[0])
        _require_column(texts_uri, pq.read_schema(path, filesystem=fs).names, column)
    yield from datasets.iter_batches(texts_uri, columns=[column])


def _require_column(texts_uri: str, names: list[str], column: str) -> None:
    if column not in names:
        raise ValueError(f"{texts_uri}: no column '{column}' ({', '.join(names)})")


def read_texts(texts_uri: str, column: str) -> list[str]:
    return list(iter_texts(texts_uri, column))


def _distinct_batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    seen: set[str] = set()
    batch: list[str] = []
    for text in texts:
        if text in seen:
            continue
        seen.add(text)
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@outputs.writes_output(inputs=("texts_uri",))
def embed_texts(
    texts_uri: str,
    out_uri: str,
    config: EmbedSettings,
    entry: ModelEntry | None = None,
    column: str = "text",
    rows_per_shard: int = TEXT_ROWS_PER_SHARD,
) -> EmbedResult:
    """Embed captions or class prompts with a text-capable model; one row per distinct text."""
    started = time.perf_counter()
    entry = entry or get_entry(config.model)
    device = resolve_device(config.device)
    model = load_model(entry, config.weights, str(device), config.tokenizer_dir, config.seed)
    model = prefix_model(model, config.dim)
    entry = model.entry
    inference = prepare_inference(model, config, device)
    schema = embedding_schema(model, config.normalize, key="text")
    out_uri = storage.normalize(out_uri)
    embedded = 0
    with (
        datasets.DatasetWriter(out_uri, schema, TEXT_EMBEDDINGS_KIND, rows_per_shard) as writer,
        inference.running(),
    ):
        for batch in _distinct_batches(iter_texts(texts_uri, column), inference.batch_size):
            vectors = inference.encode_texts(batch, config.normalize).cpu().numpy()
            embeddings = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), entry.embed_dim
            )
            writer.write(pa.table({"text": batch, "embedding": embeddings}, schema=schema))
            embedded += len(batch)
        datasets.save_config(out_uri, "embed-text", config)
        writer.finish({"model": entry.name, "dim": entry.embed_dim})
    return EmbedResult(
        out_uri, embedded, 0, entry.embed_dim, round(time.perf_counter() - started, 3)
    )
