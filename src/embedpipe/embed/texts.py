"""embed-text: captions or class prompts -> Parquet text embeddings with an image-text
model, one row per distinct text."""

import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import TEXT_EMBEDDINGS_KIND
from embedpipe.embed.images import EmbedResult, autocast_dtype, embedding_schema, resolve_device
from embedpipe.models.loading import load_model
from embedpipe.models.registry import ModelEntry, get_entry


def read_texts(texts_uri: str, column: str) -> list[str]:
    """Texts from a .txt file (one per line) or a Parquet file/dataset column."""
    if texts_uri.endswith(".txt"):
        lines = storage.read_bytes(texts_uri).decode("utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    if texts_uri.endswith(".parquet"):
        table = datasets.read_table_file(texts_uri, None)
    else:
        table = datasets.read_table(texts_uri)
    if column not in table.column_names:
        raise ValueError(f"{texts_uri}: no column '{column}' ({', '.join(table.column_names)})")
    return [text for text in table.column(column).to_pylist() if text]


@datasets.writes_output(inputs=("texts_uri",))
def embed_texts(
    texts_uri: str,
    out_uri: str,
    config: EmbedSettings,
    entry: ModelEntry | None = None,
    column: str = "text",
) -> EmbedResult:
    """Embed captions or class prompts with a text-capable model; one row per distinct text."""
    started = time.perf_counter()
    entry = entry or get_entry(config.model)
    texts = list(dict.fromkeys(read_texts(texts_uri, column)))
    device = resolve_device(config.device)
    model = load_model(entry, config.weights, str(device), config.tokenizer_dir)
    dtype = autocast_dtype(config.precision, device)
    chunks = []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for start in range(0, len(texts), config.batch_size):
            features = model.encode_texts(texts[start : start + config.batch_size]).float()
            if config.normalize:
                features = F.normalize(features, dim=-1)
            chunks.append(features.cpu().numpy())
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, entry.embed_dim), np.float32)
    schema = embedding_schema(model, config.normalize, key="text")
    table = pa.table(
        {
            "text": texts,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), entry.embed_dim
            ),
        },
        schema=schema,
    )
    out_uri = storage.normalize(out_uri)
    datasets.save_config(out_uri, "embed-text", config)
    datasets.write_table(
        out_uri, table, TEXT_EMBEDDINGS_KIND, extra={"model": entry.name, "dim": entry.embed_dim}
    )
    return EmbedResult(
        out_uri, len(texts), 0, entry.embed_dim, round(time.perf_counter() - started, 3)
    )
