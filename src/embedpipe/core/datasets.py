"""Parquet datasets as directories of shards plus a manifest written last.

A dataset folder holds its shards ``part-*.parquet`` at the top and every
side file (manifest, config, progress markers, reports, rejected rows) in a
hidden ``.embedpipe/`` folder, which pandas, pyarrow, DuckDB and Hugging Face
``datasets`` all skip: read as a folder, a dataset is exactly its rows.

A dataset is complete exactly when ``.embedpipe/manifest.json`` exists: it
names every shard, its row count and the dataset kind. Shards are named after a hash of
their bytes, so rewriting a dataset never changes a file an older manifest
still points at, and the same rows always give the same file names and
bytes. Shards no longer listed are removed once the new manifest is in place.

One run writes an output at a time: writers hold the output's lock and keep their
temporary files in its staging folder (see ``core.outputs``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe import __version__
from embedpipe.core import storage
from embedpipe.core.outputs import SIDE_DIR, output_lock, side_path, staging_dir, writes_output
from embedpipe.core.schemas import IMAGES_KIND

MANIFEST_NAME = "manifest.json"
# Where older outputs kept their manifest; only looked for to explain a refusal.
LEGACY_MANIFEST_NAME = "_manifest.json"
CONFIG_NAME = "config.json"
SHARD_PATTERN = re.compile(r"^part-\d{5}-[0-9a-f]{16}\.parquet$")
# What a manifest may name as a shard: a plain file name in the dataset's own folder.
SHARD_NAME = re.compile(r"^part-[A-Za-z0-9_.=-]*\.parquet$")
# A bundle's part: a folder inside the bundle, one or more plain names deep.
PART_NAME = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")
# Encoded images and float vectors do not shrink further; compressing them only costs time.
NO_COMPRESSION_COLUMNS = ("image", "embedding")


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or of the wrong kind."""


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compression_for(schema: pa.Schema) -> dict[str, str]:
    return {name: ("none" if name in NO_COMPRESSION_COLUMNS else "zstd") for name in schema.names}


class DatasetWriter:
    """Streams record batches into shards of at most ``rows_per_shard`` rows.

    Use as a context manager; the manifest is written on a clean exit only.
    """

    def __init__(
        self,
        out_uri: str,
        schema: pa.Schema,
        kind: str,
        rows_per_shard: int,
        row_group_rows: int = 1024,
    ) -> None:
        self.out_uri = storage.normalize(out_uri)
        self.schema = schema
        self.kind = kind
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.shards: list[dict[str, Any]] = []
        self._lock = output_lock(self.out_uri)
        self._lock.__enter__()
        self._staging = tempfile.mkdtemp(prefix="writer-", dir=staging_dir(self.out_uri))
        self._writer: pq.ParquetWriter | None = None
        self._writer_path = ""
        self._rows_in_shard = 0

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.seal()
        finally:
            if self._writer is not None:
                self._writer.close()
            shutil.rmtree(self._staging, ignore_errors=True)
            self._lock.__exit__(exc_type, exc, tb)

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards) + self._rows_in_shard

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        table = table.cast(self.schema) if table.schema != self.schema else table
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open_shard()
            room = self.rows_per_shard - self._rows_in_shard
            chunk = table.slice(offset, room)
            self._writer.write_table(chunk, row_group_size=self.row_group_rows)
            self._rows_in_shard += chunk.num_rows
            offset += chunk.num_rows
            if self._rows_in_shard >= self.rows_per_shard:
                self.seal()

    def _open_shard(self) -> None:
        self._writer_path = os.path.join(self._staging, f"shard-{len(self.shards)}.tmp")
        self._writer = pq.ParquetWriter(
            self._writer_path,
            self.schema,
            compression=_compression_for(self.schema),
            write_statistics=False,
        )
        self._rows_in_shard = 0

    def seal(self) -> None:
        """Publish the shard being written, so ``shards`` is final."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = publish_shard(self.out_uri, len(self.shards), self._writer_path)
        self.shards.append({"path": name, "rows": self._rows_in_shard})
        self._rows_in_shard = 0

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish the manifest, then drop shards of earlier writes. Call last."""
        if not self.shards and self._writer is None:
            self._open_shard()  # an empty dataset still has one shard, so it has a schema
        self.seal()
        return write_manifest(self.out_uri, self.kind, self.shards, extra)


def publish_shard(out_uri: str, index: int, local_path: str) -> str:
    """Move a finished local Parquet file into the dataset under its content-addressed name."""
    name = f"part-{index:05d}-{_file_sha256(local_path)[:16]}.parquet"
    with storage.atomic_output(storage.join(out_uri, name)) as target:
        shutil.move(local_path, target)
    return name


