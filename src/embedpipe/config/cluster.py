"""Where component images come from, and how steps run on a Kubeflow cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embedpipe.config.base import Section

# The keys of the Secret and ConfigMap in manifests/base, passed to every pod that touches
# the object store as the standard AWS variables (embedpipe.core.storage, boto3, pyarrow).
OBJECT_STORE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SETTINGS_CONFIG_MAP_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_REGION")


class ImagesSettings(Section):
    """Where component images come from; the pipelines read them from here only."""

    registry: str = Field("ghcr.io/embedpipe", description="registry and namespace of the images")
    data: str = Field("embedpipe-data", description="the data (CPU) image's name")
    gpu: str = Field("embedpipe-gpu", description="the GPU image's name")
    tag: str = Field("0.1.0", description="the tag of both images")

    @property
    def data_image(self) -> str:
        return f"{self.registry.rstrip('/')}/{self.data}:{self.tag}"

    @property
    def gpu_image(self) -> str:
        return f"{self.registry.rstrip('/')}/{self.gpu}:{self.tag}"


class Toleration(Section):
    key: str = Field(description="taint key")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists or Equal")
    value: str = Field("", description="taint value (Equal only)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "NoSchedule", description="taint effect"
    )

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Toleration:
        if (self.operator == "Equal") != bool(self.value):
            raise ValueError("operator Equal needs a value; Exists takes none")
        return self


class ClusterSettings(Section):
    """How steps run on a Kubeflow cluster; kfp.local ignores all of it.

    The names match manifests/base; each overlay's cluster.toml (read by
    `embedpipe compile --overlay`) says how its GPU pool is selected.
    """

    object_store_secret: str = Field(
        "embedpipe-object-store", description="Secret with AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY"
    )
    settings_config_map: str = Field(
        "embedpipe-settings", description="ConfigMap with AWS_ENDPOINT_URL_S3 and AWS_REGION"
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels of the GPU pool, for GPU steps"
    )
    gpu_tolerations: tuple[Toleration, ...] = Field(
        default=(Toleration(key="nvidia.com/gpu"),),
        description="taints of the GPU pool that GPU steps tolerate",
    )
    pipeline_root: str = Field(
        "", description="where KFP keeps run artifacts (s3://...); empty: the cluster default"
    )
    launcher_timeout_minutes: int = Field(
        2880, gt=0, description="a multi-node train step fails when its TrainJob runs longer"
    )
    launcher_poll_seconds: float = Field(
        30.0, gt=0, description="seconds between a launcher's status checks"
    )
    retries: int = Field(2, ge=0, description="retries of a failed step (transient failures)")
    retry_backoff: str = Field(
        "330s",
        pattern=r"^\d+(s|m|h)$",
        description="wait before the first retry (doubling after); past the 300 s lease of "
        "the output lock a killed pod leaves, so the retry can take it over",
    )
