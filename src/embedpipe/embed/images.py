"""embed: Parquet image shards -> Parquet embeddings.

One DataLoader runs over the row groups of every shard still to embed (each worker
reads its own row groups, so memory stays at one row group per worker). Pixels are
prepared one of two ways (``[embed].preprocess``):

- ``pil``: Pillow decodes and open_clip's own transform resizes in the workers: exact
  to open_clip, the default on CPU;
- ``device``: workers pass JPEG bytes (other formats, and JPEGs Pillow must rotate or
  convert, decoded to uint8 by Pillow); the main process decodes the JPEGs in batches
  on the model's device (nvjpeg on CUDA) and resizes, crops and normalises there: the
  default on GPU. The same code runs on CPU tensors.

The model runs under ``torch.inference_mode`` in the chosen precision (bf16 weights
on GPU by default). Every image id is embedded once (identical files share an id), in
dataset order. A file that cannot be decoded is skipped and listed in
``.embedpipe/rejected.parquet``. Each input shard becomes one output shard, and a
marker is written after it, so a killed run started again with the same settings
resumes after its finished shards. The model name, dimension, weights source and
normalisation go into the Parquet schema metadata.
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.finite import check_embeddings
from embedpipe.core.images import (
    DEFAULT_LIMITS,
    ImageLimits,
    ImageRejected,
    decode_rgb,
    error_reason,
    open_checked,
    orientation,
)
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import EMBEDDINGS_KIND, IMAGES_KIND, REJECTED_SCHEMA
from embedpipe.embed import device_pixels
from embedpipe.embed.prefix import prefix_model
from embedpipe.models.backends.base import PreprocessSpec
from embedpipe.models.loading import RANDOM_WEIGHTS, LoadedModel, load_model
from embedpipe.models.registry import ModelEntry, get_entry

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"
REJECTED_NAME = "rejected.parquet"
AUTOCAST = {"amp_bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISION_WEIGHTS = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16}
CPU_BATCH = 64
GPU_BATCH = 256


@dataclass(frozen=True)
class EmbedResult(StageMetrics):
    out_uri: str
    embedded: int
    resumed_shards: int
    dim: int
    seconds: float
    rejected: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """DECISIONS 8: auto is bf16 weights for inference on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    return AUTOCAST.get(resolve_precision(precision, device))


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    return LOW_PRECISION_WEIGHTS.get(resolve_precision(precision, device), torch.float32)


def resolve_preprocess(preprocess: str, device: torch.device) -> str:
    if preprocess == "auto":
        return "device" if device.type == "cuda" else "pil"
    return preprocess


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_batch_size(config: EmbedSettings, entry: ModelEntry, device: torch.device) -> int:
    if config.batch_size:
        return config.batch_size
    if device.type != "cuda":
        return CPU_BATCH
    if entry.max_batch_b200 and "B200" in torch.cuda.get_device_name(device):
        return entry.max_batch_b200
    return min(GPU_BATCH, entry.max_batch_b200 or GPU_BATCH)


def resolve_workers(config: EmbedSettings, device: torch.device, preprocess: str) -> int:
    """Decoding processes: on CPU they share the cores with the model; on GPU, workers
    that only read bytes for nvjpeg need fewer than workers that run Pillow."""
    if config.num_workers is not None:
        return config.num_workers
    cores = available_cores()
    if device.type != "cuda":
        return max(1, cores // 4)
    if preprocess == "device":
        return max(1, min(8, cores // 2))
    return max(1, min(16, cores - 1))


@dataclass
class Inference:
    """A loaded model made ready to embed on a device: weights cast, maybe compiled."""

    model: LoadedModel
    device: torch.device
    autocast: torch.dtype | None
    input_dtype: torch.dtype
    batch_size: int
    compiled: bool = False
    _encode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.autocast, enabled=self.autocast is not None
            ),
        ):
            yield

    def encode_images(self, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
        count = len(pixels)
        if self.compiled and count < self.batch_size:  # one shape: no recompiling
            pixels = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, self.batch_size - count))
        features = (self._encode or self.model.encode_images)(pixels)[:count].float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_texts(self, texts: list[str], normalize: bool) -> torch.Tensor:
        features = self.model.encode_texts(texts).float()
        return F.normalize(features, dim=-1) if normalize else features


