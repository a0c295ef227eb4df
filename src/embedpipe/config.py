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


class Settings(Section):
    global_: GlobalSettings = Field(default_factory=GlobalSettings, alias="global")
    paths: PathsSettings = Field(default_factory=PathsSettings)
    images: ImagesSettings = Field(default_factory=ImagesSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    taxonomy: TaxonomySettings = Field(default_factory=TaxonomySettings)


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


def load_settings(path: str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (``section.key``: value).

    Overrides whose value is None are ignored, so unset CLI flags keep the file's value.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ConfigError(f"{path}: config file not found") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from error
    for dotted_key, value in (overrides or {}).items():
        if value is not None:
            _apply_override(data, dotted_key, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        problems = "\n  ".join(_describe(item) for item in error.errors())
        raise ConfigError(f"{origin}: invalid configuration:\n  {problems}") from None
