"""A comparison table as Markdown: value cells, paired-delta cells, footnote marks and run links."""

from __future__ import annotations

from orchestrator.report.format import (
    MISSING,
    NO_CI,
    NOT_LOGGED,
    NOT_SIGNIFICANT,
    RUN_ID_CHARS,
    Footnotes,
    escape_cell,
    fmt,
    row_note,
    run_url,
)
from orchestrator.report.metrics import COST, QUALITY, MetricSpec
from orchestrator.report.stats import DeltaEstimate
from orchestrator.report.tables import ComparisonTable, MetricCell, Row


def value_text(metric: MetricSpec, cell: MetricCell, row_n: int) -> str:
    s = cell.summary
    mean = fmt(metric.display(s.mean), metric.decimals)
    if cell.best:
        mean = f"**{mean}**"
    text = mean
    # A cost constant over seeds (parameter count, FLOPs) has std 0: "± 0" there is noise; for a
    # quality metric, identical seeds are information and keep their "± 0.00".
    if s.std is not None and (s.std > 0 or metric.kind != COST):
        text += f" ± {fmt(metric.display(s.std), metric.decimals)}"
    if s.n != row_n:
        text += f" (n={s.n})"
    if metric.kind == COST and cell.relative is not None:
        text += f" ({relative_text(cell.relative)})"
    return text


def relative_text(relative: float) -> str:
    if relative == 0:
        return "±0%"  # the same cost (FLOPs under specialization): "+0.000%" would suggest rounding
    return f"{fmt(100 * relative, 1 if abs(relative) >= 0.001 else 3, signed=True)}%"


def delta_text(metric: MetricSpec, delta: DeltaEstimate) -> str:
    scale, d = metric.scale, metric.decimals
    text = fmt(delta.mean * scale, d, signed=True)
    if not delta.has_ci:
        return f"{text} {NO_CI}"
    text += f" [{fmt(delta.low * scale, d, signed=True)}, {fmt(delta.high * scale, d, signed=True)}]"
    return text if delta.significant else f"{text} {NOT_SIGNIFICANT}"



def row_cells(table: ComparisonTable, row: Row, notes: Footnotes) -> list[str]:
    """The metric columns of one row, as Markdown cell texts."""
    n_done = len(row.done)
    reason = row_note(row)
    no_values = n_done == 0
    out: list[str] = []
    reference = table.rows[row.reference] if row.reference is not None else None
    for metric in table.metrics:
        cell = row.cells[metric.name]
        why = ""  # the footnote mark shared by this metric's value and delta when there is no value
        if no_values:
            why = notes.mark(reason or "no finished seed")
            value = MISSING + why
        elif cell.summary.n == 0:
            why = notes.mark(f"`{metric.name}` not logged by any finished seed of this row "
                             "(evaluation disabled or skipped?)")
            value = NOT_LOGGED + why
        else:
            value = value_text(metric, cell, n_done)
        out.append(value)
        if metric.kind != QUALITY:
            continue
        if row.is_reference:
            out.append("ref.")
        elif why:
            out.append(MISSING + why)
        elif reference is None:
            baseline_value = table.baseline[table.axes[0]]
            out.append(MISSING + notes.mark(f"no reference row: {table.axes[0]}={baseline_value} is not in the sweep "
                                            "for this group"))
        elif cell.delta is None or cell.delta.n == 0:
            out.append(MISSING + notes.mark("no seed finished in both this row and its reference row"))
        else:
            out.append(delta_text(metric, cell.delta))
    return out


def provenance_text(row: Row, links: dict[str, str], ui_base: str, fallback_experiment: str | None,
                    current_code: str | None) -> str:
    """Short run ids, each a reference-style link (definitions under the table keep rows readable)."""
    parts = []
    for outcome in row.done:
        if outcome.source == "mlflow" and outcome.run_id:
            short = outcome.run_id[:RUN_ID_CHARS]
            url = run_url(ui_base, outcome.experiment_id or fallback_experiment, outcome.run_id)
            if url:
                links[outcome.run_id] = url
                parts.append(f"[{short}][{outcome.run_id}]")
            else:
                parts.append(f"`{short}`")
        else:
            parts.append(f"disk:`{(outcome.stale_from or outcome.trial_id)[:RUN_ID_CHARS]}`")
        if current_code and outcome.code_version and outcome.code_version != current_code:
            parts[-1] += f" ⚠`{outcome.code_version}`"
    return " ".join(parts) if parts else MISSING


def table_markdown(table: ComparisonTable, ui_base: str, experiment_id: str | None,
                   current_code: str | None) -> tuple[list[str], Footnotes, dict[str, str]]:
    """Table lines, its footnotes, and its link definitions (run id -> MLflow UI URL)."""
    notes = Footnotes()
    links: dict[str, str] = {}
    header = [*table.axes, "n"]
    for metric in table.metrics:
        header.append(metric.header)
        if metric.kind == QUALITY:
            header.append(metric.delta_header)
    header.append("runs")
    lines = ["| " + " | ".join(escape_cell(h) for h in header) + " |",
             "|" + "|".join(["---"] * len(table.axes) + ["---:"] * (len(header) - len(table.axes) - 1) + ["---"]) + "|"]
    for row in table.rows:
        n_text = f"{len(row.done)}/{len(row.outcomes)}"
        if row.done and row.not_done:
            n_text += notes.mark(row_note(row))
        key = [escape_cell(v) for v in row.key]
        if row.is_reference:
            key[0] += " (ref.)"
        cells = row_cells(table, row, notes)
        runs = provenance_text(row, links, ui_base, experiment_id, current_code)
        if not row.done:
            runs += notes.mark(row_note(row) or "no finished seed")
        lines.append("| " + " | ".join([*key, n_text, *cells, runs]) + " |")
    return lines, notes, links
