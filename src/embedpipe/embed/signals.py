"""embed-signal: a signal column of an images dataset -> Parquet signal embeddings.

A signal is a ``list<float>`` (or ``fixed_size_list<float>``) column, one row per image
keyed by ``image_id``. The encoder is a registry entry with ``library = "signal"`` (or
a signal checkpoint, which carries its entry). The run is the embed stage's: the same
``[embed]`` settings (model, weights, seed, batch size, device, precision, normalize,
dim; the image decoding options do not apply), each input shard becomes one output
shard with a progress marker, so a killed run started again with the same settings
resumes after its finished shards, and the manifest is written last. Rows whose signal
is missing, empty, non-finite or shorter than the encoder's minimum are skipped and
listed in ``.embedpipe/rejected.parquet``; a signal of another length than a
fixed-length encoder takes stops the run with one line naming the column and lengths.
"""

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.finite import check_embeddings
from embedpipe.core.rejected import REJECTED_NAME
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import IMAGES_KIND, SIGNAL_EMBEDDINGS_KIND
from embedpipe.embed.images import (
    embedding_schema,
    finish_embeddings,
    finished_shards,
    write_embedded_shard,
)
from embedpipe.embed.loader import ShardWork, plan_work
from embedpipe.embed.runtime import resolve_batch_size, resolve_device
from embedpipe.models.loading import LoadedModel, load_model
from embedpipe.models.precision import INFERENCE, precision_for, resolve_name
from embedpipe.models.registry import ModelEntry, ModelError, get_entry
from embedpipe.models.signal_encoders import SignalEncoder
from embedpipe.models.two_towers import check_signal_length, signal_column_length

log = logging.getLogger(__name__)


class SignalColumnError(ValueError):
    """The signal column is missing or not an array of numbers."""


@dataclass(frozen=True)
class EmbedSignalResult(StageMetrics):
    out_uri: str
    column: str
    embedded: int
    resumed_shards: int
    dim: int
    seconds: float
    rejected: int = 0


def check_signal_column(images_uri: str, schema: pa.Schema, column: str) -> None:
    """Refuse a column that is absent or not a list of numbers, naming it."""
    if column not in schema.names:
        arrays = [f.name for f in schema if _is_numeric_list(f.type)]
        raise SignalColumnError(
            f"{images_uri}: no signal column '{column}'"
            + (f"; list columns of numbers: {', '.join(arrays)}" if arrays else "")
        )
    kind = schema.field(column).type
    if not _is_numeric_list(kind):
        raise SignalColumnError(
            f"{images_uri}: column '{column}' is {kind}, not a signal (list<float32> or "
            "fixed_size_list<float32>)"
        )


def _is_numeric_list(kind: pa.DataType) -> bool:
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (lists or pa.types.is_fixed_size_list(kind)):
        return False
    value = kind.value_type
    return pa.types.is_floating(value) or pa.types.is_integer(value)


@dataclass(frozen=True)
class SignalRows:
    """Signals of some rows as flat values and offsets (None: a missing signal)."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    present: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> "SignalRows":
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        present = array.is_valid().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
        flat = pc.list_flatten(array).cast(pa.float32())
        values = flat.to_numpy(zero_copy_only=False)  # a null inside a signal: NaN
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(values, starts, lengths, present)

    def signal(self, row: int) -> np.ndarray:
        start = self.starts[row]
        return self.values[start : start + self.lengths[row]]


def _problem(rows: SignalRows, row: int, encoder: SignalEncoder) -> str | None:
    """Why a row's signal is skipped, or None when it is embedded."""
    if not rows.present[row]:
        return "missing signal"
    length, shortest = int(rows.lengths[row]), encoder.arch.min_signal_length
    if length < shortest and not encoder.arch.signal_length:
        return f"signal of length {length}, below the encoder's minimum {shortest}"
    if not np.isfinite(rows.signal(row)).all():
        return "non-finite or missing values in the signal"
    return None


