"""False-negative-safe mining: the rank window, the margins, max_score and the sampling,
against a numpy oracle on embeddings with planted false negatives."""

import math
import re
from pathlib import Path
from xml.etree import ElementTree

import faiss
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from embedpipe.config import CombineSettings, MineSettings
from embedpipe.core import datasets
from embedpipe.mining.combine import combine_negatives
from embedpipe.mining.filters import SCORE_FILTERS
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import Partition
from embedpipe.mining.report import REPORT_HTML

CONCEPTS, PER_CONCEPT, DIM = 6, 10, 32
PLANTED = 3  # concepts k = 0..2: image 0 of concept k+1 is a near duplicate of image 1 of k


def planted_vectors(seed=0):
    """Six concepts of ten unit vectors; three images are near duplicates of an image of
    the previous concept (a mislabelled image / a duplicate across concepts)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CONCEPTS, DIM))
    vectors = np.repeat(centres, PER_CONCEPT, axis=0) + rng.normal(
        scale=0.8, size=(CONCEPTS * PER_CONCEPT, DIM)
    )
    for k in range(PLANTED):
        vectors[(k + 1) * PER_CONCEPT] = vectors[k * PER_CONCEPT + 1] + rng.normal(
            scale=0.01, size=DIM
        )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    concepts = [f"c{n // PER_CONCEPT}" for n in range(len(vectors))]
    return vectors.astype(np.float32), concepts


def partition_of(vectors: np.ndarray, concepts: list[str], category="shells") -> Partition:
    count, dim = vectors.shape
    table = pa.table(
        {
            "image_id": [f"i{n:03d}" for n in range(count)],
            "category": [category] * count,
            "concept": concepts,
            "split": ["train"] * count,
        }
    )
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    return Partition(category, table, pa.chunked_array([flat]), np.arange(count))


def oracle(vectors, concepts, config: MineSettings):
    """Per query, its pool (window minus the filtered, in rank order), and the counts, by
    float64 numpy and plain loops: ranks count other-concept images before the filters, the
    positive score is the mean similarity to the concept-mates, the first filter that
    drops a candidate counts it."""
    similarity = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    count = len(vectors)
    spread = 10 if config.sampling == "random" or config.margin is not None else 1
    if config.relative_margin is not None or config.max_score is not None:
        spread = 10
    last = config.rank_max or config.rank_min - 1 + spread * config.top_k
    counts = dict.fromkeys(
        ["skipped_rank_min", "window", "margin", "relative_margin", "max_score"], 0
    )
    pools = {}
    for q in range(count):
        mates = [p for p in range(count) if concepts[p] == concepts[q] and p != q]
        positive = similarity[q, mates].mean()
        others = sorted(
            (p for p in range(count) if concepts[p] != concepts[q]), key=lambda p: -similarity[q, p]
        )
        counts["skipped_rank_min"] += min(len(others), config.rank_min - 1)
        window = others[config.rank_min - 1 : last]
        counts["window"] += len(window)
        pool = []
        for p in window:
            score = similarity[q, p]
            if config.margin is not None and score > positive - config.margin:
                counts["margin"] += 1
            elif config.relative_margin is not None and score > positive - abs(positive) * (
                config.relative_margin
            ):
                counts["relative_margin"] += 1
            elif config.max_score is not None and score > config.max_score:
                counts["max_score"] += 1
            else:
                pool.append(p)
        pools[f"i{q:03d}"] = [f"i{p:03d}" for p in pool]
    return pools, counts


def written(result) -> dict[str, dict]:
    return {r["query_id"]: r for r in datasets.read_table(result.out_uri).to_pylist()}


def planted_pairs():
    """(query, its planted false negative) ids."""
    return [
        (f"i{k * PER_CONCEPT + 1:03d}", f"i{(k + 1) * PER_CONCEPT:03d}") for k in range(PLANTED)
    ]


def test_the_planted_false_negatives_are_mined_without_a_filter_and_dropped_with_a_margin(
    tmp_path,
):
    vectors, concepts = planted_vectors()
    partition = partition_of(vectors, concepts)
    plain = written(mine_category(partition, str(tmp_path / "plain"), MineSettings()))
    result = mine_category(partition, str(tmp_path / "m"), MineSettings(margin=0.0))
    safe = written(result)
    for query, planted in planted_pairs():
        assert plain[query]["negative_ids"][0] == planted  # the hardest negative: a positive
        assert planted not in safe[query]["negative_ids"]
        assert len(safe[query]["negative_ids"]) == 3
    # the near duplicate as a query: its "negatives" of the concept it duplicates go too
    assert result.dropped_margin > PLANTED
    assert result.dropped_relative_margin == result.dropped_max_score == 0


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"margin": 0.0},
        {"margin": 0.05},
        {"relative_margin": 0.05},
        {"max_score": 0.3},
        {"margin": 0.0, "relative_margin": 0.2, "max_score": 0.35, "top_k": 4},
        {"rank_min": 3, "rank_max": 12},
        {"rank_min": 2, "margin": 0.0, "top_k": 5},
    ],
)
def test_selection_and_counts_equal_the_numpy_oracle(tmp_path, settings):
    vectors, concepts = planted_vectors()
    config = MineSettings(**settings)
    result = mine_category(partition_of(vectors, concepts), str(tmp_path / "n"), config)
    pools, counts = oracle(vectors, concepts, config)
    rows = written(result)
    assert set(rows) == set(pools)
    for query, row in rows.items():
        assert row["negative_ids"] == pools[query][: config.top_k]
        similarity = vectors[int(query[1:])] @ vectors[[int(i[1:]) for i in row["negative_ids"]]].T
        np.testing.assert_allclose(row["negative_scores"], similarity, atol=1e-5)
    assert all(counts[key] > 0 for key in SCORE_FILTERS if key in settings)  # not vacuous
    assert result.skipped_rank_min == counts["skipped_rank_min"]
    assert result.window == counts["window"]
    assert result.dropped_margin == counts["margin"]
    assert result.dropped_relative_margin == counts["relative_margin"]
    assert result.dropped_max_score == counts["max_score"]
    assert result.negatives == sum(min(config.top_k, len(p)) for p in pools.values())
    assert result.short_queries == sum(len(p) < config.top_k for p in pools.values())
    assert result.metrics()["dropped_margin"] == counts["margin"]  # the KFP metrics


def test_random_sampling_draws_top_k_of_the_pool_reproducibly(tmp_path):
    vectors, concepts = planted_vectors()
    partition = partition_of(vectors, concepts)
    config = MineSettings(sampling="random", margin=0.0, top_k=4, seed=7)
    first = written(mine_category(partition, str(tmp_path / "a"), config))
    again = written(mine_category(partition, str(tmp_path / "b"), config))
    other_seed = written(
        mine_category(partition, str(tmp_path / "c"), config.model_copy(update={"seed": 8}))
    )
    top = written(
        mine_category(partition, str(tmp_path / "t"), config.model_copy(update={"sampling": "top"}))
    )
    pools, _ = oracle(vectors, concepts, config)
    for query, row in first.items():
        pool = pools[query]
        assert set(row["negative_ids"]) <= set(pool)
        assert len(row["negative_ids"]) == min(4, len(pool))
        assert row["negative_ids"] == sorted(row["negative_ids"], key=pool.index)  # rank order
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
    assert first == again
    assert first != other_seed
    assert any(first[q]["negative_ids"] != top[q]["negative_ids"] for q in first)


def unfiltered_rule(partition: Partition, top_k: int):
    """Mining before the filters existed: an exact faiss search top_k + largest concept + 1
    deep, each query's first top_k hits of another concept, bands at the terciles."""
    vectors = partition.vectors()
    concept = partition.table.column("concept").to_numpy(zero_copy_only=False)
    codes = np.unique(concept, return_inverse=True)[1]
    depth = min(len(vectors), top_k + int(np.bincount(codes).max()) + 1)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, found = index.search(vectors, depth)
    keep = (found >= 0) & (codes[found.clip(min=0)] != codes[:, None])
    keep &= np.cumsum(keep, axis=1) <= top_k
    edges = np.quantile(scores[keep], [1 / 3, 2 / 3])
    return found, scores, keep, np.searchsorted(edges, scores[keep], side="right")


