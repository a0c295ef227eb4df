"""The data image, built by `make image-test`, run for real with podman.

Marked `image`: `make test` leaves these out, `make image-test` builds the image and
runs them with EMBEDPIPE_TEST_IMAGE naming it.
"""

import json
import os
import subprocess
import time

import pytest

from embedpipe import __version__
from embedpipe.config import IngestSettings
from embedpipe.core import datasets
from embedpipe.data.demo_data import DemoSpec, generate_demo_dataset
from embedpipe.data.ingest import REJECTED_NAME, ingest_images

pytestmark = pytest.mark.image
IMAGE = os.environ.get("EMBEDPIPE_TEST_IMAGE", "")


@pytest.fixture(scope="module", autouse=True)
def image():
    if not IMAGE:
        pytest.fail("EMBEDPIPE_TEST_IMAGE is not set: run these through `make image-test`")
    return IMAGE


def podman(*args, timeout=300):
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def test_the_smoke_entry_prints_the_version_as_a_non_root_user():
    started = time.perf_counter()
    assert podman("run", "--rm", IMAGE).strip() == f"embedpipe {__version__}"
    print(f"embedpipe --version in the container: {time.perf_counter() - started:.2f} s")
    assert podman("run", "--rm", IMAGE, "id", "-u").strip() == "10001"


def test_labels_name_the_version_and_git_revision():
    inspected = json.loads(podman("image", "inspect", IMAGE))[0]
    labels = inspected["Labels"]
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.title"] == "embedpipe-data"
    print(f"image size: {inspected['Size'] / 1e6:.0f} MB")


def test_the_data_image_has_no_torch_and_kfp_runs_its_python():
    check = (
        "import importlib.util, shutil, sys, embedpipe.cli, kfp.dsl.executor_main; "
        "assert importlib.util.find_spec('torch') is None; "
        "assert 'torch' not in sys.modules; "
        "print(shutil.which('python3'))"
    )
    assert podman("run", "--rm", IMAGE, "python3", "-c", check).strip() == (
        "/opt/embedpipe/bin/python3"
    )


def test_ingest_inside_the_container_writes_parquet_the_host_reads(tmp_path):
    source = tmp_path / "in"
    planted = generate_demo_dataset(str(source), DemoSpec(categories=2, concepts=2, images=6))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the container's user is not the host's
    podman(
        *("run", "--rm", "-v", f"{source}:/data/in:ro", "-v", f"{out}:/data/out", IMAGE),
        *("embedpipe", "ingest", "/data/in", "--out", "/data/out/images", "--workers", "2"),
    )
    in_container = datasets.read_table(str(out / "images"), "images")
    on_host = ingest_images([str(source)], str(tmp_path / "host"), IngestSettings(workers=1))
    expected = datasets.read_table(on_host.out_uri, "images")
    assert in_container.num_rows == expected.num_rows > 0
    assert sorted(in_container.column("image_id").to_pylist()) == sorted(
        expected.column("image_id").to_pylist()
    )
    rejected_uri = datasets.side_path(str(out / "images"), REJECTED_NAME)
    rejected = datasets.read_table_file(rejected_uri, None)
    assert rejected.num_rows == on_host.rejected == len(planted["corrupt"])


def executor_input(parameters, outputs, output_file):
    """The ExecutorInput JSON the KFP driver hands a step, for parameters and output URIs."""
    artifacts = {
        name: {"artifacts": [{"name": name, "type": {"schemaTitle": kind}, "uri": uri}]}
        for name, (kind, uri) in outputs.items()
    }
    return json.dumps(
        {
            "inputs": {"parameterValues": parameters},
            "outputs": {"artifacts": artifacts, "outputFile": output_file},
        }
    )


def test_the_compiled_ingest_step_runs_in_the_image_as_the_kfp_launcher_starts_it(tmp_path):
    """Command and args from our compiled YAML, outputs at s3:// URIs the way the launcher
    maps them (/s3/...), as the image's non-root user."""
    from embedpipe.config import load_settings
    from embedpipe.pipelines.compile import compile_pipelines, read_pipeline_spec

    settings = load_settings(None, {"images.registry": "localhost", "images.tag": "test"})
    (package,) = [p for p in compile_pipelines(settings, str(tmp_path)) if "preprocess" in p]
    spec = read_pipeline_spec(package)
    container = spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]
    source = tmp_path / "in"
    generate_demo_dataset(str(source), DemoSpec(categories=2, concepts=2, images=5))
    bucket = tmp_path / "s3"
    bucket.mkdir()
    bucket.chmod(0o777)  # the cluster mounts an emptyDir here; the step's user writes into it
    ingest_task = spec["root"]["dag"]["tasks"]["ingest"]["inputs"]["parameters"]
    parameters = {
        "sources": ["/data/in"],
        # the compiled [ingest] section, and a run's overrides over it
        "settings": ingest_task["settings"]["runtimeValue"]["constant"],
        "overrides": {"rows_per_shard": 7, "row_group_rows": 4, "workers": 1},
    }
    outputs = {
        "images": ("system.Dataset", "s3://artifacts/run-1/ingest/images"),
        "metrics": ("system.Metrics", "s3://artifacts/run-1/ingest/metrics"),
    }
    request = executor_input(parameters, outputs, "/s3/artifacts/run-1/ingest/executor_output.json")
    args = [request if arg == "{{$}}" else arg for arg in container["args"]]
    podman(
        *("run", "--rm", "-v", f"{source}:/data/in:ro", "-v", f"{bucket}:/s3"),
        *("--entrypoint", container["command"][0], IMAGE, *container["command"][1:], *args),
    )
    written_uri = str(bucket / "artifacts/run-1/ingest/images")
    images = datasets.read_table(written_uri, "images")
    config = IngestSettings(rows_per_shard=7, row_group_rows=4, workers=1)
    expected = ingest_images([str(source)], str(tmp_path / "host"), config)
    assert images.num_rows == expected.images > 0
    assert len(datasets.read_manifest(written_uri)["shards"]) == expected.shards > 1
    reported = json.loads((bucket / "artifacts/run-1/ingest/executor_output.json").read_text())
    written = reported["artifacts"]["images"]["artifacts"][0]
    assert written["metadata"]["rows"] == images.num_rows