def prepare_inference(model: LoadedModel, config: EmbedSettings, device: torch.device) -> Inference:
    dtype = weights_dtype(config.precision, device)
    if dtype != torch.float32:
        model.module.to(dtype)
    inference = Inference(
        model,
        device,
        autocast_dtype(config.precision, device),
        dtype,
        resolve_batch_size(config, model.entry, device),
    )
    if config.compile:
        inference.compiled = True
        inference._encode = torch.compile(model.encode_images)
    return inference


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


# What a worker hands over for one image: ready model input (float, the Pillow path),
# JPEG bytes for the device, Pillow-decoded uint8 pixels (HWC), or why it failed.
READY, JPEG, PIXELS, ERROR = "ready", "jpeg", "pixels", "error"


def decode_error(error: Exception) -> str:
    """The rejection reason: the caps' own, or Pillow's without object addresses."""
    if isinstance(error, ImageRejected):
        return str(error)
    return f"cannot decode image: {error_reason(error)}"


class PilPixels:
    """Pillow decoding and the model's own transform: exact to open_clip."""

    def __init__(self, transform, draft_size: int | None):
        self.transform = transform
        self.draft_size = draft_size

    def __call__(self, data: bytes) -> tuple[str, torch.Tensor]:
        return READY, self.transform(decode(data, self.draft_size))


