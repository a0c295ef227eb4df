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
    batch_size: int = Field(64, gt=0, description="images per forward pass")
    num_workers: int = Field(1, ge=0, description="DataLoader decoding processes")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    normalize: bool = Field(True, description="L2-normalise the embeddings")
    draft_decode: bool = Field(False, description="JPEG draft decoding: faster, not bit-exact")
    accelerator_type: str = Field(
        "",
        description="GPU the cluster step requests, e.g. nvidia.com/gpu",
        json_schema_extra=COMPILE_TIME,
    )
    accelerator_limit: int = Field(
        1, ge=1, description="GPUs the cluster step requests", json_schema_extra=COMPILE_TIME
    )
