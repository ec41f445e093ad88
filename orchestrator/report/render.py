"""Markdown and CSV for the comparison tables, the header, and the "at a glance" paragraph.

Conventions a reader can rely on (also written into the report's legend):
- a value is `mean ± std` over the finished seeds; the `n` column says finished/planned seeds;
- Δ is paired per seed against the row's reference; `[low, high]` is its t CI; `†` marks a CI that
  includes 0, `°` a single seed pair (no CI at all);
- a cell never goes blank: `—ⁿ` / `n/aⁿ` carry a numbered footnote that says why.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report.collect import Collection, TrialOutcome
from orchestrator.report.metrics import COST, QUALITY, MetricSpec
from orchestrator.report.stats import DeltaEstimate, is_improvement
from orchestrator.report.tables import ComparisonTable, MetricCell, Row
from orchestrator.search.spec import format_value

NOT_SIGNIFICANT = "†"
NO_CI = "°"
MISSING = "—"
NOT_LOGGED = "n/a"
DEFAULT_UI_BASE = "http://127.0.0.1:5000"
RUN_ID_CHARS = 8
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


# ----------------------------------------------------------------------------------------------
# Small formatting helpers
# ----------------------------------------------------------------------------------------------
def fmt(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if text.lstrip("+-").strip("0.") == "":  # "-0.00" reads as a sign where there is none
        text = f"{0:+.{decimals}f}" if signed else f"{0:.{decimals}f}"
    return text


def escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def superscript(n: int) -> str:
    return str(n).translate(_SUPERSCRIPTS)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def seeds_text(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"


def run_url(ui_base: str, experiment_id: str | None, run_id: str) -> str | None:
    if not experiment_id:
        return None
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(ui_base: str, experiment_id: str) -> str:
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}"


@dataclass
class Footnotes:
    """Numbered notes of one table; the same text always gets the same number."""

    texts: list[str] = field(default_factory=list)

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return superscript(self.texts.index(text) + 1)

    def render(self) -> list[str]:
        return [f"{superscript(i)} {text}  " for i, text in enumerate(self.texts, 1)]


# ----------------------------------------------------------------------------------------------
# Why a value is missing
# ----------------------------------------------------------------------------------------------
def outcome_reason(outcome: TrialOutcome) -> str:
    if outcome.state == "failed":
        reason = f"failed: {outcome.failure_class or 'error'}"
        if outcome.failure_class in ("error", None) and outcome.error:
            error = outcome.error if len(outcome.error) <= 80 else outcome.error[:77] + "..."
            reason += f" ({escape_cell(error)})"
        return reason
    if outcome.state in ("running", "planned") and outcome.failure_class:
        return f"{outcome.state} (retry after {outcome.failure_class})"
    if outcome.state == "done":
        return "done but no metrics recorded"
    return outcome.state


def describe_outcomes(outcomes: Iterable[TrialOutcome]) -> str:
    """`failed: nan (seed 1); running (seeds 2, 3)`: one clause per reason, seeds grouped."""
    by_reason: dict[str, list[int]] = {}
    for outcome in outcomes:
        by_reason.setdefault(outcome_reason(outcome), []).append(outcome.seed)
    return "; ".join(f"{reason} ({seeds_text(seeds)})" for reason, seeds in by_reason.items())


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------
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


def row_note(row: Row) -> str | None:
    """Why some (or all) seeds of a row have no numbers; None when every planned seed finished."""
    missing = row.not_done
    if not missing:
        return None
    return describe_outcomes(missing)


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


# ----------------------------------------------------------------------------------------------
# CSV: the same tables, raw numbers in logged units
# ----------------------------------------------------------------------------------------------
def table_csv(table: ComparisonTable) -> str:
    columns = [*table.axes, "is_reference", "seeds_done", "seeds_planned", "missing"]
    for metric in table.metrics:
        columns += [f"{metric.name}_mean", f"{metric.name}_std", f"{metric.name}_n"]
        if metric.kind == QUALITY:
            columns += [f"{metric.name}_delta", f"{metric.name}_delta_ci_low", f"{metric.name}_delta_ci_high",
                        f"{metric.name}_delta_n", f"{metric.name}_delta_significant", f"{metric.name}_best"]
        elif metric.kind == COST:
            columns += [f"{metric.name}_relative"]
    columns += ["sources", "mlflow_run_ids", "code_versions"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in table.rows:
        values: list[object] = [*row.key, row.is_reference, len(row.done), len(row.outcomes), row_note(row) or ""]
        for metric in table.metrics:
            cell = row.cells[metric.name]
            values += [_csv_num(cell.summary.mean), _csv_num(cell.summary.std), cell.summary.n]
            if metric.kind == QUALITY:
                d = cell.delta
                values += [_csv_num(d.mean if d else None), _csv_num(d.low if d else None),
                           _csv_num(d.high if d else None), d.n if d else "",
                           "" if d is None or d.significant is None else d.significant, cell.best]
            elif metric.kind == COST:
                values += [_csv_num(cell.relative)]
        values += [";".join(o.source for o in row.done), ";".join(o.run_id or "" for o in row.done),
                   ";".join(sorted({o.code_version or "" for o in row.done}))]
        writer.writerow(values)
    return buffer.getvalue()


def _csv_num(value: float | None) -> object:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


# ----------------------------------------------------------------------------------------------
# "At a glance": the paragraph a researcher reads first
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Finding:
    label: str
    delta: DeltaEstimate


def _findings(tables: Sequence[ComparisonTable], metric: MetricSpec) -> list[_Finding]:
    """Every non-reference row's delta for `metric`, each (row cell, reference cell) pair once."""
    seen, out = set(), []
    for table in tables:
        for row in table.rows:
            cell = row.cells.get(metric.name)
            if row.is_reference or row.reference is None or cell is None or cell.delta is None or cell.delta.n == 0:
                continue
            pair = (tuple(sorted(row.cell.items())), tuple(sorted(table.rows[row.reference].cell.items())))
            if pair in seen:
                continue
            seen.add(pair)
            out.append(_Finding(f"`{row.label(table.axes)}`", cell.delta))
    return out


