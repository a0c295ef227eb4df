"""Settings of the model stages that exist so far: embed (and embed-text)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from embedpipe.config.base import COMPILE_TIME, COMPILE_TIME_FLAG, Section


class EmbedSettings(Section):
    model: str = Field(
        "clip_vitb32",
        description="a registry name (`embedpipe models`)",
        json_schema_extra=COMPILE_TIME_FLAG,
    )
    weights: str = Field(
        "", description='"" the registry\'s weights, "random", a dir, a file or an s3:// prefix'
    )
    tokenizer_dir: str = Field("", description="local tokenizer for hub-tokenizer models")
    seed: int = Field(
        0,
        ge=0,
        description='seed of the initialisation when weights = "random": same seed, same model',
    )
    batch_size: int = Field(
        0,
        ge=0,
        description="images per forward pass; 0: from the device (64 on CPU, 256 on a GPU, "
        "the registry's batch on a B200)",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader decoding processes (0: inline); unset: from the core count",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "amp_bf16", "bf16", "pure_bf16", "fp16"] = Field(
        "auto",
        description="fp32; amp_bf16 (autocast); bf16 or pure_bf16 (bf16 weights); fp16 (autocast); "
        "auto: bf16 on GPU, fp32 on CPU",
    )
    preprocess: Literal["auto", "pil", "device"] = Field(
        "auto",
        description="pil: Pillow + open_clip's transform in the workers (exact); device: JPEGs "
        "decoded (nvjpeg on GPU) and resized on the model's device; auto: device on GPU, "
        "pil on CPU",
    )
    compile: bool = Field(
        False, description="torch.compile the image tower (pays off on long GPU runs)"
    )
    normalize: bool = Field(True, description="L2-normalise the embeddings")
    dim: int = Field(
        0,
        ge=0,
        description="write the first N dimensions (a nested model's prefix), renormalised "
        "when normalize (0: all)",
    )
    draft_decode: bool = Field(False, description="JPEG draft decoding: faster, not bit-exact")
    accelerator_type: str = Field(
        "",
        description="GPU the cluster step requests, e.g. nvidia.com/gpu",
        json_schema_extra=COMPILE_TIME,
    )
    accelerator_limit: int = Field(
        1, ge=1, description="GPUs the cluster step requests", json_schema_extra=COMPILE_TIME
    )
    parallelism: int = Field(
        1,
        ge=1,
        description="pipeline: embed tasks, each on a contiguous group of the input shards "
        "(one GPU each on a cluster), merged into one dataset",
        json_schema_extra=COMPILE_TIME,
    )
