"""What every settings section shares: strictness, errors, and how a field is marked.

A field's ``json_schema_extra`` says how it travels:

- ``NO_FLAG``: not a command-line flag (cluster-only settings, or inputs given as
  positional arguments);
- ``COMPILE_TIME``: it shapes the compiled pipeline graph (parallelism, accelerators,
  the model entry, whether a step runs), so it is read when pipelines are compiled and a
  run's overrides may not change it.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

NO_FLAG: dict[str, Any] = {"cli": False}
COMPILE_TIME: dict[str, Any] = {"compile_time": True, "cli": False}
COMPILE_TIME_FLAG: dict[str, Any] = {"compile_time": True}


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


def _type_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` may not fill a field of this type, where pydantic's lax mode would
    coerce it (``true`` -> 1, ``"5"`` -> 5). Integral floats pass as integers: KFP hands
    every number of a dict parameter over as a float."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        return _type_problem(options[0], value) if len(options) == 1 else None
    if origin is Literal:
        annotation = type(args[0])
    if origin in (tuple, list) and isinstance(value, list | tuple) and args:
        return next((p for item in value if (p := _type_problem(args[0], item))), None)
    if annotation is bool and not isinstance(value, bool):
        return f"expected true or false, got {value!r}"
    if annotation in (int, float) and isinstance(value, bool | str):
        return f"expected a number, got {value!r}"
    if annotation is int and isinstance(value, float) and not value.is_integer():
        return f"expected an integer, got {value!r}"
    if annotation is str and not isinstance(value, str):
        return f"expected text, got {value!r}"
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _type_problem(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def has_flag(field: FieldInfo) -> bool:
    return _extra(field).get("cli", True)


def is_compile_time(field: FieldInfo) -> bool:
    return _extra(field).get("compile_time", False)


def compile_time_keys(model: type[Section]) -> frozenset[str]:
    return frozenset(name for name, field in model.model_fields.items() if is_compile_time(field))