def _delta_phrase(metric: MetricSpec, delta: DeltaEstimate) -> str:
    unit = metric.delta_unit if metric.delta_unit is not None else metric.unit
    unit = f" {unit}" if unit else ""
    value = fmt(delta.mean * metric.scale, metric.decimals, signed=True) + unit
    if delta.has_ci:
        ci = (f"{fmt(delta.low * metric.scale, metric.decimals, signed=True)}, "
              f"{fmt(delta.high * metric.scale, metric.decimals, signed=True)}")
        return f"{value}, {round(delta.confidence * 100)}% CI [{ci}], n={delta.n}"
    return f"{value}, n=1, no CI"


def _metric_sentence(metric: MetricSpec, findings: list[_Finding]) -> str:
    """`Seg. mIoU: largest significant gain X (+2.45 pts, CI, n); 3 more significant gains; no significant drop.`"""
    sign = 1 if metric.higher_is_better else -1
    gains = [f for f in findings if f.delta.significant and is_improvement(f.delta.mean, metric.higher_is_better)]
    drops = [f for f in findings if f.delta.significant and not is_improvement(f.delta.mean, metric.higher_is_better)]
    if gains:
        top = max(gains, key=lambda f: sign * f.delta.mean)
        text = f"**{metric.label}**: largest significant gain {top.label} ({_delta_phrase(metric, top.delta)})"
        if len(gains) > 1:
            text += f", {len(gains) - 1} more significant gain{'s' if len(gains) > 2 else ''}"
    else:
        top = max(findings, key=lambda f: sign * f.delta.mean)
        verdict = "not significant" if top.delta.has_ci else "single seed"
        text = (f"**{metric.label}**: no significant gain (best point estimate {top.label}, "
                f"{_delta_phrase(metric, top.delta)}, {verdict})")
    if drops:
        worst = min(drops, key=lambda f: sign * f.delta.mean)
        text += (f"; {plural(len(drops), 'significant drop')}, the largest {worst.label} "
                 f"({_delta_phrase(metric, worst.delta)})")
    elif any(f.delta.has_ci for f in findings):
        text += "; no significant drop"
    return text + "."


