"""How long `build_report` takes for a sweep of ~1,000 finished trials (target: < 10 s).

Builds a synthetic sweep in a temp dir: a real spec (10 specializations x 2 frameworks x 5 scales
x 10 seeds), result.json files, and a real SQLite MLflow store with one child run per trial,
populated through MlflowClient.log_batch exactly like the runner logs (slow, not timed). Then
times `build_report` (first call in the process, so mlflow/matplotlib imports are included) and a
second, warm call, plus a breakdown by phase.

    .venv/bin/python benchmarks/report_build.py [--seeds 10] [--keep DIR]

The last line of output is a JSON object: {"runs", "seconds", "target_seconds", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the synthetic sweep is a test helper (tests/support)

from support import synthetic  # noqa: E402  (after the path setup above)

from orchestrator.identity import code_version  # noqa: E402
from orchestrator.report import build_report  # noqa: E402
from orchestrator.report.collect import collect_outcomes  # noqa: E402
from orchestrator.report.csv_export import table_csv  # noqa: E402
from orchestrator.report.format import DEFAULT_UI_BASE  # noqa: E402
from orchestrator.report.glance import at_a_glance  # noqa: E402
from orchestrator.report.markdown_table import table_markdown  # noqa: E402
from orchestrator.report.metrics import table_metrics  # noqa: E402
from orchestrator.report.mlflow_runs import fetch_mlflow_runs  # noqa: E402
from orchestrator.report.plots import plot_deltas, plot_token_curves  # noqa: E402
from orchestrator.report.tables import build_tables  # noqa: E402
from orchestrator.spec import expand, load_spec, spec_hash  # noqa: E402
from orchestrator.store import ProjectPaths  # noqa: E402

TARGET_SECONDS = 10.0
SPECIALIZATIONS = ["none", "norms", "qkv_first_third", "paper", "all", "ls", "proj", "mlp", "qkv_all", "qkv_last_third"]
FRAMEWORKS = ["supervised", "dinov2"]
SCALES = ["micro", "tiny", "small", "base", "large"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per cell (100 cells): 10 -> 1,000 runs")
    parser.add_argument("--keep", type=Path, default=None, help="build in this directory and keep it")
    parser.add_argument("--client-path", action="store_true",
                        help="also time MlflowClient.search_runs (the path used for non-SQLite stores)")
    args = parser.parse_args()

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["CLS_ABLATION_ROOT"] = str(workdir)  # trial store, reports and ledger live in the temp dir
    try:
        return run(workdir, args.seeds, args.client_path)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: Path, seeds: int, client_path: bool = False) -> int:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    spec_path = synthetic.write_spec(
        workdir, name="bench_ablation", specializations=SPECIALIZATIONS, frameworks=FRAMEWORKS, scales=SCALES,
        seeds=list(range(seeds)), tracking_uri=uri,
        compare=["specialization", ["specialization", "framework"], ["specialization", "scale"]],
        metrics=["linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "depth_abs_rel"],
    )
    spec = load_spec(spec_path)
    version = code_version()
    plans = expand(spec, code_version=version)
    paths = ProjectPaths.discover()

    # ~2% failures and ~2% still running, so the report exercises its footnotes at scale.
    results = {}
    for i, plan in enumerate(plans):
        if i % 53 == 7:
            continue  # running / planned: no result yet
        failure = "nan" if i % 47 == 3 else ("oom" if i % 97 == 11 else None)
        results[plan.trial_id] = synthetic.synthetic_result(plan.cell, plan.seed, failure)
    synthetic.write_results(paths, results)

    started = time.perf_counter()
    synthetic.populate_mlflow(uri, spec.name, spec.name, plans, results, spec_hash=spec_hash(spec),
                              code_version=version)
    populate_s = time.perf_counter() - started
    done = [r for r in results.values() if r["status"] == "done"]
    metrics_per_run = round(sum(len(synthetic.flat_metrics(r)) for r in done) / len(done))

    output = workdir / "reports" / "ablation.md"
    started = time.perf_counter()
    build_report(spec, output=output, current_code_version=version)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    build_report(spec, output=output, current_code_version=version)
    warm_s = time.perf_counter() - started
    breakdown = phase_breakdown(spec, plans, paths, version, output)
    if client_path:
        started = time.perf_counter()
        fetch_mlflow_runs(uri, spec.name, fast_sqlite=False)
        breakdown["MLflow search via MlflowClient (info)"] = time.perf_counter() - started

    mlflow_rows = sum(1 for line in output.read_text().splitlines() if "][" in line)
    rows = [
        ("runs (trials planned)", f"{len(plans)}"),
        ("runs with a result", f"{len(results)}"),
        ("metrics per finished run (mean)", f"{metrics_per_run}"),
        ("populate MLflow (not timed)", f"{populate_s:.1f} s"),
        ("build_report, first call", f"{cold_s:.2f} s"),
        ("build_report, second call", f"{warm_s:.2f} s"),
        *((f"  phase: {name}", f"{seconds:.2f} s") for name, seconds in breakdown.items()),
        ("table rows linking MLflow runs", f"{mlflow_rows}"),
        ("target", f"< {TARGET_SECONDS:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 12}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    print(json.dumps({"runs": len(plans), "seconds": round(cold_s, 3), "warm_seconds": round(warm_s, 3),
                      "target_seconds": TARGET_SECONDS, "metrics_per_run": metrics_per_run,
                      "breakdown_seconds": {k: round(v, 3) for k, v in breakdown.items()}}))
    return 0 if cold_s < TARGET_SECONDS else 1


def phase_breakdown(spec, plans, paths, version: str, output: Path) -> dict[str, float]:
    """The same work as build_report, phase by phase (informational)."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    collection = collect_outcomes(spec, plans, paths, version)
    out["collect (MLflow search + result.json)"] = time.perf_counter() - t
    t = time.perf_counter()
    tables = build_tables(spec, collection.outcomes, table_metrics(list(spec.report.metrics)))
    out["tables + statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    for table in tables:
        table_csv(table)
        table_markdown(table, DEFAULT_UI_BASE, collection.experiment_id, version)
    at_a_glance(tables, collection)
    out["markdown + csv"] = time.perf_counter() - t
    t = time.perf_counter()
    for table in tables:
        plot_deltas(table, output.parent / "bench_delta.png")
        plot_token_curves(table, output.parent / "bench_tokens.png")
    out["plots"] = time.perf_counter() - t
    return out


if __name__ == "__main__":
    raise SystemExit(main())
