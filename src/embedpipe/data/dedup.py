"""dedup: perceptual hashes, duplicate groups and a cross-split leakage report.

Exact duplicates share an ``image_id`` (the content hash). Near duplicates are
images whose perceptual hashes (``fingerprints``: phash, dhash, whash or
colorhash) are within ``max_distance`` bits. Hashing runs in worker processes,
and JPEGs are decoded in draft mode at the small size the hash needs. The near-duplicate
search uses faiss's multi-index hashing (``IndexBinaryMultiHash``), which looks
up only codes that share a hash-table bucket up to a few bit flips instead of
comparing all pairs; with ``nflip >= max_distance // nhash`` it is exact by the
pigeonhole principle. Rows linked by either kind of duplicate are grouped with
union-find; a group leaks when its rows sit in more than one split.
"""

import collections
import functools
import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from embedpipe.config import DedupSettings
from embedpipe.core import datasets, outputs, parallel, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import (
    DEDUP_GROUPS_SCHEMA,
    DEDUP_KIND,
    IMAGES_KIND,
    SELECTION_KIND,
    SPLITS_KIND,
)
from embedpipe.data.dedup_report import render_report
from embedpipe.data.fingerprints import code_bytes, fingerprint_chunk

log = logging.getLogger(__name__)

META_COLUMNS = ["image_id", "source", "category", "concept", "split"]
# The representative of a group comes from the earliest split in this order.
SPLIT_ORDER = {"train": 0, "val": 1, "val-support": 1, "val-query": 2, "test": 3, "unused": 4}
NO_SPLIT = "none"
HASH_CHUNK = 64
REPORT_HTML = "dedup_report.html"
LEAKAGE_JSON = "leakage.json"
MULTIHASH_BITS = 16  # bits per hash table
MAX_FLIPS = 3  # beyond this, probing costs more than comparing every pair


@dataclass(frozen=True)
class DedupResult(StageMetrics):
    out_uri: str
    images: int
    distinct_images: int
    unreadable: int
    groups: int
    exact_duplicate_images: int
    near_duplicate_images: int
    leaking_groups: int
    dropped: int
    kept: int
    seconds: float


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


