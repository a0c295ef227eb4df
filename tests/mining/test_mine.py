import collections
from pathlib import Path

import datasets as hf
import numpy as np
import pyarrow as pa
import pytest
from conftest import random_embeddings

from embedpipe.config import CombineSettings, MineSettings, ToHfSettings
from embedpipe.core import datasets, storage
from embedpipe.mining.combine import combine_negatives
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import list_categories, partition_by_category
from embedpipe.mining.to_hf import export_to_hf


def mine(meta_uri, emb_uri, category, out, config):
    """Partition once, then mine one category (the fan-out, sequentially)."""
    partitions = partition_by_category(meta_uri, emb_uri, out + "-partitions")
    return mine_category(partitions[category], out, config)


def write_vectors(root: Path, spec: dict[str, int], per_concept: int, dim=16, seed=0, test_every=4):
    """Clustered unit vectors: category -> number of concepts; every 4th image is test."""
    rng = np.random.default_rng(seed)
    meta, ids, vectors = collections.defaultdict(list), [], []
    for category, concepts in spec.items():
        centre = rng.normal(size=dim)
        for k in range(concepts):
            concept_centre = centre + rng.normal(scale=0.6, size=dim)
            for i in range(per_concept):
                image_id = f"{category}-{k}-{i}"
                vectors.append(concept_centre + rng.normal(scale=0.5, size=dim))
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
    config = MineSettings(top_k=5, index=index, ivf_nprobe=2, recall_sample=200)
    result = mine(meta_uri, emb_uri, "big", str(tmp_path / "n"), config)
    assert result.index == index and 0.0 < result.recall <= 1.0
    exact = mine(meta_uri, emb_uri, "big", str(tmp_path / "e"), MineSettings(top_k=5))
    assert exact.recall == 1.0 and exact.queries == result.queries == 20 * 59  # image 0: test


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
