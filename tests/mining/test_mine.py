import collections
import json
from pathlib import Path

import datasets as hf
import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import random_embeddings

from embedpipe.cli import main
from embedpipe.config import CombineSettings, MineSettings, ToHfSettings
from embedpipe.core import datasets, storage
from embedpipe.mining.combine import combine_negatives
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import (
    embedding_matrix,
    gather_rows,
    list_categories,
    partition_by_category,
)
from embedpipe.mining.to_hf import export_to_hf


def mine(meta_uri, emb_uri, category, out, config):
    """Partition once, then mine one category (the fan-out, sequentially)."""
    partitions = partition_by_category(meta_uri, emb_uri, out + "-partitions")
    return mine_category(partitions[category], out, config)


def write_vectors(
    root: Path,
    spec: dict[str, int],
    per_concept: int,
    dim=16,
    seed=0,
    test_every=4,
    spread=0.6,
    noise=0.5,
):
    """Clustered unit vectors: category -> number of concepts; every 4th image is test.

    Concept centres scatter around the category's by ``spread``, images around their
    concept's by ``noise``."""
    rng = np.random.default_rng(seed)
    meta, ids, vectors = collections.defaultdict(list), [], []
    for category, concepts in spec.items():
        centre = rng.normal(size=dim)
        for k in range(concepts):
            concept_centre = centre + rng.normal(scale=spread, size=dim)
            for i in range(per_concept):
                image_id = f"{category}-{k}-{i}"
                vectors.append(concept_centre + rng.normal(scale=noise, size=dim))
                ids.append(image_id)
                meta["image_id"].append(image_id)
                meta["category"].append(category)
                meta["concept"].append(f"c{k}")
                meta["split"].append("test" if i % test_every == 0 else "train")
    matrix = np.asarray(vectors, np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    datasets.write_table(str(root / "meta"), pa.table(meta), "selection")
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    datasets.write_table(
        str(root / "emb"), pa.table({"image_id": ids, "embedding": embedding}), "embeddings"
    )
    return str(root / "meta"), str(root / "emb"), dict(zip(ids, matrix, strict=True)), meta


def rows(uri):
    return datasets.read_table(uri, "hard-negatives").to_pylist()


@pytest.fixture
def clustered(tmp_path):
    return write_vectors(tmp_path, {"birds": 5, "cars": 4, "mugs": 1}, per_concept=12)


def test_exact_mode_matches_numpy_brute_force(clustered, tmp_path):
    meta_uri, emb_uri, vectors, meta = clustered
    result = mine(meta_uri, emb_uri, "birds", str(tmp_path / "n"), MineSettings(top_k=5))
    assert result.index == "flat" and result.recall == 1.0
    info = {
        i: (c, s)
        for i, c, s, cat in zip(
            meta["image_id"], meta["concept"], meta["split"], meta["category"], strict=True
        )
        if cat == "birds"
    }
    train = [i for i, (_, s) in info.items() if s == "train"]
    produced = rows(result.out_uri)
    assert {r["query_id"] for r in produced} == set(train)
    for row in produced:
        others = [i for i in train if info[i][0] != row["concept"]]
        sims = np.array([vectors[row["query_id"]] @ vectors[i] for i in others])
        best = np.argsort(-sims, kind="stable")[:5]
        assert row["negative_ids"] == [others[b] for b in best]
        np.testing.assert_allclose(row["negative_scores"], sims[best], rtol=1e-5, atol=1e-6)
        mates = {i for i in train if info[i][0] == row["concept"] and i != row["query_id"]}
        assert set(row["positive_ids"]) == mates


def test_bands_partition_the_scores(clustered, tmp_path):
    meta_uri, emb_uri, _, _ = clustered
    config = MineSettings(
        top_k=4, band_names=("easy", "medium", "hard", "hardest"), band_quantiles=(0.25, 0.5, 0.75)
    )
    result = mine(meta_uri, emb_uri, "birds", str(tmp_path / "n"), config)
    pairs = [
        (s, b)
        for r in rows(result.out_uri)
        for s, b in zip(r["negative_scores"], r["band"], strict=True)
    ]
    edges = result.band_edges
    assert edges == sorted(edges) and len(edges) == 3
    for score, band in pairs:
        position = config.band_names.index(band)
        lower = edges[position - 1] if position else -np.inf
        upper = edges[position] if position < len(edges) else np.inf
        assert lower <= score < upper or (position == len(edges) and score >= lower)
    counts = collections.Counter(b for _, b in pairs)
    assert set(counts) == set(config.band_names)
    assert max(counts.values()) - min(counts.values()) <= len(pairs) * 0.1 + 2


def test_no_test_image_becomes_a_training_negative(clustered, tmp_path):
    meta_uri, emb_uri, _, meta = clustered
    split = dict(zip(meta["image_id"], meta["split"], strict=True))
    result = mine(meta_uri, emb_uri, "cars", str(tmp_path / "n"), MineSettings())
    produced = rows(result.out_uri)
    assert produced and all(split[r["query_id"]] == "train" for r in produced)
    assert all(split[i] == "train" for r in produced for i in r["negative_ids"] + r["positive_ids"])
    config = MineSettings(query_splits=("test",), candidate_splits=("train",))
    held_out = rows(mine(meta_uri, emb_uri, "cars", str(tmp_path / "t"), config).out_uri)
    assert all(split[r["query_id"]] == "test" for r in held_out)
    assert all(split[i] == "train" for r in held_out for i in r["negative_ids"])


def test_categories_without_work_are_skipped_with_a_reason(clustered, tmp_path):
    meta_uri, emb_uri, _, _ = clustered
    single = mine(meta_uri, emb_uri, "mugs", str(tmp_path / "m"), MineSettings())
    assert single.skipped == "fewer than two concepts among the candidates"
    assert rows(single.out_uri) == []
    meta = datasets.read_table(meta_uri)
    boats = pa.table(
        {"image_id": ["boat-1"], "category": ["boats"], "concept": ["c0"], "split": ["train"]}
    )
    datasets.write_table(str(tmp_path / "meta2"), pa.concat_tables([meta, boats]), "selection")
    absent = mine(str(tmp_path / "meta2"), emb_uri, "boats", str(tmp_path / "b"), MineSettings())
    assert absent.skipped == "no embedded images in this category"
    assert list_categories(meta_uri) == ["birds", "cars", "mugs"]


def test_combine_is_order_independent_and_samples(clustered, tmp_path):
    meta_uri, emb_uri, _, _ = clustered
    outs = [
        mine(meta_uri, emb_uri, c, str(tmp_path / c), MineSettings()).out_uri
        for c in ("birds", "cars", "mugs")
    ]
    a = combine_negatives(outs, str(tmp_path / "a"), CombineSettings(num_samples=20, seed=3))
    b = combine_negatives(outs[::-1], str(tmp_path / "b"), CombineSettings(num_samples=20, seed=3))
    assert rows(a.out_uri) == rows(b.out_uri) and a.rows == 20
    assert a.skipped_categories == {"mugs": "fewer than two concepts among the candidates"}
    everything = combine_negatives(outs, str(tmp_path / "all"), CombineSettings())
    assert everything.rows_per_category == {"birds": 45, "cars": 36}
    assert sum(a.rows_per_category.values()) == 20


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_report_their_recall(tmp_path, index):
    meta_uri, emb_uri, _, _ = write_vectors(
        tmp_path, {"big": 20}, per_concept=60, dim=32, test_every=10**6
    )
    config = MineSettings(top_k=5, index=index, ivf_nprobe=2, recall_sample=200, min_recall=0)
    result = mine(meta_uri, emb_uri, "big", str(tmp_path / "n"), config)
    assert result.index == index and 0.0 < result.recall <= 1.0
    exact = mine(meta_uri, emb_uri, "big", str(tmp_path / "e"), MineSettings(top_k=5))
    assert exact.recall == 1.0 and exact.queries == result.queries == 20 * 59  # image 0: test


@pytest.fixture(scope="module")
def tight_concepts(tmp_path_factory):
    """One category of 30 concepts x 150 images (149 train), each concept a tight cluster:
    nearly all of a query's nearest images are its concept-mates, so its negatives sit
    deeper than those."""
    root = tmp_path_factory.mktemp("tight")
    meta_uri, emb_uri, vectors, meta = write_vectors(
        root, {"shells": 30}, per_concept=150, dim=32, spread=0.3, noise=0.2, test_every=10**6
    )
    partition = partition_by_category(meta_uri, emb_uri, str(root / "partitions"))["shells"]
    train = {
        i: vectors[i] for i, s in zip(meta["image_id"], meta["split"], strict=True) if s == "train"
    }
    concept_of = dict(zip(meta["image_id"], meta["concept"], strict=True))
    return partition, train, concept_of, (meta_uri, emb_uri)


def brute_force_negatives(vectors: dict, concept_of: dict, top_k: int) -> dict[str, set]:
    """Per image: the ``top_k`` most similar images of other concepts, by numpy."""
    ids = list(vectors)
    matrix = np.stack([vectors[i] for i in ids])
    concepts = np.array([concept_of[i] for i in ids])
    similarity = matrix @ matrix.T
    similarity[concepts[:, None] == concepts[None, :]] = -np.inf
    best = np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]
    return {ids[q]: {ids[b] for b in row} for q, row in enumerate(best)}


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_indexes_write_the_exact_negatives_and_report_how_many(
    tight_concepts, tmp_path, index
):
    partition, vectors, concept_of, _ = tight_concepts
    result = mine_category(partition, str(tmp_path / "n"), MineSettings(top_k=5, index=index))
    truth = brute_force_negatives(vectors, concept_of, 5)
    produced = rows(result.out_uri)
    assert len(produced) == result.queries == 30 * 149
    delivered = np.mean([len(set(r["negative_ids"]) & truth[r["query_id"]]) / 5 for r in produced])
    assert delivered >= 0.95
    # the reported figure samples 1,000 of the queries
    assert result.recall == pytest.approx(delivered, abs=0.02)
    assert result.metrics()["recall"] == result.recall
    written = datasets.read_manifest(result.out_uri, "hard-negatives")["mining"]
    assert written["recall"] == result.recall


