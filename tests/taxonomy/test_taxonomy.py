import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gbif import COLUMNS, IMAGE_NAMES, ROWS, write_images, write_table

from embedpipe.config import IngestSettings, TaxonomySettings
from embedpipe.core import datasets, storage
from embedpipe.data.ingest import ingest_images
from embedpipe.taxonomy import RANKS
from embedpipe.taxonomy.names import parse_name
from embedpipe.taxonomy.stage import (
    RANK_KEYS_JSON,
    SPLIT_METADATA_JSON,
    UNKNOWN_JSON,
    TaxonomyInputError,
    build_taxonomy,
)
from embedpipe.taxonomy.table import TaxonomyTableError, load_taxon_table


@pytest.fixture(scope="module")
def butterflies(tmp_path_factory):
    root = tmp_path_factory.mktemp("butterflies")
    write_images(root / "src")
    ingest_images([str(root / "src")], str(root / "images"), IngestSettings(workers=1))
    return root / "images", write_table(root / "Taxon.tsv")


def run(butterflies, tmp_path, **settings):
    images, table = butterflies
    return build_taxonomy(
        str(images), str(table), str(tmp_path / "tax"), TaxonomySettings(**settings)
    )


def species_rows(result):
    return {
        r["raw_name"]: r
        for r in datasets.read_table(storage.join(result.out_uri, "species")).to_pylist()
    }


def index_rows(result, split):
    return datasets.read_table(storage.join(result.out_uri, "index", split)).to_pylist()


@pytest.mark.parametrize(
    "raw,species,infra,problem",
    [
        ("Danaus plexippus (Linnaeus, 1758)", "Danaus plexippus", None, None),
        ("  danaus_plexippus ", "Danaus plexippus", None, None),
        ("DANAUS PLEXIPPUS", "Danaus plexippus", None, None),
        ("Danaus (Anosia) plexippus", "Danaus plexippus", None, None),
        ("Danaus plexippus plexippus", "Danaus plexippus", "plexippus", None),
        ("Rosa canina subsp. dumalis Bechst.", "Rosa canina", "dumalis", None),
        ("Agathis montana de Laub.", "Agathis montana", None, None),
        ("Papilio cardui L.", "Papilio cardui", None, None),
        ("Danaus sp.", None, None, "not identified to species"),
        ("Heliconius cf. erato", None, None, "uncertain identification (cf./aff.)"),
        ("Salix x rubens", None, None, "hybrid name"),
        ("Mentha \u00d7piperita", None, None, "hybrid name"),
        ("Mentha \u00d7 piperita L.", None, None, "hybrid name"),
        ("\u00d7Triticosecale rimpaui", None, None, "hybrid name"),
        ("", None, None, "empty name"),
    ],
)
def test_name_normalisation(raw, species, infra, problem):
    parsed = parse_name(raw)
    assert (parsed.species, parsed.infraspecific, parsed.problem) == (species, infra, problem)


def test_every_name_is_known_or_unknown_with_its_reason(butterflies, tmp_path):
    result = run(butterflies, tmp_path)
    rows = species_rows(result)
    assert set(rows) == set(IMAGE_NAMES)
    for name, expected in IMAGE_NAMES.items():
        row = rows[name]
        if expected.isdigit():
            assert (row["status"], row["taxon_id"], row["reason"]) == ("known", expected, None)
        else:
            assert row["status"] == "unknown" and row["reason"].startswith(expected)
        assert row["images"] == 4
    assert rows["Anosia plexippus"]["matched_status"] == "synonym"
    assert rows["Papilio cardui L."]["accepted_name"] == "Vanessa cardui"
    assert rows["Danaus plexippus plexippus"]["infraspecific"] == "plexippus"
    assert (result.names, result.known_names, result.unknown_names) == (14, 10, 4)
    assert result.species == 7 and result.unlabelled_images == 4 * 4
    unknown = storage.read_json(datasets.side_path(result.out_uri, UNKNOWN_JSON))
    assert set(unknown) == {n for n, e in IMAGE_NAMES.items() if not e.isdigit()}


def test_kingdom_setting_resolves_the_homonym(butterflies, tmp_path):
    rows = species_rows(run(butterflies, tmp_path, kingdom="Plantae"))
    assert rows["Agathis montana"]["taxon_id"] == "501"
    assert rows["Danaus gilippus Cramer"]["reason"] == "no match in kingdom Plantae"


