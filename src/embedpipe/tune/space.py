"""The search space against ``[train]``: checked before any trial starts, whichever
backend searches it. No torch, no optuna, no kubernetes here."""

from __future__ import annotations

import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from embedpipe.config import ConfigError, SearchDimension, TrainSettings, TuneSettings
from embedpipe.config.base import is_compile_time


def reported_metrics(train: TrainSettings) -> list[str]:
    """The overall validation metrics training prints (``metric_line``), by name."""
    names = [f"val_recall_at_{k}" for k in train.val_k]
    if train.image_text:
        names += [f"val_text_recall_at_{k}" for k in train.val_k]
    return names


def _field_kind(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return _field_kind(next(arg for arg in args if arg is not type(None)))
    if origin is Literal:
        return "choice"
    if origin is tuple:
        return "list"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "str"
    return "other"


def _train_value(base: dict[str, Any], key: str, value: Any) -> Any:
    """``value`` as the train setting ``key`` holds it (32.0 -> 32), or a ValueError saying
    why [train] rejects it."""
    try:
        return getattr(TrainSettings.model_validate({**base, key: value}), key)
    except ValidationError as error:
        problem = error.errors()[0]
        message = problem["msg"].removeprefix("Value error, ")
        raise ValueError(f"{value!r} is not a valid [train].{key}: {message}") from None


def _check_dimension(
    key: str, dimension: SearchDimension, base: dict[str, Any], algorithm: str
) -> SearchDimension:
    field = TrainSettings.model_fields[key]
    kind = _field_kind(field.annotation)
    if kind == "other":
        raise ValueError("only number, text and choice settings can be searched")
    if kind == "list":
        # Searched as text ("32,64,128"), as Optuna stores choices and Katib passes them.
        texts = dimension.type == "categorical" and all(
            isinstance(c, str) for c in dimension.choices
        )
        if not texts:
            raise ValueError(
                "a list setting takes type categorical with text choices, e.g. "
                'choices = ["", "32,64,128"]'
            )
        for choice in dimension.choices:
            _train_value(base, key, choice)
        return dimension
    if dimension.type == "categorical":
        values = tuple(_train_value(base, key, choice) for choice in dimension.choices)
        return dimension.model_copy(update={"choices": values})
    if kind not in ("int", "float"):
        raise ValueError(f"a {kind} setting takes type categorical, not {dimension.type}")
    if kind == "int" and dimension.type == "float":
        raise ValueError("an integer setting takes type int (or categorical), not float")
    for bound in (dimension.low, dimension.high):
        _train_value(base, key, int(bound) if dimension.type == "int" else bound)
    if algorithm == "grid" and dimension.type == "float" and dimension.step is None:
        raise ValueError("grid search needs a step for a float range (or use choices)")
    if dimension.step is not None and dimension.step > dimension.high - dimension.low:
        raise ValueError(
            f"step {dimension.step:g} is larger than the range {dimension.low:g}..."
            f"{dimension.high:g}: every trial would get the same value (use a smaller step)"
        )
    return dimension


def check_search(tune: TuneSettings, train: TrainSettings) -> dict[str, SearchDimension]:
    """The space with every value as [train] holds it; a ConfigError naming the key and the
    problem for an unknown key, a fixed (compile-time) key, a value [train] rejects, a grid
    range without a step, or a metric training never reports."""
    if not tune.space:
        raise ConfigError(
            "[tune].space is empty: name the [train] settings to search, e.g. "
            '[tune.space] lr = { type = "float", low = 1e-5, high = 1e-2, log = true }'
        )
    base = train.model_dump()
    known = TrainSettings.model_fields
    checked = {}
    for key, dimension in tune.space.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"[tune].space.{key}: unknown key, not a [train] setting{hint}")
        if is_compile_time(known[key]):
            raise ConfigError(
                f"[tune].space.{key}: set when the pipeline is compiled (it shapes the "
                "graph), so it cannot be searched"
            )
        try:
            checked[key] = _check_dimension(key, dimension, base, tune.algorithm)
        except ValueError as error:
            raise ConfigError(f"[tune].space.{key}: {error}") from None
    metrics = reported_metrics(train)
    if tune.metric not in metrics:
        raise ConfigError(
            f"[tune].metric: training never reports {tune.metric!r}; with these [train] "
            f"settings it reports {', '.join(metrics)}"
        )
    return checked


def grid_values(dimension: SearchDimension) -> list[Any]:
    """Every value a grid search visits along one dimension."""
    if dimension.type == "categorical":
        return list(dimension.choices)
    step = dimension.step if dimension.step is not None else 1
    count = round((dimension.high - dimension.low) / step) + 1
    values = [dimension.low + i * step for i in range(count)]
    values = [v for v in values if v <= dimension.high + 1e-12 * abs(dimension.high)]
    if dimension.type == "int":
        return [round(v) for v in values]
    return [round(v, 12) for v in values]


def trial_settings(train: TrainSettings, params: dict[str, Any]) -> TrainSettings:
    """[train] with a trial's parameters on top; a ConfigError when they do not go together
    (e.g. loss triplet with image-text pairs)."""
    try:
        return TrainSettings.model_validate({**train.model_dump(), **params})
    except ValidationError as error:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise ConfigError(f"trial parameters {params}: {problems}") from None
