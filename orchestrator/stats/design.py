"""Which cells a sweep compares: one comparison per `report.compare` entry.

- an axis `a`: one row per value of `a`, every other axis held at the baseline's value;
- a crossing `[a, b, ...]`: one row per combination, grouped by the values of `b, ...`; within a
  group, `a` varies and the reference is `a = baseline[a]` with the same `b, ...`, so a difference
  is always "this variant against the baseline variant under the same framework / scale".

The report lays its tables out with these rules and `plan` pools the noise of the same pairs, so
both speak of the same comparisons.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec.schema import SweepSpec

CellKey = tuple[tuple[str, str], ...]  # a cell as sorted (axis, value) items: hashable, order-free
Placed = tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]  # (cell, key in the table's axes, group)


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


def cell_key(cell: Mapping[str, str]) -> CellKey:
    return tuple(sorted(cell.items()))


def layout(axes: tuple[str, ...], values: Mapping[str, list[str]], baseline: Mapping[str, str],
           present: set[CellKey]) -> tuple[list[Placed], list[dict[str, str]]]:
    """(cell, key, group) per row of one comparison in display order, and the cells the sweep lacks."""
    first, others = axes[0], axes[1:]
    rows, absent = [], []
    for group in itertools.product(*(values[a] for a in others)):
        for value in values[first]:
            cell = dict(baseline)
            cell[first] = value
            cell.update(zip(others, group))
            if cell_key(cell) in present:
                rows.append((cell, (value, *group), tuple(group)))
            else:
                absent.append(cell)
    return rows, absent


def reference_cell(axes: tuple[str, ...], cell: Mapping[str, str], baseline: Mapping[str, str]) -> dict[str, str]:
    """The cell `cell` is compared against: the first compared axis at its baseline value, the rest equal."""
    return {**cell, axes[0]: baseline[axes[0]]}


def compared_pairs(spec: SweepSpec, present: set[CellKey]) -> list[tuple[CellKey, CellKey]]:
    """Every (variant, reference) pair of cells the report compares, each once (a pair shown by a
    single-axis table and by a crossing is one comparison), both cells in `present`."""
    values, baseline = axis_values(spec), resolve_baseline(spec)
    pairs: dict[tuple[CellKey, CellKey], None] = {}
    for axes in compare_entries(spec):
        placed, _ = layout(axes, values, baseline, present)
        for cell, _, _ in placed:
            reference = cell_key(reference_cell(axes, cell, baseline))
            if reference != cell_key(cell) and reference in present:
                pairs[(cell_key(cell), reference)] = None
    return list(pairs)


def comparison_differences(spec: SweepSpec, runs: Mapping[tuple[CellKey, int], Mapping[str, float]],
                           metrics: list[str] | tuple[str, ...]) -> list[tuple[CellKey, dict[str, list[float]]]]:
    """Per compared (variant, reference) pair with both cells in `runs` ((cell, seed) -> final
    metrics): the variant and, per metric, variant - reference at each seed both finished with it."""
    seeds_of: dict[CellKey, set[int]] = {}
    for cell, seed in runs:
        seeds_of.setdefault(cell, set()).add(seed)
    out = []
    for variant, reference in compared_pairs(spec, set(seeds_of)):
        seeds = sorted(seeds_of[variant] & seeds_of[reference])
        out.append((variant, {metric: [runs[variant, s][metric] - runs[reference, s][metric] for s in seeds
                                       if metric in runs[variant, s] and metric in runs[reference, s]]
                              for metric in metrics}))
    return out
