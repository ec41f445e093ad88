"""The comparison tables as data: which cells form each table's rows, and each row's statistics.

One table per `report.compare` entry:
- an axis `a`: one row per value of `a`, every other axis held at the baseline's value;
- a crossing `[a, b, ...]`: one row per combination, grouped by the values of `b, ...`; within a
  group, `a` varies and the reference row is `a = baseline[a]` with the same `b, ...`, so a delta is
  always "this variant against the baseline variant under the same framework / scale".

Formatting lives in markdown_table.py and csv_export.py; this module only decides and computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.report.metrics import COST, QUALITY, MetricSpec
from orchestrator.report.outcome import TrialOutcome
from orchestrator.report.stats import (
    DEFAULT_CONFIDENCE,
    DeltaEstimate,
    Summary,
    best_indices,
    paired_delta,
    relative_change,
    summarize,
)

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec


@dataclass
class MetricCell:
    summary: Summary
    delta: DeltaEstimate | None = None  # paired against the row's reference; None on the reference itself
    relative: float | None = None  # (mean - reference mean) / reference mean, for cost columns
    best: bool = False
    per_seed: dict[int, float] = field(default_factory=dict)


@dataclass
class Row:
    key: tuple[str, ...]  # the table axes' values, in the table's axis order
    cell: dict[str, str]  # the full cell (every axis)
    group: tuple[str, ...]  # values of the crossing's other axes (empty for a single axis)
    outcomes: list[TrialOutcome]  # one per planned seed, in seed order
    index: int = -1  # position in the table
    reference: int | None = None  # index of this row's reference row in the table; None: no reference
    cells: dict[str, MetricCell] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.reference == self.index

    @property
    def done(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.has_metrics]

    @property
    def not_done(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if not o.has_metrics]

    def label(self, axes: Sequence[str]) -> str:
        return ", ".join(f"{a}={v}" for a, v in zip(axes, self.key))


@dataclass
class ComparisonTable:
    axes: tuple[str, ...]
    metrics: list[MetricSpec]
    rows: list[Row]
    absent: list[dict[str, str]]  # cells the table would show but the sweep does not contain
    baseline: dict[str, str]
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def title(self) -> str:
        return " × ".join(self.axes)

    @property
    def slug(self) -> str:
        return "_x_".join(a.replace(".", "_").replace("/", "_") for a in self.axes)

    @property
    def held_fixed(self) -> dict[str, str]:
        return {a: v for a, v in self.baseline.items() if a not in self.axes}

    def groups(self) -> list[tuple[str, ...]]:
        return list(dict.fromkeys(row.group for row in self.rows))


# ----------------------------------------------------------------------------------------------
# What the spec asks for
# ----------------------------------------------------------------------------------------------
def axis_values(spec: SweepSpec) -> dict[str, list[str]]:
    """Axis name -> its value names, in spec order."""
    return {axis.name: list(axis.values) for axis in spec.axes}


def resolve_baseline(spec: SweepSpec) -> dict[str, str]:
    """report.baseline, else the spec's baseline, each completed with the first value of every axis."""
    given = dict(spec.report.baseline or spec.baseline or {})
    return {axis: given.get(axis, values[0]) for axis, values in axis_values(spec).items() if values}


def compare_entries(spec: SweepSpec) -> list[tuple[str, ...]]:
    """`report.compare` as axis tuples (default: every axis alone)."""
    entries = list(spec.report.compare) or [axis.name for axis in spec.axes]
    return [(entry,) if isinstance(entry, str) else tuple(entry) for entry in entries]


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def seed_values(outcomes: Sequence[TrialOutcome], metric: str) -> dict[int, float]:
    """{seed: value} over the finished seeds that logged `metric`."""
    return {o.seed: float(o.metrics[metric]) for o in outcomes if o.has_metrics and metric in o.metrics}


def layout(axes: tuple[str, ...], values: Mapping[str, list[str]], baseline: Mapping[str, str],
           present: set[tuple[tuple[str, str], ...]]) -> tuple[list[tuple[dict[str, str], tuple, tuple]], list[dict]]:
    """(cell, key, group) per row in display order, and the cells the sweep lacks."""
    first, others = axes[0], axes[1:]
    rows, absent = [], []
    for group in itertools.product(*(values[a] for a in others)):
        for value in values[first]:
            cell = dict(baseline)
            cell[first] = value
            cell.update(zip(others, group))
            if _cell_key(cell) in present:
                rows.append((cell, (value, *group), tuple(group)))
            else:
                absent.append(cell)
    return rows, absent


def _cell_key(cell: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(cell.items()))


def build_table(axes: tuple[str, ...], values: Mapping[str, list[str]], baseline: Mapping[str, str],
                outcomes_by_cell: Mapping[tuple, list[TrialOutcome]], metrics: list[MetricSpec],
                confidence: float = DEFAULT_CONFIDENCE) -> ComparisonTable:
    placed, absent = layout(axes, values, baseline, set(outcomes_by_cell))
    rows = [Row(key=key, cell=cell, group=group, index=i,
                outcomes=sorted(outcomes_by_cell[_cell_key(cell)], key=lambda o: o.seed))
            for i, (cell, key, group) in enumerate(placed)]
    for row in rows:
        row.reference = next((j for j, other in enumerate(rows)
                              if other.group == row.group and other.key[0] == baseline[axes[0]]), None)
    table = ComparisonTable(axes=axes, metrics=metrics, rows=rows, absent=absent, baseline=dict(baseline),
                            confidence=confidence)
    fill_cells(table)
    return table


def fill_cells(table: ComparisonTable) -> None:
    """Summaries, paired deltas against the reference row, relative cost, and best-per-group."""
    for row in table.rows:
        for metric in table.metrics:
            per_seed = seed_values(row.outcomes, metric.name)
            row.cells[metric.name] = MetricCell(summary=summarize(per_seed.values()), per_seed=per_seed)
    for row in table.rows:
        if row.reference is None or row.is_reference:
            continue
        reference = table.rows[row.reference]
        for metric in table.metrics:
            cell, ref_cell = row.cells[metric.name], reference.cells[metric.name]
            if metric.kind == QUALITY:
                cell.delta = paired_delta(cell.per_seed, ref_cell.per_seed, table.confidence)
            elif metric.kind == COST:
                cell.relative = relative_change(cell.summary.mean, ref_cell.summary.mean)
    for group in table.groups():
        members = [row for row in table.rows if row.group == group]
        for metric in table.metrics:
            if metric.kind != QUALITY or metric.higher_is_better is None:
                continue  # bold marks "best", which cost and descriptive columns do not have
            means = [row.cells[metric.name].summary.mean for row in members]
            if sum(m is not None for m in means) < 2:
                continue  # a lone value is not "the best" of anything
            for i in best_indices(means, metric.higher_is_better):
                members[i].cells[metric.name].best = True


def build_tables(spec: SweepSpec, outcomes: Sequence[TrialOutcome], metrics: list[MetricSpec],
                 confidence: float = DEFAULT_CONFIDENCE) -> list[ComparisonTable]:
    values = axis_values(spec)
    baseline = resolve_baseline(spec)
    by_cell: dict[tuple, list[TrialOutcome]] = {}
    for outcome in outcomes:
        by_cell.setdefault(_cell_key(outcome.cell), []).append(outcome)
    return [build_table(axes, values, baseline, by_cell, metrics, confidence) for axes in compare_entries(spec)]