@pytest.mark.parametrize("seed", [0, 1])
def test_default_settings_write_exactly_what_mining_wrote_before_the_filters(tmp_path, seed):
    vectors, concepts = planted_vectors(seed)
    partition = partition_of(vectors, concepts)
    result = mine_category(partition, str(tmp_path / "n"), MineSettings())
    table = datasets.read_table(result.out_uri)
    found, scores, keep, bands = unfiltered_rule(partition, 3)
    ids = partition.table.column("image_id").to_pylist()
    assert table.column("negative_ids").to_pylist() == [
        [ids[n] for n in row[mask]] for row, mask in zip(found, keep, strict=True)
    ]
    written_scores = np.asarray(table.column("negative_scores").combine_chunks().flatten())
    assert np.array_equal(written_scores, scores[keep])  # bit for bit
    names = np.array(["easy", "medium", "hard"])
    assert table.column("band").combine_chunks().flatten().to_pylist() == names[bands].tolist()
    assert result.search_depth == 3 + PER_CONCEPT + 1
    assert result.dropped_margin == result.skipped_rank_min == 0
    assert result.window == result.negatives == len(ids) * 3


def test_positive_scores_and_drops_are_summarised_for_the_report(tmp_path):
    vectors, concepts = planted_vectors()
    partition = partition_of(vectors, concepts)
    config = MineSettings(margin=0.0)
    result = mine_category(partition, str(tmp_path / "n"), config)
    similarity = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    same = np.equal.outer(concepts, concepts) & ~np.eye(len(concepts), dtype=bool)
    positive = (similarity * same).sum(1) / same.sum(1)
    summary = result.scores["positive"]
    assert summary["count"] == len(vectors)
    assert summary["median"] == pytest.approx(np.median(positive), abs=1e-4)
    assert summary["max"] == pytest.approx(positive.max(), abs=1e-4)
    assert result.scores["dropped"]["count"] == result.dropped_margin
    histogram = result.scores["histogram"]
    assert sum(histogram["negative"]) == result.negatives
    assert sum(histogram["positive"]) == len(vectors)
    manifest = datasets.read_manifest(result.out_uri, "hard-negatives")["mining"]
    assert manifest["dropped_margin"] == result.dropped_margin
    assert manifest["filters"]["margin"] == 0.0 and manifest["filters"]["rank_max"] == 30