class DevicePixels:
    """JPEGs go to the device as bytes; other formats, and JPEGs that need Pillow's
    conversions (CMYK, EXIF rotation), are decoded here to uint8."""

    def __call__(self, data: bytes) -> tuple[str, torch.Tensor]:
        if data.startswith(device_pixels.JPEG_MAGIC) and _plain_jpeg(data):
            return JPEG, torch.from_numpy(np.frombuffer(data, np.uint8).copy())
        return PIXELS, torch.from_numpy(np.array(decode(data, None)))


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG the device may decode as it is: RGB or grey, upright, within the size caps
    (checked from the header, as decode() does)."""
    try:
        with open_checked(data, DEFAULT_LIMITS) as image:
            return image.mode in ("RGB", "L") and orientation(image) == 1
    except ImageRejected:  # decode() rejects it, with the reason
        return False


@dataclass(frozen=True)
class ShardWork:
    """One input shard still to embed: the rows to embed and their ids, in row order."""

    index: int
    name: str
    uri: str
    rows: np.ndarray
    ids: pa.Array
    group_rows: tuple[int, ...]


class DatasetImages(IterableDataset):
    """Yields (shard index, row, source, kind, payload) for every row of ``work``.

    The row groups of all shards form one list; worker k of n reads entries k, k+n, ...,
    so one loader (and one set of workers) serves the whole run.
    """

    def __init__(self, work: list[ShardWork], prepare: Callable[[bytes], tuple[str, object]]):
        # Only what the workers need (not the ids): this is pickled for each worker.
        self.shards = [(item.index, item.uri, item.rows, item.group_rows) for item in work]
        self.prepare = prepare

    def _units(self) -> Iterator[tuple[int, str, int, int, np.ndarray]]:
        """(shard index, uri, row group, its first row, rows to read in it)"""
        for index, uri, rows, group_rows in self.shards:
            offset = 0
            for group, size in enumerate(group_rows):
                start, stop = np.searchsorted(rows, [offset, offset + size])
                if stop > start:
                    yield index, uri, group, offset, rows[start:stop] - offset
                offset += size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        handle, parquet, open_uri = None, None, None
        try:
            for number, (index, uri, group, offset, rows) in enumerate(self._units()):
                if number % workers != worker:
                    continue
                if open_uri != uri:
                    if handle is not None:
                        handle.close()
                    fs, path = storage.arrow_filesystem(uri)
                    handle = fs.open_input_file(path)
                    parquet, open_uri = pq.ParquetFile(handle), uri
                table = parquet.read_row_group(group, columns=["image", "source"])
                images, sources = table.column("image"), table.column("source")
                for row in rows.tolist():
                    try:
                        kind, payload = self.prepare(images[row].as_py())
                    except Exception as error:  # reported, never fatal
                        kind, payload = ERROR, decode_error(error)
                    yield index, offset + row, sources[row].as_py(), kind, payload
        finally:
            if handle is not None:
                handle.close()


def collate_items(items: list[tuple]) -> dict:
    ready = [payload for *_, kind, payload in items if kind == READY]
    return {
        "shards": torch.tensor([item[0] for item in items]),
        "rows": torch.tensor([item[1] for item in items]),
        "sources": [item[2] for item in items],
        "kinds": [item[3] for item in items],
        "ready": torch.stack(ready) if ready else None,
        "encoded": [payload for *_, kind, payload in items if kind in (JPEG, PIXELS)],
        "errors": [payload for *_, kind, payload in items if kind == ERROR],
    }


@dataclass
class DeviceBatch:
    """One batch on the device: ``pixels`` for the items at ``ok``, the others failed."""

    shards: torch.Tensor
    rows: torch.Tensor
    pixels: torch.Tensor | None
    ok: list[int]
    failed: list[tuple[int, str, str]]  # position, source, reason


def device_batches(
    work: list[ShardWork], inference: Inference, config: EmbedSettings, preprocess: str
) -> Iterator[DeviceBatch]:
    """Every image of ``work`` as model input on the device, in batches."""
    model, device = inference.model, inference.device
    if preprocess == "device":
        prepare = DevicePixels()
    else:
        prepare = PilPixels(
            model.transform, model.entry.image_size if config.draft_decode else None
        )
    workers = resolve_workers(config, device, preprocess)
    loader = DataLoader(
        DatasetImages(work, prepare),
        batch_size=inference.batch_size,
        num_workers=workers,
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    spec = model.preprocess_spec
    for batch in loader:
        yield _to_device(batch, spec, inference)


def _to_device(batch: dict, spec: PreprocessSpec, inference: Inference) -> DeviceBatch:
    device, dtype = inference.device, inference.input_dtype
    sources, kinds = batch["sources"], batch["kinds"]
    errors = iter(batch["errors"])
    failed = [(i, sources[i], next(errors)) for i, kind in enumerate(kinds) if kind == ERROR]
    if batch["ready"] is not None:  # the Pillow path: model input made in the workers
        ok = [i for i, kind in enumerate(kinds) if kind == READY]
        pixels = batch["ready"].to(device, non_blocking=True).to(dtype)
        return DeviceBatch(batch["shards"], batch["rows"], pixels, ok, failed)
    positions = [i for i, kind in enumerate(kinds) if kind in (JPEG, PIXELS)]
    encoded = dict(zip(positions, batch["encoded"], strict=True))
    jpeg_at = [i for i in positions if kinds[i] == JPEG]
    jpegs = device_pixels.decode_jpegs([encoded[i] for i in jpeg_at], device)
    decoded = dict(zip(jpeg_at, jpegs, strict=True))
    ok, images = [], []
    for i in positions:
        if kinds[i] == PIXELS:
            image = encoded[i].to(device, non_blocking=True).permute(2, 0, 1)
        elif isinstance(decoded[i], Exception):  # the device's decoder refused it: ask Pillow
            try:
                image = torch.from_numpy(np.array(decode(encoded[i].numpy().tobytes(), None)))
            except Exception as error:  # reported, never fatal
                failed.append((i, sources[i], decode_error(error)))
                continue
            image = image.to(device).permute(2, 0, 1)
        else:
            image = decoded[i]
        ok.append(i)
        images.append(image)
    pixels = device_pixels.preprocess(images, spec, dtype) if images else None
    return DeviceBatch(batch["shards"], batch["rows"], pixels, ok, failed)


@dataclass
class _Pending:
    rows: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    received: int = 0


def embedded_shards(
    work: list[ShardWork],
    inference: Inference,
    config: EmbedSettings,
    preprocess: str,
    progress: tqdm | None = None,
) -> Iterator[tuple[ShardWork, pa.Array, np.ndarray, list[tuple[str, str]]]]:
    """(shard, ids, vectors in row order, rejected (source, reason)) for each shard of
    ``work`` as soon as all its rows are embedded."""
    dim = inference.model.entry.embed_dim
    by_index = {item.index: item for item in work}
    pending = {item.index: _Pending() for item in work}
    for item in work:
        if not len(item.rows):
            del pending[item.index]
            yield item, item.ids, np.zeros((0, dim), np.float32), []
    if not pending:
        return
    with inference.running():
        for batch in device_batches(work, inference, config, preprocess):
            features = None
            if batch.pixels is not None:
                features = inference.encode_images(batch.pixels, config.normalize)
            ok = torch.tensor(batch.ok, dtype=torch.long)
            shards_ok = batch.shards[ok]
            for index in torch.unique(batch.shards).tolist():
                state = pending[index]
                mine = shards_ok == index
                state.rows.append(batch.rows[ok][mine])
                if features is not None:
                    state.features.append(features[mine.to(features.device)])
                for position, source, reason in batch.failed:
                    if int(batch.shards[position]) == index:
                        state.rejected.append((source, reason))
                state.received += int((batch.shards == index).sum())
                if state.received == len(by_index[index].rows):
                    del pending[index]
                    yield _finish(by_index[index], state, dim)
            if progress is not None:
                progress.update(len(batch.shards))
    if pending:
        raise RuntimeError(f"embed: rows of shard(s) {sorted(pending)} never came back")


def _finish(item: ShardWork, state: _Pending, dim: int):
    rows = torch.cat(state.rows).numpy()
    if state.features:
        vectors = torch.cat(state.features).cpu().numpy().astype(np.float32, copy=False)
    else:
        vectors = np.zeros((0, dim), np.float32)
    order = np.argsort(rows, kind="stable")
    ids = item.ids.take(pa.array(np.searchsorted(item.rows, rows[order])))
    return item, ids, vectors[order], state.rejected


def _shard_ids(shard_uri: str) -> tuple[list[str], tuple[int, ...]]:
    fs, path = storage.arrow_filesystem(shard_uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        groups = tuple(
            parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)
        )
        ids = parquet.read(columns=["image_id"]).column("image_id").to_pylist()
    return ids, groups


def _fingerprint(
    entry: ModelEntry, config: EmbedSettings, device: torch.device, inputs: list, select: str
) -> str:
    identity = {
        "entry": entry.model_dump(mode="json"),
        "settings": config.model_dump(
            mode="json", include={"weights", "seed", "normalize", "draft_decode", "dim"}
        ),
        # resolved: "auto" on another device embeds differently
        "precision": resolve_precision(config.precision, device),
        "preprocess": resolve_preprocess(config.preprocess, device),
        "inputs": inputs,
        "select": select,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@outputs.writes_output(inputs=("images_uri", "select_uri"))
def embed_images(
    images_uri: str,
    out_uri: str,
    config: EmbedSettings,
    entry: ModelEntry | None = None,
    select_uri: str | None = None,
    shard_group: tuple[int, int] = (0, 1),
) -> EmbedResult:
    """Embed every distinct image of ``images_uri`` (only ids in ``select_uri`` if given).

    ``shard_group = (i, n)`` embeds only the i-th of n contiguous groups of input shards
    (one task of a fan-out); merging the n outputs in order gives what one run gives.
    """
    started = time.perf_counter()
    entry = entry or get_entry(config.model)
    out_uri = storage.normalize(out_uri)
    manifest = datasets.verify_dataset(images_uri, IMAGES_KIND)
    wanted = None
    if select_uri:
        datasets.verify_dataset(select_uri)
        selection = datasets.read_table(select_uri, columns=["image_id"]).column("image_id")
        wanted = set(pc.unique(selection).to_pylist())
    device = resolve_device(config.device)
    model = load_model(entry, config.weights, str(device), config.tokenizer_dir, config.seed)
    model = prefix_model(model, config.dim)
    entry = model.entry
    inference = prepare_inference(model, config, device)
    preprocess = resolve_preprocess(config.preprocess, device)
    schema = embedding_schema(model, config.normalize)
    names = [s["path"] for s in manifest["shards"]]
    fingerprint = _fingerprint(entry, config, device, [*names, list(shard_group)], select_uri or "")
    finished = _finished_shards(out_uri, fingerprint)
    work, shards, rejected = plan_work(images_uri, wanted, finished, out_uri, shard_group)
    resumed = len(shards)
    embedded = 0
    total = sum(len(item.rows) for item in work)
    progress = tqdm(total=total, desc=f"embed {entry.name}", unit="img", disable=None)
    with progress:
        for item, ids, vectors, failed in embedded_shards(
            work, inference, config, preprocess, progress
        ):
            check_embeddings(vectors, entry.name, item.name)
            table = pa.table(
                {
                    "image_id": ids,
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(vectors.reshape(-1), pa.float32()), entry.embed_dim
                    ),
                },
                schema=schema,
            )
            shard = _publish(out_uri, item.index, table)
            storage.write_json(
                datasets.side_path(out_uri, PROGRESS_DIR, f"{item.name}.json"),
                {
                    "input": item.name,
                    "shard": shard,
                    "fingerprint": fingerprint,
                    "rejected": failed,
                },
            )
            shards[item.index] = shard
            rejected.extend(failed)
            embedded += table.num_rows
    datasets.save_config(out_uri, "embed", config)
    _write_rejected(out_uri, rejected)
    datasets.write_manifest(
        out_uri,
        EMBEDDINGS_KIND,
        [shards[index] for index in sorted(shards)],
        {
            "model": entry.name,
            "dim": entry.embed_dim,
            "weights": model.weights_source,
            **({"seed": config.seed} if model.weights_source == RANDOM_WEIGHTS else {}),
            "normalized": config.normalize,
            "shard_group": list(shard_group),
        },
    )
    storage.delete_tree(datasets.side_path(out_uri, PROGRESS_DIR))
    result = EmbedResult(
        out_uri,
        embedded,
        resumed,
        entry.embed_dim,
        round(time.perf_counter() - started, 3),
        len(rejected),
    )
    log.info("embedded %d images with %s (%d shard(s) resumed)", embedded, entry.name, resumed)
    if rejected:
        log.warning(
            "%d image(s) could not be decoded and are listed in %s, e.g. %s: %s",
            len(rejected),
            datasets.side_path(out_uri, REJECTED_NAME),
            *rejected[0],
        )
    return result


def plan_work(
    images_uri: str,
    wanted: set[str] | None = None,
    finished: dict[str, dict] | None = None,
    out_uri: str = "",
    shard_group: tuple[int, int] = (0, 1),
) -> tuple[list[ShardWork], dict[int, dict], list[tuple[str, str]]]:
    """The shards still to embed, each with the rows of ids not seen before (and in
    ``wanted``); the output shards and rejected files of the ``finished`` ones.

    Only the shards of ``shard_group`` are embedded; the ids of the shards before it are
    read (ids only) so an image seen earlier is left to the group that sees it first.
    """
    manifest = datasets.read_manifest(images_uri, IMAGES_KIND)
    inputs = datasets.shard_uris(images_uri, manifest)
    first, end = group_bounds(len(inputs), *shard_group)
    inputs = inputs[:end]
    finished = finished or {}
    seen: set[str] = set()
    work: list[ShardWork] = []
    shards: dict[int, dict] = {}
    rejected: list[tuple[str, str]] = []
    for index, (shard_uri, input_shard) in enumerate(
        zip(inputs, manifest["shards"][:end], strict=True)
    ):
        name = input_shard["path"]
        if name in finished:
            record = finished[name]
            done = datasets.read_table_file(
                storage.join(out_uri, record["shard"]["path"]), ["image_id"]
            )
            seen.update(done.column("image_id").to_pylist())
            shards[index] = record["shard"]
            rejected.extend(tuple(pair) for pair in record.get("rejected", []))
            continue
        ids, group_rows = _shard_ids(shard_uri)
        rows = np.flatnonzero(_rows_to_embed(ids, wanted, seen))
        kept = [ids[row] for row in rows]
        seen.update(kept)
        if index < first:
            continue
        work.append(
            ShardWork(index, name, shard_uri, rows, pa.array(kept, pa.string()), group_rows)
        )
    return work, shards, rejected


def group_bounds(shards: int, group: int, groups: int) -> tuple[int, int]:
    """The input shards ``[first, end)`` of contiguous group ``group`` of ``groups``."""
    if not 0 <= group < groups:
        raise ValueError(f"shard group {group} of {groups}: expected 0 <= group < groups")
    return group * shards // groups, (group + 1) * shards // groups


def _finished_shards(out_uri: str, fingerprint: str) -> dict[str, dict]:
    markers = storage.list_files(datasets.side_path(out_uri, PROGRESS_DIR))
    finished = {}
    for marker in markers:
        record = storage.read_json(marker.uri)
        shard_uri = storage.join(out_uri, record["shard"]["path"])
        if record.get("fingerprint") == fingerprint and storage.exists(shard_uri):
            finished[record["input"]] = record
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


def _write_rejected(out_uri: str, rejected: list[tuple[str, str]]) -> None:
    columns = list(zip(*rejected, strict=True)) if rejected else [[], []]
    table = pa.table(dict(zip(REJECTED_SCHEMA.names, columns, strict=True)), schema=REJECTED_SCHEMA)
    with storage.atomic_output(datasets.side_path(out_uri, REJECTED_NAME)) as path:
        pq.write_table(table, path)


def _publish(out_uri: str, index: int, table: pa.Table) -> dict:
    handle, path = tempfile.mkstemp(suffix=storage.TMP_SUFFIX, dir=outputs.staging_dir(out_uri))
    os.close(handle)
    try:
        pq.write_table(table, path, compression="zstd")
        name = datasets.publish_shard(out_uri, index, path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return {"path": name, "rows": table.num_rows}
