"""The loader: rows of Parquet image shards -> vectors, in batches on the model's device.

One DataLoader runs over the row groups of every shard to embed (each worker reads its
own row groups, so memory stays at one row group per worker); workers prepare the pixels
(``pixels``), the main process runs the model (``runtime.Inference``). Every image id is
embedded once (identical files share an id). A file that cannot be decoded is reported
with its source and reason, never fatal.

``vectors_for`` is the one entry point for a list of ids (evaluate, train's
validation); the embed stage drives ``embedded_shards`` itself to publish and resume
shard by shard.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.embed.pixels import (
    ERROR,
    DeviceBatch,
    collate_items,
    decode_error,
    preparer,
    to_device,
)
from embedpipe.embed.runtime import Inference, LoaderOptions


class MissingImages(ValueError):
    """Ids asked for that the images dataset does not hold."""

    def __init__(self, images_uri: str, missing: list[str], asked: int):
        self.missing = missing
        super().__init__(
            f"{images_uri}: {len(missing)} of the {asked} image(s) asked for are not in the "
            f"images dataset (e.g. {missing[0]})"
        )


class UndecodableImages(ValueError):
    """Images asked for that do not decode: their ids, sources and reasons."""

    def __init__(self, images_uri: str, failed: list[tuple[str, str, str]]):
        self.failed = failed
        image_id, source, reason = failed[0]
        super().__init__(
            f"{images_uri}: image {image_id} cannot be decoded ({source}: {reason})"
            + (f", and {len(failed) - 1} more" if len(failed) > 1 else "")
        )


@dataclass(frozen=True)
class ShardWork:
    """One input shard still to embed: the rows to embed and their ids, in row order."""

    index: int
    name: str
    uri: str
    rows: np.ndarray
    ids: pa.Array
    group_rows: tuple[int, ...]


def vectors_for(
    images_uri: str,
    ids: Sequence[str],
    inference: Inference,
    options: LoaderOptions | None = None,
) -> np.ndarray:
    """The vector of each of ``ids``, in that order (float32, one row per id), embedded
    from the images dataset ``images_uri``. MissingImages names ids it does not hold; an
    image that cannot be decoded is UndecodableImages naming its id, source and reason."""
    work, _, _ = plan_work(images_uri, set(ids))
    options = options or LoaderOptions()
    embedded_ids: list[str] = []
    parts: list[np.ndarray] = []
    failed: list[tuple[str, str, str]] = []
    for item, done, vectors, rejected in embedded_shards(work, inference, options):
        embedded_ids.extend(done.to_pylist())
        parts.append(vectors)
        if rejected:  # a shard's rejections come in row order, as its ids do
            embedded = set(done.to_pylist())
            lost = [i for i in item.ids.to_pylist() if i not in embedded]
            failed.extend((i, *pair) for i, pair in zip(lost, rejected, strict=True))
    if failed:
        raise UndecodableImages(images_uri, failed)
    where = {image_id: row for row, image_id in enumerate(embedded_ids)}
    missing = [image_id for image_id in dict.fromkeys(ids) if image_id not in where]
    if missing:
        raise MissingImages(images_uri, missing, len(set(ids)))
    dim = inference.model.entry.embed_dim
    matrix = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return matrix[[where[image_id] for image_id in ids]]


def plan_work(
    images_uri: str,
    wanted: set[str] | None = None,
    finished: dict[str, dict] | None = None,
    out_uri: str = "",
    shard_group: tuple[int, int] = (0, 1),
) -> tuple[list[ShardWork], dict[int, dict], list[tuple[str, str]]]:
    """The shards still to embed, each with the rows of ids not seen before (and in
    ``wanted``); the output shards and rejected files of the ``finished`` ones (records
    of a resumed embed run into ``out_uri``).

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


def _shard_ids(shard_uri: str) -> tuple[list[str], tuple[int, ...]]:
    fs, path = storage.arrow_filesystem(shard_uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        groups = tuple(
            parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)
        )
        ids = parquet.read(columns=["image_id"]).column("image_id").to_pylist()
    return ids, groups


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


class DatasetImages(IterableDataset):
    """Yields (shard index, row, source, kind, payload) for every row of ``work``.

    The row groups of all shards form one list; worker k of n reads entries k, k+n, ...,
    so one loader (and one set of workers) serves the whole run.
    """

    def __init__(self, work: list[ShardWork], prepare):
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


def device_batches(
    work: list[ShardWork], inference: Inference, options: LoaderOptions
) -> Iterator[DeviceBatch]:
    """Every image of ``work`` as model input on the device, in batches."""
    model, device = inference.model, inference.device
    loader = DataLoader(
        DatasetImages(work, preparer(model, options.preprocess, options.draft_decode)),
        batch_size=inference.batch_size,
        num_workers=options.workers,
        collate_fn=collate_items,
        pin_memory=device.type == "cuda",
        persistent_workers=options.workers > 0,
    )
    spec = model.preprocess_spec
    for batch in loader:
        yield to_device(batch, spec, device, inference.input_dtype)


@dataclass
class _Pending:
    rows: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # row, source, reason
    received: int = 0


def embedded_shards(
    work: list[ShardWork],
    inference: Inference,
    options: LoaderOptions,
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
        for batch in device_batches(work, inference, options):
            features = None
            if batch.pixels is not None:
                features = inference.encode_images(batch.pixels, options.normalize)
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
                        state.rejected.append((int(batch.rows[position]), source, reason))
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
    # workers' batches arrive out of row order: the rejections come in row order, as ids do
    rejected = [(source, reason) for _, source, reason in sorted(state.rejected)]
    return item, ids, vectors[order], rejected