def at_a_glance(tables: Sequence[ComparisonTable], collection: Collection) -> str:
    """One paragraph from the numbers: per quality metric, the largest significant gain and whether
    any drop is significant (over every distinct variant-vs-reference comparison in the tables)."""
    metrics = [m for m in (tables[0].metrics if tables else []) if m.kind == QUALITY and m.higher_is_better is not None]
    sentences: list[str] = []
    compared: set[str] = set()
    intervals = 0
    for metric in metrics:
        findings = _findings(tables, metric)
        if not findings:
            continue
        compared.update(f.label for f in findings)
        intervals += sum(f.delta.has_ci for f in findings)
        sentences.append(_metric_sentence(metric, findings))
    any_ci = intervals > 0
    if sentences:
        confidence = round(tables[0].confidence * 100)
        sentences.insert(0, f"Over {plural(len(compared), 'variant-vs-reference comparison')} "
                            f"(paired by seed, {confidence}% CI):")
        if not any_ci:
            sentences.append("Every delta rests on a single seed pair: no confidence intervals, treat them as "
                             "indicative only.")
        elif intervals >= 20:
            # Honest about multiplicity: the intervals are per comparison, not corrected for how many there are.
            chance = (1 - tables[0].confidence) * intervals
            sentences.append(f"These are {intervals} uncorrected intervals: about {chance:.0f} would exclude 0 by "
                             "chance alone, so trust effects that repeat across groups more than isolated ones.")
    elif metrics:
        sentences.append("No comparison has finished seeds in both a variant and its reference row yet, "
                         "so there are no deltas to summarize.")
    counts = collection.counts()
    total = len(collection.outcomes)
    unfinished = total - counts.get("done", 0)
    if unfinished:
        parts = [f"{counts[s]} {s}" for s in ("failed", "running", "planned", "cancelled", "stopped") if counts.get(s)]
        sentences.append(f"{unfinished} of {total} trials have no results yet ({', '.join(parts)}); "
                         "the footnotes say which cells they leave thin.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------
@dataclass
class TableAssets:
    csv_name: str
    delta_plot: str | None = None
    token_plot: str | None = None


@dataclass
class ReportHeader:
    sweep: str
    description: str
    generated: str
    seeds: list[int]
    spec_hash: str | None
    code_versions: dict[str, int]  # code version -> trials with metrics that ran under it
    current_code_version: str | None
    tracking_uri: str
    experiment: str
    experiment_id: str | None
    mlflow_error: str | None
    ui_base: str = DEFAULT_UI_BASE
    trials_csv: str | None = None


def _header_lines(header: ReportHeader, collection: Collection) -> list[str]:
    counts = collection.counts()
    states = ("done", "failed", "running", "planned", "cancelled", "stopped")
    trials = " · ".join(f"{counts.get(s, 0)} {s}" for s in states if counts.get(s) or s in states[:4])
    sources = collection.sources()
    data = []
    if sources.get("mlflow"):
        where = f"experiment `{header.experiment}`"
        if header.experiment_id:
            where = f"experiment [{header.experiment}]({experiment_url(header.ui_base, header.experiment_id)})"
        data.append(f"{sources['mlflow']} from MLflow ({where})")
    if sources.get("disk"):
        data.append(f"{sources['disk']} from `result.json` on disk")
    versions = list(header.code_versions) or ([header.current_code_version] if header.current_code_version else [])
    version_text = ", ".join(f"`{v}`" for v in versions) or "unknown"
    if header.current_code_version and versions and versions != [header.current_code_version]:
        version_text += f" (current trainer code: `{header.current_code_version}`)"
    borrowed = sum(1 for o in collection.outcomes if o.stale_from)
    borrowed_text = f"; {borrowed} done only under an earlier trainer code version" if borrowed else ""
    lines = [f"# Ablation report: {header.sweep}", ""]
    if header.description:
        lines += [header.description.strip(), ""]
    lines += [
        f"- **Generated:** {header.generated}",
        f"- **Trials:** {trials} (of {len(collection.outcomes)}{borrowed_text})",
        f"- **Seeds:** {', '.join(str(s) for s in header.seeds)}",
        f"- **Spec hash:** `{header.spec_hash or 'unknown'}`",
        f"- **Code version:** {version_text}",
        f"- **Data:** {', '.join(data) if data else 'no finished trial yet'}",
    ]
    if header.trials_csv:
        lines.append(f"- **Per-trial data:** [{header.trials_csv}]({header.trials_csv})")
    lines.append("")
    current = header.current_code_version
    others = {v: n for v, n in header.code_versions.items() if v != current}
    if len(header.code_versions) > 1 or others:
        spread = ", ".join(f"`{v}` ({plural(n, 'trial')})" for v, n in header.code_versions.items())
        lines += ["> [!WARNING]",
                  f"> These results come from {plural(len(header.code_versions), 'trainer code version')}: {spread}; "
                  f"the current trainer code is `{current}`. Trials not yet re-run under it show the numbers of "
                  "the same configuration under an earlier version, marked ⚠ in the runs column; differences "
                  "between rows may come from code changes, not from specialization. Re-run the sweep to "
                  "replace them.", ""]
    if header.mlflow_error and sources.get("disk"):
        lines += ["> [!NOTE]", f"> {escape_cell(header.mlflow_error)}; the numbers marked `disk:` come from the trials' "
                  "`result.json` files.", ""]
    return lines


LEGEND = (
    "**How to read the tables.** Values are mean ± standard deviation over the finished seeds; `n` is "
    "finished/planned seeds. Δ is the paired difference to the row marked *(ref.)* (the baseline value of the first "
    "compared axis, the other axes equal), computed seed by seed and averaged, with a {conf}% t confidence interval "
    "(n−1 degrees of freedom). " + NOT_SIGNIFICANT + " the interval includes 0 (not significant); " + NO_CI +
    " no interval: a single seed pair, or per-seed differences that are all identical (no spread to estimate noise from). **Bold** is the best mean of a column (within each group of a crossing); "
    "↑ higher is better, ↓ lower is better; `pts` are percentage points. Cost columns show the change relative to "
    "the reference row in parentheses. *cos CLS-patch* is the cosine similarity between the [CLS] token and the "
    "patch tokens after the pre-attention norm (norm1), averaged over the first (early) or last (late) third of the "
    "blocks: the token-type separation the paper observes. — and n/a always carry a footnote saying why. Runs link "
    "to MLflow; `disk:` marks numbers read from a trial's result.json. The CSV files hold the same tables in logged "
    "units (fractions, not %)."
)


@dataclass
class SearchOverview:
    """A tuned sweep's searches, for the report: the spec's `search:` and each cell's summary."""

    spec: Any  # orchestrator.search.SearchSpec
    cells: Sequence[Any]  # orchestrator.search.CellSummary, in cell order
    search_trial_ids: set[str] = field(default_factory=set)


def search_markdown(overview: SearchOverview) -> list[str]:
    """How each cell was tuned: trials run, the chosen values, and their validation score."""
    spec = overview.spec
    keys = list(spec.params)
    ranges = "; ".join(
        f"`{key}` " + (f"in {{{', '.join(format_value(c) for c in p.choices)}}}" if p.choices is not None else
                      f"in [{format_value(p.low)}, {format_value(p.high)}]" + (" log" if p.log else "")
                      + (f" step {format_value(p.step)}" if p.step else ""))
        for key, p in spec.params.items())
    lines = ["## Hyperparameter search", "",
             f"Every cell was tuned on its own: {spec.sampler.upper() if spec.sampler == 'tpe' else spec.sampler} "
             f"sampler, {spec.budget()} trials per cell, pruner {spec.pruner}, selecting the best "
             f"`{spec.metric}` ({spec.resolved_direction}) on the validation split held out of the training "
             f"data. The tables below show each cell at its chosen values, measured on the test split. "
             f"Searched: {ranges}.", ""]
    header = ["cell", "trials", "complete", "pruned", "failed", *[f"chosen {k.rsplit('.', 1)[-1]}" for k in keys],
              f"best {spec.metric}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for cell in overview.cells:
        label = ", ".join(f"{a}={v}" for a, v in cell.cell.items())
        if cell.best_params:
            chosen = [format_value(cell.best_params.get(k)) for k in keys]
            best = fmt(cell.best_value, 4)
        else:
            chosen = ["—"] * len(keys)
            best = "—"
        status = "" if cell.finished else " (searching)"
        if cell.gave_up:
            status = f" (stopped: {escape_cell(cell.gave_up)})"
        lines.append("| " + " | ".join([escape_cell(label) + status, f"{cell.trials}/{cell.budget}",
                                        str(cell.complete), str(cell.pruned), str(cell.failed), *chosen, best]) + " |")
    return lines + [""]


def report_markdown(header: ReportHeader, collection: Collection, tables: Sequence[ComparisonTable],
                    assets: Mapping[str, TableAssets], search: SearchOverview | None = None) -> str:
    lines = _header_lines(header, collection)
    lines += ["## At a glance", "", at_a_glance(tables, collection), ""]
    if search is not None:
        lines += search_markdown(search)
    confidence = round((tables[0].confidence if tables else 0.95) * 100)
    lines += [LEGEND.format(conf=confidence), ""]
    for table in tables:
        lines += [f"## {escape_cell(table.title)}", ""]
        fixed = table.held_fixed
        if fixed:
            lines += ["Other axes held at " + ", ".join(f"{a}=`{v}`" for a, v in fixed.items()) + ".", ""]
        if not table.rows:
            lines += ["_No cell of the sweep matches this comparison._", ""]
        else:
            body, notes, links = table_markdown(table, header.ui_base, header.experiment_id,
                                                header.current_code_version)
            lines += body + [""]
            if notes.texts:
                lines += notes.render() + [""]
            if links:
                lines += [f"[{run_id}]: {url}" for run_id, url in links.items()] + [""]
        if table.absent:
            absent = "; ".join(", ".join(f"{a}={c[a]}" for a in table.axes) for c in table.absent)
            lines += [f"Not in this sweep (no trials planned): {escape_cell(absent)}.", ""]
        asset = assets.get(table.slug)
        if asset:
            for plot, alt in ((asset.delta_plot, f"Δ vs reference, {table.title}"),
                              (asset.token_plot, f"[CLS]-patch cosine per block, {table.title}")):
                if plot:
                    lines += [f"![{alt}]({plot})", ""]
            lines += [f"CSV: [{asset.csv_name}]({asset.csv_name})", ""]
    return "\n".join(lines).rstrip() + "\n"
