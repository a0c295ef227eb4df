"""embed: Parquet image shards -> Parquet embeddings.

Each input shard becomes one output shard. DataLoader workers each decode
their own Parquet row groups (memory stays at one row group per worker) while
the model runs batches under ``torch.inference_mode``, with bf16/fp16 autocast
on GPU. Every image id is embedded once (identical files share an id), in
dataset order. A marker is written after each finished shard, so a killed run
started again with the same settings resumes after the last finished shard.
The model name, dimension, weights source and normalisation go into the
Parquet schema metadata.
"""

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

# Decoding workers share the CPU cores with the model's OpenMP threads; spinning idle
# threads then steal time from decoding (measured: 0.77 -> 0.87 of the forward-only
# ceiling on 2 cores). It only takes effect if set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets, storage
from embedpipe.core.images import DEFAULT_LIMITS, ImageLimits, decode_rgb
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import EMBEDDINGS_KIND, IMAGES_KIND
from embedpipe.models.loading import LoadedModel, load_model
from embedpipe.models.registry import ModelEntry, get_entry

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbedResult(StageMetrics):
    out_uri: str
    embedded: int
    resumed_shards: int
    dim: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return PRECISIONS[precision]


def embedding_schema(model: LoadedModel, normalized: bool, key: str = "image_id") -> pa.Schema:
    entry = model.entry
    metadata = {
        "embedpipe.model": entry.name,
        "embedpipe.library": entry.library,
        "embedpipe.architecture": entry.architecture,
        "embedpipe.dim": str(entry.embed_dim),
        "embedpipe.weights": model.weights_source,
        "embedpipe.normalized": json.dumps(normalized),
    }
    fields = [
        pa.field(key, pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), entry.embed_dim), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


