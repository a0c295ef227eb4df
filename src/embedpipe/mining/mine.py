"""mine: per-category hard negatives from a faiss kNN index, with difficulty bands.

For one category, every query image (from ``query_splits``) gets its nearest
images of *other* concepts of the same category among the candidates (from
``candidate_splits``: train against train by default, so held-out images never
become training negatives), their similarity scores, its positives (the other
candidates of its concept) and a difficulty band per negative. Bands cut the
category's negative scores at quantiles: the highest similarities are the
hardest.

A query's own concept-mates are usually its nearest neighbours, so the search
goes ``last rank + largest concept + 1`` deep (the last rank is ``top_k`` unless a
rank window, a score filter or random sampling asks for more; see config/mining.py) and
selects from the hits of other concepts as mining/filters.py describes: by default the
first ``top_k``. Per-category statistics (positive and negative score distributions,
candidates each filter dropped) go into the result, hence the manifest and the metrics.

The index is exact inner product (cosine on normalised vectors) up to ``exact_max``
candidates; above it, IVF or HNSW, whose search breadth (nprobe, efSearch) grows with
that depth: the negatives sit past the concept-mates. With an approximate index, recall
is measured on what is written: the share of the exact selection (exact search on a
sample of queries, the same filters; with random sampling, the candidates drawn from)
that the written selection holds; below ``min_recall`` the category fails. Searching
with an ID selector that leaves the concept out finds no more (the graph and the lists
are walked the same way) and costs a search per concept. faiss runs on a GPU when the
installed faiss has GPU support and a GPU is present (flat and IVF; HNSW has no GPU
version).
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.config import MineSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import NEGATIVES_KIND, NEGATIVES_SCHEMA
from embedpipe.mining.filters import choose, filter_candidates, positive_scores
from embedpipe.mining.partition import Partition, read_partition
from embedpipe.mining.stats import score_statistics

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
    search_depth: int = 0  # neighbours searched per query: last rank + largest concept + 1
    search_breadth: int = 0  # nprobe (IVF) or efSearch (HNSW) searched with; 0 when exact
    # the false-negative filters (mining/filters.py), counted over every query
    negatives: int = 0  # written
    short_queries: int = 0  # queries written fewer than top_k negatives
    queries_without_positives: int = 0  # not margin-filtered
    skipped_rank_min: int = 0  # other-concept candidates ranked before rank_min
    window: int = 0  # other-concept candidates ranked rank_min to the last rank
    dropped_margin: int = 0
    dropped_relative_margin: int = 0
    dropped_max_score: int = 0
    filters: dict = field(default_factory=dict)  # the settings, the last rank resolved
    scores: dict = field(default_factory=dict)  # positive/negative/dropped distributions


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
    written: Callable[[int], np.ndarray],
    select: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    depth: int,
    config: MineSettings,
) -> float:
    """Share of the exact selection that the written one holds, on up to ``recall_sample``
    queries.

    ``written(q)``: the candidate numbers selected for query q from the index searched;
    ``select(sample, scores, found)``: the mask of what the same selection takes from an
    exact search's results for the queries ``sample``.
    """
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.permutation(len(queries))[: config.recall_sample])
    exact = faiss.IndexFlatIP(candidates.shape[1])
    exact.add(candidates)
    scores, found = exact.search(queries[sample], depth)
    keep = select(sample, scores, found)
    truth = [set(row[mask].tolist()) for row, mask in zip(found, keep, strict=True)]
    hits = sum(len(t.intersection(written(q).tolist())) for t, q in zip(truth, sample, strict=True))
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
        result = MineResult(
            out_uri, category, 0, 0, "-", 1.0, elapsed, skipped, filters=filter_settings(config)
        )
        return _finish(out_uri, NEGATIVES_SCHEMA.empty_table(), result)

    vectors = partition.vectors()
    candidate_rows = np.flatnonzero(is_candidate)
    query_rows = np.flatnonzero(is_query)
    candidates = _rows_of(vectors, candidate_rows)
    queries = _rows_of(vectors, query_rows)
    largest_concept = np.bincount(concept_codes[candidate_rows]).max()
    depth = min(len(candidate_rows), config.last_rank + int(largest_concept) + 1)
    search = build_index(candidates, depth, config)
    scores, neighbours = search.index.search(queries, depth)
    candidate_codes, query_codes = concept_codes[candidate_rows], concept_codes[query_rows]
    positive = positive_scores(
        queries, query_codes, is_candidate[query_rows], candidates, candidate_codes
    )
    filtered = filter_candidates(neighbours, scores, query_codes, candidate_codes, positive, config)
    keep = choose(filtered.pool, config, category)
    negatives, negative_scores, counts = neighbours[keep], scores[keep], keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    recall = 1.0
    if not search.kind.startswith("flat"):

        def select(sample, found_scores, found):
            exact = filter_candidates(
                found, found_scores, query_codes[sample], candidate_codes, positive[sample], config
            )
            # a random draw is compared by what it draws from: the candidates left
            return choose(exact.pool, config, category) if config.sampling == "top" else exact.pool

        if config.sampling == "top":
            written = lambda q: negatives[offsets[q] : offsets[q + 1]]  # noqa: E731
        else:
            written = lambda q: neighbours[q][filtered.pool[q]]  # noqa: E731
        recall = measure_recall(candidates, queries, written, select, depth, config)
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
        negatives=len(negatives),
        short_queries=int((counts < config.top_k).sum()),
        queries_without_positives=int(np.isnan(positive).sum()),
        skipped_rank_min=filtered.skipped_rank_min,
        window=filtered.window,
        **{f"dropped_{name}": count for name, count in filtered.dropped.items()},
        filters=filter_settings(config),
        scores=score_statistics(positive, negative_scores, filtered.dropped_scores),
    )
    log.info(
        "mine %s: %d queries, %d candidates, %s index, depth %d, recall %.3f; %d negatives, "
        "dropped: margin %d, relative_margin %d, max_score %d",
        category,
        result.queries,
        result.candidates,
        search.kind,
        depth,
        recall,
        result.negatives,
        result.dropped_margin,
        result.dropped_relative_margin,
        result.dropped_max_score,
    )
    return _finish(out_uri, table, result)


def _rows_of(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``vectors[rows]``, without a copy when ``rows`` is every row in order."""
    return vectors if len(rows) == len(vectors) else vectors[rows]


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


def filter_settings(config: MineSettings) -> dict:
    """The selection's settings as the report states them (rank_max resolved)."""
    return {
        "top_k": config.top_k,
        "rank_min": config.rank_min,
        "rank_max": config.last_rank,
        "margin": config.margin,
        "relative_margin": config.relative_margin,
        "max_score": config.max_score,
        "sampling": config.sampling,
    }


def _finish(out_uri: str, table: pa.Table, result: MineResult) -> MineResult:
    summary = {k: v for k, v in asdict(result).items() if k != "out_uri"}
    datasets.write_table(out_uri, table, NEGATIVES_KIND, extra={"mining": summary})
    return result
