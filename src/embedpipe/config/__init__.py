"""One TOML file with a section per stage, validated on load.

Precedence: defaults, then the file, then command-line flags. Unknown keys
and bad values are errors that name the file, the section and the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GlobalSettings(Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    pipeline_root: str = Field("runs", description="where kfp.local keeps run artifacts")
    build_dir: str = Field("build", description="where `embedpipe compile` writes IR YAML")


class PathsSettings(Section):
    sources: list[str] = Field(
        default_factory=list, description="image folders, tar archives or s3:// prefixes"
    )


class ImagesSettings(Section):
    """Where component images come from; the pipelines read them from here only."""

    registry: str = "ghcr.io/embedpipe"
    data: str = "embedpipe-data"
    gpu: str = "embedpipe-gpu"
    tag: str = "0.1.0"

    @property
    def data_image(self) -> str:
        return f"{self.registry.rstrip('/')}/{self.data}:{self.tag}"

    @property
    def gpu_image(self) -> str:
        return f"{self.registry.rstrip('/')}/{self.gpu}:{self.tag}"


class IngestSettings(Section):
    rows_per_shard: int = Field(5000, gt=0, description="images per Parquet shard")
    row_group_rows: int = Field(256, gt=0, description="images per Parquet row group")
    workers: int = Field(0, ge=0, description="decoding processes; 0 = one per CPU core")
    strip_components: int = Field(
        0, ge=0, description="leading path components to drop (like tar --strip-components)"
    )
    split_dirnames: tuple[str, ...] = Field(
        ("train", "test"), description="top-level folder names that mean an explicit split"
    )

    @field_validator("split_dirnames")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must be a non-empty list of distinct folder names")
        return value


class CatalogSettings(Section):
    num_train: int | None = Field(
        None, ge=1, description="exact train images per concept; overrides train_fraction"
    )
    train_fraction: float = Field(0.2, gt=0.0, le=1.0)
    seed: int = 42
    relative: bool = Field(False, description="JSON paths relative to the source root")


class SplitSettings(Section):
    concept_frac: float = Field(0.65, ge=0.0, le=1.0)
    min_concepts_threshold: int = Field(3, ge=1)
    test_sample_frac: float = Field(1.0, ge=0.0, le=1.0)
    max_test_images: int = Field(200, ge=0)
    seed: int = 23


class TaxonomySettings(Section):
    table: str = Field("", description="GBIF/Darwin Core taxon TSV; empty: no taxonomy step")
    name_column: str = Field("concept", description="column holding the species name")
    side_table: str = Field("", description="Parquet/CSV with the name column, joined per image")
    side_table_key: Literal["image_id", "source"] = "image_id"
    kingdom: str = Field("", description="resolve names in this kingdom only (homonyms)")
    split_mode: Literal["species", "images"] = "species"
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    min_images_per_species: int = Field(1, ge=1)
    keep_genus_in_train: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> TaxonomySettings:
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("test_fraction + val_fraction must be below 1")
        return self


class EmbedSettings(Section):
    model: str = Field("clip_vitb32", description="a registry name (`embedpipe models`)")
    weights: str = Field("", description='"" registry source, "random", a dir, file or s3://')
    tokenizer_dir: str = Field("", description="local tokenizer for hub-tokenizer models")
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(1, ge=0, description="DataLoader decoding processes")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    normalize: bool = True
    draft_decode: bool = Field(False, description="JPEG draft decoding: faster, not bit-exact")
    accelerator_type: str = Field(
        "", description="GPU to request in the cluster, e.g. nvidia.com/gpu"
    )
    accelerator_limit: int = Field(1, ge=1)


class DedupSettings(Section):
    hash: Literal["phash", "dhash", "whash", "colorhash"] = "phash"
    hash_size: int = Field(8, ge=4, le=32)
    max_distance: int = Field(6, ge=0, description="Hamming distance for near duplicates")
    workers: int = Field(0, ge=0, description="hashing processes; 0 = one per core")
    drop: Literal["none", "duplicates", "leaking"] = "none"
    report_groups: int = Field(24, ge=0, description="largest groups shown in the HTML report")


class MineSettings(Section):
    images: str = Field("", description="image dataset; empty: the latest local preprocess run")
    metadata: str = Field("", description="image ids with category/concept/split (dedup kept)")
    embeddings: str = Field("", description="embeddings dataset")
    top_k: int = Field(3, gt=0, description="hard negatives per query")
    query_splits: tuple[str, ...] = ("train",)
    candidate_splits: tuple[str, ...] = ("train",)
    band_names: tuple[str, ...] = ("easy", "medium", "hard")
    band_quantiles: tuple[float, ...] = (1 / 3, 2 / 3)
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_max: int = Field(100_000, gt=0, description="auto: exact search up to this size")
    ivf_nprobe: int = Field(16, gt=0)
    hnsw_m: int = Field(32, gt=0)
    hnsw_ef_search: int = Field(128, gt=0)
    recall_sample: int = Field(1000, gt=0, description="queries used to measure recall")
    gpu: bool = Field(True, description="use faiss GPU when the build has it and a GPU is there")
    parallelism: int = Field(4, gt=0, description="categories mined at once in the pipeline")
    num_samples: int = Field(0, ge=0, description="combine: sample this many rows (0: all)")
    max_positives: int = Field(1, ge=0, description="to-hf: positive images per row")
    seed: int = 0
    accelerator_type: str = ""
    accelerator_limit: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _bands_match_edges(self) -> MineSettings:
        edges = list(self.band_quantiles)
        if len(self.band_names) != len(edges) + 1:
            raise ValueError("band_names needs exactly one more name than band_quantiles")
        if edges != sorted(edges) or any(not 0 < q < 1 for q in edges):
            raise ValueError("band_quantiles must increase strictly inside (0, 1)")
        return self


class Toleration(Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"

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
    retries: int = Field(2, ge=0, description="retries of a failed step (transient failures)")
    retry_backoff: str = Field("30s", pattern=r"^\d+(s|m|h)$")


class Settings(Section):
    global_: GlobalSettings = Field(default_factory=GlobalSettings, alias="global")
    paths: PathsSettings = Field(default_factory=PathsSettings)
    images: ImagesSettings = Field(default_factory=ImagesSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    taxonomy: TaxonomySettings = Field(default_factory=TaxonomySettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    embed: EmbedSettings = Field(default_factory=EmbedSettings)
    mine: MineSettings = Field(default_factory=MineSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra registry entries, [models.NAME]"
    )


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    section, key = (location[0], ".".join(location[1:])) if len(location) > 1 else ("", location[0])
    where = f"[{section}].{key}" if section else key
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


def _apply_override(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    section, _, key = dotted_key.partition(".")
    if not key:
        raise ConfigError(f"override '{dotted_key}': expected section.key")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"override '{dotted_key}': [{section}] is not a section")
    target[key] = value


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: config file not found") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error


def _merge_layer(data: dict[str, Any], layer: dict[str, Any], origin: str) -> None:
    """A layer replaces keys inside each section it names, not whole sections."""
    for section, values in layer.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: top-level key '{section}' must be a [section]")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{origin}: [{section}] is not a section in the base config")
        target.update(values)


def load_settings(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    layers: tuple[str | Path, ...] = (),
) -> Settings:
    """Defaults, the TOML file at ``path``, each TOML file in ``layers``, then ``overrides``.

    Layers (a cluster overlay's cluster.toml) replace keys section by section.
    Overrides (``section.key``: value) whose value is None are ignored, so unset
    CLI flags keep the file's value.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        data = _read_toml(path)
    for layer in layers:
        _merge_layer(data, _read_toml(layer), str(layer))
        origin = f"{origin} + {layer}"
    for dotted_key, value in (overrides or {}).items():
        if value is not None:
            _apply_override(data, dotted_key, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        problems = "\n  ".join(_describe(item) for item in error.errors())
        raise ConfigError(f"{origin}: invalid configuration:\n  {problems}") from None
