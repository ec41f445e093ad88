"""`build_report`: collect a sweep's outcomes, build its comparison tables and write the report
(Markdown, one CSV per table, the per-trial CSV, PNG figures) next to each other."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.identity import code_version
from orchestrator.plan import sweep_output_dir, tuned_trials
from orchestrator.report.collect import collect_outcomes, with_unavailable_reasons
from orchestrator.report.csv_export import outcomes_csv, table_csv
from orchestrator.report.document import ReportHeader, SearchOverview, TableAssets, report_markdown
from orchestrator.report.format import DEFAULT_UI_BASE
from orchestrator.report.metrics import table_metrics
from orchestrator.report.plots import plot_deltas, plot_token_curves
from orchestrator.report.tables import ComparisonTable, build_tables
from orchestrator.spec import SweepSpec, cell_text, spec_hash
from orchestrator.spec.controls import plain_sweep_trials
from orchestrator.store import ProjectPaths
from trainer.contract import write_text_atomic

log = logging.getLogger(__name__)
UI_BASE_ENV = "MLFLOW_UI_BASE"  # where links point: the MLflow UI serving this sweep's store


def default_output(spec: SweepSpec, paths: ProjectPaths) -> Path:
    """`spec.report.output` when the spec has one, else `reports/<sweep name>.md` under the project root."""
    return paths.resolve(spec.report.output) if spec.report.output else paths.reports_dir / f"{spec.name}.md"


def build_report(spec: SweepSpec, *, output: Path | str | None = None, root: Path | str | None = None,
                 ui_base: str | None = None, current_code_version: str | None = None) -> Path:
    """Write the sweep's report and return the Markdown path (default: `default_output`).

    `ui_base` (default `$MLFLOW_UI_BASE` or http://127.0.0.1:5000) is where run links point;
    `root` is the project root (default: `ProjectPaths.discover()`); `current_code_version`
    (default: the trainer's code now) decides which trials count as run under the current code.
    Trials not yet run under it show the same config's results from an earlier version, with a warning.
    """
    paths = ProjectPaths.discover(root)
    output = Path(output) if output is not None else default_output(spec, paths)
    output.parent.mkdir(parents=True, exist_ok=True)
    ui_base = ui_base or os.environ.get(UI_BASE_ENV) or DEFAULT_UI_BASE
    version = current_code_version or code_version()
    search = None
    if spec.search is not None:  # a tuned sweep compares each cell at its chosen settings
        tuned = tuned_trials(spec, sweep_output_dir(spec, paths), version)
        search = SearchOverview(spec.search, tuned.cells)
        plans = tuned.final + tuned.controls
    else:
        plans = plain_sweep_trials(spec, version)

    collection = collect_outcomes(spec, plans, paths, version)
    collection.outcomes = with_unavailable_reasons(collection.outcomes, plans, list(spec.report.metrics))
    tables = build_tables(spec, collection.outcomes, table_metrics(list(spec.report.metrics)))

    stem = output.stem
    assets: dict[str, TableAssets] = {}
    for table in tables:
        csv_name = f"{stem}_{table.slug}.csv"
        write_text_atomic(output.parent / csv_name, table_csv(table))
        assets[table.slug] = TableAssets(
            csv_name=csv_name,
            delta_plot=_write_plot(plot_deltas, table, output.parent / f"{stem}_{table.slug}_delta.png"),
            token_plot=_write_plot(plot_token_curves, table, output.parent / f"{stem}_{table.slug}_tokens.png"))
    trials_csv = f"{stem}_trials.csv"
    write_text_atomic(output.parent / trials_csv, outcomes_csv(collection))

    try:
        hash_text = spec_hash(spec)
    except Exception as err:  # an unresolvable spec cannot have produced results either; still report
        log.warning("could not hash the spec: %s", err)
        hash_text = None
    header = ReportHeader(
        sweep=spec.name, description=spec.description,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seeds=list(spec.seeds) or sorted({p.seed for p in plans}),
        spec_hash=hash_text, code_versions=collection.code_versions(), current_code_version=version,
        tracking_uri=collection.tracking_uri, experiment=collection.experiment,
        experiment_id=collection.experiment_id, mlflow_error=collection.mlflow_error, ui_base=ui_base,
        trials_csv=trials_csv,
        seeds_by_cell=[(cell_text(rule.cell.items()), rule.seeds) for rule in spec.seeds_by_cell],
    )
    # Atomic: a reader (or a researcher's editor) never sees half a report.
    write_text_atomic(output, report_markdown(header, collection, tables, assets, search))
    return output


def _write_plot(make: Callable[[ComparisonTable, Path], Path | None], table: ComparisonTable,
                path: Path) -> str | None:
    """A figure is a nice-to-have: a plotting failure is logged and the report still gets written."""
    try:
        written = make(table, path)
    except Exception as err:  # matplotlib raises many types; none should cost the tables
        log.warning("could not draw %s: %s", path.name, err)
        written = None
    if written is None:
        path.unlink(missing_ok=True)  # never leave a previous build's figure looking current
        return None
    return path.name
