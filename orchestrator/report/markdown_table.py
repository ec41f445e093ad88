"""One comparison as Markdown: the main table (per quality metric and row: value, Δ, interval,
Holm-adjusted p, verdict), the cost table, the token table, then the run links, with one set of
footnotes for all of them."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.report.format import (
    MISSING,
    NO_CI,
    NOT_LOGGED,
    RUN_ID_CHARS,
    Footnotes,
    escape_cell,
    fmt,
    fmt_p,
    row_note,
    run_url,
)
from orchestrator.report.metrics import COST, DESCRIPTIVE, QUALITY, MetricSpec
from orchestrator.report.stats import DeltaEstimate
from orchestrator.report.tables import ComparisonTable, MetricCell, Row
from orchestrator.report.verdicts import NO_LARGER_EFFECT, SIGNIFICANT, Verdict

THROUGHPUT = "throughput_img_s"
INDICATIVE_NOTE = ("Throughput is indicative: trials that run side by side share the machine's cores, so its "
                   "differences measure the neighbours' load as much as the model; "
                   "`benchmarks/model_overhead.py` measures the speed of each specialization, interleaved.")


@dataclass
class TableText:
    """The Markdown of one comparison: each part's lines (empty when it has no column) and what they share."""

    main: list[str]
    costs: list[str]
    tokens: list[str]
    runs: list[str]  # one bullet per row, after the tables
    notes: Footnotes
    links: dict[str, str]  # run id -> MLflow UI URL, the definitions of the runs' reference links


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
    return fmt(delta.mean * metric.scale, metric.decimals, signed=True)


def interval_text(metric: MetricSpec, delta: DeltaEstimate) -> str:
    if not delta.has_ci:
        return f"{NO_CI} none"
    scale, d = metric.scale, metric.decimals
    return f"[{fmt(delta.low * scale, d, signed=True)}, {fmt(delta.high * scale, d, signed=True)}]"


def verdict_text(metric: MetricSpec, verdict: Verdict | None, delta: DeltaEstimate) -> str:
    if verdict is None:  # a table not judged (tables.judge): say nothing rather than guess
        return MISSING
    if verdict.kind == SIGNIFICANT:
        if metric.higher_is_better is None:
            return "**significant**"
        gain = (delta.mean > 0) == metric.higher_is_better
        return f"**significant {'gain' if gain else 'drop'}**"
    if verdict.kind == NO_LARGER_EFFECT:
        unit = f" {metric.difference_unit}" if metric.difference_unit else ""
        return f"no effect larger than ±{fmt(verdict.bound * metric.scale, metric.decimals)}{unit}"
    return "inconclusive" if verdict.has_test else f"inconclusive {NO_CI}"


def _key_cells(row: Row) -> list[str]:
    key = [escape_cell(v) for v in row.key]
    if row.is_control:
        key[0] += " (control)"
    elif row.is_reference:
        key[0] += " (ref.)"
    return key


def _missing_mark(table: ComparisonTable, row: Row, metric: MetricSpec, notes: Footnotes) -> tuple[str, str]:
    """(value text, the footnote mark) when the row has no value of `metric`; ("", "") when it has one."""
    if not row.done:
        mark = notes.mark(row_note(row) or "no finished seed")
        return MISSING + mark, mark
    if row.cells[metric.name].summary.n == 0:
        reasons = {o.unavailable.get(metric.name) for o in row.done}
        reason = reasons.pop() if len(reasons) == 1 else None
        mark = notes.mark(f"`{metric.name}`: {reason}" if reason else f"`{metric.name}` not logged by any "
                          "finished seed of this row (evaluation disabled or skipped?)")
        return NOT_LOGGED + mark, mark
    return "", ""


def comparison_cells(table: ComparisonTable, row: Row, metric: MetricSpec, notes: Footnotes) -> list[str]:
    """[value, Δ, interval, Holm p, verdict] of one row for one quality metric. The Δ cell says why
    when there is no comparison; the three after it are then left blank."""
    value, mark = _missing_mark(table, row, metric, notes)
    cell = row.cells[metric.name]
    if not value:
        value = value_text(metric, cell, len(row.done))
    if row.is_control:
        return [value, "control", "", "", ""]
    if row.is_reference:
        return [value, "ref.", "", "", ""]
    if mark:
        return [value, MISSING + mark, "", "", ""]
    if row.reference is None:
        baseline = table.baseline[table.axes[0]]
        why = notes.mark(f"no reference row: {table.axes[0]}={baseline} is not in the sweep for this group")
        return [value, MISSING + why, "", "", ""]
    delta = cell.delta
    if delta is None or delta.n == 0:
        return [value, MISSING + notes.mark("no seed finished in both this row and its reference row"), "", "", ""]
    p_holm = fmt_p(cell.verdict.p_holm) if cell.verdict is not None and cell.verdict.has_test else NO_CI
    return [value, delta_text(metric, delta), interval_text(metric, delta), p_holm,
            verdict_text(metric, cell.verdict, delta)]


