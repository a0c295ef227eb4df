"""Kubeflow Trainer TrainJobs and batch Jobs that run ``embedpipe train`` on the GPU pool,
built through the typed models of ``kubeflow-trainer-api``.

A TrainJob runs the command on ``numNodes`` pods of the ``torch-distributed`` runtime
under ``torchrun``, which reads the ``PET_*`` variables Trainer injects (nodes, rank,
master address, processes per node). A batch Job (where Trainer is not installed) runs
it in one pod, whose ``embedpipe train`` starts a process per GPU itself.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from kubeflow_trainer_api import models as trainer

from embedpipe.config import ClusterSettings, ConfigError, TrainSettings
from embedpipe.config.cluster import OBJECT_STORE_SECRET_KEYS, SETTINGS_CONFIG_MAP_KEYS

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
PRIMARY_CONTAINER = "node"  # the torch-distributed runtime's trainer container
JOB_CONTAINER = "training"
LAUNCHER = "embedpipe.io/launcher"  # the TrainJob's runtime patch manager
SPEC_HASH = "embedpipe.io/spec-hash"
# Keeps Istio sidecars out of training pods: a sidecar never exits, so the pod (and
# Katib's metrics collector, which waits for the training container) would hang.
NO_SIDECAR = {"sidecar.istio.io/inject": "false"}
LABELS = {"app.kubernetes.io/part-of": "embedpipe"}


def object_name(prefix: str, *parts: str) -> str:
    """A DNS-1035 name that is the same every time for the same parts (a KFP run and
    task): a retried launcher finds the object its first attempt created."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def spec_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("spec"), sort_keys=True).encode()).hexdigest()[:16]


def _env(cluster: ClusterSettings) -> list[trainer.IoK8sApiCoreV1EnvVar]:
    """Object-store credentials from the Secret, endpoint and region from the ConfigMap:
    the same variables every pipeline step gets."""
    secret = [
        trainer.IoK8sApiCoreV1EnvVar(
            name=key,
            value_from=trainer.IoK8sApiCoreV1EnvVarSource(
                secret_key_ref=trainer.IoK8sApiCoreV1SecretKeySelector(
                    name=cluster.object_store_secret, key=key
                )
            ),
        )
        for key in OBJECT_STORE_SECRET_KEYS
    ]
    settings = [
        trainer.IoK8sApiCoreV1EnvVar(
            name=key,
            value_from=trainer.IoK8sApiCoreV1EnvVarSource(
                config_map_key_ref=trainer.IoK8sApiCoreV1ConfigMapKeySelector(
                    name=cluster.settings_config_map, key=key
                )
            ),
        )
        for key in SETTINGS_CONFIG_MAP_KEYS
    ]
    return secret + settings


def _tolerations(cluster: ClusterSettings) -> list[trainer.IoK8sApiCoreV1Toleration]:
    return [
        trainer.IoK8sApiCoreV1Toleration(
            key=t.key, operator=t.operator, value=t.value or None, effect=t.effect
        )
        for t in cluster.gpu_tolerations
    ]


def _gpus(count: int) -> trainer.IoK8sApiCoreV1ResourceRequirements | None:
    if not count:
        return None
    return trainer.IoK8sApiCoreV1ResourceRequirements.from_dict(
        {"limits": {"nvidia.com/gpu": str(count)}}
    )


def _deadline(minutes: int) -> int | None:
    return minutes * 60 if minutes else None