def test_tree_paths_and_missing_rank(butterflies, tmp_path):
    result = run(butterflies, tmp_path, kingdom="Plantae")
    tree = {
        r["taxon_id"]: r
        for r in datasets.read_table(storage.join(result.out_uri, "tree")).to_pylist()
    }
    assert [tree["501"][rank] for rank in RANKS] == [
        "Plantae",
        "Tracheophyta",
        None,
        "Pinales",
        "Araucariaceae",
        "Agathis",
        "Agathis montana",
    ]
    result = run(butterflies, tmp_path / "animals")
    tree = {
        r["taxon_id"]: r
        for r in datasets.read_table(storage.join(result.out_uri, "tree")).to_pylist()
    }
    assert [tree["101"][rank] for rank in RANKS] == [
        "Animalia",
        "Arthropoda",
        "Insecta",
        "Lepidoptera",
        "Nymphalidae",
        "Danaus",
        "Danaus plexippus",
    ]
    assert tree["101"]["vernacular_name"] == "monarch"
    assert tree["101"]["images"] == 16  # four spellings of the monarch, four images each


def test_rank_keys_are_dense_stable_and_match_the_index(butterflies, tmp_path):
    first = run(butterflies, tmp_path / "a", test_fraction=0.0)
    second = run(butterflies, tmp_path / "b", test_fraction=0.0)
    keys = storage.read_json(datasets.side_path(first.out_uri, RANK_KEYS_JSON))
    assert keys == storage.read_json(datasets.side_path(second.out_uri, RANK_KEYS_JSON))
    for rank in RANKS:
        assert sorted(keys[rank].values()) == list(range(len(keys[rank])))
    assert len(keys["species"]) == 7 and len(keys["genus"]) == 3 and len(keys["family"]) == 1
    tree = {
        r["taxon_id"]: r
        for r in datasets.read_table(storage.join(first.out_uri, "tree")).to_pylist()
    }
    for row in index_rows(first, "train"):  # recompute every label from tree + keys
        path = tree[row["species_id"]]
        for depth, rank in enumerate(RANKS):
            lineage = "|".join(path[r] or "" for r in RANKS[: depth + 1])
            assert row[f"{rank}_key"] == keys[rank][lineage]


def test_missing_rank_is_labelled_minus_one(butterflies, tmp_path):
    result = run(butterflies, tmp_path, kingdom="Plantae", test_fraction=0.0)
    rows = [r for r in index_rows(result, "train") if r["species_id"] == "501"]
    assert len(rows) == 4 and {r["class_key"] for r in rows} == {-1}
    assert rows[0]["caption"] == (
        "a photo of Plantae Tracheophyta Pinales Araucariaceae "
        "Agathis montana with common name Mount Panie kauri"
    )


def test_captions_follow_bioclip(butterflies, tmp_path):
    result = run(butterflies, tmp_path, test_fraction=0.0)
    captions = {r["species_id"]: r["caption"] for r in index_rows(result, "train")}
    assert captions["101"] == (
        "a photo of Animalia Arthropoda Insecta Lepidoptera Nymphalidae "
        "Danaus plexippus with common name monarch"
    )


def test_species_split_holds_out_whole_species_and_keeps_genera(butterflies, tmp_path):
    result = run(butterflies, tmp_path, test_fraction=0.5, seed=3)
    train = {r["species_id"] for r in index_rows(result, "train")}
    test = {r["species_id"] for r in index_rows(result, "test")}
    assert test and not train & test
    genus = {"101": "D", "102": "D", "103": "D", "201": "H", "202": "H", "301": "V", "302": "V"}
    assert {genus[s] for s in test} <= {genus[s] for s in train}
    metadata = storage.read_json(datasets.side_path(result.out_uri, SPLIT_METADATA_JSON))
    assert sorted(metadata["held_out_species"]["test"]) == sorted(test)
    again = run(butterflies, tmp_path / "again", test_fraction=0.5, seed=3)
    assert {r["species_id"] for r in index_rows(again, "test")} == test


