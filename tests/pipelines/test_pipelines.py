"""Compiled IR checks, a component run through kfp.local, and one end-to-end local run."""

from pathlib import Path

import pytest
from gbif import write_images, write_table

from embedpipe.config import load_settings
from embedpipe.core import datasets
from embedpipe.data.catalog import build_catalog
from embedpipe.data.split import create_concept_splits
from embedpipe.pipelines import PIPELINE_NAMES
from embedpipe.pipelines.compile import compile_pipelines, read_pipeline_spec
from embedpipe.pipelines.local import run_locally
from embedpipe.taxonomy.stage import build_taxonomy

TINY_MODEL = """
[embed]
model = "tiny"
weights = "random"
num_workers = 0
[models.tiny]
library = "open_clip"
architecture = "embedpipe-tiny"
embed_dim = 64
image_size = 64
text = true
open_clip_config = { embed_dim = 64, vision_cfg = { image_size = 64, layers = 2, width = 128, \
patch_size = 32 }, text_cfg = { context_length = 32, vocab_size = 49408, width = 128, heads = 2, \
layers = 2 } }
"""


def settings_for(tmp_path, sources, extra="", sections=""):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n'
        f"[paths]\nsources = {[str(s) for s in sources]!r}\n"
        '[images]\nregistry = "registry.example/ml"\ntag = "v9"\n'
        f"[ingest]\nworkers = 1\n{extra}{sections}{TINY_MODEL}"
    )
    return load_settings(str(config))


def load_settings_text(tmp_path, embed_lines):
    """The tiny-model config with extra keys appended to its [embed] section."""
    config = tmp_path / "gpu.toml"
    config.write_text(TINY_MODEL.replace("num_workers = 0\n", f"num_workers = 0{embed_lines}"))
    return load_settings(str(config))


def test_compiled_pipeline_takes_images_and_defaults_from_config(tmp_path):
    gpu = '\naccelerator_type = "nvidia.com/gpu"\naccelerator_limit = 2\n'
    settings = settings_for(tmp_path, ["s3://bucket/raw"], "rows_per_shard = 123\n")
    path = str(tmp_path / "build" / "preprocess.yaml")
    compile_pipelines(settings, str(tmp_path / "build"))
    spec = read_pipeline_spec(path)
    executors = spec["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images.pop("exec-embed") == "registry.example/ml/embedpipe-gpu:v9"
    assert set(images.values()) == {"registry.example/ml/embedpipe-data:v9"}
    assert "accelerator" not in executors["exec-embed"]["container"].get("resources", {})
    with_gpu = load_settings_text(tmp_path, gpu)
    compile_pipelines(with_gpu, str(tmp_path / "build-gpu"))
    gpu_spec = read_pipeline_spec(tmp_path / "build-gpu" / "preprocess.yaml")
    gpu_executors = gpu_spec["deploymentSpec"]["executors"]
    accelerator = gpu_executors["exec-embed"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert str(accelerator["resourceCount"]) == "2"
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"check-settings", "ingest", "catalog", "split", "dedup", "embed"}
    assert tasks["embed"]["inputs"]["artifacts"]["select"]["taskOutputArtifact"] == {
        "outputArtifactKey": "kept",
        "producerTask": "dedup",
    }
    assert tasks["ingest"]["dependentTasks"] == ["check-settings"]
    ingest_settings = tasks["ingest"]["inputs"]["parameters"]["settings"]["runtimeValue"]
    assert ingest_settings["constant"]["rows_per_shard"] == 123
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"sources", "ingest", "catalog", "split", "taxonomy", "dedup", "embed"}
    assert params["ingest"]["defaultValue"] == {}
    assert '"rows_per_shard": 123' in spec["pipelineInfo"]["description"]
    table = tmp_path / "Taxon.tsv"
    with_taxonomy = settings_for(
        tmp_path, ["s3://b/raw"], sections=f'[taxonomy]\ntable = "{table}"\n'
    )
    compile_pipelines(with_taxonomy, str(tmp_path / "build-taxonomy"))
    taxonomy_tasks = read_pipeline_spec(tmp_path / "build-taxonomy" / "preprocess.yaml")["root"]
    assert "taxonomy" in taxonomy_tasks["dag"]["tasks"]
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
    kept = set(datasets.read_table(outputs["dedup/kept"], "selection").column(0).to_pylist())
    embeddings = datasets.read_table(outputs["embed/embeddings"], "embeddings")
    in_dataset_order = datasets.read_table(images, "images", ["image_id"]).column(0).to_pylist()
    expected = [i for i in dict.fromkeys(in_dataset_order) if i in kept]
    assert embeddings.column("image_id").to_pylist() == expected
    assert "Duplicates: 8 groups" in Path(outputs["dedup/report"]).read_text()


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


