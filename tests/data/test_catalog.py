import collections
from pathlib import Path

import pytest
from conftest import flat_tree, jpeg_bytes, write_tree

from embedpipe.config import CatalogSettings, IngestSettings
from embedpipe.core import datasets, storage
from embedpipe.data.catalog import CATALOG_JSON, CatalogError, build_catalog, perva_layout
from embedpipe.data.ingest import ingest_images


def catalog_rows(uri):
    return datasets.read_table(uri, "catalog").to_pylist()


def files_of(uri):
    """Every output file's bytes, keyed by name (shards are content-addressed)."""
    files = sorted(p for p in Path(uri).rglob("*") if p.is_file())
    return {p.relative_to(uri).as_posix(): p.read_bytes() for p in files}


@pytest.fixture
def flat_images(tmp_path):
    root = flat_tree(tmp_path / "src", categories=2, concepts=3, images=11)
    out = tmp_path / "images"
    ingest_images([str(root)], str(out), IngestSettings(workers=1))
    return str(out)


def test_explicit_layout_keeps_the_folder_split(demo_catalog):
    rows = catalog_rows(demo_catalog)
    assert len(rows) == 408
    for row in rows:
        assert row["split"] == Path(row["source"]).parts[-4]  # .../<split>/<cat>/<concept>/x
    manifest = datasets.read_manifest(demo_catalog, "catalog")
    assert manifest["mode"] == "explicit"


def test_auto_split_by_fraction_per_concept(flat_images, tmp_path):
    result = build_catalog(flat_images, str(tmp_path / "c"), CatalogSettings(train_fraction=0.2))
    counts = collections.Counter(
        (r["concept"], r["category"], r["split"]) for r in catalog_rows(result.out_uri)
    )
    for (_, _, split), count in counts.items():
        assert count == {"train": round(0.2 * 11), "test": 11 - round(0.2 * 11)}[split]
    assert (result.train_images, result.test_images) == (6 * 2, 6 * 9)


def test_num_train_is_exact_and_overrides_the_fraction(flat_images, tmp_path):
    config = CatalogSettings(num_train=4, train_fraction=0.9)
    rows = catalog_rows(build_catalog(flat_images, str(tmp_path / "c"), config).out_uri)
    train = collections.Counter(
        (r["category"], r["concept"]) for r in rows if r["split"] == "train"
    )
    assert set(train.values()) == {4} and len(train) == 6


def test_num_train_caps_explicit_train_folders(demo_images, tmp_path):
    rows = catalog_rows(
        build_catalog(demo_images, str(tmp_path / "c"), CatalogSettings(num_train=2)).out_uri
    )
    by_concept = collections.defaultdict(collections.Counter)
    for row in rows:
        by_concept[row["concept"]][row["split"]] += 1
    assert all(c["train"] == 2 and c["unused"] == 3 for c in by_concept.values())


def test_same_seed_same_bytes_other_seed_other_split(flat_images, tmp_path):
    a = build_catalog(flat_images, str(tmp_path / "a"), CatalogSettings(seed=7))
    b = build_catalog(flat_images, str(tmp_path / "b"), CatalogSettings(seed=7))
    c = build_catalog(flat_images, str(tmp_path / "c"), CatalogSettings(seed=8))
    assert files_of(a.out_uri) == files_of(b.out_uri)
    assert [r["split"] for r in catalog_rows(a.out_uri)] != [
        r["split"] for r in catalog_rows(c.out_uri)
    ]


def test_adding_a_category_does_not_reshuffle_the_others(tmp_path):
    small = flat_tree(tmp_path / "small", categories=1, concepts=2, images=9)
    big = flat_tree(tmp_path / "big", categories=3, concepts=2, images=9)
    splits = []
    for root in (small, big):
        ingest_images([str(root)], str(root) + "-images", IngestSettings(workers=1))
        rows = catalog_rows(
            build_catalog(str(root) + "-images", str(root) + "-cat", CatalogSettings()).out_uri
        )
        splits.append(
            {
                Path(r["source"]).relative_to(root).as_posix(): r["split"]
                for r in rows
                if r["category"] == "cat0"
            }
        )
    assert splits[0] == splits[1]


def test_json_is_the_perva_layout_of_the_parquet(demo_catalog):
    layout = storage.read_json(datasets.side_path(demo_catalog, CATALOG_JSON))
    rows = catalog_rows(demo_catalog)
    assert set(layout) == {"box", "disc", "ring", "star"}
    for category, concepts in layout.items():
        assert len(concepts) == 5
        for concept, entry in concepts.items():
            for split in ("train", "test"):
                expected = sorted(
                    r["path"]
                    for r in rows
                    if (r["category"], r["concept"], r["split"]) == (category, concept, split)
                )
                assert sorted(entry[split]) == expected


def test_relative_paths_resolve_against_the_source_root(demo_dir, demo_images, tmp_path):
    result = build_catalog(demo_images, str(tmp_path / "c"), CatalogSettings(relative=True))
    layout = storage.read_json(datasets.side_path(result.out_uri, CATALOG_JSON))
    paths = [
        p
        for concepts in layout.values()
        for entry in concepts.values()
        for p in entry["train"] + entry["test"]
    ]
    assert len(paths) == 408
    assert all(not p.startswith("/") and (demo_dir / p).is_file() for p in paths)
    assert paths[0].split("/")[0] in ("train", "test")


def test_mixed_layouts_are_refused_with_examples(tmp_path):
    root = write_tree(
        tmp_path / "src",
        {
            "train/cat/concept/a.jpg": jpeg_bytes((1, 2, 3)),
            "cat/concept/b.jpg": jpeg_bytes((4, 5, 6)),
        },
    )
    ingest_images([str(root)], str(tmp_path / "images"), IngestSettings(workers=1))
    with pytest.raises(CatalogError, match=r"mixed layouts: 1 images sit in split folders"):
        build_catalog(str(tmp_path / "images"), str(tmp_path / "c"), CatalogSettings())


def test_catalog_refuses_a_dataset_of_another_kind(demo_catalog, tmp_path):
    with pytest.raises(datasets.DatasetError, match="expected a dataset of kind 'images'"):
        build_catalog(demo_catalog, str(tmp_path / "c"), CatalogSettings())


def test_perva_layout_ignores_unused_rows(demo_images, tmp_path):
    result = build_catalog(demo_images, str(tmp_path / "c"), CatalogSettings(num_train=1))
    layout = perva_layout(datasets.read_table(result.out_uri, "catalog"))
    assert all(len(entry["train"]) == 1 for c in layout.values() for entry in c.values())


def test_custom_split_folder_names_reach_the_catalog(tmp_path):
    files = {
        f"{split}/cat/concept/{split}{i}.jpg": jpeg_bytes(
            (i * 30, 90, 20 if split == "tr" else 200)
        )
        for split in ("tr", "te")
        for i in range(3)
    }
    root = write_tree(tmp_path / "src", files)
    settings = IngestSettings(workers=1, split_dirnames=("tr", "te"))
    ingest_images([str(root)], str(tmp_path / "images"), settings)
    result = build_catalog(str(tmp_path / "images"), str(tmp_path / "c"), CatalogSettings())
    assert (result.mode, result.train_images, result.test_images) == ("explicit", 3, 3)
    for row in catalog_rows(result.out_uri):
        assert row["split"] == {"tr": "train", "te": "test"}[Path(row["source"]).parts[-4]]
