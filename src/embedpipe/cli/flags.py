"""Command-line flags derived from the settings models: each option is declared once.

A field ``rows_per_shard`` of ``[ingest]`` becomes ``--rows-per-shard``: its type and
choices come from the annotation (``Literal`` -> choices, ``bool`` -> ``--x/--no-x``,
tuples -> comma-separated lists), its help from the description, with the default
appended here. A flag left out keeps the config file's value. ``settings_flags`` writes
settings back as such flags (the command line of a pod on the cluster).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from embedpipe.config import ConfigError, Section, Settings, has_flag, load_settings

DEST_SEPARATOR = "__"  # argparse dest: section__key
METAVARS = {int: "N", float: "X", str: "TEXT"}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _list_of(item_type: type) -> Callable[[str], tuple]:
    def parse(value: str) -> tuple:
        return tuple(item_type(item) for item in value.split(",") if item)

    parse.__name__ = f"comma-separated {item_type.__name__} list"
    return parse


def _argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return _argument(inner)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin in (tuple, list) and args and args[0] in (str, int, float):
        return {"type": _list_of(args[0]), "metavar": "A,B,..."}
    if annotation in METAVARS:
        return {"type": annotation, "metavar": METAVARS[annotation]}
    raise TypeError(f"no flag for a field of type {annotation!r}: mark it NO_FLAG")


def _text(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if isinstance(default, tuple | list):
        return ",".join(_text(item) for item in default)
    if default is None:
        return "unset"
    if default == "":
        return '""'
    if isinstance(default, bool):
        return "on" if default else "off"
    return _text(default)


def add_settings_flags(parser: argparse.ArgumentParser, section: str, model: type[Section]) -> None:
    """``--config`` and one flag per field of ``model`` (the ``[section]`` of the config)."""
    parser.add_argument("--config", metavar="FILE", help="TOML config; flags override it")
    group = parser.add_argument_group(f"[{section}] settings")
    labels = {}
    for key, field in model.model_fields.items():
        if not has_flag(field):
            continue
        description = (field.description or "").replace("%", "%%")
        group.add_argument(
            flag_name(key),
            dest=f"{section}{DEST_SEPARATOR}{key}",
            default=None,
            help=f"{description} (default: {_default_text(field)})",
            **_argument(field.annotation),
        )
        labels[f"{section}.{key}"] = flag_name(key)
    parser.set_defaults(flag_labels=labels)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then ``--config``, then the flags given."""
    overrides = {
        dest.replace(DEST_SEPARATOR, ".", 1): value
        for dest, value in vars(args).items()
        if DEST_SEPARATOR in dest
    }
    return load_settings(getattr(args, "config", None), overrides, labels=args.flag_labels)


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return format(value, ".10g") if isinstance(value, float) else str(value)


def settings_flags(
    section: str, settings: Section, searched: dict[str, str] | None = None
) -> list[str]:
    """The flags that set ``settings`` (the ``[section]`` of the config): one for every
    setting that differs from its default, then ``--key=PLACEHOLDER`` for each searched
    one (Katib substitutes the placeholders)."""
    searched = searched or {}
    flags = []
    model = type(settings)
    defaults = model()
    for key, field in model.model_fields.items():
        value = getattr(settings, key)
        if key in searched or not has_flag(field) or value == getattr(defaults, key):
            continue
        if isinstance(value, bool):
            flags.append(flag_name(key) if value else f"--no-{flag_name(key)[2:]}")
            continue
        if isinstance(value, tuple) and any("," in str(item) for item in value):
            raise ConfigError(
                f"[{section}].{key}: {value!r} has a comma, which a comma-separated flag of "
                "the cluster command cannot carry"
            )
        flags.append(f"{flag_name(key)}={_flag_value(value)}")
    flags += [f"{flag_name(key)}={placeholder}" for key, placeholder in searched.items()]
    return flags