def test_without_genus_guard_whole_genera_can_be_held_out(butterflies, tmp_path):
    held = [
        {
            r["species_id"]
            for r in index_rows(
                run(
                    butterflies,
                    tmp_path / str(seed),
                    test_fraction=0.7,
                    seed=seed,
                    keep_genus_in_train=False,
                ),
                "test",
            )
        }
        for seed in range(6)
    ]
    genus_sets = [{"101", "102", "103"}, {"201", "202"}, {"301", "302"}]
    assert any(g <= h for h in held for g in genus_sets)


def test_image_split_keeps_every_species_in_train(butterflies, tmp_path):
    result = run(butterflies, tmp_path, split_mode="images", test_fraction=0.5, val_fraction=0.25)
    counts = collections.Counter(
        (r["species_id"], split)
        for split in ("train", "val", "test")
        for r in index_rows(result, split)
    )
    for species in {s for s, _ in counts}:
        n = sum(counts[(species, s)] for s in ("train", "val", "test"))
        assert counts[(species, "train")] >= 1
        assert counts[(species, "test")] == min(round(0.5 * n), n - 1)
    assert result.train_images + result.val_images + result.test_images == 4 * 10


def test_species_with_too_few_images_are_left_out(butterflies, tmp_path):
    result = run(butterflies, tmp_path, min_images_per_species=5, test_fraction=0.0)
    trained = {r["species_id"] for r in index_rows(result, "train")}
    assert trained == {"101"}  # only the monarch has 16 images; the others have 4
    metadata = storage.read_json(datasets.side_path(result.out_uri, SPLIT_METADATA_JSON))
    assert "102" in metadata["too_few_images"]


def test_names_from_a_side_table_joined_on_source(butterflies, tmp_path):
    images, table = butterflies
    sources = (
        datasets.read_table(str(images), "images", columns=["source"]).column("source").to_pylist()
    )
    side = pa.table({"source": sources, "species": ["Vanessa atalanta"] * len(sources)})
    pq.write_table(side, tmp_path / "labels.parquet")
    config = TaxonomySettings(
        side_table=str(tmp_path / "labels.parquet"),
        side_table_key="source",
        name_column="species",
        test_fraction=0.0,
    )
    result = build_taxonomy(str(images), str(table), str(tmp_path / "tax"), config)
    assert result.species == 1 and result.labelled_images == len(sources)
    bad = TaxonomySettings(side_table=str(tmp_path / "labels.parquet"), name_column="taxon")
    with pytest.raises(
        TaxonomyInputError,
        match=r"labels\.parquet: missing column\(s\) "
        r"image_id, taxon",
    ):
        build_taxonomy(str(images), str(table), str(tmp_path / "t2"), bad)


def test_table_missing_columns_is_named(tmp_path):
    path = write_table(tmp_path / "t.tsv", [r[:4] for r in ROWS], COLUMNS[:4])
    with pytest.raises(
        TaxonomyTableError,
        match=r"t\.tsv: missing required column\(s\) "
        r"taxonomicStatus, acceptedNameUsageID, "
        r"parentNameUsageID",
    ):
        load_taxon_table(str(path))


def test_duplicate_ids_are_named_with_lines(tmp_path):
    rows = [*ROWS, ROWS[9]]
    with pytest.raises(
        TaxonomyTableError, match=rf"duplicate taxon ids: taxonID 102 on lines 11, {len(rows) + 1}"
    ):
        load_taxon_table(str(write_table(tmp_path / "t.tsv", rows)))


def test_parent_cycles_are_named(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[0][6] = "7017"  # Animalia's parent becomes Nymphalidae: a loop
    with pytest.raises(
        TaxonomyTableError,
        match=r"cycle in parentNameUsageID links through "
        r"taxa .*1 \(line 2\)",
    ):
        load_taxon_table(str(write_table(tmp_path / "t.tsv", [tuple(r) for r in rows])))


def test_table_on_s3(butterflies, bucket, tmp_path):
    images, table = butterflies
    storage.write_bytes(f"s3://{bucket}/Taxon.tsv", table.read_bytes())
    result = build_taxonomy(
        str(images), f"s3://{bucket}/Taxon.tsv", f"s3://{bucket}/taxonomy", TaxonomySettings()
    )
    assert result.known_names == 10
    assert datasets.read_manifest(f"s3://{bucket}/taxonomy", "taxonomy")["parts"]
