"""embed: Parquet image shards -> Parquet embeddings, the stage on the engine.

The engine is ``runtime`` (device, precision, batch and worker sizing), ``pixels``
(decoding and preprocessing, ``[embed].preprocess``) and ``loader`` (shards -> vectors).
This stage adds what a run needs around it: each input shard becomes one output shard,
and a marker is written after it, so a killed run started again with the same settings
resumes after its finished shards; files that cannot be decoded are skipped and listed
in ``.embedpipe/rejected.parquet``; the manifest is written last. The model name,
dimension, weights source and normalisation go into the Parquet schema metadata.
"""

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.finite import check_embeddings
from embedpipe.core.rejected import REJECTED_NAME, write_rejected
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import EMBEDDINGS_KIND, IMAGES_KIND
from embedpipe.embed.loader import ShardWork, embedded_shards, plan_work
from embedpipe.embed.prefix import prefix_model
from embedpipe.embed.runtime import (
    loader_options,
    prepare_inference,
    resolve_device,
    resolve_preprocess,
)
from embedpipe.models.loading import RANDOM_WEIGHTS, LoadedModel, load_model
from embedpipe.models.precision import resolve_name
from embedpipe.models.registry import ModelEntry, get_entry

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


@dataclass(frozen=True)
class EmbedResult(StageMetrics):
    out_uri: str
    embedded: int
    resumed_shards: int
    dim: int
    seconds: float
    rejected: int = 0


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


def _fingerprint(
    entry: ModelEntry, config: EmbedSettings, device: torch.device, inputs: list, select: str
) -> str:
    identity = {
        "entry": entry.model_dump(mode="json"),
        "settings": config.model_dump(
            mode="json", include={"weights", "seed", "normalize", "draft_decode", "dim"}
        ),
        # resolved: "auto" on another device embeds differently
        "precision": resolve_name(config.precision, device),
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
    options = loader_options(config, device)
    schema = embedding_schema(model, config.normalize)
    names = [s["path"] for s in manifest["shards"]]
    fingerprint = _fingerprint(entry, config, device, [*names, list(shard_group)], select_uri or "")
    finished = finished_shards(out_uri, fingerprint)
    work, shards, rejected = plan_work(images_uri, wanted, finished, out_uri, shard_group)
    resumed = len(shards)
    embedded = 0
    total = sum(len(item.rows) for item in work)
    progress = tqdm(total=total, desc=f"embed {entry.name}", unit="img", disable=None)
    with progress:
        for item, ids, vectors, failed in embedded_shards(work, inference, options, progress):
            check_embeddings(vectors, entry.name, item.name)
            shard = write_embedded_shard(out_uri, item, ids, vectors, schema, fingerprint, failed)
            shards[item.index] = shard
            rejected.extend(failed)
            embedded += shard["rows"]
    finish_embeddings(
        out_uri,
        EMBEDDINGS_KIND,
        shards,
        rejected,
        config,
        model,
        entry.embed_dim,
        shard_group=list(shard_group),
    )
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


def finished_shards(out_uri: str, fingerprint: str) -> dict[str, dict]:
    markers = storage.list_files(datasets.side_path(out_uri, PROGRESS_DIR))
    finished = {}
    for marker in markers:
        record = storage.read_json(marker.uri)
        shard_uri = storage.join(out_uri, record["shard"]["path"])
        if record.get("fingerprint") == fingerprint and storage.exists(shard_uri):
            finished[record["input"]] = record
    return finished


def finish_embeddings(
    out_uri: str,
    kind: str,
    shards: dict[int, dict],
    rejected: list[tuple[str, str]],
    config: EmbedSettings,
    model: LoadedModel,
    dim: int,
    **extra,
) -> None:
    """The side files, then the manifest (last) of an embeddings dataset whose ``shards``
    are all written; the progress records go once the manifest stands."""
    datasets.save_config(out_uri, "embed", config)
    write_rejected(out_uri, rejected)
    random = model.weights_source == RANDOM_WEIGHTS
    datasets.write_manifest(
        out_uri,
        kind,
        [shards[index] for index in sorted(shards)],
        {
            "model": model.entry.name,
            "dim": dim,
            "weights": model.weights_source,
            **({"seed": config.seed} if random else {}),
            "normalized": config.normalize,
            **extra,
        },
    )
    storage.delete_tree(datasets.side_path(out_uri, PROGRESS_DIR))


def write_embedded_shard(
    out_uri: str,
    item: ShardWork,
    ids: pa.Array | list[str],
    vectors: np.ndarray,
    schema: pa.Schema,
    fingerprint: str,
    failed: list[tuple[str, str]],
) -> dict:
    """Publish the vectors of input shard ``item`` as an output shard, then its progress
    record (which a resumed run with the same fingerprint takes as done); the shard."""
    dim = schema.field("embedding").type.list_size
    table = pa.table(
        {
            "image_id": ids,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), dim
            ),
        },
        schema=schema,
    )
    shard = _publish(out_uri, item.index, table)
    storage.write_json(
        datasets.side_path(out_uri, PROGRESS_DIR, f"{item.name}.json"),
        {"input": item.name, "shard": shard, "fingerprint": fingerprint, "rejected": failed},
    )
    return shard


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
