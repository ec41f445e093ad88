"""The whole Markdown document: header with sources and warnings, "at a glance", the search
overview of a tuned sweep, the legend, and each comparison: its main, cost and token tables, their
notes, the run links after them, and figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.report.format import DEFAULT_UI_BASE, NO_CI, escape_cell, experiment_url, fmt, plural
from orchestrator.report.glance import at_a_glance
from orchestrator.report.markdown_table import INDICATIVE_NOTE, THROUGHPUT, table_markdown, unlogged
from orchestrator.report.metrics import COST, DESCRIPTIVE
from orchestrator.report.outcome import Collection
from orchestrator.report.tables import ComparisonTable
from orchestrator.spec.schema import CONTROLS
from orchestrator.spec.search import format_value

if TYPE_CHECKING:
    from orchestrator.search.study import CellSummary
    from orchestrator.spec.search import SearchSpec


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
    seeds_by_cell: list[tuple[str, list[int]]] = field(default_factory=list)  # (cell text, its seeds)
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
    by_cell = [f"{cell}: {', '.join(map(str, seeds))}" for cell, seeds in header.seeds_by_cell]
    lines = [f"# Ablation report: {header.sweep}", ""]
    if header.description:
        lines += [header.description.strip(), ""]
    lines += [
        f"- **Generated:** {header.generated}",
        f"- **Trials:** {trials} (of {len(collection.outcomes)}{borrowed_text})",
        f"- **Seeds:** {'; '.join([', '.join(map(str, header.seeds)), *by_cell])}",
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
    "**How to read the tables.** Each comparison has a main table, a cost table and a token table, then its "
    "runs. In the main table every quality metric has a block of rows: the mean ± standard deviation over the "
    "finished seeds (`n` is finished/planned seeds), then Δ, the paired difference to the row marked *(ref.)* (the "
    "baseline value of the first compared axis, the other axes equal) computed seed by seed and averaged, its "
    "{conf}% t confidence interval (n−1 degrees of freedom, uncorrected), the Holm-adjusted p-value of the paired "
    "t test and the verdict: **significant** (Holm p < 0.05), *no effect larger than ±X* (the interval lies inside "
    "±X, X the spec's `report.target_effects` for the metric) or *inconclusive*. " + NO_CI + " no interval: a "
    "single seed pair, or per-seed differences that are all identical (no spread to estimate noise from). Rows "
    "marked *(control)* are floors (e.g. an untrained network), shown with values and never compared. **Bold** "
    "is the best mean of a metric (within each group of a crossing); ↑ higher is better, ↓ lower is better; Δ of "
    "a % metric is in percentage points (`pts`). The cost table shows the change relative to the reference row "
    "in parentheses. The token table shows the cosine similarity between the [CLS] token and the patch tokens, and "
    "between distinct patch tokens, before and after the pre-attention norm (norm1), averaged over the first "
    "(early) or last (late) third of the blocks: the paper sees [CLS]-patch clearly positive before norm1 and about "
    "0 after, and patch-patch staying positive (norm2 and the final norm: each trial's token_interaction.json and "
    "plot). — and n/a always carry a footnote "
    "saying why. Runs link to MLflow; `disk:` marks numbers read from a trial's result.json. The CSV files hold "
    "the same tables in logged units (fractions, not %), with the uncorrected p-values."
)


# What each control row is (report.controls; the trials: orchestrator/spec/controls.py).
CONTROL_TEXT = {
    CONTROLS["untrained"]: "the baseline's architecture at its random initialization (the first seed's, "
                           "specialization none), no training step",
    CONTROLS["pixels"]: "the normalized pixel patches themselves as the tokens (3·p² values per p×p patch, "
                        "[CLS] their mean)",
}


def controls_markdown(tables: Sequence[ComparisonTable]) -> str | None:
    """What the *(control)* rows are and which setup they measure; None when no table has one."""
    labels = list(dict.fromkeys(row.control for table in tables for row in table.rows if row.is_control))
    if not labels:
        return None
    baseline = ", ".join(f"{axis}=`{value}`" for axis, value in tables[0].baseline.items())
    described = "; ".join(f"*{label}*: {CONTROL_TEXT.get(label, 'a reference trial')}" for label in labels)
    return (f"**Controls.** Through the same probes, on the data and model size of the baseline cell ({baseline}): "
            f"{described}. Each is one trial, shared through the trial store with every sweep on the same setup.")


@dataclass
class SearchOverview:
    """A tuned sweep's searches, for the report: the spec's `search:` and each cell's summary."""

    spec: SearchSpec
    cells: Sequence[CellSummary]  # in the sweep's cell order


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


def comparison_markdown(table: ComparisonTable, header: ReportHeader) -> list[str]:
    """The main table, the cost and token tables, their footnotes, then the runs and their links."""
    text = table_markdown(table, header.ui_base, header.experiment_id, header.current_code_version)
    missing = [m.name for kind in (COST, DESCRIPTIVE) for m in unlogged(table, kind)]
    lines = text.main + [""]
    if text.costs:
        lines += ["**Cost**", "", *text.costs, ""]
        if any(m.name == THROUGHPUT for m in table.metrics) and THROUGHPUT not in missing:
            lines += [INDICATIVE_NOTE, ""]
    if text.tokens:
        lines += ["**Token interaction** (cosine similarity before / after norm1, mean over the early / late third of the blocks)", "",
                  *text.tokens, ""]
    if missing and any(row.done for row in table.rows):
        lines += ["Not logged by any finished trial of this comparison: "
                  + ", ".join(f"`{name}`" for name in missing) + ".", ""]
    if text.notes.texts:
        lines += text.notes.render() + [""]
    lines += ["**Runs**", "", *text.runs, ""]
    if text.links:
        lines += [f"[{run_id}]: {url}" for run_id, url in text.links.items()] + [""]
    return lines


def report_markdown(header: ReportHeader, collection: Collection, tables: Sequence[ComparisonTable],
                    assets: Mapping[str, TableAssets], search: SearchOverview | None = None) -> str:
    lines = _header_lines(header, collection)
    lines += ["## At a glance", "", at_a_glance(tables, collection), ""]
    if search is not None:
        lines += search_markdown(search)
    confidence = round((tables[0].confidence if tables else 0.95) * 100)
    lines += [LEGEND.format(conf=confidence), ""]
    if (controls := controls_markdown(tables)) is not None:
        lines += [controls, ""]
    for table in tables:
        lines += [f"## {escape_cell(table.title)}", ""]
        fixed = table.held_fixed
        if fixed:
            lines += ["Other axes held at " + ", ".join(f"{a}=`{v}`" for a, v in fixed.items()) + ".", ""]
        if not table.rows:
            lines += ["_No cell of the sweep matches this comparison._", ""]
        else:
            lines += comparison_markdown(table, header)
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
