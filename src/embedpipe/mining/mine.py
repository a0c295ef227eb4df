"""mine: per-category hard negatives from a faiss kNN index, with difficulty bands.

For one category, every query image (from ``query_splits``) gets its nearest
images of *other* concepts of the same category among the candidates (from
``candidate_splits``: train against train by default, so held-out images never
become training negatives), their similarity scores, its positives (the other
candidates of its concept) and a difficulty band per negative. Bands cut the
category's negative scores at quantiles: the highest similarities are the
hardest.

The index is exact inner product (cosine on normalised vectors) up to
``exact_max`` candidates; above it, IVF or HNSW, with recall@top_k against the
exact search measured on a sample of queries and reported. faiss runs on a
GPU when the installed faiss has GPU support and a GPU is present.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
import pyarrow as pa

from embedpipe.config import MineSettings
from embedpipe.core import datasets, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import NEGATIVES_KIND, NEGATIVES_SCHEMA, PARTITION_KIND
from embedpipe.mining.partition import partition_vectors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineResult(StageMetrics):
    out_uri: str
    category: str
    queries: int
    candidates: int
    index: str
    recall: float  # recall@top_k of the index against exact search (1.0 when exact)
    seconds: float
    skipped: str = ""  # why the category produced no rows
    band_edges: list[float] = field(default_factory=list)


def build_index(vectors: np.ndarray, config: MineSettings) -> tuple[faiss.Index, str]:
    count, dim = vectors.shape
    kind = config.index
    if kind == "auto":
        kind = "flat" if count <= config.exact_max else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        nlist = max(1, min(count // 39, int(4 * math.sqrt(count))))  # faiss wants 39 per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(config.ivf_nprobe, nlist)
    if config.gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
        kind += "-gpu"
    index.add(vectors)
    return index, kind


def measure_recall(
    index, candidates: np.ndarray, queries: np.ndarray, k: int, config: MineSettings
) -> float:
    """recall@k of ``index`` against exact search, on up to ``recall_sample`` queries."""
    rng = np.random.default_rng(config.seed)
    sample = queries[rng.permutation(len(queries))[: config.recall_sample]]
    exact = faiss.IndexFlatIP(candidates.shape[1])
    exact.add(candidates)
    _, truth = exact.search(sample, k)
    _, found = index.search(sample, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / truth.size if truth.size else 1.0


def assign_bands(scores: np.ndarray, config: MineSettings) -> tuple[np.ndarray, list[float]]:
    """Band index per score (0 = easiest) and the score edges between bands."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64), []
    edges = np.quantile(scores, config.band_quantiles).tolist()
    return np.searchsorted(edges, scores, side="right"), edges