def _n_text(row: Row, notes: Footnotes) -> str:
    text = f"{len(row.done)}/{len(row.outcomes)}"
    if row.done and row.not_done:
        text += notes.mark(row_note(row))
    return text


def _markdown_table(header: list[str], rows: list[list[str]], left: int, right: int) -> list[str]:
    """Header, alignment (`left` text columns, `right` number columns, text after them) and rows."""
    align = ["---"] * left + ["---:"] * right + ["---"] * (len(header) - left - right)
    return ["| " + " | ".join(escape_cell(h) for h in header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def main_table(table: ComparisonTable, notes: Footnotes) -> list[str]:
    """Per quality metric, a block of rows: the question the sweep asks, one verdict per comparison."""
    confidence = round(table.confidence * 100)
    header = ["metric", *table.axes, "n", "mean ± std", "Δ", f"{confidence}% CI", "Holm p", "verdict"]
    rows = []
    for metric in (m for m in table.metrics if m.kind == QUALITY):
        for row in table.rows:
            rows.append([escape_cell(metric.header), *_key_cells(row), _n_text(row, notes),
                         *comparison_cells(table, row, metric, notes)])
    return _markdown_table(header, rows, left=1 + len(table.axes), right=5) if rows else []


def unlogged(table: ComparisonTable, kind: str) -> list[MetricSpec]:
    """The `kind` columns no finished seed of any row logged (the side tables leave them out)."""
    return [m for m in table.metrics if m.kind == kind and not any(row.cells[m.name].summary.n for row in table.rows)]


def side_table(table: ComparisonTable, kind: str, notes: Footnotes) -> list[str]:
    """The rows' values of the `kind` columns (costs, with their change to the reference; or the
    descriptive token columns) that some row logged; [] when there is none. A control shows its
    tokens where it has some (the untrained network's: what initialization gives) and no costs
    (it trains nothing; the untrained network's size is the reference row's)."""
    missing = unlogged(table, kind)
    metrics = [m for m in table.metrics if m.kind == kind and m not in missing]
    if not metrics:
        return []
    rows = []
    for row in table.rows:
        if row.is_control and (kind == COST or not any(row.cells[m.name].summary.n for m in metrics)):
            continue
        cells = []
        for metric in metrics:
            value, _ = _missing_mark(table, row, metric, notes)
            cells.append(value or value_text(metric, row.cells[metric.name], len(row.done)))
        rows.append([*_key_cells(row), *cells])
    return _markdown_table([*table.axes, *(m.header for m in metrics)], rows, left=len(table.axes),
                           right=len(metrics))


def provenance_text(row: Row, links: dict[str, str], ui_base: str, fallback_experiment: str | None,
                    current_code: str | None) -> str:
    """Short run ids, each a reference-style link (definitions after the list keep it readable)."""
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


def runs_list(table: ComparisonTable, notes: Footnotes, links: dict[str, str], ui_base: str,
              experiment_id: str | None, current_code: str | None) -> list[str]:
    """`- none (ref.): [b4a1cba3][…] [e669b9dd][…]`: each row's finished runs, in seed order."""
    lines = []
    for row in table.rows:
        runs = provenance_text(row, links, ui_base, experiment_id, current_code)
        if not row.done:
            runs += notes.mark(row_note(row) or "no finished seed")
        lines.append(f"- {' / '.join(_key_cells(row))}: {runs}")
    return lines


def table_markdown(table: ComparisonTable, ui_base: str, experiment_id: str | None,
                   current_code: str | None) -> TableText:
    """Every part of one comparison's Markdown (see TableText)."""
    notes = Footnotes()
    links: dict[str, str] = {}
    main = main_table(table, notes)
    costs = side_table(table, COST, notes)
    tokens = side_table(table, DESCRIPTIVE, notes)
    runs = runs_list(table, notes, links, ui_base, experiment_id, current_code)
    return TableText(main=main, costs=costs, tokens=tokens, runs=runs, notes=notes, links=links)
