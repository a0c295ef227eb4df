"""The search space against ``[train]`` and ``[mine]``: checked before any trial starts,
whichever backend searches it. No torch, no optuna, no kubernetes here.

A key is a ``[train]`` setting, or ``mine.KEY`` for one of ``[mine]``'s false-negative
filters (``MINE_KEYS``): a trial with such keys re-mines its negatives with ``[mine]`` and
its values on top (``embedpipe.mining.negatives``)."""

from __future__ import annotations

import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from embedpipe.config import (
    ConfigError,
    MineSettings,
    SearchDimension,
    TrainSettings,
    TuneSettings,
)
from embedpipe.config.base import Section, is_compile_time
from embedpipe.config.tune import MINE_PREFIX

# The [mine] settings a search may vary (DECISIONS 14): the false-negative filters.
MINE_KEYS = ("max_score", "margin", "relative_margin", "rank_min", "rank_max", "sampling")


def reported_metrics(train: TrainSettings) -> list[str]:
    """The overall validation metrics training prints (``metric_line``), by name."""
    names = [f"val_recall_at_{k}" for k in train.val_k]
    if train.image_text:
        names += [f"val_text_recall_at_{k}" for k in train.val_k]
    if train.pairs == "image_signal":
        names += [f"val_signal_to_image_recall_at_{k}" for k in train.val_k]
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


def _setting_value(base: Section, key: str, value: Any) -> Any:
    """``value`` as the setting ``key`` of ``base``'s section holds it (32.0 -> 32), or a
    ValueError saying why the section rejects it."""
    model = type(base)
    section = "mine" if model is MineSettings else "train"
    try:
        return getattr(model.model_validate({**base.model_dump(), key: value}), key)
    except ValidationError as error:
        problem = error.errors()[0]
        message = problem["msg"].removeprefix("Value error, ")
        raise ValueError(f"{value!r} is not a valid [{section}].{key}: {message}") from None


def _check_dimension(
    key: str, dimension: SearchDimension, base: Section, algorithm: str
) -> SearchDimension:
    field = type(base).model_fields[key]
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
            _setting_value(base, key, choice)
        return dimension
    if dimension.type == "categorical":
        values = tuple(_setting_value(base, key, choice) for choice in dimension.choices)
        return dimension.model_copy(update={"choices": values})
    if kind not in ("int", "float"):
        raise ValueError(f"a {kind} setting takes type categorical, not {dimension.type}")
    if kind == "int" and dimension.type == "float":
        raise ValueError("an integer setting takes type int (or categorical), not float")
    for bound in (dimension.low, dimension.high):
        _setting_value(base, key, int(bound) if dimension.type == "int" else bound)
    if algorithm == "grid" and dimension.type == "float" and dimension.step is None:
        raise ValueError("grid search needs a step for a float range (or use choices)")
    if dimension.step is not None and dimension.step > dimension.high - dimension.low:
        raise ValueError(
            f"step {dimension.step:g} is larger than the range {dimension.low:g}..."
            f"{dimension.high:g}: every trial would get the same value (use a smaller step)"
        )
    return dimension


def mine_key(key: str) -> str | None:
    """The [mine] setting a space key names (``mine.margin`` -> ``margin``), or None."""
    return key.removeprefix(MINE_PREFIX) if key.startswith(MINE_PREFIX) else None


def searches_mining(space: dict[str, Any]) -> bool:
    """Whether the space names a [mine] filter, so each trial re-mines its negatives."""
    return any(mine_key(key) for key in space)


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's parameters as ([train] overrides, [mine] overrides)."""
    train = {key: value for key, value in params.items() if not mine_key(key)}
    mine = {mine_key(key): value for key, value in params.items() if mine_key(key)}
    return train, mine


def _check_mine_dimension(
    key: str, name: str, dimension: SearchDimension, mine: MineSettings, algorithm: str
) -> SearchDimension:
    if name not in MINE_KEYS:
        close = difflib.get_close_matches(name, MINE_KEYS, n=1)
        hint = f"; did you mean mine.{close[0]}?" if close else ""
        raise ConfigError(
            f"[tune].space.{key}: unknown key, not a searchable [mine] filter (one of "
            f"{', '.join(MINE_KEYS)}){hint}"
        )
    try:
        return _check_dimension(name, dimension, mine, algorithm)
    except ValueError as error:
        raise ConfigError(f"[tune].space.{key}: {error}") from None


def check_search(
    tune: TuneSettings, train: TrainSettings, mine: MineSettings | None = None
) -> dict[str, SearchDimension]:
    """The space with every value as [train] (or [mine], ``mine`` or its defaults) holds
    it; a ConfigError naming the key and the problem for an unknown key, a fixed
    (compile-time) key, a value the section rejects, a grid range without a step, or a
    metric training never reports."""
    if not tune.space:
        raise ConfigError(
            "[tune].space is empty: name the [train] settings to search, e.g. "
            '[tune.space] lr = { type = "float", low = 1e-5, high = 1e-2, log = true }'
        )
    known = TrainSettings.model_fields
    checked = {}
    for key, dimension in tune.space.items():
        name = mine_key(key)
        if name is not None and train.pairs == "image_signal":
            raise ConfigError(
                f"[tune].space.{key}: images paired with signals train on no mined "
                "negatives, so there is no [mine] filter to search"
            )
        if name is not None:
            mine = mine or MineSettings()
            checked[key] = _check_mine_dimension(key, name, dimension, mine, tune.algorithm)
            continue
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
            checked[key] = _check_dimension(key, dimension, train, tune.algorithm)
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


def trial_mine_settings(mine: MineSettings, params: dict[str, Any]) -> MineSettings:
    """[mine] with a trial's [mine] parameters on top (``split_params``); a ConfigError
    when they do not go together (e.g. rank_min 5 and rank_max 6 with top_k 3)."""
    try:
        return MineSettings.model_validate({**mine.model_dump(), **params})
    except ValidationError as error:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        given = {f"{MINE_PREFIX}{key}": value for key, value in params.items()}
        raise ConfigError(f"trial parameters {given}: {problems}") from None
