"""The report's CSV files: each comparison table in logged units, and one row per trial.

Written with the csv module: pandas would add half a second of import for a plain table.
"""

from __future__ import annotations

import csv
import io
import math

from orchestrator.report.format import row_note
from orchestrator.report.metrics import COST, QUALITY
from orchestrator.report.outcome import Collection
from orchestrator.report.tables import ComparisonTable
from orchestrator.report.verdicts import NO_LARGER_EFFECT, Verdict


def table_csv(table: ComparisonTable) -> str:
    columns = [*table.axes, "is_reference", "control", "seeds_done", "seeds_planned", "missing"]
    for metric in table.metrics:
        columns += [f"{metric.name}_mean", f"{metric.name}_std", f"{metric.name}_n"]
        if metric.kind == QUALITY:
            columns += [f"{metric.name}_delta", f"{metric.name}_delta_ci_low", f"{metric.name}_delta_ci_high",
                        f"{metric.name}_delta_n", f"{metric.name}_delta_significant", f"{metric.name}_p",
                        f"{metric.name}_p_holm", f"{metric.name}_verdict", f"{metric.name}_best"]
        elif metric.kind == COST:
            columns += [f"{metric.name}_relative"]
    columns += ["sources", "mlflow_run_ids", "code_versions"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in table.rows:
        values: list[object] = [*row.key, row.is_reference, row.control or "", len(row.done), len(row.outcomes),
                                row_note(row) or ""]
        for metric in table.metrics:
            cell = row.cells[metric.name]
            values += [_csv_num(cell.summary.mean), _csv_num(cell.summary.std), cell.summary.n]
            if metric.kind == QUALITY:
                d, verdict = cell.delta, cell.verdict
                values += [_csv_num(d.mean if d else None), _csv_num(d.low if d else None),
                           _csv_num(d.high if d else None), d.n if d else "",
                           "" if d is None or d.significant is None else d.significant,
                           _csv_num(d.p_value if d else None), _csv_num(verdict.p_holm if verdict else None),
                           _verdict_csv(verdict), cell.best]
            elif metric.kind == COST:
                values += [_csv_num(cell.relative)]
        values += [";".join(o.source for o in row.done), ";".join(o.run_id or "" for o in row.done),
                   ";".join(sorted({o.code_version or "" for o in row.done}))]
        writer.writerow(values)
    return buffer.getvalue()


def _verdict_csv(verdict: Verdict | None) -> str:
    """`significant`, `no effect larger than 0.01` (logged units) or `inconclusive`; '' when not judged."""
    if verdict is None:
        return ""
    return f"{verdict.kind} {verdict.bound!r}" if verdict.kind == NO_LARGER_EFFECT else verdict.kind


def _csv_num(value: float | None) -> object:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def outcomes_csv(collection: Collection) -> str:
    """One row per trial (cell, seed, state, source, run id, every metric): the report's raw data."""
    metric_names = sorted({name for o in collection.outcomes for name in o.metrics})
    axes = list(dict.fromkeys(axis for o in collection.outcomes for axis in o.cell))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial_id", *(f"cell.{a}" for a in axes), "control", "seed", "state", "failure_class", "source",
                     "mlflow_run_id", "code_version", "borrowed_from_trial", *metric_names])
    for o in collection.outcomes:
        writer.writerow([o.trial_id, *(o.cell.get(a, "") for a in axes), o.control or "", o.seed, o.state,
                         o.failure_class or "",
                         o.source, o.run_id or "", o.code_version or "", o.stale_from or "",
                         *(repr(float(o.metrics[m])) if m in o.metrics else "" for m in metric_names)])
    return buffer.getvalue()