def test_combine_reports_every_category_and_sums_the_counts(tmp_path):
    vectors, concepts = planted_vectors()
    config = MineSettings(margin=0.0, max_score=0.5)
    results = [
        mine_category(
            partition_of(vectors[: 20 * (n + 2)], concepts[: 20 * (n + 2)], name),
            str(tmp_path / name),
            config,
        )
        for n, name in enumerate(["birds", "cars"])
    ]
    lonely = partition_of(vectors[:10], concepts[:10], "mugs")
    results.append(mine_category(lonely, str(tmp_path / "mugs"), config))
    combined = combine_negatives(
        [r.out_uri for r in results], str(tmp_path / "all"), CombineSettings()
    )
    metrics = combined.metrics()
    for key in ("dropped_margin", "dropped_max_score", "negatives", "window"):
        assert metrics[f"mined_{key}"] == sum(getattr(r, key) for r in results)
    assert metrics["mined_dropped_margin"] > 0 and metrics["mined_dropped_max_score"] > 0
    page = (Path(combined.out_uri) / ".embedpipe" / REPORT_HTML).read_text()
    for result in results[:2]:
        assert f"<h3>{result.category}</h3>" in page
        assert f"<td>{result.dropped_margin}</td>" in page
    assert "skipped: fewer than two concepts among the candidates" in page
    assert "margin 0.0" in page and "max_score 0.5" in page and "<svg" in page
    drawings = [ElementTree.fromstring(svg) for svg in re.findall("<svg.*?</svg>", page)]
    assert len(drawings) == 2  # the skipped category has none
    assert all(len(d.findall("{http://www.w3.org/2000/svg}polyline")) == 3 for d in drawings)


def test_a_rank_window_narrower_than_top_k_is_refused():
    with pytest.raises(ValidationError, match="rank_min 5 to rank_max 6 hold fewer than top_k 3"):
        MineSettings(rank_min=5, rank_max=6)
    assert MineSettings(rank_min=5, rank_max=7).last_rank == 7
    assert MineSettings().last_rank == 3
    assert MineSettings(rank_min=11, relative_margin=0.05).last_rank == 10 + 30
    assert math.isfinite(MineSettings(max_score=0.9).max_score)
