"""`build_report` end to end on a real spec, real result.json files and a REAL SQLite MLflow store
(populated with MlflowClient.log_batch exactly as the runner's child runs look), plus the fallback
to result.json when MLflow has nothing."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from support import synthetic

from orchestrator.identity import code_version
from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.report import build_report
from orchestrator.report.mlflow_runs import fetch_mlflow_runs
from orchestrator.spec import expand, load_spec, spec_hash
from orchestrator.store import ProjectPaths

SEEDS = (0, 1, 2)
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")  # inside MLflow's own SQLAlchemy store


def make_sweep(root, *, name="mini_ablation", tracking_uri=None):
    """none / norms / paper x 3 seeds; paper seed 2 diverged (nan), norms seed 2 still running."""
    spec = load_spec(synthetic.write_spec(root, name=name, specializations=["none", "norms", "paper"], seeds=SEEDS,
                                          tracking_uri=tracking_uri))
    version = code_version()
    plans = expand(spec, code_version=version)
    paths = ProjectPaths.discover(root)
    results, running = {}, None
    for plan in plans:
        variant, seed = plan.cell["specialization"], plan.seed
        if variant == "norms" and seed == 2:
            running = plan
            continue
        results[plan.trial_id] = synthetic.synthetic_result(plan.cell, seed, "nan" if (variant, seed) == ("paper", 2)
                                                            else None)
    synthetic.write_results(paths, results)
    for plan in plans:  # what the runner writes next to each trial: its config
        paths.trial(plan.trial_id).write_config(plan.config)
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    for plan in plans:
        state = "running" if plan is running else ("failed" if results[plan.trial_id]["status"] == "failed" else "done")
        ledger.trials[plan.trial_id] = TrialRecord(trial_id=plan.trial_id, cell=plan.cell, seed=plan.seed, state=state)
    ledger.save()
    return spec, plans, results, paths, version


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    spec, plans, results, paths, version = make_sweep(root)
    # One finished trial logged under an older trainer version: the report must warn about the mix.
    old = next(p.trial_id for p in plans if p.cell["specialization"] == "none" and p.seed == 1)
    run_ids = synthetic.populate_mlflow(paths.default_tracking_uri, spec.name, spec.name, plans, results,
                                        spec_hash=spec_hash(spec), code_version=version,
                                        code_version_of={old: "0ldc0de0ld00"})
    output = build_report(spec, root=root, ui_base="http://mlflow.example:5000", current_code_version=version)
    return dict(root=root, spec=spec, plans=plans, results=results, paths=paths, run_ids=run_ids, output=output,
                text=output.read_text())


def seed_metric(results, plans, variant, metric):
    return {p.seed: results[p.trial_id]["metrics"][metric] for p in plans
            if p.cell["specialization"] == variant and p.trial_id in results
            and results[p.trial_id]["status"] == "done"}


MIOU, TOP1 = "Seg. mIoU (%) ↑", "Linear top-1 [CLS] (%) ↑"


def header_cells(text):
    """The main table's header (its rows: one block per quality metric)."""
    return [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| metric"))
            .strip().strip("|").split("|")]


