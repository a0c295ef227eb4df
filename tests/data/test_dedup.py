import base64
import collections
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedpipe.config import DedupSettings, SplitSettings
from embedpipe.core import datasets, storage
from embedpipe.data.dedup import (
    LEAKAGE_JSON,
    REPORT_HTML,
    find_duplicates,
    hamming,
    near_pairs,
)
from embedpipe.data.demo_data import MANIFEST_NAME
from embedpipe.data.split import create_concept_splits


def groups_of(result):
    members = collections.defaultdict(set)
    for row in datasets.read_table(storage.join(result.out_uri, "groups")).to_pylist():
        members[row["group_id"]].add(row["source"])
    return {frozenset(m) for m in members.values()}


def planted_groups(demo_dir):
    manifest = storage.read_json(str(demo_dir / MANIFEST_NAME))
    return {
        frozenset(str(demo_dir / p) for p in pair)
        for pair in manifest["exact_duplicates"] + manifest["near_duplicates"]
    }


@pytest.fixture(scope="module")
def demo_splits(demo_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits") / "splits"
    return create_concept_splits(demo_catalog, str(out), SplitSettings()).out_uri


def test_finds_exactly_the_planted_duplicates(demo_images, demo_dir, tmp_path):
    result = find_duplicates(demo_images, str(tmp_path / "d"), DedupSettings(workers=1))
    assert groups_of(result) == planted_groups(demo_dir)
    assert (result.exact_duplicate_images, result.near_duplicate_images) == (8, 8)
    assert result.distinct_images == 404 and result.unreadable == 0


def test_groups_equal_imagededup_on_the_same_folder(demo_images, demo_dir, tmp_path):
    from imagededup.methods import PHash

    phash = PHash(verbose=False)
    encodings = phash.encode_images(image_dir=str(demo_dir), recursive=True)
    found = phash.find_duplicates(encoding_map=encodings, max_distance_threshold=6)
    theirs = set()
    for name, duplicates in found.items():
        if duplicates:
            theirs.add(frozenset(str(demo_dir / n) for n in [name, *duplicates]))
    ours = groups_of(
        find_duplicates(demo_images, str(tmp_path / "d"), DedupSettings(max_distance=6, workers=2))
    )
    assert ours == theirs


def test_multi_index_search_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    for i in range(0, 600, 2):  # plant pairs at every distance up to 9
        bits = np.unpackbits(codes[i])
        bits[rng.choice(64, i % 10, replace=False)] ^= 1
        codes[i + 1] = np.packbits(bits)
    for radius in (0, 3, 6, 9):
        first, second = near_pairs(codes, radius)
        distances = hamming(codes[:, None, :], codes[None, :, :])
        expected = {(i, j) for i, j in zip(*np.nonzero(distances <= radius), strict=True) if i < j}
        assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected


def test_leakage_report_on_concept_splits(demo_images, demo_splits, tmp_path):
    result = find_duplicates(
        demo_images, str(tmp_path / "d"), DedupSettings(workers=1), demo_splits
    )
    leakage = storage.read_json(datasets.side_path(result.out_uri, LEAKAGE_JSON))
    rows = datasets.read_table(storage.join(result.out_uri, "groups")).to_pylist()
    leaking = {r["group_id"] for r in rows if r["leaks"]}
    assert leakage["leaking_groups"] == len(leaking) == result.leaking_groups > 0
    for group in leaking:
        splits = {r["split"] for r in rows if r["group_id"] == group}
        assert splits == {"val-support", "val-query"}
    per_category = sum(c["groups"] for c in leakage["by_category"].values())
    assert per_category == len(leaking)


@pytest.mark.parametrize("drop", ["none", "duplicates", "leaking"])
def test_drop_keeps_one_representative(demo_images, demo_splits, tmp_path, drop):
    result = find_duplicates(
        demo_images, str(tmp_path / "d"), DedupSettings(drop=drop, workers=1), demo_splits
    )
    kept = {r["source"] for r in datasets.read_table(str(tmp_path / "d" / "kept")).to_pylist()}
    rows = datasets.read_table(storage.join(result.out_uri, "groups")).to_pylist()
    for row in rows:
        dropped = drop == "duplicates" or (drop == "leaking" and row["leaks"])
        assert (row["source"] in kept) == (row["representative"] or not dropped)
    representatives = [r for r in rows if r["representative"]]
    assert all(r["split"] in ("train", "val-support") for r in representatives)
    assert result.kept == len(kept) == 408 - result.dropped


def test_html_report_shows_thumbnails(demo_images, tmp_path):
    result = find_duplicates(
        demo_images, str(tmp_path / "d"), DedupSettings(workers=1, report_groups=3)
    )
    page = Path(datasets.side_path(result.out_uri, REPORT_HTML)).read_text()
    thumbnails = re.findall(r"src='data:image/jpeg;base64,([^']+)'", page)
    assert len(thumbnails) == 6  # three groups of two
    assert Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))).size[0] <= 96
    assert "<h1>Duplicates: 8 groups" in page


@pytest.mark.parametrize("method", ["dhash", "whash", "colorhash"])
def test_other_hashes_find_the_exact_copies(demo_images, demo_dir, tmp_path, method):
    result = find_duplicates(
        demo_images, str(tmp_path / "d"), DedupSettings(hash=method, max_distance=0, workers=1)
    )
    exact = {
        frozenset(str(demo_dir / p) for p in pair)
        for pair in storage.read_json(str(demo_dir / MANIFEST_NAME))["exact_duplicates"]
    }
    assert exact <= groups_of(result)
    fingerprints = datasets.read_table(storage.join(result.out_uri, "fingerprints"))
    assert fingerprints.num_rows == 404 and None not in fingerprints.column("hash").to_pylist()
