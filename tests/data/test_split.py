import collections
import math
from pathlib import Path

import pytest

from embedpipe.config import SplitSettings
from embedpipe.core import datasets, storage
from embedpipe.data.split import (
    METADATA_JSON,
    REPORT_MD,
    TRAIN_JSON,
    VAL_JSON,
    create_concept_splits,
)


def split_rows(uri):
    return datasets.read_table(uri, "splits").to_pylist()


def concepts_by_side(rows):
    sides = collections.defaultdict(set)
    for row in rows:
        sides[row["concept_split"]].add((row["category"], row["concept"]))
    return sides


def test_defaults_select_ceil_fraction_of_concepts_per_category(demo_catalog, tmp_path):
    result = create_concept_splits(demo_catalog, str(tmp_path / "s"), SplitSettings())
    rows = split_rows(result.out_uri)
    sides = concepts_by_side(rows)
    per_category = collections.Counter(category for category, _ in sides["train"])
    assert set(per_category.values()) == {math.ceil(0.65 * 5)}
    assert (result.train_concepts, result.val_concepts) == (16, 4)
    for row in rows:
        if row["concept_split"] == "val":
            assert row["split"] == "val"
        else:  # test_sample_frac 1.0: every test image of a train concept trains
            assert row["split"] == "train"
    assert result.unused_images == 0


def test_test_sampling_fraction_and_cap(demo_catalog, tmp_path):
    config = SplitSettings(test_sample_frac=0.5, max_test_images=6)
    rows = split_rows(create_concept_splits(demo_catalog, str(tmp_path / "s"), config).out_uri)
    by_concept = collections.defaultdict(collections.Counter)
    for row in rows:
        if row["concept_split"] == "train":
            by_concept[(row["category"], row["concept"])][(row["catalog_split"], row["split"])] += 1
    for counts in by_concept.values():
        n_test = counts[("test", "train")] + counts[("test", "unused")]
        assert counts[("test", "train")] == min(max(math.floor(0.5 * n_test), 1), 6)
        assert counts[("train", "unused")] == 0


def test_small_categories_are_not_split(demo_catalog, tmp_path):
    config = SplitSettings(min_concepts_threshold=6)
    result = create_concept_splits(demo_catalog, str(tmp_path / "s"), config)
    assert result.train_concepts == 0 and result.val_concepts == 20
    metadata = storage.read_json(datasets.side_path(result.out_uri, METADATA_JSON))
    assert all(info["below_threshold"] for info in metadata["categories"].values())


def test_outputs_agree_with_each_other(demo_catalog, tmp_path):
    config = SplitSettings(test_sample_frac=0.3, max_test_images=200)
    out = Path(create_concept_splits(demo_catalog, str(tmp_path / "s"), config).out_uri)
    rows = split_rows(str(out))
    train_json = storage.read_json(datasets.side_path(str(out), TRAIN_JSON))
    val_json = storage.read_json(datasets.side_path(str(out), VAL_JSON))
    metadata = storage.read_json(datasets.side_path(str(out), METADATA_JSON))
    for category, info in metadata["categories"].items():
        assert sorted(train_json[category]) == info["selected_concepts"]
        for concept, sample in info["sampled_test_images_by_concept"].items():
            trained = {
                r["path"]
                for r in rows
                if r["concept"] == concept and r["category"] == category and r["split"] == "train"
            }
            assert set(sample["sampled"]) <= trained
            assert sorted(train_json[category][concept]["train"]) == sorted(trained)
            assert train_json[category][concept]["test"] == []
        for concept, entry in val_json[category].items():
            expected = {
                s: sorted(
                    r["path"]
                    for r in rows
                    if (r["category"], r["concept"], r["catalog_split"]) == (category, concept, s)
                )
                for s in ("train", "test")
            }
            assert {s: sorted(entry[s]) for s in entry} == expected
    assert "| box | 5 | 4 |" in Path(datasets.side_path(str(out), REPORT_MD)).read_text()


def output_files(uri):
    return sorted(path for path in Path(uri).rglob("*") if path.is_file())


def test_same_seed_same_bytes(demo_catalog, tmp_path):
    outs = [
        create_concept_splits(demo_catalog, str(tmp_path / name), SplitSettings(seed=5))
        for name in ("a", "b")
    ]
    files = [
        {path.relative_to(o.out_uri): path.read_bytes() for path in output_files(o.out_uri)}
        for o in outs
    ]
    assert files[0] == files[1]
    other = create_concept_splits(demo_catalog, str(tmp_path / "c"), SplitSettings(seed=6))
    assert concepts_by_side(split_rows(other.out_uri)) != concepts_by_side(
        split_rows(outs[0].out_uri)
    )


@pytest.mark.parametrize("frac,expected", [(0.0, 0), (0.2, 1), (0.5, 3), (1.0, 5)])
def test_concept_fraction_rounds_up(demo_catalog, tmp_path, frac, expected):
    result = create_concept_splits(
        demo_catalog, str(tmp_path / "s"), SplitSettings(concept_frac=frac)
    )
    assert result.train_concepts == expected * 4