def train_job(
    name: str,
    image: str,
    arguments: list[str],
    cluster: ClusterSettings,
    *,
    runtime: str = "torch-distributed",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    timeout_minutes: int = 0,
    namespace: str = "",
    setup: str = "",
) -> trainer.TrainerV1alpha1TrainJob:
    """A TrainJob of ``num_nodes`` pods, each with ``gpus_per_node`` GPUs, running
    ``torchrun -m embedpipe ARGUMENTS`` on the GPU pool (after the shell line ``setup`` in
    each pod, when given: ``sh -c "SETUP && torchrun ..."``)."""
    pod_patch = trainer.TrainerV1alpha1PodTemplatePatch(
        metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(annotations=dict(NO_SIDECAR)),
        spec=trainer.TrainerV1alpha1PodSpecPatch(
            node_selector=dict(cluster.gpu_node_selector) or None,
            tolerations=_tolerations(cluster) or None,
        ),
    )
    patch = trainer.TrainerV1alpha1RuntimePatch(
        manager=LAUNCHER,
        training_runtime_spec=trainer.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=trainer.TrainerV1alpha1JobSetTemplatePatch(
                spec=trainer.TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        trainer.TrainerV1alpha1ReplicatedJobPatch(
                            name="node",
                            template=trainer.TrainerV1alpha1JobTemplatePatch(
                                spec=trainer.TrainerV1alpha1JobSpecPatch(template=pod_patch)
                            ),
                        )
                    ]
                )
            )
        ),
    )
    return trainer.TrainerV1alpha1TrainJob(
        api_version=TRAINER_API,
        kind="TrainJob",
        metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name or None, namespace=namespace or None, labels=dict(LABELS)
        ),
        spec=trainer.TrainerV1alpha1TrainJobSpec(
            runtime_ref=trainer.TrainerV1alpha1RuntimeRef(
                name=runtime, api_group="trainer.kubeflow.org", kind="ClusterTrainingRuntime"
            ),
            trainer=trainer.TrainerV1alpha1Trainer(
                image=image,
                command=_with_setup(["torchrun", "-m", "embedpipe", *arguments], setup),
                num_nodes=num_nodes,
                resources_per_node=_gpus(gpus_per_node),
                env=_env(cluster),
            ),
            runtime_patches=[patch],
            active_deadline_seconds=_deadline(timeout_minutes),
        ),
    )


def batch_job(
    name: str,
    image: str,
    arguments: list[str],
    cluster: ClusterSettings,
    *,
    gpus: int = 1,
    timeout_minutes: int = 0,
    namespace: str = "",
    setup: str = "",
) -> trainer.IoK8sApiBatchV1Job:
    """One pod running ``embedpipe ARGUMENTS`` (one process per GPU), after the shell line
    ``setup`` when given, never restarted: a failed trial is Katib's to count."""
    container = trainer.IoK8sApiCoreV1Container(
        name=JOB_CONTAINER,
        image=image,
        command=_with_setup(["embedpipe", *arguments, f"--nproc-per-node={max(1, gpus)}"], setup),
        resources=_gpus(gpus),
        env=_env(cluster),
    )
    pod = trainer.IoK8sApiCoreV1PodTemplateSpec(
        metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            annotations=dict(NO_SIDECAR), labels=dict(LABELS)
        ),
        spec=trainer.IoK8sApiCoreV1PodSpec(
            containers=[container],
            restart_policy="Never",
            node_selector=dict(cluster.gpu_node_selector) or None,
            tolerations=(_tolerations(cluster) or None) if gpus else None,
        ),
    )
    return trainer.IoK8sApiBatchV1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=trainer.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name or None, namespace=namespace or None, labels=dict(LABELS)
        ),
        spec=trainer.IoK8sApiBatchV1JobSpec(
            backoff_limit=0, template=pod, active_deadline_seconds=_deadline(timeout_minutes)
        ),
    )


def _with_setup(command: list[str], setup: str) -> list[str]:
    """``command``, or ``sh -c "SETUP && COMMAND"``: the form Katib's metrics collector
    keeps as it is (it wraps ``sh -c``'s line, redirecting the output of its last command,
    the training, to the file it reads)."""
    return ["sh", "-c", f"{setup} && {shlex.join(command)}"] if setup else command


def as_dict(model: Any) -> dict[str, Any]:
    """The object as the API server takes it (camelCase, unset fields left out)."""
    return model.to_dict()


def check_cluster_model(train: TrainSettings, config_models: dict[str, Any]) -> None:
    """Pods on the cluster run ``embedpipe train`` with the packaged model registry: a
    model defined in the config's [models] is unknown there."""
    own = config_models or {}
    named = [("model", train.model)]
    if train.pairs == "image_signal":
        named.append(("signal_model", train.signal_model))
    for key, name in named:
        if name in own:
            raise ConfigError(
                f"[train].{key} {name!r} is a [models] entry of the config, which the "
                "cluster's `embedpipe train` does not read; use a model of the packaged registry"
            )
