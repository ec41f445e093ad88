"""The sweep report: `build_report(spec)` writes Markdown + CSV + PNG that answer "which components
benefit from specialization, at which scale, under which framework", with honest noise.

    build.py           build_report: collect -> tables -> files
    collect.py         one outcome per planned trial (MLflow, else result.json; ledger for the unfinished)
    borrow.py          results of the same config under an earlier trainer code version
    mlflow_runs.py     the sweep's MLflow runs in one read (direct SQLite, else MlflowClient)
    outcome.py         TrialOutcome, Collection: what the rest is built from
    tables.py          each comparison table's rows and statistics; the family of comparisons, judged
    stats.py           pure statistics (mean/std, paired deltas, t confidence intervals, p-values)
    verdicts.py        significant / no effect larger than the target / inconclusive, Holm over the family
    metrics.py         display names, units, directions
    format.py          number formatting, footnotes, links, why a value is missing
    markdown_table.py  one comparison as Markdown: main, cost and token tables, run links
    glance.py          the "at a glance" paragraph
    document.py        the whole Markdown document (header, legend, search overview, tables)
    csv_export.py      the CSV files
    plots.py           PNG figures
"""

from orchestrator.report.build import build_report, default_output

__all__ = ["build_report", "default_output"]
