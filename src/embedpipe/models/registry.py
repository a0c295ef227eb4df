"""The model registry: named entries that say how a model is built and where weights come from.

Entries are data (``registry.toml`` beside this file); users add or override
entries under ``[models.NAME]`` in their config file. Reading the registry
does not import torch.
"""

import tomllib
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from embedpipe.models.signal_config import SIGNAL_LIBRARY, parse_arch


class ModelError(ValueError):
    """A model name, entry or weights source cannot be used."""


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    library: Literal["open_clip", "transformers", "signal"]
    architecture: str = Field(description="open_clip config name or transformers model class")
    pretrained: str = Field("", description="open_clip tag, hf-hub:ID, or transformers hub id")
    embed_dim: int = Field(gt=0)
    image_size: int = Field(0, ge=0, validate_default=True)
    max_batch_b200: int | None = Field(None, gt=0)
    text: bool = False
    hub_tokenizer: bool = False
    arch: dict[str, Any] = Field(
        default_factory=dict, description="offline architecture config", validate_default=True
    )
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize: Literal["shortest", "squash"] = "shortest"
    open_clip_config: dict[str, Any] | None = Field(
        None, description="a custom open_clip model config, registered under `architecture`"
    )

    @field_validator("image_size")
    @classmethod
    def _image_models_have_a_size(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("library") != SIGNAL_LIBRARY and value <= 0:
            raise ValueError("an image model needs image_size > 0")
        return value

    @field_validator("arch")
    @classmethod
    def _signal_arch_is_complete(cls, value: dict[str, Any], info: ValidationInfo) -> dict:
        if info.data.get("library") == SIGNAL_LIBRARY:
            parse_arch(info.data.get("architecture", ""), value)
        return value

    @property
    def signal(self) -> bool:
        """A signal encoder (``library = "signal"``), not an image model."""
        return self.library == SIGNAL_LIBRARY


def _builtin_entries() -> dict[str, dict[str, Any]]:
    text = resources.files("embedpipe.models").joinpath("registry.toml").read_text("utf-8")
    return tomllib.loads(text)


def load_registry(extra: dict[str, dict[str, Any]] | None = None) -> dict[str, ModelEntry]:
    """Built-in entries, updated by ``extra`` (``[models.NAME]`` tables from a config file)."""
    raw = _builtin_entries()
    for name, fields in (extra or {}).items():
        raw[name] = {**raw.get(name, {}), **fields}
    registry = {}
    for name, fields in raw.items():
        try:
            registry[name] = ModelEntry(name=name, **fields)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                for e in error.errors()
            )
            raise ModelError(f"[models.{name}]: {problems}") from None
    return registry


def get_entry(name: str, extra: dict[str, dict[str, Any]] | None = None) -> ModelEntry:
    registry = load_registry(extra)
    if name not in registry:
        raise ModelError(f"unknown model '{name}'; known: {', '.join(sorted(registry))}")
    return registry[name]


def listing_rows(registry: dict[str, ModelEntry]) -> list[list[str]]:
    """Rows for ``embedpipe models``: name, library, architecture, weights, dim, size, batch."""
    rows = []
    for entry in registry.values():
        if entry.signal:
            length = parse_arch(entry.architecture, entry.arch).signal_length
            size = f"{length} values" if length else "any length"
            rows.append(
                [
                    entry.name,
                    entry.library,
                    entry.architecture,
                    "-",
                    str(entry.embed_dim),
                    size,
                    "-",
                    "signal",
                ]
            )
            continue
        rows.append(
            [
                entry.name,
                entry.library,
                entry.architecture,
                entry.pretrained or "-",
                str(entry.embed_dim),
                str(entry.image_size),
                str(entry.max_batch_b200) if entry.max_batch_b200 else "-",
                ("text+image" if entry.text else "image")
                + (" (hub tokenizer)" if entry.hub_tokenizer else ""),
            ]
        )
    return rows
