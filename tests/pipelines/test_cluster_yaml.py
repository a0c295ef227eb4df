"""What the compiled YAML asks of a cluster: credentials, GPU pool, retries, caching."""

from pathlib import Path

import pytest
import yaml
from conftest import compile_for_overlay

from embedpipe.pipelines.cluster import OBJECT_STORE_SECRET_KEYS, SETTINGS_CONFIG_MAP_KEYS

ROOT = Path(__file__).resolve().parents[2]
GPU_EXECUTORS = {"exec-embed", "exec-mine"}
UNCACHED_TASKS = {"ingest"}  # its sources live outside KFP's view


def read_compiled(out):
    compiled = {}
    for name in ("preprocess", "mine"):
        text = (out / f"{name}.yaml").read_text()
        spec, platform = yaml.safe_load_all(text)
        compiled[name] = (text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"])
    return compiled


def container_tasks(spec):
    """Every task that runs a container, inside sub-DAGs (dsl.If, ParallelFor) too, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    components = spec["components"]
    return {
        name: task
        for name, task in tasks.items()
        if "executorLabel" in components[task["componentRef"]["name"]]
    }


@pytest.fixture(scope="module")
def gpu_cloud(gpu_cloud_build):
    return read_compiled(gpu_cloud_build)


def test_every_step_reads_credentials_from_the_secret_and_endpoint_from_the_config_map(
    gpu_cloud,
):
    for _, spec, platform in gpu_cloud.values():
        executors = platform["executors"]
        assert set(executors) == set(spec["deploymentSpec"]["executors"]) - {
            name for name in spec["deploymentSpec"]["executors"] if "importer" in name
        }
        for config in executors.values():
            (secret,) = config["secretAsEnv"]
            assert secret["secretName"] == "embedpipe-object-store"
            assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == {
                key: key for key in OBJECT_STORE_SECRET_KEYS
            }
            (config_map,) = config["configMapAsEnv"]
            assert config_map["configMapName"] == "embedpipe-settings"
            assert {k["configMapKey"] for k in config_map["keyToEnv"]} == set(
                SETTINGS_CONFIG_MAP_KEYS
            )


def test_gpu_steps_request_gpus_on_the_b200_pool_and_data_steps_do_not(gpu_cloud):
    seen_gpu = set()
    for _, spec, platform in gpu_cloud.values():
        for name, executor in spec["deploymentSpec"]["executors"].items():
            resources = executor.get("container", {}).get("resources", {})
            config = platform["executors"].get(name, {})
            if name in GPU_EXECUTORS:
                seen_gpu.add(name)
                assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
                assert str(resources["accelerator"]["resourceCount"]) == "1"
                assert config["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
                assert config["tolerations"] == [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ]
                assert executor["container"]["image"] == "ghcr.io/embedpipe/embedpipe-gpu:0.1.0"
            else:
                assert "accelerator" not in resources
                assert "nodeSelector" not in config and "tolerations" not in config
                if "container" in executor and "importer" not in name:
                    image = executor["container"]["image"]
                    assert image == "ghcr.io/embedpipe/embedpipe-data:0.1.0"
    assert seen_gpu == GPU_EXECUTORS


def test_every_step_retries_and_caching_is_chosen_per_step(gpu_cloud):
    checked = set()
    for _, spec, _ in gpu_cloud.values():
        for name, task in container_tasks(spec).items():
            if "importer" in name:
                continue
            checked.add(name)
            assert task["retryPolicy"]["maxRetryCount"] == 2, name
            assert task["retryPolicy"]["backoffDuration"] == "330s", name
            expected_cache = name not in UNCACHED_TASKS
            assert task.get("cachingOptions", {}).get("enableCache", False) is expected_cache, name
    assert {"check-settings", "ingest", "embed", "partition", "mine", "combine", "to-hf"} <= checked


def test_the_compiled_yaml_carries_no_secret_and_no_local_path(gpu_cloud):
    for text, spec, _ in gpu_cloud.values():
        assert spec["defaultPipelineRoot"] == "s3://embedpipe-artifacts/pipeline-root"
        for leaked in ("sentinel-secret-value-1234", "sentinel-key-id-5678", str(ROOT), "/tmp/"):
            assert leaked not in text
        assert str(Path.home()) + "/" not in text


def test_the_local_overlay_has_no_gpu_pool(tmp_path):
    compiled = read_compiled(compile_for_overlay("local", tmp_path))
    _, spec, platform = compiled["preprocess"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-embed"]["container"].get(
        "resources", {}
    )
    assert not any("nodeSelector" in config for config in platform["executors"].values())
    image = spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]["image"]
    assert image == "localhost:5001/embedpipe/embedpipe-data:0.1.0"
    assert spec["defaultPipelineRoot"] == "s3://mlpipeline/embedpipe"


def test_the_default_retry_comes_after_the_lease_of_a_killed_pods_lock():
    from embedpipe.config.cluster import ClusterSettings
    from embedpipe.core.locks import LEASE_SECONDS

    backoff = ClusterSettings().retry_backoff
    seconds = int(backoff[:-1]) * {"s": 1, "m": 60, "h": 3600}[backoff[-1]]
    assert seconds > LEASE_SECONDS
