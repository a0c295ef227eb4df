"""mine: per-category hard negatives from a faiss kNN index, with difficulty bands.

For one category, every query image (from ``query_splits``) gets its nearest
images of *other* concepts of the same category among the candidates (from
``candidate_splits``: train against train by default, so held-out images never
become training negatives), their similarity scores, its positives (the other
candidates of its concept) and a difficulty band per negative. Bands cut the
category's negative scores at quantiles: the highest similarities are the
hardest.

A query's own concept-mates are usually its nearest neighbours, so the search
goes ``top_k + largest concept + 1`` deep and keeps the first ``top_k`` hits of
other concepts. The index is exact inner product (cosine on normalised vectors)
up to ``exact_max`` candidates; above it, IVF or HNSW, whose search breadth
(nprobe, efSearch) grows with that depth: the negatives sit past the
concept-mates. With an approximate index, recall is measured on what is
written: the share of the exact other-concept negatives (exact search on a
sample of queries) that the written negatives hold; below ``min_recall`` the
category fails. Searching with an ID selector that leaves the concept out
finds no more (the graph and the lists are walked the same way) and costs a
search per concept. faiss runs on a GPU when the installed faiss has GPU support
and a GPU is present (flat and IVF; HNSW has no GPU version).
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.config import MineSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import NEGATIVES_KIND, NEGATIVES_SCHEMA
from embedpipe.mining.partition import Partition, read_partition

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU searches at most this many neighbours and probes this many lists


@dataclass(frozen=True)
class MineResult(StageMetrics):
    out_uri: str
    category: str
    queries: int
    candidates: int
    index: str
    # share of the exact other-concept negatives that the written negatives hold, on up
    # to recall_sample queries (1.0 when the index is exact)
    recall: float
    seconds: float
    skipped: str = ""  # why the category produced no rows
    band_edges: list[float] = field(default_factory=list)
    search_depth: int = 0  # neighbours searched per query: top_k + largest concept + 1
    search_breadth: int = 0  # nprobe (IVF) or efSearch (HNSW) searched with; 0 when exact


@dataclass(frozen=True)
class Search:
    index: faiss.Index
    kind: str  # flat, ivf or hnsw, with "-gpu" when on a GPU
    breadth: int  # nprobe or efSearch; 0 for flat


def build_index(vectors: np.ndarray, depth: int, config: MineSettings) -> Search:
    """An index over ``vectors`` that searches ``depth`` neighbours per query."""
    count, dim = vectors.shape
    kind = config.index
    if kind == "auto":
        kind = "flat" if count <= config.exact_max else "ivf"
    breadth = 0
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        # efSearch below the depth returns fewer than depth hits: the concept-mates only
        breadth = index.hnsw.efSearch = depth + config.hnsw_ef_search
    else:
        nlist = max(1, min(count // 39, int(4 * math.sqrt(count))))  # faiss wants 39 per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        # the lists a query's first `depth` neighbours fill hold mostly its own concept
        breadth = index.nprobe = min(nlist, config.ivf_nprobe + math.ceil(depth * nlist / count))
    if _gpu_available(config) and kind != "hnsw" and max(depth, breadth) <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
        kind += "-gpu"
    elif _gpu_available(config):
        log.info("%s index with depth %d, breadth %d: searching on the CPU", kind, depth, breadth)
    index.add(vectors)
    return Search(index, kind, breadth)


def _gpu_available(config: MineSettings) -> bool:
    return config.gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def measure_recall(
    candidates: np.ndarray,
    queries: np.ndarray,
    negatives: np.ndarray,
    offsets: np.ndarray,
    is_other_concept,
    depth: int,
    config: MineSettings,
) -> float:
    """Share of the exact negatives among those written, on up to ``recall_sample`` queries.

    Query q's negatives are candidate numbers ``negatives[offsets[q]:offsets[q + 1]]``;
    ``is_other_concept(sample, found)`` masks the hits of other concepts than each query's.
    """
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(len(queries))[: config.recall_sample])
    exact = faiss.IndexFlatIP(candidates.shape[1])
    exact.add(candidates)
    _, found = exact.search(queries[sample], depth)
    keep = (found >= 0) & is_other_concept(sample, found.clip(min=0))
    keep &= np.cumsum(keep, axis=1) <= config.top_k
    truth = [set(row[mask].tolist()) for row, mask in zip(found, keep, strict=True)]
    hits = sum(
        len(t.intersection(negatives[offsets[q] : offsets[q + 1]].tolist()))
        for t, q in zip(truth, sample, strict=True)
    )
    expected = sum(len(t) for t in truth)
    return hits / expected if expected else 1.0


def assign_bands(scores: np.ndarray, config: MineSettings) -> tuple[np.ndarray, list[float]]:
    """Band index per score (0 = easiest) and the score edges between bands."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64), []
    edges = np.quantile(scores, config.band_quantiles).tolist()
    return np.searchsorted(edges, scores, side="right"), edges