def near_pairs(codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows of packed ``codes`` within ``max_distance`` bits."""
    count, nbytes = codes.shape
    bits = nbytes * 8
    nhash = max(1, bits // MULTIHASH_BITS)
    if count == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if bits >= 2 * MULTIHASH_BITS and max_distance // nhash <= MAX_FLIPS:
        index = faiss.IndexBinaryMultiHash(bits, nhash, MULTIHASH_BITS)
        index.nflip = max_distance // nhash
    else:
        index = faiss.IndexBinaryFlat(bits)
    index.add(codes)
    limits, _, neighbours = index.range_search(codes, max_distance + 1)  # radius is exclusive
    queries = np.repeat(np.arange(count), np.diff(limits.astype(np.int64)))
    upper = queries < neighbours
    return queries[upper], neighbours[upper].astype(np.int64)


class UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _read_meta(images_uri: str, splits_uri: str | None) -> pa.Table:
    """Rows to group, with the split each image plays.

    From a concept-split dataset, validation images are ``val-support`` (catalog
    train) or ``val-query`` (catalog test): a query that copies a support image
    leaks, though both sit in "val".
    """
    if not splits_uri:
        table = datasets.read_table(images_uri, IMAGES_KIND, columns=META_COLUMNS)
        split = pc.fill_null(table.column("split"), NO_SPLIT)
        return table.set_column(table.schema.get_field_index("split"), "split", split)
    if datasets.read_manifest(splits_uri).get("kind") != SPLITS_KIND:
        return datasets.read_table(splits_uri, columns=META_COLUMNS)
    table = datasets.read_table(splits_uri, columns=[*META_COLUMNS, "catalog_split"])
    roles = {"train": "val-support", "test": "val-query"}
    split = [
        roles.get(catalog_split, split) if split == "val" else split
        for split, catalog_split in zip(
            table.column("split").to_pylist(),
            table.column("catalog_split").to_pylist(),
            strict=True,
        )
    ]
    table = table.drop_columns(["catalog_split"])
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(split))


def hash_images(
    images_uri: str, wanted: dict[str, int], config: DedupSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Packed hashes indexed like ``wanted``, and which images could be decoded."""
    nbytes = code_bytes(config.hash, config.hash_size)
    codes = np.zeros((len(wanted), nbytes), dtype=np.uint8)
    readable = np.zeros(len(wanted), dtype=bool)
    done: set[str] = set()

    def chunks():
        for batch in datasets.iter_batches(images_uri, IMAGES_KIND, ["image_id", "image"], 256):
            ids = batch.column(0).to_pylist()
            todo = [(i, row) for row, i in enumerate(ids) if i in wanted and i not in done]
            done.update(i for i, _ in todo)
            images = batch.column(1)
            for part in parallel.chunked(todo, HASH_CHUNK):
                yield [i for i, _ in part], [images[row].as_py() for _, row in part]

    hasher = functools.partial(fingerprint_chunk, method=config.hash, hash_size=config.hash_size)
    with tqdm(total=len(wanted), desc="dedup hashes", unit="img", disable=None) as progress:
        for ids, hashes in parallel.map_chunks(hasher, chunks(), config.workers):
            for image_id, value in zip(ids, hashes, strict=True):
                if value is not None:
                    codes[wanted[image_id]] = np.frombuffer(value, dtype=np.uint8)
                    readable[wanted[image_id]] = True
            progress.update(len(ids))
    return codes, readable


@outputs.writes_output(inputs=("images_uri", "splits_uri"))
def find_duplicates(
    images_uri: str,
    out_uri: str,
    config: DedupSettings,
    splits_uri: str | None = None,
    kept_uri: str | None = None,
) -> DedupResult:
    """Hash, group, report leakage and write the kept selection (``OUT/kept`` by default)."""
    started = time.perf_counter()
    out_uri = storage.normalize(out_uri)
    kept_uri = kept_uri or storage.join(out_uri, "kept")
    storage.check_output_apart(kept_uri, [images_uri, splits_uri])
    datasets.verify_dataset(images_uri, IMAGES_KIND)
    if splits_uri:
        datasets.verify_dataset(splits_uri)
    meta = _read_meta(images_uri, splits_uri)
    columns = {name: meta.column(name).to_pylist() for name in META_COLUMNS}
    ids = list(dict.fromkeys(columns["image_id"]))
    position = {image_id: k for k, image_id in enumerate(ids)}
    codes, readable = hash_images(images_uri, position, config)

    links = UnionFind(len(ids))
    usable = np.flatnonzero(readable)
    first, second = near_pairs(np.ascontiguousarray(codes[usable]), config.max_distance)
    for a, b in zip(usable[first].tolist(), usable[second].tolist(), strict=True):
        links.union(a, b)
    rows_by_root: dict[int, list[int]] = collections.defaultdict(list)
    for row, image_id in enumerate(columns["image_id"]):
        rows_by_root[links.find(position[image_id])].append(row)
    groups = [rows for rows in rows_by_root.values() if len(rows) > 1]

    def rank(row: int) -> tuple:
        return (SPLIT_ORDER.get(columns["split"][row], len(SPLIT_ORDER)), columns["source"][row])

    groups.sort(key=lambda rows: (-len(rows), min(columns["source"][r] for r in rows)))
    records, dropped = [], set()
    leaking_groups = 0
    exact_rows = near_rows = 0
    for group_id, rows in enumerate(groups):
        rows.sort(key=rank)
        representative = rows[0]
        rep_code = codes[position[columns["image_id"][representative]]]
        leaks = len({columns["split"][r] for r in rows}) > 1
        leaking_groups += leaks
        if config.drop == "duplicates" or (config.drop == "leaking" and leaks):
            dropped.update(rows[1:])
        id_counts = collections.Counter(columns["image_id"][r] for r in rows)
        for row in rows:
            image_id = columns["image_id"][row]
            exact = id_counts[image_id] > 1
            exact_rows += exact
            near_rows += not exact
            records.append(
                {
                    "group_id": group_id,
                    **{name: columns[name][row] for name in META_COLUMNS},
                    "representative": row == representative,
                    "exact": exact,
                    "distance": int(hamming(codes[position[image_id]], rep_code)),
                    "leaks": leaks,
                }
            )

    leakage = _leakage_summary(records)
    kept_rows = [row for row in range(meta.num_rows) if row not in dropped]
    _write_outputs(out_uri, ids, codes, readable, records, leakage, config)
    datasets.write_table(
        kept_uri, meta.take(kept_rows), SELECTION_KIND, extra={"drop": config.drop}
    )
    report = render_report(images_uri, records, leakage, config)
    storage.write_bytes(datasets.side_path(out_uri, REPORT_HTML), report.encode("utf-8"))
    datasets.save_config(out_uri, "dedup", config)
    result = DedupResult(
        out_uri=out_uri,
        images=meta.num_rows,
        distinct_images=len(ids),
        unreadable=int((~readable).sum()),
        groups=len(groups),
        exact_duplicate_images=exact_rows,
        near_duplicate_images=near_rows,
        leaking_groups=leaking_groups,
        dropped=len(dropped),
        kept=len(kept_rows),
        seconds=round(time.perf_counter() - started, 3),
    )
    datasets.finish_bundle(
        out_uri,
        DEDUP_KIND,
        ["fingerprints", "groups"],
        {"metrics": result.metrics(), "kept": kept_uri},
    )
    log.info("dedup: %s", result.metrics())
    return result


def _leakage_summary(records: list[dict]) -> dict:
    by_category: dict[str, dict] = {}
    leaking = {}
    for record in records:
        if record["leaks"]:
            leaking.setdefault(record["group_id"], []).append(record)
    for members in leaking.values():
        category = members[0]["category"]
        entry = by_category.setdefault(category, {"groups": 0, "images": 0, "splits": {}})
        entry["groups"] += 1
        entry["images"] += len(members)
        key = "+".join(sorted({m["split"] for m in members}, key=lambda s: SPLIT_ORDER.get(s, 9)))
        entry["splits"][key] = entry["splits"].get(key, 0) + 1
    return {"leaking_groups": len(leaking), "by_category": by_category}


def _write_outputs(out_uri, ids, codes, readable, records, leakage, config) -> None:
    hashes = [codes[k].tobytes().hex() if readable[k] else None for k in range(len(ids))]
    fingerprints = pa.table({"image_id": ids, "hash": hashes})
    meta = {"hash": config.hash, "hash_size": config.hash_size}
    datasets.write_table(
        storage.join(out_uri, "fingerprints"), fingerprints, "fingerprints", extra=meta
    )
    datasets.write_table(
        storage.join(out_uri, "groups"),
        pa.Table.from_pylist(records, DEDUP_GROUPS_SCHEMA),
        "duplicate-groups",
    )
    storage.write_json(datasets.side_path(out_uri, LEAKAGE_JSON), leakage)
