"""The comparison tables as data: which cells form each table's rows, and each row's statistics.

One table per `report.compare` entry, laid out by orchestrator/stats/design.py (an axis alone, or a
crossing grouped by its other axes, each row against the baseline value of the first axis in its
group). `judge` gives each comparison its verdict (the rules: verdicts.py) over the whole report's
family; formatting lives in markdown_table.py and csv_export.py; this module only decides and computes.
"""

from __future__ import annotations

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
    mean_with_ci,
    paired_differences,
    relative_change,
    summarize,
)
from orchestrator.report.verdicts import Verdict, decide, holm
from orchestrator.spec.schema import CONTROLS
from orchestrator.stats.design import (
    CellKey,
    axis_values,
    cell_key,
    compare_entries,
    layout,
    reference_cell,
    resolve_baseline,
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
    differences: dict[int, float] = field(default_factory=dict)  # seed -> this row - its reference (quality)
    verdict: Verdict | None = None  # set by `judge` over the report's family of comparisons


@dataclass
class Row:
    key: tuple[str, ...]  # the table axes' values, in the table's axis order
    cell: dict[str, str]  # the full cell (every axis)
    group: tuple[str, ...]  # values of the crossing's other axes (empty for a single axis)
    outcomes: list[TrialOutcome]  # one per planned seed, in seed order
    index: int = -1  # position in the table
    reference: int | None = None  # index of this row's reference row in the table; None: no reference
    cells: dict[str, MetricCell] = field(default_factory=dict)
    # A control row (an untrained network, raw pixels: the floor under every number) is shown like a
    # reference, with values and no delta, and is never compared nor "best"; `control` is its label.
    control: str | None = None

    @property
    def is_reference(self) -> bool:
        return self.reference == self.index

    @property
    def is_control(self) -> bool:
        return self.control is not None

    @property
    def compared(self) -> bool:
        """Whether this row has a reference to be compared with (not the reference, not a control)."""
        return self.reference is not None and not self.is_reference and not self.is_control

    @property
    def done(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.has_metrics]

    @property
    def not_done(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if not o.has_metrics]

    def label(self, axes: Sequence[str]) -> str:
        if self.control is not None:
            return self.control
        return ", ".join(f"{a}={v}" for a, v in zip(axes, self.key))


@dataclass
class ComparisonTable:
    axes: tuple[str, ...]
    metrics: list[MetricSpec]
    rows: list[Row]
    absent: list[dict[str, str]]  # cells the table would show but the sweep does not contain
    baseline: dict[str, str]
    confidence: float = DEFAULT_CONFIDENCE
    # report.target_effects / report.paired_sd (logged units): the "no effect larger than" band and
    # the SD to state the design's power with when no comparison has two seeds yet.
    target_effects: dict[str, float] = field(default_factory=dict)
    paired_sd: dict[str, float] = field(default_factory=dict)

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
# Building
# ----------------------------------------------------------------------------------------------
def seed_values(outcomes: Sequence[TrialOutcome], metric: str) -> dict[int, float]:
    """{seed: value} over the finished seeds that logged `metric`."""
    return {o.seed: float(o.metrics[metric]) for o in outcomes if o.has_metrics and metric in o.metrics}


def build_table(axes: tuple[str, ...], values: Mapping[str, list[str]], baseline: Mapping[str, str],
                outcomes_by_cell: Mapping[tuple, list[TrialOutcome]], metrics: list[MetricSpec],
                confidence: float = DEFAULT_CONFIDENCE) -> ComparisonTable:
    placed, absent = layout(axes, values, baseline, set(outcomes_by_cell))
    rows = [Row(key=key, cell=cell, group=group, index=i,
                outcomes=sorted(outcomes_by_cell[cell_key(cell)], key=lambda o: o.seed))
            for i, (cell, key, group) in enumerate(placed)]
    index_of = {cell_key(row.cell): row.index for row in rows}
    for row in rows:
        row.reference = index_of.get(cell_key(reference_cell(axes, row.cell, baseline)))
    table = ComparisonTable(axes=axes, metrics=metrics, rows=rows, absent=absent, baseline=dict(baseline),
                            confidence=confidence)
    fill_cells(table)
    return table


def add_control_row(table: ComparisonTable, label: str, outcomes: Sequence[TrialOutcome],
                    group: tuple[str, ...] = ()) -> Row:
    """Append a control row (values over `outcomes`' seeds, no delta, never "best") to `table`.

    The hook for reference rows that are no cell of the sweep (an untrained network, raw pixels):
    whoever computes them adds them here; they join no comparison, so the verdicts stand as judged.
    `build_tables` adds the sweep's `report.controls` here. `group`: the crossing's other axes it
    belongs to; by default it stands for every group ("any").
    """
    group = tuple(group) or ("any",) * (len(table.axes) - 1)
    row = Row(key=(label, *group), cell={}, group=group, outcomes=sorted(outcomes, key=lambda o: o.seed),
              index=len(table.rows), control=label)
    for metric in table.metrics:
        per_seed = seed_values(row.outcomes, metric.name)
        row.cells[metric.name] = MetricCell(summary=summarize(per_seed.values()), per_seed=per_seed)
    table.rows.append(row)
    return row


def fill_cells(table: ComparisonTable) -> None:
    """Summaries, paired deltas against the reference row, relative cost, and best-per-group."""
    for row in table.rows:
        for metric in table.metrics:
            per_seed = seed_values(row.outcomes, metric.name)
            row.cells[metric.name] = MetricCell(summary=summarize(per_seed.values()), per_seed=per_seed)
    for row in table.rows:
        if not row.compared:
            continue
        reference = table.rows[row.reference]
        for metric in table.metrics:
            cell, ref_cell = row.cells[metric.name], reference.cells[metric.name]
            if metric.kind == QUALITY:
                cell.differences = paired_differences(cell.per_seed, ref_cell.per_seed)
                cell.delta = mean_with_ci(cell.differences.values(), table.confidence)
            elif metric.kind == COST:
                cell.relative = relative_change(cell.summary.mean, ref_cell.summary.mean)
    for group in table.groups():
        members = [row for row in table.rows if row.group == group and not row.is_control]
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
    """One table per `report.compare` entry, each carrying the spec's target effects and SD priors,
    its comparisons judged as one family across all tables, then a row per control outcome's
    control (report.controls): in a crossing, in the baseline's group, the setup it was run on."""
    values = axis_values(spec)
    baseline = resolve_baseline(spec)
    by_cell: dict[tuple, list[TrialOutcome]] = {}
    by_control: dict[str, list[TrialOutcome]] = {}
    for outcome in outcomes:
        if outcome.control is not None:
            by_control.setdefault(outcome.control, []).append(outcome)
        else:
            by_cell.setdefault(cell_key(outcome.cell), []).append(outcome)
    tables = [build_table(axes, values, baseline, by_cell, metrics, confidence) for axes in compare_entries(spec)]
    for table in tables:
        table.target_effects = dict(spec.report.target_effects)
        table.paired_sd = dict(spec.report.paired_sd)
    judge(tables)
    for table in tables:  # after the verdicts: a control joins no comparison
        for control, control_outcomes in by_control.items():
            add_control_row(table, CONTROLS.get(control, control), control_outcomes,
                            tuple(baseline[axis] for axis in table.axes[1:]))
    return tables


# ----------------------------------------------------------------------------------------------
# The family of comparisons and its verdicts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """One distinct (variant, reference, quality metric) of the report, as its first table shows it."""

    label: str  # `axis=value, ...` of the variant row
    metric: MetricSpec
    cell: MetricCell  # holds the delta, the per-seed differences and the verdict
    planned: int = 0  # the variant row's planned seeds (its pairs, once all are done)


def comparisons(tables: Sequence[ComparisonTable]) -> list[Comparison]:
    """Every distinct (variant cell, reference cell, quality metric) with a delta over >= 1 seed pair,
    in table order: a pair shown by a single-axis table and by a crossing is one comparison."""
    return list(_distinct(tables).values())


def _distinct(tables: Sequence[ComparisonTable]) -> dict[tuple[CellKey, CellKey, str], Comparison]:
    out: dict[tuple[CellKey, CellKey, str], Comparison] = {}
    for table in tables:
        for row in table.rows:
            if not row.compared:
                continue
            reference = cell_key(table.rows[row.reference].cell)
            for metric in table.metrics:
                cell = row.cells.get(metric.name)
                if metric.kind != QUALITY or cell is None or cell.delta is None or cell.delta.n == 0:
                    continue
                out.setdefault((cell_key(row.cell), reference, metric.name),
                               Comparison(f"`{row.label(table.axes)}`", metric, cell, len(row.outcomes)))
    return out


def judge(tables: Sequence[ComparisonTable]) -> int:
    """Give every compared quality cell its verdict, Holm-adjusting the p-values over the family of
    distinct comparisons with an interval; returns the family's size."""
    distinct = _distinct(tables)
    tested = [key for key, c in distinct.items() if c.cell.delta.p_value is not None]
    adjusted = dict(zip(tested, holm([distinct[key].cell.delta.p_value for key in tested])))
    targets = tables[0].target_effects if tables else {}
    verdicts = {key: decide(c.cell.delta, adjusted.get(key), targets.get(key[2]), family_size=len(tested))
                for key, c in distinct.items()}
    for table in tables:  # a comparison shown twice carries its one verdict in both places
        for row in table.rows:
            if not row.compared:
                continue
            reference = cell_key(table.rows[row.reference].cell)
            for metric in table.metrics:
                verdict = verdicts.get((cell_key(row.cell), reference, metric.name))
                if verdict is not None:
                    row.cells[metric.name].verdict = verdict
    return len(tested)