@datasets.writes_output(inputs=("partition_uri",))
def mine_category(partition_uri: str, out_uri: str, config: MineSettings) -> MineResult:
    """Hard negatives for the category of one partition, written as a dataset at ``out_uri``."""
    started = time.perf_counter()
    out_uri = storage.normalize(out_uri)
    category = datasets.verify_dataset(partition_uri, PARTITION_KIND)["category"]
    rows = datasets.read_table(partition_uri, PARTITION_KIND)
    splits = np.array(rows.column("split").to_pylist(), dtype=object)
    concepts = np.array(rows.column("concept").to_pylist(), dtype=object)
    ids = np.array(rows.column("image_id").to_pylist(), dtype=object)
    is_query = np.isin(splits, list(config.query_splits))
    is_candidate = np.isin(splits, list(config.candidate_splits))
    skipped = ""
    if rows.num_rows == 0:
        skipped = "no embedded images in this category"
    elif len(set(concepts[is_candidate])) < 2:
        skipped = "fewer than two concepts among the candidates"
    elif not is_query.any():
        skipped = f"no query images in splits {', '.join(config.query_splits)}"
    if skipped:
        log.info("mine %s: skipped: %s", category, skipped)
        elapsed = round(time.perf_counter() - started, 3)
        result = MineResult(out_uri, category, 0, 0, "-", 1.0, elapsed, skipped)
        return _finish(out_uri, NEGATIVES_SCHEMA.empty_table(), result)

    vectors = partition_vectors(rows)
    candidate_rows = np.flatnonzero(is_candidate)
    query_rows = np.flatnonzero(is_query)
    index, kind = build_index(vectors[candidate_rows], config)
    largest_concept = max(np.unique(concepts[candidate_rows], return_counts=True)[1])
    k = min(len(candidate_rows), config.top_k + int(largest_concept) + 1)
    scores, neighbours = index.search(vectors[query_rows], k)
    recall = 1.0
    if not kind.startswith("flat"):
        recall = measure_recall(
            index,
            vectors[candidate_rows],
            vectors[query_rows],
            min(config.top_k, len(candidate_rows)),
            config,
        )

    _, concept_codes = np.unique(concepts, return_inverse=True)
    negatives, negative_scores, counts = _first_other_concepts(
        candidate_rows[neighbours.clip(min=0)],
        scores,
        neighbours >= 0,
        query_rows,
        concept_codes,
        config.top_k,
    )
    bands, edges = assign_bands(negative_scores, config)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    dictionary = pa.array(ids.tolist(), pa.string())
    positive_offsets, positive_rows = _positives(query_rows, candidate_rows, concept_codes)
    table = pa.table(
        {
            "query_id": pa.array(ids[query_rows].tolist(), pa.string()),
            "category": pa.array([category] * len(query_rows), pa.string()),
            "concept": pa.array(concepts[query_rows].tolist(), pa.string()),
            "positive_ids": pa.ListArray.from_arrays(
                pa.array(positive_offsets, pa.int32()),
                pa.DictionaryArray.from_arrays(pa.array(positive_rows, pa.int32()), dictionary),
            ),
            "negative_ids": pa.ListArray.from_arrays(
                pa.array(offsets),
                pa.DictionaryArray.from_arrays(pa.array(negatives, pa.int32()), dictionary),
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
        kind,
        round(recall, 4),
        round(time.perf_counter() - started, 3),
        "",
        edges,
    )
    log.info(
        "mine %s: %d queries, %d candidates, %s index, recall %.3f",
        category,
        result.queries,
        result.candidates,
        kind,
        recall,
    )
    return _finish(out_uri, table, result)


def _first_other_concepts(hits, scores, found, query_rows, concept_codes, top_k):
    """Per query, its first ``top_k`` hits of another concept.

    Rows of a partition are distinct images, so another concept is also another image.
    Returns the hit rows and scores, flattened query by query, and the count per query.
    """
    keep = found & (concept_codes[hits] != concept_codes[query_rows][:, None])
    keep &= np.cumsum(keep, axis=1) <= top_k
    return hits[keep], scores[keep], keep.sum(axis=1)


def _positives(query_rows: np.ndarray, candidate_rows: np.ndarray, concept_codes: np.ndarray):
    """List offsets and rows: each query's concept-mates among the candidates, itself excluded."""
    order = np.argsort(concept_codes[candidate_rows], kind="stable")
    sorted_rows = candidate_rows[order]
    starts = np.searchsorted(concept_codes[sorted_rows], concept_codes[query_rows], side="left")
    ends = np.searchsorted(concept_codes[sorted_rows], concept_codes[query_rows], side="right")
    lists = [
        group[group != query]
        for group, query in zip(
            (sorted_rows[a:b] for a, b in zip(starts, ends, strict=True)), query_rows, strict=True
        )
    ]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int32)
    rows = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return offsets, rows


def _finish(out_uri: str, table: pa.Table, result: MineResult) -> MineResult:
    summary = {k: v for k, v in asdict(result).items() if k != "out_uri"}
    datasets.write_table(out_uri, table, NEGATIVES_KIND, extra={"mining": summary})
    return result
