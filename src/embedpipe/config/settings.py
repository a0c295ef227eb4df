"""One TOML file with a section per stage, validated on load.

Precedence: defaults, then the file, then command-line flags. Unknown keys
and bad values are errors that name the file, the section and the key (or the
flag that set it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from embedpipe.config.base import ConfigError, Section, compile_time_keys
from embedpipe.config.cluster import ClusterSettings, ImagesSettings
from embedpipe.config.data import CatalogSettings, DedupSettings, IngestSettings, SplitSettings
from embedpipe.config.evaluate import EvaluateSettings
from embedpipe.config.mining import CombineSettings, MineSettings, ToHfSettings
from embedpipe.config.models import EmbedSettings
from embedpipe.config.publish import PublishSettings
from embedpipe.config.taxonomy import TaxonomySettings
from embedpipe.config.train import TrainSettings
from embedpipe.config.tune import TuneSettings


class GlobalSettings(Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level of the commands"
    )
    pipeline_root: str = Field("runs", description="where kfp.local keeps run artifacts")
    build_dir: str = Field("build", description="where `embedpipe compile` writes IR YAML")


class PathsSettings(Section):
    """The inputs of pipelines: run parameters, not stage options."""

    sources: list[str] = Field(
        default_factory=list, description="image folders, tar archives or s3:// prefixes"
    )
    images: str = Field(
        "", description="mine pipeline: image dataset; empty: the latest local preprocess run"
    )
    metadata: str = Field(
        "", description="mine pipeline: image ids with category/concept/split (dedup kept)"
    )
    embeddings: str = Field("", description="mine and train pipelines: the embeddings dataset")
    splits: str = Field(
        "",
        description="train, tune and evaluate pipelines: the split output; empty: the latest run",
    )
    negatives: str = Field(
        "",
        description="train and tune pipelines: combined hard negatives; empty: the latest mine run",
    )
    model: str = Field(
        "", description="evaluate pipeline: a trained checkpoint; empty: the latest train run"
    )
    select: str = Field(
        "", description="evaluate pipeline: the images to evaluate (dedup kept); empty: latest"
    )


# Stage name -> its section of the config file. A stage's name is the same in the config
# ([to_hf]), the component, the pipeline's run parameter and the command (`to-hf`).
STAGE_SETTINGS: dict[str, type[Section]] = {
    "ingest": IngestSettings,
    "catalog": CatalogSettings,
    "split": SplitSettings,
    "taxonomy": TaxonomySettings,
    "dedup": DedupSettings,
    "embed": EmbedSettings,
    "mine": MineSettings,
    "combine": CombineSettings,
    "to_hf": ToHfSettings,
    "train": TrainSettings,
    "tune": TuneSettings,
    "evaluate": EvaluateSettings,
    "publish": PublishSettings,
}


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
    combine: CombineSettings = Field(default_factory=CombineSettings)
    to_hf: ToHfSettings = Field(default_factory=ToHfSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra registry entries, [models.NAME]"
    )

    def section(self, stage: str) -> dict[str, Any]:
        """A stage's settings as compiled into a pipeline: JSON types, and unset (None)
        values left out, since KFP parameters cannot hold null; the stage's model fills
        them in again."""
        return getattr(self, stage).model_dump(mode="json", exclude_none=True)


def _describe(error: dict[str, Any], labels: dict[str, str], section: str = "") -> str:
    location = [str(part) for part in error["loc"]]
    if not section and len(location) > 1:
        section, location = location[0], location[1:]
    key = ".".join(location)
    if section and not key:  # a check across the section's keys
        return f"[{section}]: {error['msg'].removeprefix('Value error, ')}"
    where = f"[{section}].{key}" if section else key
    where = labels.get(f"{section}.{key}", where)
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "value_error":  # our own validators say what they got
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
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
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML config file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


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
    labels: dict[str, str] | None = None,
) -> Settings:
    """Defaults, the TOML file at ``path``, each TOML file in ``layers``, then ``overrides``.

    Layers (a cluster overlay's cluster.toml) replace keys section by section.
    Overrides (``section.key``: value) whose value is None are ignored, so unset
    CLI flags keep the file's value. ``labels`` name where an override came from
    (``section.key`` -> ``--flag``), for errors.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        data = _read_toml(path)
    for layer in layers:
        _merge_layer(data, _read_toml(layer), str(layer))
        origin = f"{origin} + {layer}"
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for dotted_key, value in given.items():
        _apply_override(data, dotted_key, value)
    labels = {key: label for key, label in (labels or {}).items() if key in given}
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        problems = "\n  ".join(_describe(item, labels) for item in error.errors())
        raise ConfigError(f"{origin}: invalid configuration:\n  {problems}") from None


def stage_settings(stage: str, compiled: dict[str, Any], overrides: dict[str, Any]) -> Section:
    """A stage's compiled settings with a run's overrides on top, validated.

    This is what a component does first: an unknown key, a key that is fixed when the
    pipeline is compiled, or a bad value is an error naming ``[stage].key``.
    """
    if stage not in STAGE_SETTINGS:
        raise ConfigError(f"unknown stage '{stage}'; known: {', '.join(STAGE_SETTINGS)}")
    model = STAGE_SETTINGS[stage]
    if not isinstance(overrides, dict):
        raise ConfigError(f"[{stage}] overrides: expected a JSON object, got {overrides!r}")
    fixed = sorted(compile_time_keys(model) & set(overrides))
    if fixed:
        raise ConfigError(
            f"[{stage}].{fixed[0]}: set when the pipeline is compiled (it shapes the graph); "
            "change it in the config file and compile again"
        )
    try:
        return model.model_validate({**compiled, **overrides})
    except ValidationError as error:
        problems = "; ".join(_describe(item, {}, stage) for item in error.errors())
        raise ConfigError(f"invalid settings: {problems}") from None


def check_overrides(compiled: dict[str, dict[str, Any]], overrides: dict[str, dict]) -> None:
    """Validate every stage's compiled settings with a run's overrides; one error names
    every problem. Overrides for a stage the pipeline does not run are errors too."""
    problems = [
        f"[{stage}]: overrides given, but this pipeline has no {stage} step"
        for stage, values in overrides.items()
        if values and stage not in compiled
    ]
    for stage, section in compiled.items():
        try:
            stage_settings(stage, section, overrides.get(stage) or {})
        except ConfigError as error:
            problems.append(str(error).removeprefix("invalid settings: "))
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