def padded_batch(rows: SignalRows, picked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The signals of ``picked`` rows zero-padded to the longest, and their lengths."""
    lengths = rows.lengths[picked]
    batch = np.zeros((len(picked), int(lengths.max())), np.float32)
    for slot, row in enumerate(picked):
        batch[slot, : lengths[slot]] = rows.signal(row)
    return torch.from_numpy(batch), torch.from_numpy(lengths)


@dataclass
class SignalInference:
    """A signal encoder on its device, in the inference meaning of a precision."""

    encoder: SignalEncoder
    device: torch.device
    autocast: torch.dtype | None
    batch_size: int

    def encode(self, values: torch.Tensor, lengths: torch.Tensor, normalize: bool, dim: int):
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.autocast, enabled=self.autocast is not None
            ),
        ):
            features = self.encoder(values.to(self.device), lengths.to(self.device)).float()
        features = features[:, :dim] if dim else features
        return F.normalize(features, dim=-1) if normalize else features


def signal_inference(model: LoadedModel, config: EmbedSettings, device: torch.device):
    chosen = precision_for(config.precision, device, INFERENCE)
    encoder = chosen.cast(model.module)
    batch_size = resolve_batch_size(config, model.entry, device)
    return SignalInference(encoder, device, chosen.autocast, batch_size)


@dataclass(frozen=True)
class ShardSignals:
    """One input shard's rows to embed: their signals and ids, the rows kept (in order)
    and the rejected ones as (source, reason)."""

    rows: SignalRows
    ids: list[str]
    kept: list[int]
    rejected: list[tuple[str, str]]


def read_shard_signals(
    item: ShardWork, column: str, encoder: SignalEncoder, where: str, name: str
) -> ShardSignals:
    fs, path = storage.arrow_filesystem(item.uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "source", column])
    table = table.take(pa.array(item.rows, pa.int64()))
    rows = SignalRows.from_arrow(table.column(column))
    ids = table.column("image_id").to_pylist()
    sources = table.column("source").to_pylist()
    kept, rejected = [], []
    for row in range(len(ids)):
        problem = _problem(rows, row, encoder)
        if problem is None:
            encoder.check_length(int(rows.lengths[row]), f"{where}: column '{column}'", name)
            kept.append(row)
        else:
            rejected.append((sources[row], f"image {ids[row]}, column '{column}': {problem}"))
    return ShardSignals(rows, ids, kept, rejected)


def embed_shard(
    signals: ShardSignals, inference: SignalInference, config: EmbedSettings, dim: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, vectors) per batch of the kept rows of one shard."""
    for first in range(0, len(signals.kept), inference.batch_size):
        picked = signals.kept[first : first + inference.batch_size]
        values, lengths = padded_batch(signals.rows, picked)
        vectors = inference.encode(values, lengths, config.normalize, config.dim)
        yield [signals.ids[row] for row in picked], vectors.cpu().numpy()


def _fingerprint(
    entry: ModelEntry, config: EmbedSettings, device: torch.device, inputs: list, column: str
) -> str:
    identity = {
        "entry": entry.model_dump(mode="json"),
        "settings": config.model_dump(mode="json", include={"weights", "seed", "normalize", "dim"}),
        "precision": resolve_name(config.precision, device),
        "inputs": inputs,
        "column": column,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _signal_schema(model: LoadedModel, config: EmbedSettings, column: str) -> pa.Schema:
    full = model.entry.embed_dim
    if config.dim > full:
        raise ModelError(f"dim: {config.dim} is larger than {model.entry.name}'s dimension {full}")
    entry = model.entry.model_copy(update={"embed_dim": config.dim or full})
    schema = embedding_schema(dataclasses.replace(model, entry=entry), config.normalize)
    extra = {"embedpipe.modality": "signal", "embedpipe.signal_column": column}
    return schema.with_metadata(
        {**schema.metadata, **{k.encode(): v.encode() for k, v in extra.items()}}
    )


@outputs.writes_output(inputs=("images_uri",))
def embed_signals(
    images_uri: str,
    out_uri: str,
    config: EmbedSettings,
    column: str,
    entry: ModelEntry | None = None,
) -> EmbedSignalResult:
    """Embed the ``column`` signal of every distinct image of ``images_uri``."""
    started = time.perf_counter()
    entry = entry or get_entry(config.model)
    if not entry.signal:
        raise ModelError(
            f"{entry.name} is an image model; embed-signal needs a signal encoder (--model "
            "signal_transformer, signal_cnn, ... or --weights a signal checkpoint)"
        )
    out_uri = storage.normalize(out_uri)
    manifest = datasets.verify_dataset(images_uri, IMAGES_KIND)
    shard_uris = datasets.shard_uris(images_uri, manifest)
    table_schema = None
    if shard_uris:
        fs, path = storage.arrow_filesystem(shard_uris[0])
        table_schema = pq.read_schema(path, filesystem=fs)
        check_signal_column(images_uri, table_schema, column)
    device = resolve_device(config.device)
    model = load_model(entry, config.weights, str(device), seed=config.seed)
    if table_schema is not None:  # a checkpoint of another signal length: before any work
        fixed = signal_column_length(images_uri, table_schema, column)
        check_signal_length(
            model.module.arch.signal_length, fixed, config.weights, images_uri, column
        )
    inference = signal_inference(model, config, device)
    schema = _signal_schema(model, config, column)
    dim = config.dim or entry.embed_dim
    names = [shard["path"] for shard in manifest["shards"]]
    fingerprint = _fingerprint(entry, config, device, names, column)
    finished = finished_shards(out_uri, fingerprint)
    work, shards, rejected = plan_work(images_uri, None, finished, out_uri)
    resumed = len(shards)
    embedded = 0
    total = sum(len(item.rows) for item in work)
    progress = tqdm(total=total, desc=f"embed-signal {entry.name}", unit="signal", disable=None)
    with progress:
        for item in work:
            where = storage.join(images_uri, item.name)
            signals = read_shard_signals(item, column, inference.encoder, where, entry.name)
            failed = signals.rejected
            ids, parts = [], []
            progress.update(len(failed))
            for batch_ids, vectors in embed_shard(signals, inference, config, dim):
                ids.extend(batch_ids)
                parts.append(vectors)
                progress.update(len(batch_ids))
            vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
            check_embeddings(vectors, entry.name, item.name)
            shard = write_embedded_shard(
                out_uri, item, pa.array(ids, pa.string()), vectors, schema, fingerprint, failed
            )
            shards[item.index] = shard
            rejected.extend(failed)
            embedded += shard["rows"]
    finish_embeddings(
        out_uri,
        SIGNAL_EMBEDDINGS_KIND,
        shards,
        rejected,
        config,
        model,
        dim,
        modality="signal",
        column=column,
    )
    seconds = round(time.perf_counter() - started, 3)
    result = EmbedSignalResult(out_uri, column, embedded, resumed, dim, seconds, len(rejected))
    log.info("embedded %d signals with %s (%d shard(s) resumed)", embedded, entry.name, resumed)
    if rejected:
        log.warning(
            "%d signal(s) were skipped and are listed in %s, e.g. %s: %s",
            len(rejected),
            datasets.side_path(out_uri, REJECTED_NAME),
            *rejected[0],
        )
    return result