@outputs.writes_output()
def mine_category(partition: str | Partition, out_uri: str, config: MineSettings) -> MineResult:
    """Hard negatives for the category of one partition (a partition dataset's URI, or the
    partition in memory), written as a dataset at ``out_uri``.

    Raises ValueError, writing nothing, when an approximate index finds fewer of the exact
    negatives than ``config.min_recall``.
    """
    started = time.perf_counter()
    out_uri = storage.normalize(out_uri)
    if isinstance(partition, str):
        storage.check_output_apart(out_uri, [partition])
        partition = read_partition(partition)
    category, rows = partition.category, partition.table
    splits = rows.column("split")
    is_query = pc.is_in(splits, pa.array(config.query_splits, pa.string()))
    is_query = is_query.to_numpy(zero_copy_only=False)
    is_candidate = pc.is_in(splits, pa.array(config.candidate_splits, pa.string()))
    is_candidate = is_candidate.to_numpy(zero_copy_only=False)
    concepts = rows.column("concept").combine_chunks().dictionary_encode()
    concept_codes = concepts.indices.to_numpy(zero_copy_only=False)
    skipped = ""
    if rows.num_rows == 0:
        skipped = "no embedded images in this category"
    elif len(np.unique(concept_codes[is_candidate])) < 2:
        skipped = "fewer than two concepts among the candidates"
    elif not is_query.any():
        skipped = f"no query images in splits {', '.join(config.query_splits)}"
    if skipped:
        log.info("mine %s: skipped: %s", category, skipped)
        elapsed = round(time.perf_counter() - started, 3)
        result = MineResult(out_uri, category, 0, 0, "-", 1.0, elapsed, skipped)
        return _finish(out_uri, NEGATIVES_SCHEMA.empty_table(), result)

    vectors = partition.vectors()
    candidate_rows = np.flatnonzero(is_candidate)
    query_rows = np.flatnonzero(is_query)
    candidates = _rows_of(vectors, candidate_rows)
    queries = _rows_of(vectors, query_rows)
    largest_concept = np.bincount(concept_codes[candidate_rows]).max()
    depth = min(len(candidate_rows), config.top_k + int(largest_concept) + 1)
    search = build_index(candidates, depth, config)
    scores, neighbours = search.index.search(queries, depth)
    candidate_codes, query_codes = concept_codes[candidate_rows], concept_codes[query_rows]
    negatives, negative_scores, counts = _first_other_concepts(
        neighbours, scores, query_codes, candidate_codes, config.top_k
    )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    recall = 1.0
    if not search.kind.startswith("flat"):
        recall = measure_recall(
            candidates,
            queries,
            negatives,
            offsets,
            lambda sample, found: candidate_codes[found] != query_codes[sample][:, None],
            depth,
            config,
        )
        if recall < config.min_recall:
            raise ValueError(
                f"mine {category}: the {search.kind} index (breadth {search.breadth}) found "
                f"{recall:.3f} of the exact negatives, below [mine].min_recall "
                f"{config.min_recall}: raise ivf_nprobe or hnsw_ef_search, or use index flat"
            )
    negatives = candidate_rows[negatives]  # partition rows, which index the id dictionary
    bands, edges = assign_bands(negative_scores, config)
    ids = rows.column("image_id").combine_chunks()
    positive_offsets, positive_rows = _positives(query_rows, candidate_rows, concept_codes)
    table = pa.table(
        {
            "query_id": ids.take(pa.array(query_rows)),
            "category": pa.array([category] * len(query_rows), pa.string()),
            "concept": concepts.dictionary.take(pa.array(concept_codes[query_rows])),
            "positive_ids": pa.ListArray.from_arrays(
                pa.array(positive_offsets, pa.int32()),
                pa.DictionaryArray.from_arrays(pa.array(positive_rows, pa.int32()), ids),
            ),
            "negative_ids": pa.ListArray.from_arrays(
                pa.array(offsets),
                pa.DictionaryArray.from_arrays(pa.array(negatives, pa.int32()), ids),
            ),
            "negative_scores": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(negative_scores, pa.float32())
            ),
            "band": pa.ListArray.from_arrays(
                pa.array(offsets),
                pa.DictionaryArray.from_arrays(
                    pa.array(bands, pa.int8()), pa.array(list(config.band_names), pa.string())
                ),
            ),
        },
        schema=NEGATIVES_SCHEMA,
    )
    result = MineResult(
        out_uri,
        category,
        len(query_rows),
        len(candidate_rows),
        search.kind,
        round(recall, 4),
        round(time.perf_counter() - started, 3),
        "",
        edges,
        depth,
        search.breadth,
    )
    log.info(
        "mine %s: %d queries, %d candidates, %s index, depth %d, recall %.3f",
        category,
        result.queries,
        result.candidates,
        search.kind,
        depth,
        recall,
    )
    return _finish(out_uri, table, result)


