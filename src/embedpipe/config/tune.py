"""Settings of the tune stage: one search space over ``[train]`` settings and ``[mine]``'s
false-negative filters, searched by Optuna on one machine or by a Katib Experiment on the
cluster.

The space is a table per searched setting, named as in ``[train]``, and ``mine.KEY`` for a
mining filter (``max_score``, ``margin``, ``relative_margin``, ``rank_min``, ``rank_max``,
``sampling``), which a trial re-mines its negatives with::

    [tune.space]
    lr = { type = "float", low = 1e-5, high = 1e-2, log = true }
    weight_decay = { type = "float", low = 0.0, high = 0.2 }
    batch_size = { type = "categorical", choices = [32, 64] }
    loss = { type = "categorical", choices = ["infonce", "multipos_sigmoid"] }
    mine.margin = { type = "float", low = 0.0, high = 0.2 }

TOML reads ``mine.margin = ...`` (or a ``[tune.space.mine]`` table) as a nested table;
it is held flat, as ``"mine.margin"``, the name Optuna's trials and the best parameters
carry (a run's JSON overrides may give either form).

What needs ``[train]`` and ``[mine]`` too (is the key a setting, does every value pass it,
does the trainer report the metric) is checked by ``embedpipe.tune.space.check_search``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from embedpipe.config.base import COMPILE_TIME_FLAG, NO_FLAG, Section


class SearchDimension(Section):
    """One searched setting: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(
        description="float or int (a range from low to high) or categorical (choices)"
    )
    low: float | None = Field(None, description="lowest value of a range")
    high: float | None = Field(None, description="highest value of a range")
    log: bool = Field(False, description="sample the range on a log scale (low > 0)")
    step: float | None = Field(None, description="spacing of a range's values (grid needs it)")
    choices: tuple[str | bool | int | float, ...] = Field(
        (), description="the values of a categorical setting"
    )

    @model_validator(mode="after")
    def _well_formed(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical: give at least one choice")
            if self.low is not None or self.high is not None or self.log or self.step:
                raise ValueError("categorical: takes choices only, no low/high/log/step")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"categorical: repeated choices in {list(self.choices)}")
            return self
        if self.choices:
            raise ValueError(f"{self.type}: takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type}: give both low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"{self.type}: low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"empty range: low {self.low:g} is not below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(
                f"log range from {self.low:g} to {self.high:g} reaches zero or below; "
                "a log scale needs low > 0"
            )
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be positive, got {self.step:g}")
            if self.log:
                raise ValueError("log and step together: choose one")
        if self.type == "int":
            bounds = [self.low, self.high, *([self.step] if self.step is not None else [])]
            if not all(float(value).is_integer() for value in bounds):
                raise ValueError(f"int: low, high and step must be integers, got {bounds}")
        return self


MINE_PREFIX = "mine."


class TuneSettings(Section):
    space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="[train] settings to search: [tune.space] name = {type, low, high, log, "
        "step, choices}; mine.KEY searches a [mine] filter (max_score, margin, "
        "relative_margin, rank_min, rank_max, sampling), re-mining each trial's negatives",
        json_schema_extra=NO_FLAG,
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_mine_keys(cls, values):
        """``space.mine`` as a table of dimensions (TOML's ``mine.margin = {...}``) ->
        ``space["mine.margin"]``; a ``mine`` entry with a ``type`` is left for the check to
        name as an unknown [train] key."""
        space = values.get("space") if isinstance(values, dict) else None
        nested = space.get("mine") if isinstance(space, dict) else None
        if not isinstance(nested, dict) or "type" in nested:
            return values
        flat = {k: v for k, v in space.items() if k != "mine"}
        for key, dimension in nested.items():
            flat[f"{MINE_PREFIX}{key}"] = dimension
        return {**values, "space": flat}

    metric: str = Field(
        "val_recall_at_5",
        description="objective: a validation metric training reports (val_recall_at_K)",
    )
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="maximize or minimize the metric"
    )
    n_trials: int = Field(20, gt=0, description="trials in the whole search")
    parallel_trials: int = Field(
        1, gt=0, description="trials at once (katib; optuna runs one at a time)"
    )
    max_failed_trials: int = Field(
        3, ge=0, description="failed trials the search tolerates before it fails"
    )
    algorithm: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe (Katib: multivariate-tpe), random or grid (ranges need step)"
    )
    pruning: bool = Field(
        True, description="optuna: stop trials below the median at a validation (MedianPruner)"
    )
    pruning_startup_trials: int = Field(
        2, ge=0, description="optuna: trials that finish before any is pruned"
    )
    seed: int = Field(0, description="seed of the sampler")
    backend: Literal["optuna", "katib"] = Field(
        "optuna",
        description="optuna: trials in-process; katib: a Katib Experiment on the cluster",
        json_schema_extra=COMPILE_TIME_FLAG,
    )
    trial_template: Literal["trainjob", "job"] = Field(
        "trainjob",
        description="katib: trials as Kubeflow Trainer TrainJobs, or batch Jobs (no Trainer)",
    )
    runtime: str = Field(
        "torch-distributed", description="katib trainjob: the ClusterTrainingRuntime"
    )
    trial_num_nodes: int = Field(1, gt=0, description="katib trainjob: nodes of each trial")
    trial_gpus_per_node: int = Field(
        1, ge=0, description="katib: nvidia.com/gpu of each trial node"
    )
    trial_timeout_minutes: int = Field(
        0, ge=0, description="katib: a trial running longer fails (0: no limit)"
    )
    timeout_minutes: int = Field(
        2880, gt=0, description="katib: the tune step fails if the search runs longer"
    )
    namespace: str = Field("", description='katib: namespace of the Experiment ("": the pod\'s)')
    poll_seconds: float = Field(
        30.0, gt=0, description="katib: seconds between status checks of the Experiment"
    )
