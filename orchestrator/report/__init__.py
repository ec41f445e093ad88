"""The sweep report: `build_report(spec)` writes Markdown + CSV + PNG that answer "which components
benefit from specialization, at which scale, under which framework", with honest noise.

    collect.py  one outcome per planned trial (MLflow, else result.json; ledger for the unfinished)
    mlflow_runs.py  the sweep's MLflow runs in one read (direct SQLite, else MlflowClient)
    tables.py   which cells form each comparison table; per-row statistics
    stats.py    pure statistics (mean/std, paired deltas, t confidence intervals)
    metrics.py  display names, units, directions
    render.py   Markdown, CSV, the "at a glance" paragraph
    plots.py    PNG figures
    synthetic.py  a synthetic sweep (spec, result.json, MLflow runs) for the benchmark and tests
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.report.collect import Collection, TrialOutcome, collect_outcomes, outcomes_csv, project_paths
from orchestrator.report.metrics import table_metrics
from orchestrator.report.render import (
    DEFAULT_UI_BASE,
    ReportHeader,
    SearchOverview,
    TableAssets,
    report_markdown,
    table_csv,
)
from orchestrator.report.stats import DEFAULT_CONFIDENCE
from orchestrator.report.tables import ComparisonTable, build_tables

__all__ = ["Collection", "ComparisonTable", "TrialOutcome", "build_report", "default_output", "UI_BASE_ENV"]

log = logging.getLogger(__name__)
UI_BASE_ENV = "MLFLOW_UI_BASE"  # where links point: the MLflow UI serving this sweep's store


def default_output(spec, paths) -> Path:
    """`spec.report.output` when the spec has one, else `reports/<sweep name>.md` under the project root."""
    configured = getattr(getattr(spec, "report", None), "output", None)
    return paths.resolve(configured) if configured else paths.reports_dir / f"{spec.name}.md"


def _write_text_atomic(path: Path, text: str) -> None:
    # A reader (or a researcher's editor) never sees half a report.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_plot(make, table: ComparisonTable, path: Path) -> str | None:
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


def build_report(spec, output: Path | str | None = None, *, ui_base: str | None = None,
                 root: Path | str | None = None, plans=None, current_code_version: str | None = None,
                 confidence: float = DEFAULT_CONFIDENCE, plots: bool = True, use_mlflow: bool = True,
                 other_code_versions: bool = True) -> Path:
    """Write the sweep's report (Markdown, one CSV per table, PNG figures) and return the Markdown path.

    `plans` defaults to `expand(spec)` under the current trainer code version; `ui_base` (default
    `$MLFLOW_UI_BASE` or http://127.0.0.1:5000) is where run links point; `root` is the project
    root (default: `ProjectPaths.discover()`). `other_code_versions`: trials not yet run under the
    current trainer code show the same config's results from an earlier version, with a warning.
    """
    from orchestrator.identity import code_version
    from orchestrator.spec import expand, spec_hash

    paths = project_paths(root)
    output = Path(output) if output is not None else default_output(spec, paths)
    output.parent.mkdir(parents=True, exist_ok=True)
    ui_base = ui_base or os.environ.get(UI_BASE_ENV) or DEFAULT_UI_BASE
    version = current_code_version or code_version()
    searches = None
    if getattr(spec, "search", None) is not None:  # a tuned sweep compares each cell at its chosen settings
        from orchestrator.search import tuned_plan

        tuned = tuned_plan(spec, paths.resolve(spec.output_dir), version)
        searches = SearchOverview(spec.search, tuned.cells, {p.trial_id for p in tuned.search})
        plans = list(plans) if plans is not None else tuned.final
    plans = list(plans) if plans is not None else expand(spec, code_version=version)

    collection = collect_outcomes(spec, plans, root=paths.root, current_code_version=version, use_mlflow=use_mlflow,
                                  other_code_versions=other_code_versions)
    metrics = table_metrics(list(getattr(spec.report, "metrics", []) or []))
    tables = build_tables(spec, collection.outcomes, metrics, confidence)

    stem = output.stem
    assets: dict[str, TableAssets] = {}
    for table in tables:
        csv_name = f"{stem}_{table.slug}.csv"
        _write_text_atomic(output.parent / csv_name, table_csv(table))
        asset = TableAssets(csv_name=csv_name)
        if plots:
            from orchestrator.report.plots import plot_deltas, plot_token_curves

            asset.delta_plot = _write_plot(plot_deltas, table, output.parent / f"{stem}_{table.slug}_delta.png")
            asset.token_plot = _write_plot(plot_token_curves, table, output.parent / f"{stem}_{table.slug}_tokens.png")
        assets[table.slug] = asset
    trials_csv = f"{stem}_trials.csv"
    _write_text_atomic(output.parent / trials_csv, outcomes_csv(collection))

    code_versions: dict[str, int] = {}
    for outcome in collection.outcomes:
        if outcome.has_metrics and outcome.code_version:
            code_versions[outcome.code_version] = code_versions.get(outcome.code_version, 0) + 1
    try:
        hash_text = spec_hash(spec)
    except Exception as err:  # an unresolvable spec cannot have produced results either; still report
        log.warning("could not hash the spec: %s", err)
        hash_text = None
    header = ReportHeader(
        sweep=spec.name, description=getattr(spec, "description", "") or "",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seeds=list(getattr(spec, "seeds", []) or sorted({p.seed for p in plans})),
        spec_hash=hash_text, code_versions=code_versions, current_code_version=version,
        tracking_uri=collection.tracking_uri, experiment=collection.experiment,
        experiment_id=collection.experiment_id, mlflow_error=collection.mlflow_error, ui_base=ui_base,
        trials_csv=trials_csv,
    )
    _write_text_atomic(output, report_markdown(header, collection, tables, assets, searches))
    return output