def main_row(text, metric, first_cell):
    """The main table's row of `metric` for the row labelled `first_cell`, as header -> cell."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == [metric, first_cell]:
            return dict(zip(header_cells(text), cells))
    raise AssertionError(f"no row {metric!r}, {first_cell!r}")


def runs_line(text, label):
    """The run links of one row, listed after the tables: `- none (ref.): [id][…] …`."""
    return next(line for line in text.splitlines() if line.startswith(f"- {label}: "))


def test_report_is_written_where_the_spec_says(tracked):
    assert tracked["output"] == tracked["paths"].reports_dir / "mini_ablation.md"
    assert tracked["text"].startswith("# Ablation report: mini_ablation")


def test_header_counts_trials_and_names_the_sources(tracked):
    text = tracked["text"]
    assert "7 done · 1 failed · 1 running · 0 planned (of 9)" in text
    assert "7 from MLflow (experiment [mini_ablation](http://mlflow.example:5000/#/experiments/" in text
    assert f"`{spec_hash(tracked['spec'])}`" in text


def test_rows_come_from_mlflow_with_links_to_their_runs(tracked):
    text = tracked["text"]
    experiment_id = fetch_mlflow_runs(tracked["paths"].default_tracking_uri, "mini_ablation").experiment_id
    for plan in tracked["plans"]:
        if tracked["results"].get(plan.trial_id, {}).get("status") == "done":
            run_id = tracked["run_ids"][plan.trial_id]
            assert f"[{run_id[:8]}][{run_id}]" in text
            assert f"[{run_id}]: http://mlflow.example:5000/#/experiments/{experiment_id}/runs/{run_id}" in text
    assert not any("disk:`" in line for line in text.splitlines() if line.startswith("- "))
    assert not any(run_id in line for run_id in tracked["run_ids"].values() for line in text.splitlines()
                   if line.startswith("|"))  # links after the tables, not inside them


def test_numbers_match_hand_computed_statistics(tracked):
    results, plans, text = tracked["results"], tracked["plans"], tracked["text"]
    none = seed_metric(results, plans, "none", "seg_miou")
    paper = seed_metric(results, plans, "paper", "seg_miou")
    row = main_row(text, MIOU, "none (ref.)")
    mean, std = statistics.mean(none.values()) * 100, statistics.stdev(none.values()) * 100
    assert row["mean ± std"].replace("**", "") == f"{mean:.2f} ± {std:.2f}"
    # paper: seeds 0 and 1 finished -> paired over 2 seeds with t_{0.975,1} = 12.706
    diffs = [(paper[s] - none[s]) * 100 for s in (0, 1)]
    m = sum(diffs) / 2
    half = 12.706 * math.sqrt(sum((d - m) ** 2 for d in diffs)) / math.sqrt(2)
    paper_row = main_row(text, MIOU, "paper")
    low, high = paper_row["95% CI"].strip("[]").split(", ")
    assert paper_row["Δ"] == f"{m:+.2f}"
    assert float(low) == pytest.approx(m - half, abs=0.011) and float(high) == pytest.approx(m + half, abs=0.011)
    # norms: seeds 0, 1 finished too (seed 2 running)
    norms = seed_metric(results, plans, "norms", "linear_top1_cls")
    base = seed_metric(results, plans, "none", "linear_top1_cls")
    d = [(norms[s] - base[s]) * 100 for s in (0, 1)]
    assert main_row(text, TOP1, "norms")["Δ"] == f"{sum(d) / 2:+.2f}"


def test_failed_and_running_seeds_are_footnoted(tracked):
    text = tracked["text"]
    assert main_row(text, MIOU, "paper")["n"] == "2/3²"  # ¹ is norms' running seed
    assert main_row(text, MIOU, "norms")["n"] == "2/3¹"
    assert "failed: nan (seed 2)" in text
    assert "running (seed 2)" in text


def test_mixed_code_versions_raise_a_warning(tracked):
    text = tracked["text"]
    assert "> [!WARNING]" in text and "`0ldc0de0ld00` (1 trial)" in text
    assert "⚠`0ldc0de0ld00`" in runs_line(text, "none (ref.)")


def test_csv_and_plots_sit_next_to_the_markdown(tracked):
    reports = tracked["output"].parent
    for name in ("mini_ablation_specialization.csv", "mini_ablation_specialization_delta.png",
                 "mini_ablation_specialization_tokens.png", "mini_ablation_trials.csv"):
        assert (reports / name).is_file(), name
        assert f"({name})" in tracked["text"]
    rows = list(csv.DictReader((reports / "mini_ablation_specialization.csv").open()))
    assert [r["specialization"] for r in rows] == ["none", "norms", "paper"]
    assert rows[0]["sources"] == "mlflow;mlflow;mlflow"
    assert (reports / "mini_ablation_specialization_delta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_direct_sqlite_read_equals_mlflow_client_search(tracked):
    uri = tracked["paths"].default_tracking_uri
    fast = fetch_mlflow_runs(uri, "mini_ablation", fast_sqlite=True)
    slow = fetch_mlflow_runs(uri, "mini_ablation", fast_sqlite=False)
    assert fast.error is None and slow.error is None
    assert fast.experiment_id == slow.experiment_id
    assert set(fast.runs_by_trial) == set(slow.runs_by_trial) == set(tracked["run_ids"])
    for trial_id, runs in slow.runs_by_trial.items():
        (a,), (b,) = fast.runs_by_trial[trial_id], runs
        assert (a.run_id, a.status, a.start_time) == (b.run_id, b.status, b.start_time)
        assert dict(a.tags) == dict(b.tags)
        assert dict(a.metrics) == pytest.approx(dict(b.metrics))


def test_without_mlflow_the_report_falls_back_to_result_json(tmp_path):
    spec, plans, results, paths, version = make_sweep(tmp_path, name="offline_ablation")
    assert not (tmp_path / "mlflow.db").exists()
    output = build_report(spec, root=tmp_path, current_code_version=version)
    text = output.read_text()
    assert not (tmp_path / "mlflow.db").exists()  # reading must not create a store
    assert "7 from `result.json` on disk" in text
    assert "> [!NOTE]" in text and "no MLflow store at" in text
    none = seed_metric(results, plans, "none", "seg_miou")
    row = main_row(text, MIOU, "none (ref.)")
    assert row["mean ± std"].replace("**", "").startswith(f"{statistics.mean(none.values()) * 100:.2f} ± ")
    assert runs_line(text, "none (ref.)").count("disk:`") == 3
    assert "failed: nan (seed 2)" in text and "running (seed 2)" in text


def test_an_mlflow_store_without_this_sweep_also_falls_back(tracked, tmp_path):
    # A real store that holds only another sweep's experiment (the module's populated store).
    spec, plans, results, paths, version = make_sweep(tmp_path, name="elsewhere_ablation",
                                                      tracking_uri=tracked["paths"].default_tracking_uri)
    text = build_report(spec, root=tmp_path, current_code_version=version).read_text()
    assert "7 from `result.json` on disk" in text
    assert "no MLflow experiment named 'elsewhere_ablation'" in text


def test_after_a_trainer_change_the_same_configs_from_mlflow_are_shown_with_a_warning(tracked, tmp_path):
    # A new trainer version gives every trial a new id: nothing has run under it yet.
    output = build_report(tracked["spec"], output=tmp_path / "stale.md", root=tracked["root"],
                          current_code_version="c0dec0dec0de")
    text = output.read_text()
    assert "7 done · 0 failed · 0 running · 2 planned (of 9; 7 done only under an earlier trainer code version)" in text
    assert "> [!WARNING]" in text and "the current trainer code is `c0dec0dec0de`" in text
    runs = runs_line(text, "none (ref.)")
    assert runs.count("⚠") == 3
    run_id = tracked["run_ids"][next(p.trial_id for p in tracked["plans"] if p.cell["specialization"] == "none"
                                     and p.seed == 0)]
    assert run_id in runs


def test_a_changed_config_is_never_borrowed(tracked, tmp_path):
    spec = load_spec(tracked["spec"].source, overrides=["base.schedule.steps=50"])
    text = build_report(spec, output=tmp_path / "changed.md", root=tracked["root"],
                        current_code_version="c0dec0dec0de").read_text()
    assert "0 done · 0 failed · 0 running · 9 planned (of 9)" in text


def test_after_a_trainer_change_the_ledger_s_previous_trials_are_used_without_mlflow(tmp_path):
    spec, plans, results, paths, version = make_sweep(tmp_path, name="offline_stale")
    text = build_report(spec, root=tmp_path, current_code_version="c0dec0dec0de").read_text()
    assert "7 done only under an earlier trainer code version" in text
    old_none_0 = next(p.trial_id for p in plans if p.cell["specialization"] == "none" and p.seed == 0)
    assert f"disk:`{old_none_0[:8]}` ⚠`unknown`" in runs_line(text, "none (ref.)")
