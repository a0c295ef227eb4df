"""Compiled IR checks, a component run through kfp.local, and one end-to-end local run."""

from pathlib import Path

import pytest
import yaml

from embedpipe import datasets
from embedpipe.catalog import build_catalog
from embedpipe.config import load_settings
from embedpipe.pipelines.compile import compile_pipelines
from embedpipe.pipelines.local import run_locally
from embedpipe.splits import create_concept_splits


def settings_for(tmp_path, sources, extra=""):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n'
        f"[paths]\nsources = {[str(s) for s in sources]!r}\n"
        '[images]\nregistry = "registry.example/ml"\ntag = "v9"\n'
        f"[ingest]\nworkers = 1\n{extra}"
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
    assert set(spec["root"]["dag"]["tasks"]) == {"ingest", "catalog", "split"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["rows_per_shard"]["defaultValue"] == 123
    assert "defaultValue" not in params["sources"]  # sources are given per run
    assert spec["root"]["dag"]["tasks"]["ingest"]["cachingOptions"] == {}
    assert spec["root"]["dag"]["tasks"]["catalog"]["cachingOptions"]["enableCache"] is True
    text = Path(path).read_text()
    assert str(tmp_path) not in text


@pytest.mark.slow
def test_local_run_matches_the_library(demo_dir, tmp_path):
    settings = settings_for(tmp_path, [demo_dir])
    outputs = run_locally("preprocess", settings)
    assert set(outputs) == {"images", "catalog", "splits"}
    assert all(Path(uri).is_relative_to(tmp_path / "runs") for uri in outputs.values())
    direct_catalog = build_catalog(outputs["images"], str(tmp_path / "c"), settings.catalog)
    assert datasets.read_table(outputs["catalog"], "catalog").equals(
        datasets.read_table(direct_catalog.out_uri, "catalog")
    )
    direct_splits = create_concept_splits(
        direct_catalog.out_uri, str(tmp_path / "s"), settings.split
    )
    assert datasets.read_table(outputs["splits"], "splits").equals(
        datasets.read_table(direct_splits.out_uri, "splits")
    )
    assert datasets.read_table(outputs["images"], "images").num_rows == 408
    assert (Path(outputs["splits"]) / "split_report.md").is_file()
