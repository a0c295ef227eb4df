"""Every dataset embedpipe writes reads as exactly its rows in the common Parquet tools.

The stages run for real on small generated data; each output folder is then
read by pandas, pyarrow.dataset, Hugging Face ``datasets`` and DuckDB, and the
row count compared with the manifest's ``rows``.
"""

import os
from urllib.parse import urlparse

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from conftest import flat_tree, jpeg_bytes, write_tree
from gbif import write_images, write_table

from embedpipe.config import (
    CatalogSettings,
    CombineSettings,
    DedupSettings,
    EmbedSettings,
    IngestSettings,
    MineSettings,
    SplitSettings,
    TaxonomySettings,
)
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.data.catalog import build_catalog
from embedpipe.data.dedup import find_duplicates
from embedpipe.data.demo_signals import SIGNALS_NAME, SignalDemoSpec, generate_signal_demo
from embedpipe.data.ingest import REJECTED_NAME, ingest_images
from embedpipe.data.split import create_concept_splits
from embedpipe.embed.images import embed_images
from embedpipe.embed.signals import embed_signals
from embedpipe.mining.combine import combine_negatives
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import partition_by_category
from embedpipe.models.registry import get_entry
from embedpipe.taxonomy.split import SPLITS
from embedpipe.taxonomy.stage import build_taxonomy


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_entry) -> dict[str, dict[str, str]]:
    """Name -> folder of every kind of dataset the stages write, from one small run, and of
    the bundles (folders of datasets) among the outputs."""
    root = tmp_path_factory.mktemp("readers")
    source = flat_tree(root / "src", categories=2, concepts=4, images=5)
    write_tree(
        source,
        {
            "cat0/concept0/copy.jpg": (source / "cat1/concept2/img01.jpg").read_bytes(),
            "cat1/concept3/broken.jpg": jpeg_bytes()[:50],  # a row in rejected.parquet
        },
    )
    out = {name: str(root / name) for name in ("images", "catalog", "splits")}
    bundles = {name: str(root / name) for name in ("dedup", "partitions", "taxonomy")}
    ingest_images([str(source)], out["images"], IngestSettings(workers=1, rows_per_shard=12))
    build_catalog(out["images"], out["catalog"], CatalogSettings())
    create_concept_splits(
        out["catalog"], out["splits"], SplitSettings(concept_frac=0.5, min_concepts_threshold=2)
    )
    find_duplicates(out["images"], bundles["dedup"], DedupSettings(workers=1), out["splits"])
    for part in ("fingerprints", "groups", "kept"):
        out[f"dedup/{part}"] = storage.join(bundles["dedup"], part)
    out["embeddings"] = str(root / "embeddings")
    embed_images(
        out["images"],
        out["embeddings"],
        EmbedSettings(weights="random", batch_size=16, num_workers=0),
        tiny_entry,
    )
    out["signal_images"], out["signal_embeddings"] = embed_a_signal_column(out["images"], root)
    partitions = partition_by_category(out["dedup/kept"], out["embeddings"], bundles["partitions"])
    negatives = []
    for category, partition in sorted(partitions.items()):
        out[f"partition/{category}"] = partition
        negatives.append(str(root / "negatives" / category))
        mine_category(partition, negatives[-1], MineSettings(top_k=2))
        out[f"negatives/{category}"] = negatives[-1]
    out["combined"] = str(root / "combined")
    combine_negatives(negatives, out["combined"], CombineSettings())

    write_images(root / "butterflies")
    ingest_images([str(root / "butterflies")], str(root / "bimages"), IngestSettings(workers=1))
    table = str(write_table(root / "Taxon.tsv"))
    build_taxonomy(str(root / "bimages"), table, bundles["taxonomy"], TaxonomySettings())
    for part in ("species", "tree", "rank_keys", *(f"index/{s}" for s in SPLITS)):
        out[f"taxonomy/{part}"] = storage.join(bundles["taxonomy"], part)

    generate_signal_demo(str(root / "galaxies"), SignalDemoSpec(objects=2, views=2))
    out["signal_images"] = str(root / "signal_images")
    signals = IngestSettings(
        workers=1, signals=str(root / "galaxies" / SIGNALS_NAME), signal_key="source"
    )
    ingest_images([str(root / "galaxies")], out["signal_images"], signals)
    return {"datasets": out, "bundles": bundles}


def embed_a_signal_column(images: str, root) -> tuple[str, str]:
    """The images with a list<float32> signal column (a missing one among them), and
    embed-signal's output for it."""
    table = datasets.read_table(images)
    rng = np.random.default_rng(0)
    signals = [rng.normal(size=20 + row % 7).astype(np.float32) for row in range(table.num_rows)]
    signals[0] = None
    table = table.append_column("signal", pa.array(signals, pa.list_(pa.float32())))
    with_signals = str(root / "signal_images")
    datasets.write_table(with_signals, table, IMAGES_KIND, rows_per_shard=16)
    out = str(root / "signal_embeddings")
    config = EmbedSettings(model="signal_cnn_small", weights="random", device="cpu")
    embed_signals(with_signals, out, config, "signal", get_entry("signal_cnn_small"))
    return with_signals, out


@pytest.fixture(scope="module")
def artifacts(run) -> dict[str, str]:
    return run["datasets"]


def manifest_rows(folder: str) -> int:
    return datasets.read_manifest(folder)["rows"]