def _rows_of(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``vectors[rows]``, without a copy when ``rows`` is every row in order."""
    return vectors if len(rows) == len(vectors) else vectors[rows]


def _first_other_concepts(neighbours, scores, query_codes, candidate_codes, top_k):
    """Per query, its first ``top_k`` hits of another concept (candidate numbers).

    Rows of a partition are distinct images, so another concept is also another image.
    Returns the hits and scores, flattened query by query, and the count per query.
    """
    found = neighbours >= 0
    keep = found & (candidate_codes[neighbours.clip(min=0)] != query_codes[:, None])
    keep &= np.cumsum(keep, axis=1) <= top_k
    return neighbours[keep], scores[keep], keep.sum(axis=1)


def _positives(query_rows: np.ndarray, candidate_rows: np.ndarray, concept_codes: np.ndarray):
    """List offsets and rows: each query's concept-mates among the candidates, itself excluded."""
    order = np.argsort(concept_codes[candidate_rows], kind="stable")
    sorted_rows = candidate_rows[order]
    sorted_codes = concept_codes[sorted_rows]
    query_codes = concept_codes[query_rows]
    starts = np.searchsorted(sorted_codes, query_codes, side="left")
    ends = np.searchsorted(sorted_codes, query_codes, side="right")
    # every query's concept range laid end to end, then the query itself taken out
    lengths = ends - starts
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(query_rows)), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = sorted_rows[np.repeat(starts, lengths) + within]
    is_self = rows == query_rows[owner]
    rows = rows[~is_self]
    counts = lengths - np.bincount(owner[is_self], minlength=len(query_rows))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return offsets, rows


def _finish(out_uri: str, table: pa.Table, result: MineResult) -> MineResult:
    summary = {k: v for k, v in asdict(result).items() if k != "out_uri"}
    datasets.write_table(out_uri, table, NEGATIVES_KIND, extra={"mining": summary})
    return result
