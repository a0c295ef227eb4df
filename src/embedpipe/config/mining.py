"""Settings of the mining stages: mine, combine, to_hf."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embedpipe.config.base import COMPILE_TIME, Section


class MineSettings(Section):
    top_k: int = Field(3, gt=0, description="hard negatives per query")
    query_splits: tuple[str, ...] = Field(("train",), description="splits of the query images")
    candidate_splits: tuple[str, ...] = Field(
        ("train",), description="splits negatives come from (never held-out images)"
    )
    band_names: tuple[str, ...] = Field(
        ("easy", "medium", "hard"), description="difficulty bands, easiest first"
    )
    band_quantiles: tuple[float, ...] = Field(
        (1 / 3, 2 / 3), description="score quantiles between the bands"
    )
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="auto: exact search up to exact_max candidates, IVF above"
    )
    exact_max: int = Field(100_000, gt=0, description="auto: exact search up to this size")
    ivf_nprobe: int = Field(
        32,
        gt=0,
        description="IVF lists probed per query beyond those the search depth fills "
        "(depth: the last rank, top_k by default, + the largest concept + 1 neighbours)",
    )
    hnsw_m: int = Field(32, gt=0, description="HNSW links per node")
    hnsw_ef_search: int = Field(
        128,
        gt=0,
        description="HNSW candidates kept per query beyond the search depth "
        "(the last rank + the largest concept + 1)",
    )
    recall_sample: int = Field(
        1000, gt=0, description="queries whose written negatives are checked by exact search"
    )
    min_recall: float = Field(
        0.9,
        ge=0,
        le=1,
        description="fail a category whose approximate index writes a smaller share of the "
        "exact negatives (measured on recall_sample queries)",
    )
    rank_min: int = Field(
        1,
        ge=1,
        description="first rank a negative may have among the query's other-concept "
        "candidates, most similar = 1 (11 skips the ten most similar)",
    )
    rank_max: int = Field(
        0,
        ge=0,
        description="last rank searched and considered; 0: rank_min - 1 + top_k, or + 10 * "
        "top_k when a score filter or random sampling is set",
    )
    margin: float | None = Field(
        None,
        description="drop candidates scoring above the query's positive score (its mean "
        "similarity to its positives) minus this; 0: nothing more similar; unset: off",
    )
    relative_margin: float | None = Field(
        None,
        ge=0,
        le=1,
        description="drop candidates scoring above the positive score minus this fraction "
        "(0 to 1) of its magnitude (0.05: above 95% of a positive score); unset: off",
    )
    max_score: float | None = Field(
        None, description="drop candidates scoring above this similarity; unset: off"
    )
    sampling: Literal["top", "random"] = Field(
        "top",
        description="top: the top_k most similar candidates left; random: top_k of them drawn "
        "with the seed",
    )
    gpu: bool = Field(True, description="use faiss GPU when the build has it and a GPU is there")
    seed: int = Field(0, description="seed of the recall sample and of random sampling")
    parallelism: int = Field(
        4,
        gt=0,
        description="categories mined at once in the pipeline",
        json_schema_extra=COMPILE_TIME,
    )
    accelerator_type: str = Field(
        "",
        description="GPU the cluster mining steps request (faiss-gpu on the GPU image)",
        json_schema_extra=COMPILE_TIME,
    )
    accelerator_limit: int = Field(
        1, ge=1, description="GPUs each mining step requests", json_schema_extra=COMPILE_TIME
    )

    @model_validator(mode="after")
    def _bands_match_edges(self) -> MineSettings:
        edges = list(self.band_quantiles)
        if len(self.band_names) != len(edges) + 1:
            raise ValueError("band_names needs exactly one more name than band_quantiles")
        if edges != sorted(edges) or any(not 0 < q < 1 for q in edges):
            raise ValueError("band_quantiles must increase strictly inside (0, 1)")
        if self.rank_max and self.rank_max - self.rank_min + 1 < self.top_k:
            raise ValueError(
                f"ranks rank_min {self.rank_min} to rank_max {self.rank_max} hold fewer than "
                f"top_k {self.top_k} candidates"
            )
        return self

    @property
    def filters_scores(self) -> bool:
        """Whether a score filter (margin, relative_margin, max_score) is set."""
        return any(v is not None for v in (self.margin, self.relative_margin, self.max_score))

    @property
    def last_rank(self) -> int:
        """The last rank considered: rank_max, or what 0 stands for."""
        if self.rank_max:
            return self.rank_max
        spread = 10 if self.filters_scores or self.sampling == "random" else 1
        return self.rank_min - 1 + spread * self.top_k


class CombineSettings(Section):
    num_samples: int = Field(0, ge=0, description="sample this many rows (0: all)")
    seed: int = Field(0, description="seed of the sample")


class ToHfSettings(Section):
    max_positives: int = Field(1, ge=0, description="positive images per row")
    seed: int = Field(0, description="seed of the positive images' choice")