@pytest.mark.parametrize(
    "weak", [{"index": "hnsw", "hnsw_ef_search": 1}, {"index": "ivf", "ivf_nprobe": 1}]
)
def test_an_index_below_min_recall_fails_naming_the_category(tight_concepts, tmp_path, weak):
    partition = tight_concepts[0]
    config = MineSettings(top_k=5, min_recall=0.999, **weak)
    with pytest.raises(ValueError, match=r"shells: .*below \[mine\]\.min_recall 0\.999"):
        mine_category(partition, str(tmp_path / "n"), config)
    assert not (tmp_path / "n").exists()  # no negatives published from a failed search


def test_the_cli_reports_an_index_below_min_recall_in_one_line(tight_concepts, tmp_path, capsys):
    meta_uri, emb_uri = tight_concepts[3]
    flags = ["--index", "ivf", "--ivf-nprobe", "1", "--min-recall", "0.999"]
    assert main(["mine", meta_uri, emb_uri, "--out", str(tmp_path / "out"), *flags]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mine shells:" in lines[0] and "min_recall 0.999" in lines[0]


def test_hugging_face_export_reloads_with_the_image_bytes(demo_images, tmp_path):
    meta_uri, emb_uri = random_embeddings(demo_images, tmp_path, dim=8)
    mined = mine(
        meta_uri,
        emb_uri,
        "star",
        str(tmp_path / "n"),
        MineSettings(top_k=2),
    )
    rows_written = export_to_hf(
        mined.out_uri, demo_images, str(tmp_path / "hf"), ToHfSettings(max_positives=2)
    )
    reloaded = hf.load_from_disk(str(tmp_path / "hf"))
    assert len(reloaded) == rows_written == mined.queries
    images = datasets.read_table(demo_images, "images", ["image_id", "image"]).to_pylist()
    data = {r["image_id"]: r["image"] for r in images}
    raw = reloaded.cast_column("query_image", hf.Image(decode=False))
    sample = raw[0]
    assert sample["query_image"]["bytes"] == data[sample["query_id"]]
    assert len(sample["negative_ids"]) == 2 and len(sample["positive_ids"]) == 2
    assert reloaded[0]["negative_images"][0].size == (128, 128)


def test_hugging_face_export_to_s3(demo_images, bucket, tmp_path):
    meta_uri, emb_uri = random_embeddings(
        demo_images, tmp_path, dim=4, seed=1, only_split="train", limit=60
    )
    table = datasets.read_table(meta_uri)
    category = table.column("category")[0].as_py()
    mined = mine(
        meta_uri,
        emb_uri,
        category,
        str(tmp_path / "n"),
        MineSettings(top_k=1),
    )
    export_to_hf(mined.out_uri, demo_images, f"s3://{bucket}/hf", ToHfSettings())
    names = [e.uri.rsplit("/", 1)[-1] for e in storage.list_files(f"s3://{bucket}/hf")]
    assert "state.json" in names and "dataset_info.json" in names
    local = tmp_path / "download"
    for entry in storage.list_files(f"s3://{bucket}/hf"):
        (local / entry.uri.rsplit("/", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        (local / entry.uri.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(entry.uri))
    assert len(hf.load_from_disk(str(local))) == mined.queries > 0


def test_an_empty_export_still_reloads(tmp_path, demo_images):
    from embedpipe.core.schemas import NEGATIVES_SCHEMA

    datasets.write_table(str(tmp_path / "none"), NEGATIVES_SCHEMA.empty_table(), "hard-negatives")
    assert (
        export_to_hf(str(tmp_path / "none"), demo_images, str(tmp_path / "hf"), ToHfSettings()) == 0
    )
    assert len(hf.load_from_disk(str(tmp_path / "hf"))) == 0


def test_faiss_gpu_takes_flat_and_ivf_searches_it_can_hold(clustered, tmp_path, monkeypatch):
    """Where faiss has GPU support and sees a GPU (stood in for here, the index staying on
    the CPU): flat and IVF searches move to it; HNSW (no GPU version) and searches deeper
    than faiss GPU's limit stay on the CPU."""
    moved = []

    def to_gpus(index):
        moved.append(type(index).__name__)
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    meta_uri, emb_uri, _, _ = clustered
    partition = partition_by_category(meta_uri, emb_uri, str(tmp_path / "p"))["birds"]
    kinds = {
        index: mine_category(partition, str(tmp_path / index), MineSettings(index=index)).index
        for index in ("flat", "ivf", "hnsw")
    }
    assert kinds == {"flat": "flat-gpu", "ivf": "ivf-gpu", "hnsw": "hnsw"}
    assert moved == ["IndexFlatIP", "IndexIVFFlat"]
    assert mine_category(partition, str(tmp_path / "cpu"), MineSettings(gpu=False)).index == "flat"
    monkeypatch.setattr("embedpipe.mining.mine.GPU_MAX_K", 4)
    assert mine_category(partition, str(tmp_path / "deep"), MineSettings()).index == "flat"


@pytest.mark.skipif(
    not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0,
    reason="needs faiss with GPU support and a GPU",
)
def test_gpu_search_writes_what_the_cpu_search_writes(clustered, tmp_path):
    meta_uri, emb_uri, _, _ = clustered
    partition = partition_by_category(meta_uri, emb_uri, str(tmp_path / "p"))["birds"]
    on_gpu = mine_category(partition, str(tmp_path / "g"), MineSettings(top_k=4))
    on_cpu = mine_category(partition, str(tmp_path / "c"), MineSettings(top_k=4, gpu=False))
    assert on_gpu.index == "flat-gpu" and on_cpu.index == "flat"
    for a, b in zip(rows(on_gpu.out_uri), rows(on_cpu.out_uri), strict=True):
        assert a["negative_ids"] == b["negative_ids"]
        np.testing.assert_allclose(a["negative_scores"], b["negative_scores"], atol=1e-5)


def test_the_cli_mines_in_memory_what_the_pipeline_mines_from_partitions(
    clustered, tmp_path, capsys
):
    meta_uri, emb_uri, _, _ = clustered
    out = tmp_path / "cli"
    assert main(["mine", meta_uri, emb_uri, "--out", str(out), "--top-k", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["category"] for r in printed] == ["birds", "cars", "mugs"]
    assert not (out / "partitions").exists()
    partitions = partition_by_category(meta_uri, emb_uri, str(tmp_path / "p"))
    for category, partition in partitions.items():
        mined = mine_category(partition, str(tmp_path / "n" / category), MineSettings(top_k=4))
        assert rows(str(out / "negatives" / category)) == rows(mined.out_uri)


def test_vectors_are_gathered_across_chunks(tmp_path):
    matrix = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    whole = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 3)
    column = pa.chunked_array([whole.slice(0, 2), whole.slice(2, 4), whole.slice(6, 1)])
    wanted = np.array([6, 0, 3, 3, 2, 5, 1])
    np.testing.assert_array_equal(gather_rows(column, wanted), matrix[wanted])
    np.testing.assert_array_equal(embedding_matrix(column), matrix)