def write_manifest(
    out_uri: str, kind: str, shards: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mark the dataset complete with these shards, then remove shards no longer listed.

    Under the output's lock, and only once every listed shard is there: a manifest never
    names a missing shard.
    """
    manifest = {
        "kind": kind,
        "embedpipe_version": __version__,
        "rows": sum(shard["rows"] for shard in shards),
        "shards": shards,
        **(extra or {}),
    }
    out_uri = storage.normalize(out_uri)
    with output_lock(out_uri) as lock:
        lock.verify_held()
        present = storage.list_names(out_uri)
        missing = [shard["path"] for shard in shards if shard["path"] not in present]
        if missing:
            raise DatasetError(
                f"{out_uri}: shard {missing[0]} vanished before the manifest was written "
                "(something else wrote or cleaned this folder); run the stage again"
            )
        storage.write_json(side_path(out_uri, MANIFEST_NAME), manifest)
        _remove_stale_shards(out_uri, present - {shard["path"] for shard in shards})
    return manifest


def _remove_stale_shards(out_uri: str, names: set[str]) -> None:
    """Delete this dataset's unlisted shards; datasets in subfolders are not its own."""
    for name in sorted(names):
        if SHARD_PATTERN.match(name):
            storage.delete(storage.join(out_uri, name))


def write_table(
    out_uri: str,
    table: pa.Table,
    kind: str,
    extra: dict[str, Any] | None = None,
    rows_per_shard: int = 1_000_000,
) -> dict[str, Any]:
    """Write a whole in-memory table as a dataset (one shard per ``rows_per_shard``)."""
    with DatasetWriter(out_uri, table.schema, kind, rows_per_shard) as writer:
        writer.write(table)
        return writer.finish(extra)


def read_manifest(uri: str, kind: str | None = None) -> dict[str, Any]:
    manifest_uri = side_path(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        reason = "the path is wrong, or the stage that writes it did not finish"
        if storage.exists(storage.join(storage.normalize(uri), LEGACY_MANIFEST_NAME)):
            reason = f"an older embedpipe wrote {LEGACY_MANIFEST_NAME} instead: run the stage again"
        raise DatasetError(
            f"{uri}: not a complete embedpipe dataset (no {SIDE_DIR}/{MANIFEST_NAME}: {reason})"
        )
    manifest = storage.read_json(manifest_uri)
    _check_manifest(manifest_uri, manifest)
    if kind is not None and manifest.get("kind") != kind:
        raise DatasetError(
            f"{uri}: expected a dataset of kind '{kind}', found '{manifest.get('kind')}'"
        )
    return manifest


def _check_manifest(manifest_uri: str, manifest: Any) -> None:
    """Refuse a manifest that is not what embedpipe writes, or that names files outside its
    dataset (a shard path like ``../../etc/hostname``)."""
    if not isinstance(manifest, dict):
        raise DatasetError(
            f"{manifest_uri}: not an embedpipe manifest (a JSON {type(manifest).__name__}, "
            "not an object)"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DatasetError(f"{manifest_uri}: not an embedpipe manifest (no list of shards)")
    for number, shard in enumerate(shards):
        path = shard.get("path") if isinstance(shard, dict) else None
        rows = shard.get("rows") if isinstance(shard, dict) else None
        if not isinstance(path, str) or not isinstance(rows, int):
            raise DatasetError(f"{manifest_uri}: shard {number} needs a path and a row count")
        if not SHARD_NAME.match(path) or ".." in path:
            raise DatasetError(
                f"{manifest_uri}: shard path {path!r} is not a part-*.parquet file of the "
                "dataset's own folder; refusing to read it"
            )
    parts = manifest.get("parts", [])
    if not isinstance(parts, list):
        raise DatasetError(f"{manifest_uri}: 'parts' must be a list of folder names")
    for part in parts:
        if not isinstance(part, str) or not PART_NAME.match(part) or ".." in part.split("/"):
            raise DatasetError(
                f"{manifest_uri}: part {part!r} is not a folder inside the bundle; "
                "refusing to read it"
            )


def verify_dataset(uri: str, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a complete dataset whose every listed shard exists (one listing);
    a bundle's parts are verified in turn. Call it on a stage's inputs before heavy work."""
    manifest = read_manifest(uri, kind)
    present = storage.list_names(storage.normalize(uri))
    missing = [shard["path"] for shard in manifest["shards"] if shard["path"] not in present]
    if missing:
        raise DatasetError(
            f"{uri}: shard {missing[0]} listed in {SIDE_DIR}/{MANIFEST_NAME} is missing "
            f"({len(missing)} of {len(manifest['shards'])} shards missing): the dataset was "
            "changed after it was written; write it again with the stage that made it"
        )
    for part in manifest.get("parts", []):
        verify_dataset(storage.join(storage.normalize(uri), part))
    return manifest


def shard_uris(uri: str, manifest: dict[str, Any]) -> list[str]:
    base = storage.normalize(uri)
    return [storage.join(base, shard["path"]) for shard in manifest["shards"]]


def read_table(uri: str, kind: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset (or some columns of it) in shard order."""
    manifest = read_manifest(uri, kind)
    tables = [read_table_file(shard_uri, columns) for shard_uri in shard_uris(uri, manifest)]
    if not tables:
        raise DatasetError(f"{uri}: the dataset has no shards")
    return pa.concat_tables(tables)


def read_table_file(uri: str, columns: list[str] | None) -> pa.Table:
    """One Parquet file (a shard, or a file that is not a dataset)."""
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def iter_batches(
    uri: str, kind: str | None = None, columns: list[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream the dataset batch by batch; memory stays at one row group."""
    manifest = read_manifest(uri, kind)
    for shard_uri in shard_uris(uri, manifest):
        fs, path = storage.arrow_filesystem(shard_uri)
        with fs.open_input_file(path) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


def image_bytes(images_uri: str, image_ids: set[str]) -> dict[str, bytes]:
    """The encoded bytes of the given images, read from an image dataset in one pass."""
    found: dict[str, bytes] = {}
    for batch in iter_batches(images_uri, IMAGES_KIND, ["image_id", "image"], 512):
        for image_id, data in zip(batch.column(0).to_pylist(), batch.column(1), strict=True):
            if image_id in image_ids and image_id not in found:
                found[image_id] = data.as_py()
        if len(found) == len(image_ids):
            break
    return found


def save_config(out_uri: str, stage: str, config: Any) -> None:
    """Save the resolved stage config with its output (``.embedpipe/config.json``)."""
    payload = {"stage": stage, "config": config.model_dump(mode="json")}
    with output_lock(out_uri):
        storage.write_json(side_path(out_uri, CONFIG_NAME), payload)


def finish_bundle(out_uri: str, kind: str, parts: list[str], extra: dict[str, Any]) -> None:
    """Mark a folder of several datasets complete: its own manifest, in its own
    ``.embedpipe/``, comes last; each part is a dataset folder of its own."""
    manifest = {
        "kind": kind,
        "embedpipe_version": __version__,
        "rows": 0,
        "shards": [],
        "parts": parts,
        **extra,
    }
    with output_lock(out_uri) as lock:
        lock.verify_held()
        storage.write_json(side_path(out_uri, MANIFEST_NAME), manifest)


@writes_output(inputs=("parts",))
def merge_datasets(parts: list[str], out_uri: str, kind: str) -> dict[str, Any]:
    """One dataset of the shards of ``parts``, in order, held in its own folder.

    The fan-out's merge: each part is a complete dataset; their non-empty shards are
    linked (or copied server-side on S3) into ``out_uri`` under sequential names, and
    the manifest, written last, carries the first part's extra fields.
    """
    out_uri = storage.normalize(out_uri)
    manifests = [verify_dataset(part, kind) for part in parts]
    if not manifests:
        raise DatasetError(f"{out_uri}: nothing to merge")
    shards = []
    for part, manifest in zip(parts, manifests, strict=True):
        for shard, source in zip(manifest["shards"], shard_uris(part, manifest), strict=True):
            if shard["rows"] == 0:
                continue
            digest = shard["path"].removesuffix(".parquet").rsplit("-", 1)[-1]
            name = f"part-{len(shards):05d}-{digest}.parquet"
            storage.copy_file(source, storage.join(out_uri, name))
            shards.append({"path": name, "rows": shard["rows"]})
    if not shards:  # an empty dataset keeps one (empty) shard, so it has a schema
        first = manifests[0]["shards"][0]
        storage.copy_file(
            shard_uris(parts[0], manifests[0])[0], storage.join(out_uri, first["path"])
        )
        shards.append(first)
    reserved = {"kind", "embedpipe_version", "rows", "shards"}
    extra = {k: v for k, v in manifests[0].items() if k not in reserved}
    return write_manifest(out_uri, kind, shards, {**extra, "merged_parts": len(parts)})