def decode(
    data: bytes, draft_size: int | None, limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """RGB pixels as displayed; ImageRejected (a ValueError) for an image over the caps
    (one that an older ingest let through) instead of gigabytes of resize."""
    return decode_rgb(data, limits, draft_size)


class ShardImages(IterableDataset):
    """Yields (row position, pixels) for the kept rows of one Parquet shard.

    Worker k of n reads row groups k, k+n, ...; rows come back out of order and
    are put back in order by position.
    """

    def __init__(self, shard_uri: str, keep: np.ndarray, transform, draft_size: int | None):
        self.shard_uri = shard_uri
        self.keep = keep
        self.transform = transform
        self.draft_size = draft_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        fs, path = storage.arrow_filesystem(self.shard_uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            offset = 0
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                rows = np.flatnonzero(self.keep[offset : offset + size])
                if group % workers == worker and len(rows):
                    images = parquet.read_row_group(group, columns=["image"]).column("image")
                    for row in rows.tolist():
                        pixels = self.transform(decode(images[row].as_py(), self.draft_size))
                        yield offset + row, pixels
                offset += size


def _fingerprint(entry: ModelEntry, config: EmbedSettings, inputs: list, select: str) -> str:
    identity = {
        "entry": entry.model_dump(mode="json"),
        "settings": config.model_dump(
            mode="json", include={"weights", "normalize", "precision", "draft_decode"}
        ),
        "inputs": inputs,
        "select": select,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@datasets.writes_output(inputs=("images_uri", "select_uri"))
def embed_images(
    images_uri: str,
    out_uri: str,
    config: EmbedSettings,
    entry: ModelEntry | None = None,
    select_uri: str | None = None,
) -> EmbedResult:
    """Embed every distinct image of ``images_uri`` (only ids in ``select_uri`` if given)."""
    started = time.perf_counter()
    entry = entry or get_entry(config.model)
    out_uri = storage.normalize(out_uri)
    manifest = datasets.verify_dataset(images_uri, IMAGES_KIND)
    inputs = datasets.shard_uris(images_uri, manifest)
    wanted = None
    if select_uri:
        datasets.verify_dataset(select_uri)
        selection = datasets.read_table(select_uri, columns=["image_id"]).column("image_id")
        wanted = set(pc.unique(selection).to_pylist())
    device = resolve_device(config.device)
    model = load_model(entry, config.weights, str(device), config.tokenizer_dir)
    schema = embedding_schema(model, config.normalize)
    fingerprint = _fingerprint(
        entry, config, [s["path"] for s in manifest["shards"]], select_uri or ""
    )
    finished = _finished_shards(out_uri, fingerprint)
    seen: set[str] = set()
    shards, resumed, embedded = [], 0, 0
    progress = tqdm(total=manifest["rows"], desc=f"embed {entry.name}", unit="img", disable=None)
    with progress:
        for index, (shard_uri, input_shard) in enumerate(
            zip(inputs, manifest["shards"], strict=True)
        ):
            name = input_shard["path"]
            progress.update(input_shard["rows"])
            if name in finished:
                shard = finished[name]
                done_ids = datasets.read_table_file(
                    storage.join(out_uri, shard["path"]), ["image_id"]
                )
                seen.update(done_ids.column("image_id").to_pylist())
                shards.append(shard)
                resumed += 1
                continue
            ids = datasets.read_table_file(shard_uri, ["image_id"]).column("image_id")
            keep = _rows_to_embed(ids.to_pylist(), wanted, seen)
            vectors = _embed_shard(model, shard_uri, keep, config, device)
            kept_ids = [ids[i].as_py() for i in np.flatnonzero(keep)]
            table = pa.table(
                {
                    "image_id": kept_ids,
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(vectors.reshape(-1), pa.float32()), entry.embed_dim
                    ),
                },
                schema=schema,
            )
            shard = _publish(out_uri, index, table)
            storage.write_json(
                datasets.side_path(out_uri, PROGRESS_DIR, f"{name}.json"),
                {"input": name, "shard": shard, "fingerprint": fingerprint},
            )
            shards.append(shard)
            seen.update(kept_ids)
            embedded += len(kept_ids)
    datasets.save_config(out_uri, "embed", config)
    datasets.write_manifest(
        out_uri,
        EMBEDDINGS_KIND,
        shards,
        {
            "model": entry.name,
            "dim": entry.embed_dim,
            "weights": model.weights_source,
            "normalized": config.normalize,
        },
    )
    storage.delete_tree(datasets.side_path(out_uri, PROGRESS_DIR))
    result = EmbedResult(
        out_uri, embedded, resumed, entry.embed_dim, round(time.perf_counter() - started, 3)
    )
    log.info("embedded %d images with %s (%d shard(s) resumed)", embedded, entry.name, resumed)
    return result


def _finished_shards(out_uri: str, fingerprint: str) -> dict[str, dict]:
    markers = storage.list_files(datasets.side_path(out_uri, PROGRESS_DIR))
    finished = {}
    for marker in markers:
        record = storage.read_json(marker.uri)
        shard_uri = storage.join(out_uri, record["shard"]["path"])
        if record.get("fingerprint") == fingerprint and storage.exists(shard_uri):
            finished[record["input"]] = record["shard"]
    return finished


def _rows_to_embed(ids: list[str], wanted: set[str] | None, seen: set[str]) -> np.ndarray:
    keep = np.zeros(len(ids), dtype=bool)
    local: set[str] = set()
    for row, image_id in enumerate(ids):
        if image_id in seen or image_id in local:
            continue
        if wanted is not None and image_id not in wanted:
            continue
        local.add(image_id)
        keep[row] = True
    return keep


def _embed_shard(
    model: LoadedModel,
    shard_uri: str,
    keep: np.ndarray,
    config: EmbedSettings,
    device: torch.device,
) -> np.ndarray:
    dim = model.entry.embed_dim
    if not keep.any():
        return np.zeros((0, dim), dtype=np.float32)
    draft = model.entry.image_size if config.draft_decode else None
    loader = DataLoader(
        ShardImages(shard_uri, keep, model.transform, draft),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    dtype = autocast_dtype(config.precision, device)
    positions, chunks = [], []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for rows, pixels in loader:
            features = model.encode_images(pixels.to(device, non_blocking=True)).float()
            if config.normalize:
                features = F.normalize(features, dim=-1)
            positions.append(rows.numpy())
            chunks.append(features.cpu().numpy())
    order = np.argsort(np.concatenate(positions), kind="stable")
    return np.concatenate(chunks)[order].astype(np.float32, copy=False)


def _publish(out_uri: str, index: int, table: pa.Table) -> dict:
    handle, path = tempfile.mkstemp(suffix=storage.TMP_SUFFIX, dir=datasets.staging_dir(out_uri))
    os.close(handle)
    try:
        pq.write_table(table, path, compression="zstd")
        name = datasets.publish_shard(out_uri, index, path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return {"path": name, "rows": table.num_rows}