def test_mine_pipeline_compiles_a_parallel_fan_out(tmp_path):
    extra = '\n[mine]\nparallelism = 3\naccelerator_type = "nvidia.com/gpu"\n'
    settings = settings_for(tmp_path, ["s3://bucket/raw"], sections=extra)
    paths = compile_pipelines(settings, str(tmp_path / "build"))
    spec = read_pipeline_spec(tmp_path / "build" / "mine.yaml")
    assert sorted(Path(p).name for p in paths) == [
        f"{name}.yaml" for name in sorted(PIPELINE_NAMES)
    ]
    tasks = spec["root"]["dag"]["tasks"]
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("partition-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    importers = [name for name in spec["deploymentSpec"]["executors"] if "importer" in name]
    assert len(importers) == 3
    combine_input = tasks["combine"]["inputs"]["artifacts"]["per_category"]
    assert combine_input["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    mine_executor = spec["deploymentSpec"]["executors"]["exec-mine"]["container"]
    assert mine_executor["image"] == "registry.example/ml/embedpipe-gpu:v9"
    assert mine_executor["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"


@pytest.mark.slow
def test_mine_pipeline_runs_after_preprocess(demo_dir, tmp_path):
    import datasets as hf

    settings = settings_for(tmp_path, [demo_dir], sections="\n[mine]\ntop_k = 2\n")
    preprocess = run_locally("preprocess", settings)
    outputs = run_locally("mine", settings)
    negatives = datasets.read_table(outputs["combine/combined"], "hard-negatives")
    per_category = [key for key in outputs if key.endswith("/mine")]
    assert len(per_category) == 4
    kept = datasets.read_table(preprocess["dedup/kept"], "selection").to_pylist()
    train_ids = {row["image_id"] for row in kept if row["split"] == "train"}
    assert set(negatives.column("query_id").to_pylist()) == train_ids
    assert all(len(n) == 2 for n in negatives.column("negative_ids").to_pylist())
    reloaded = hf.load_from_disk(outputs["to-hf/hf_dataset"])
    assert len(reloaded) == negatives.num_rows
    report = Path(outputs["combine/report"]).read_text()
    assert f"Hard negatives: 4 categories, {2 * negatives.num_rows} negatives" in report


@pytest.mark.slow
def test_the_embed_fan_out_gives_what_one_task_gives(demo_dir, tmp_path):
    """Three embed tasks over groups of shards, merged, equal one run over all of them,
    duplicates across groups included (the demo plants exact duplicates)."""
    from conftest import assert_same_embeddings

    from embedpipe.embed.images import embed_images
    from embedpipe.models.registry import get_entry

    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n'
        f"[paths]\nsources = {[str(demo_dir)]!r}\n"
        "[ingest]\nworkers = 1\nrows_per_shard = 50\n"
        + TINY_MODEL.replace("num_workers = 0\n", "num_workers = 0\nparallelism = 3\n")
    )
    settings = load_settings(str(config))
    outputs = run_locally("preprocess", settings)
    merged = outputs["merge-embeddings/embeddings"]
    manifest = datasets.read_manifest(merged, "embeddings")
    assert manifest["merged_parts"] == 3
    one_task = embed_images(
        outputs["ingest/images"],
        str(tmp_path / "one"),
        settings.embed,
        get_entry("tiny", settings.models),
        outputs["dedup/kept"],
    )
    assert_same_embeddings(
        datasets.read_table(merged, "embeddings"), datasets.read_table(one_task.out_uri)
    )
