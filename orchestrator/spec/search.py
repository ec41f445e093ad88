"""The `search:` section of a sweep spec: which hyperparameters Optuna tunes in every cell.

    search:
      metric: val/linear_top1_cls        # a validation metric: never select on the test split
      trials_per_cell: 6
      sampler: tpe                       # tpe | random | grid
      pruner: median                     # median | successive_halving | hyperband | none
      params:
        optimizer.lr: {low: 3.0e-4, high: 1.0e-2, log: true}
        optimizer.weight_decay: {choices: [0.0, 0.05]}

Pure pydantic: orchestrator/spec/sections.py checks the parts that need the trial schema (keys,
values) and the metric names.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.spec.problems import Frozen
from trainer.contract import VALIDATION_PREFIX

# Measured by the trainer at every `evaluation.every_steps` (the cheap global probes), so a pruner
# can compare learning curves; the dense metrics exist only at the end.
INTERMEDIATE_METRICS = tuple(VALIDATION_PREFIX + m for m in ("linear_top1_cls", "linear_top1_cls_patch", "knn_top1"))
FINAL_METRICS = ("linear_top1_cls", "linear_top1_cls_patch", "knn_top1", "seg_miou", "seg_pixel_acc",
                 "depth_rmse", "depth_abs_rel")
LOWER_IS_BETTER = ("depth_rmse", "depth_abs_rel")


class SearchParam(Frozen):
    """One tuned setting: a range (`low`, `high`, optional `log` or `step`) or a list of `choices`."""

    low: int | float | None = None  # ints stay ints: an integer range (is_int)
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchParam":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either choices or low/high (with log or step), not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices (a list)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna samples log ranges continuously)")
        return self

    @property
    def is_int(self) -> bool:
        """An integer range when low, high (and step) are written as integers."""
        ends = [self.low, self.high] + ([self.step] if self.step is not None else [])
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool) for v in ends)

    @property
    def grid(self) -> list[Any] | None:
        """Every value of a finite parameter (choices, or a range with a step); None for a continuous one."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None and not self.is_int:
            return None
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.is_int else [round(v, 12) for v in values]

    def edge_values(self) -> list[Any]:
        """Values that must each be valid in the trial config: the ends, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class SearchSpec(Frozen):
    metric: str = Field(description="validation metric to optimize, e.g. val/linear_top1_cls")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="default: from the metric (minimize RMSE/AbsRel, maximize the rest)")
    params: dict[str, SearchParam] = Field(description="dotted trial keys -> range or choices")
    trials_per_cell: int = Field(8, gt=0, description="trials that finish (complete or pruned) per cell")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    sampler_seed: int = 0
    startup_trials: int | None = Field(
        None, ge=0, description="random trials before TPE models the results (default: a third of the budget)")
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    pruner_startup_trials: int = Field(2, ge=0, description="median: finished trials before it prunes")
    reduction_factor: int = Field(3, ge=2, description="successive_halving / hyperband")
    seed: int | None = Field(None, description="the trial seed searches run with (default: the first of seeds)")
    max_failures: int | None = Field(
        None, ge=0, description="failed trials a cell may have before its search gives up (default: trials_per_cell)")
    parallel_per_cell: int | None = Field(
        None, gt=0, description="trials of one cell running at once (default: as many as the backend runs)")

    @property
    def resolved_direction(self) -> str:
        if self.direction:
            return self.direction
        return "minimize" if self.metric.removeprefix(VALIDATION_PREFIX) in LOWER_IS_BETTER else "maximize"

    @property
    def failure_budget(self) -> int:
        return self.trials_per_cell if self.max_failures is None else self.max_failures

    def grid_size(self) -> int | None:
        sizes = [p.grid for p in self.params.values()]
        if any(s is None for s in sizes):
            return None
        return math.prod(len(s) for s in sizes)

    def budget(self) -> int:
        """Trials per cell: trials_per_cell, but never more than a finite space has points."""
        grid = self.grid_size()
        return min(self.trials_per_cell, grid) if grid else self.trials_per_cell


def format_value(value: Any) -> str:
    """Short, exact enough for a label or a table: 0.0012 -> 1.2e-03, 0.05 -> 0.05, 3 -> 3."""
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def params_label(params: dict[str, Any]) -> str:
    return " ".join(f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in params.items())
