"""Compiled IR checks, a component run through kfp.local, and one end-to-end local run."""

from pathlib import Path

import pytest
import yaml
from gbif import write_images, write_table

from embedpipe import datasets
from embedpipe.catalog import build_catalog
from embedpipe.config import load_settings
from embedpipe.pipelines.compile import compile_pipelines
from embedpipe.pipelines.local import run_locally
from embedpipe.splits import create_concept_splits
from embedpipe.taxonomy.stage import build_taxonomy


def settings_for(tmp_path, sources, extra="", sections=""):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n'
        f"[paths]\nsources = {[str(s) for s in sources]!r}\n"
        '[images]\nregistry = "registry.example/ml"\ntag = "v9"\n'
        f"[ingest]\nworkers = 1\n{extra}{sections}"
    )
    return load_settings(str(config))


def test_compiled_pipeline_takes_images_and_defaults_from_config(tmp_path):
    settings = settings_for(tmp_path, ["s3://bucket/raw"], "rows_per_shard = 123\n")
    [path] = compile_pipelines(settings, str(tmp_path / "build"))
    spec = yaml.safe_load(Path(path).read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "registry.example/ml/embedpipe-data:v9"
    }
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "catalog", "split", "condition-1"}
    condition = tasks["condition-1"]["triggerPolicy"]["condition"]
    assert "pipelinechannel--taxonomy_table" in condition
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["rows_per_shard"]["defaultValue"] == 123
    assert "defaultValue" not in params["sources"]  # sources are given per run
    assert spec["root"]["dag"]["tasks"]["ingest"]["cachingOptions"] == {}
    assert spec["root"]["dag"]["tasks"]["catalog"]["cachingOptions"]["enableCache"] is True
    text = Path(path).read_text()
    assert str(tmp_path) not in text


@pytest.mark.slow
def test_local_run_matches_the_library_and_skips_taxonomy(demo_dir, tmp_path):
    settings = settings_for(tmp_path, [demo_dir])
    outputs = run_locally("preprocess", settings)
    assert {"ingest/images", "catalog/catalog", "split/splits", "split/report"} <= set(outputs)
    assert not any(key.startswith("taxonomy") for key in outputs)
    assert all(Path(uri).is_relative_to(tmp_path / "runs") for uri in outputs.values())
    images = outputs["ingest/images"]
    direct_catalog = build_catalog(images, str(tmp_path / "c"), settings.catalog)
    assert datasets.read_table(outputs["catalog/catalog"], "catalog").equals(
        datasets.read_table(direct_catalog.out_uri, "catalog")
    )
    direct_splits = create_concept_splits(
        direct_catalog.out_uri, str(tmp_path / "s"), settings.split
    )
    assert datasets.read_table(outputs["split/splits"], "splits").equals(
        datasets.read_table(direct_splits.out_uri, "splits")
    )
    assert datasets.read_table(images, "images").num_rows == 408
    assert "| box | 5 | 4 |" in Path(outputs["split/report"]).read_text()


@pytest.mark.slow
def test_local_run_includes_taxonomy_when_a_table_is_configured(tmp_path):
    images_dir = write_images(tmp_path / "butterflies")
    table = write_table(tmp_path / "Taxon.tsv")
    section = f'[taxonomy]\ntable = "{table}"\ntest_fraction = 0.3\n'
    settings = settings_for(tmp_path, [images_dir], sections=section)
    outputs = run_locally("preprocess", settings)
    produced = outputs["taxonomy/taxonomy"]
    direct = build_taxonomy(
        outputs["ingest/images"], str(table), str(tmp_path / "t"), settings.taxonomy
    )
    for part in ("species", "tree", "rank_keys", "index/train", "index/test"):
        assert datasets.read_table(f"{produced}/{part}").equals(
            datasets.read_table(f"{direct.out_uri}/{part}")
        )
    assert datasets.read_manifest(produced, "taxonomy")["metrics"]["known_names"] == 10