def test_every_artifact_has_rows_and_side_files_only_in_the_hidden_folder(run, artifacts):
    assert manifest_rows(artifacts["images"]) == 41
    rejected = datasets.side_path(artifacts["images"], REJECTED_NAME)
    assert datasets.read_table_file(rejected, None).num_rows == 1
    assert manifest_rows(artifacts["dedup/groups"]) >= 2  # the copied image and its original
    assert manifest_rows(artifacts["combined"]) > 0
    empty = sorted(name for name, folder in artifacts.items() if not manifest_rows(folder))
    assert empty == ["taxonomy/index/val"]  # still read as no rows, by all but `datasets`
    for name, folder in artifacts.items():
        files = top_files(folder)
        assert files and all(datasets.SHARD_PATTERN.match(f) for f in files), (name, files)
    for name, folder in run["bundles"].items():
        assert top_files(folder) == [], name
        assert datasets.read_manifest(folder)["parts"], name


def top_files(folder: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_file())


def test_pandas_reads_each_folder_as_its_rows(artifacts):
    for name, folder in artifacts.items():
        assert len(pd.read_parquet(folder)) == manifest_rows(folder), name


def test_pyarrow_dataset_reads_each_folder_as_its_rows(artifacts):
    for name, folder in artifacts.items():
        found = pads.dataset(folder, format="parquet")
        assert found.count_rows() == manifest_rows(folder), name
        expected = datasets.read_table(folder)
        assert found.schema.names == expected.schema.names, name


def test_hugging_face_datasets_reads_each_folder_as_its_rows(artifacts, tmp_path, monkeypatch):
    import datasets as hf

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, folder in artifacts.items():
        # load_dataset cannot make a split of no rows ("corresponds to no data").
        if manifest_rows(folder) > 0:
            loaded = hf.load_dataset(
                "parquet", data_dir=folder, split="train", cache_dir=str(tmp_path / "hf-cache")
            )
            assert loaded.num_rows == manifest_rows(folder), name
            assert loaded.column_names == datasets.read_table(folder).schema.names, name


def test_duckdb_reads_each_folder_as_its_rows(artifacts):
    for name, folder in artifacts.items():
        query = f"select count(*) from read_parquet('{folder}/*.parquet')"
        assert duckdb.sql(query).fetchall() == [(manifest_rows(folder),)], name


def test_signal_columns_read_as_float_lists_and_numbers_everywhere(artifacts, tmp_path):
    import datasets as hf

    folder = artifacts["signal_images"]
    assert manifest_rows(folder) == 11  # 12 views, one planted NaN spectrum rejected
    frame = pd.read_parquet(folder)
    assert frame["spectrum"].iloc[0].dtype == np.float32 and len(frame["spectrum"].iloc[0]) == 256
    assert frame["redshift"].dtype == np.float64
    schema = pads.dataset(folder, format="parquet").schema
    assert schema.field("spectrum").type == pa.list_(pa.float32())
    loaded = hf.load_dataset(
        "parquet", data_dir=folder, split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.features["spectrum"].feature == hf.Value("float32")
    assert loaded.features["redshift"] == hf.Value("float64")
    assert len(loaded[0]["spectrum"]) == 256
    query = (
        f"select typeof(spectrum), typeof(redshift) from read_parquet('{folder}/*.parquet') limit 1"
    )
    assert duckdb.sql(query).fetchall() == [("FLOAT[]", "DOUBLE")]


def test_s3_datasets_read_through_pyarrows_s3_filesystem(bucket, s3_endpoint, tmp_path):
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=4)
    write_tree(source, {"cat0/concept1/broken.jpg": b"not an image"})
    uri = f"s3://{bucket}/images"
    ingest_images([str(source)], uri, IngestSettings(workers=1, rows_per_shard=3))
    rows = manifest_rows(uri)
    assert rows == 8 and len(datasets.read_manifest(uri)["shards"]) == 3
    endpoint = urlparse(s3_endpoint)
    filesystem = pafs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    assert len(pd.read_parquet(f"{bucket}/images", filesystem=filesystem)) == rows
    found = pads.dataset(f"{bucket}/images", filesystem=filesystem, format="parquet")
    assert found.count_rows() == rows
    assert found.to_table(columns=["image_id"]).num_rows == rows


def test_a_folder_without_the_manifest_is_refused_by_name(tmp_path):
    written = datasets.write_table(str(tmp_path / "d"), pa.table({"x": [1, 2]}), "t")
    assert written["rows"] == 2
    (tmp_path / "d" / ".embedpipe" / "manifest.json").unlink()
    with pytest.raises(datasets.DatasetError, match=r"no \.embedpipe/manifest\.json"):
        datasets.read_table(str(tmp_path / "d"))
    (tmp_path / "d" / "_manifest.json").write_text("{}")
    with pytest.raises(datasets.DatasetError, match=r"older embedpipe wrote _manifest\.json"):
        datasets.read_manifest(str(tmp_path / "d"))


def test_rewrite_removes_only_its_own_stale_shards(tmp_path):
    folder = str(tmp_path / "d")
    first = datasets.write_table(folder, pa.table({"x": [1]}), "t")
    storage.write_json(datasets.side_path(folder, "notes.json"), {"kept": True})
    (tmp_path / "d" / "other.parquet").write_bytes(b"someone else's file")
    second = datasets.write_table(folder, pa.table({"x": [2]}), "t")
    assert not (tmp_path / "d" / first["shards"][0]["path"]).exists()
    assert (tmp_path / "d" / second["shards"][0]["path"]).is_file()
    assert (tmp_path / "d" / "other.parquet").is_file()
    assert storage.read_json(datasets.side_path(folder, "notes.json")) == {"kept": True}
