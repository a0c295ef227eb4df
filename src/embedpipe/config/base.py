"""What every settings section shares: strictness, errors, and how a field is marked.

A field's ``json_schema_extra`` says how it travels:

- ``NO_FLAG``: not a command-line flag (cluster-only settings, or inputs given as
  positional arguments);
- ``COMPILE_TIME``: it shapes the compiled pipeline graph (parallelism, accelerators,
  the model entry, whether a step runs), so it is read when pipelines are compiled and a
  run's overrides may not change it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

NO_FLAG: dict[str, Any] = {"cli": False}
COMPILE_TIME: dict[str, Any] = {"compile_time": True, "cli": False}
COMPILE_TIME_FLAG: dict[str, Any] = {"compile_time": True}


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def has_flag(field: FieldInfo) -> bool:
    return _extra(field).get("cli", True)


def is_compile_time(field: FieldInfo) -> bool:
    return _extra(field).get("compile_time", False)


def compile_time_keys(model: type[Section]) -> frozenset[str]:
    return frozenset(name for name, field in model.model_fields.items() if is_compile_time(field))
