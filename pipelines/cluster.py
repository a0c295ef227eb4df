"""How a step runs on the cluster: credentials, endpoint, GPU pool, retries, caching.

kfp-kubernetes writes these into the compiled YAML's platform spec; kfp.local
ignores them, so the same pipeline runs on one machine unchanged.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from embedpipe.config import ClusterSettings
from embedpipe.config.cluster import OBJECT_STORE_SECRET_KEYS, SETTINGS_CONFIG_MAP_KEYS


def place(
    task: PipelineTask,
    cluster: ClusterSettings,
    *,
    cache: bool,
    accelerator_type: str = "",
    accelerator_limit: int = 1,
) -> PipelineTask:
    """Attach object-store access, retries and caching; GPU steps also get the GPU pool."""
    kubernetes.use_secret_as_env(
        task, cluster.object_store_secret, {key: key for key in OBJECT_STORE_SECRET_KEYS}
    )
    kubernetes.use_config_map_as_env(
        task, cluster.settings_config_map, {key: key for key in SETTINGS_CONFIG_MAP_KEYS}
    )
    task.set_caching_options(cache)
    if cluster.retries:
        task.set_retry(
            num_retries=cluster.retries, backoff_duration=cluster.retry_backoff, backoff_factor=2
        )
    if accelerator_type:
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_limit)
        for label, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator=toleration.operator,
                value=toleration.value or None,
                effect=toleration.effect,
            )
    return task
