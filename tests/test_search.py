"""Per-cell hyperparameter search (spec `search:`): Optuna ask/tell in the orchestrator.

The runner mechanics run against the stand-in trainer (conftest) with its `search` behaviour: a
learning curve in progress.jsonl whose validation metric peaks at lr = 1e-3 and whose TEST metric
is the opposite, so picking by the wrong split shows. Optuna, its journal file, the runner, the
local backend's processes and signals are all real. The real trainer's side (validation hold-out,
progress.jsonl) is tested in test_trainer_loop.py, and the tuned default sweep end to end below.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from conftest import MICRO_BASE, PYTHON, REPO, read_ledger, wait_for, write_spec
from orchestrator.commands import run_sweep
from orchestrator.spec import SpecError, load_spec

SEARCH_BASE = {
    **MICRO_BASE,
    "data": {**MICRO_BASE["data"], "val_fraction": 0.25},
    "evaluation": {**MICRO_BASE["evaluation"], "every_steps": 10},
}
LRS = [1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1]


def validation_quality(lr: float) -> float:  # the stand-in's curve (conftest)
    return max(0.0, 1 - abs(math.log10(lr) + 3) / 4)


def search_spec(folder: Path, name: str, search: dict, **extra) -> Path:
    extra.setdefault("tracking", {"enabled": False})
    return write_spec(folder, name, base=extra.pop("base", SEARCH_BASE), search=search, **extra)


def run(path: Path, root: Path, **kwargs):
    return run_sweep(load_spec(path), root=root, progress=False, poll_interval=0.05, retry_delay_s=0.05,
                     console=Console(file=io.StringIO(), width=200), **kwargs)


def studies(root: Path, sweep: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(root / "runs" / sweep / "optuna.journal")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in storage.get_all_studies()}


def attempts(root: Path) -> dict[str, int]:
    """How many times the stand-in trainer started in each run dir (its own attempt counter)."""
    return {p.parent.name: int(p.read_text()) for p in (root / "runs" / "trials").glob("*/stand_in_attempts")}


# ------------------------------------------------------------------------------------------------
# The spec's `search:` section: every mistake named before anything runs


@pytest.mark.parametrize("change, where, says", [
    ({"metric": "linear_top1_cls"}, "search.metric", "validation split"),
    ({"metric": "val/accuracy"}, "search.metric", "unknown metric"),
    ({"pruner": "median", "metric": "val/seg_miou"}, "search.pruner", "only measured at the end"),
    ({"params": {"optimizer.learning_rate": {"low": 1e-4, "high": 1e-2}}}, "search.params.optimizer.learning_rate",
     "unknown key 'learning_rate'"),
    ({"params": {"optimizer.lr": {"low": 0.0, "high": 1e-2}}}, "search.params.optimizer.lr", "greater than 0"),
    ({"params": {"optimizer.lr": {"low": 1e-2, "high": 1e-4}}}, "search.params.optimizer.lr", "smaller than high"),
    ({"params": {"model.specialization": {"choices": ["none", "paper"]}}}, "search.params.model.specialization",
     "axis 'specialization' sets"),
    ({"params": {"seed": {"choices": [0, 1]}}}, "search.params.seed", "seeds"),
    ({"sampler": "grid"}, "search.params.optimizer.lr", "grid sampler needs a finite set"),
    ({"sampler": "cmaes"}, "search.sampler", "tpe"),
    ({"trials_per_cell": 0}, "search.trials_per_cell", "greater than 0"),
])
def test_bad_search_sections_are_refused_with_the_field_and_the_fix(tmp_path, change, where, says):
    search = {"metric": "val/linear_top1_cls", "pruner": "none",
              "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, **change}
    path = search_spec(tmp_path, "bad", search)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert where in text and says in text, text


def test_a_search_needs_a_validation_split_and_a_pruner_needs_a_learning_curve(tmp_path):
    base = {**MICRO_BASE}  # no data.val_fraction, no evaluation.every_steps
    path = search_spec(tmp_path, "no_val", {"metric": "val/knn_top1", "pruner": "median",
                                            "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2}}}, base=base)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert "base.data.val_fraction" in text and "base.evaluation.every_steps" in text, text


def test_set_overrides_reach_the_search_section(tmp_path):
    path = search_spec(tmp_path, "override", {"metric": "val/knn_top1",
                                              "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2}}})
    spec = load_spec(path, ["search.trials_per_cell=3", "search.pruner=none",
                            "search.params.optimizer.lr={low: 1.0e-5, high: 1.0e-3, log: true}"])
    assert spec.search.trials_per_cell == 3 and spec.search.pruner == "none"
    assert spec.search.params["optimizer.lr"].high == 1e-3 and spec.search.params["optimizer.lr"].log
    with pytest.raises(SpecError, match="search.sampelr"):
        load_spec(path, ["search.sampelr=grid"])


# ------------------------------------------------------------------------------------------------
# Running searches


def test_grid_search_runs_each_point_once_and_the_report_picks_by_validation(tmp_path, project_root, stand_in):
    stand_in.behave(**{"": {"search": {"points": 2, "step_s": 0.05}}})
    path = search_spec(tmp_path, "grid", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "none", "trials_per_cell": 10,
        "params": {"optimizer.lr": {"choices": LRS}}}, seeds=[0, 1], backend={"max_parallel": 3},
        report={"metrics": ["linear_top1_cls"]})
    outcome = run(path, project_root)
    assert outcome.ok, outcome

    found = studies(project_root, "grid")
    assert len(found) == 2  # one study per cell
    for trials in found.values():
        # the budget is capped at the grid's 4 points, each run exactly once, none twice
        assert sorted(t.params["optimizer.lr"] for t in trials) == LRS
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert len({t.user_attrs["trial_id"] for t in trials}) == 4
    assert set(attempts(project_root).values()) == {1}  # no run dir trained twice
    # 2 cells x 4 grid points + 2 cells x seed 1 at the chosen lr (seed 0's final trial IS the best search trial)
    assert len(attempts(project_root)) == 10

    ledger = read_ledger(project_root, "grid")
    finals = [t for t in ledger["trials"].values() if t["seed"] == 1]
    assert len(finals) == 2 and all("lr=1.00e-03" in t["label"] for t in finals)

    report = (project_root / "reports" / "grid.md").read_text()
    assert "## Hyperparameter search" in report
    rows = [line for line in report.splitlines() if line.startswith("| specialization=")]
    assert len(rows) == 2
    for row in rows:  # chosen by validation (1e-3), never by test (1e-4 or 1e-1 would win there)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:6] == ["4/4", "4", "0", "0", "1.00e-03"], row
        assert float(cells[6]) == pytest.approx(validation_quality(1e-3))
    # the comparison tables show each cell at its chosen lr, on the TEST metric: 1 - quality = 0%
    table = report.split("## specialization")[1]
    assert "| none (ref.) | 2/2 |" in table and " 0.00 " in table

    status = subprocess.run([PYTHON, "-m", "orchestrator", "status", str(path)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    assert status.returncode == 0, status.stderr
    assert "search: grid, 4 trials per cell" in status.stdout
    assert "│ specialization=paper │ 4/4    │ 4        │ 0      │ 0      │ 0       │ 1.0000 │ lr=1.00e-03 (done)" \
        in status.stdout, status.stdout


def test_pruning_stops_running_trials_early_and_they_are_not_run_again(tmp_path, project_root, stand_in):
    # 10 points of 0.25 s each: a full run takes 2.5 s. Median pruning after 2 finished trials.
    stand_in.behave(**{"": {"search": {"points": 10, "step_s": 0.25}}})
    path = search_spec(tmp_path, "prune", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "median", "pruner_startup_trials": 2,
        "trials_per_cell": 4, "params": {"optimizer.lr": {"choices": [1e-3, 3e-3, 1e-5, 1e-7]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 1})
    started = time.monotonic()
    outcome = run(path, project_root)
    assert outcome.ok, outcome

    (trials,) = studies(project_root, "prune").values()
    states = {t.params["optimizer.lr"]: t.state for t in trials}
    # grid ids follow trial numbers: the two good lrs finish first, the two bad ones get pruned
    assert states == {1e-3: optuna.trial.TrialState.COMPLETE, 3e-3: optuna.trial.TrialState.COMPLETE,
                      1e-5: optuna.trial.TrialState.PRUNED, 1e-7: optuna.trial.TrialState.PRUNED}, states
    ledger = read_ledger(project_root, "prune")
    pruned = [t for t in ledger["trials"].values() if t["state"] == "pruned"]
    assert len(pruned) == 2
    for record in pruned:
        run_dir = Path(record["run_dir"])
        assert (run_dir / "got_sigterm").exists()  # really stopped: SIGTERM, the trainer's checkpoint exit
        assert not (run_dir / "result.json").exists()
        points = (run_dir / "progress.jsonl").read_text().splitlines()
        assert 1 <= len(points) < 10, points  # stopped early, not at the end
    assert time.monotonic() - started < 4 * 2.5 + 20  # the pruned trials did not run their full length

    # a second run: nothing new runs, the pruned trials stay pruned
    again = run(path, project_root)
    assert again.ok
    assert set(attempts(project_root).values()) == {1}


def test_successive_halving_promotes_the_best_and_prunes_the_rest(tmp_path, project_root, stand_in):
    stand_in.behave(**{"": {"search": {"points": 6, "step_s": 0.1}}})
    path = search_spec(tmp_path, "asha", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "successive_halving", "reduction_factor": 2,
        "params": {"optimizer.lr": {"choices": [1e-3, 1e-5, 1e-7, 1e-1]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 1})
    assert run(path, project_root).ok
    (trials,) = studies(project_root, "asha").values()
    states = {t.params["optimizer.lr"]: t.state for t in trials}
    assert states[1e-3] == optuna.trial.TrialState.COMPLETE
    assert optuna.trial.TrialState.PRUNED in states.values(), states


def test_identical_suggestions_share_one_run(tmp_path, project_root, stand_in):
    """TPE over a 2-value space, parallel: the sampler repeats itself; each setting still runs once,
    and the search ends when the space is covered (budget capped at its 2 points)."""
    stand_in.behave(**{"": {"search": {"points": 2, "step_s": 0.2}}})
    path = search_spec(tmp_path, "dups", {
        "metric": "val/linear_top1_cls", "sampler": "tpe", "startup_trials": 1, "pruner": "none",
        "trials_per_cell": 6, "params": {"optimizer.lr": {"choices": [1e-3, 1e-2]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 3})
    outcome = run(path, project_root)
    assert outcome.ok, outcome
    assert set(attempts(project_root).values()) == {1} and len(attempts(project_root)) == 2
    (trials,) = studies(project_root, "dups").values()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["optimizer.lr"] for t in complete} == {1e-3, 1e-2}
    for t in complete:  # an Optuna trial that repeated a setting got that run's value
        assert t.value == pytest.approx(validation_quality(t.params["optimizer.lr"]))


def test_failed_explorations_are_replaced_within_the_budget_and_do_not_fail_the_sweep(tmp_path, project_root,
                                                                                    stand_in):
    # 80% of the log range fails, so any sampler seed (it follows the trainer's code version) draws
    # failures among the first 4 (P(none) = 0.2^4) and 4 successes well within 60 failures.
    stand_in.behave(**{"": {"search": {"points": 1, "step_s": 0.01, "fail_above": 1e-4}}})
    path = search_spec(tmp_path, "failing", {
        "metric": "val/linear_top1_cls", "sampler": "random", "pruner": "none", "trials_per_cell": 4,
        "max_failures": 60, "params": {"optimizer.lr": {"low": 1e-5, "high": 1.0, "log": True}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 2, "retries": 0})
    outcome = run(path, project_root)
    assert outcome.ok and not outcome.failed, outcome  # a diverging lr is a result, not a broken sweep
    (trials,) = studies(project_root, "failing").values()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed, "the seed should draw some lr above 1e-4; pick another range"
    assert all(t.params["optimizer.lr"] > 1e-4 and "nan" in t.user_attrs["fail_reason"] for t in failed)
    assert len({t.user_attrs["trial_id"] for t in complete}) == 4  # replaced: 4 complete trials after all
    assert outcome.counts["failed"] == len(failed)


def test_a_grid_with_a_failing_point_ends_when_every_point_ran(tmp_path, project_root, stand_in):
    stand_in.behave(**{"": {"search": {"points": 1, "step_s": 0.01, "fail_above": 2e-2}}})
    path = search_spec(tmp_path, "grid_fail", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "none",
        "params": {"optimizer.lr": {"choices": [1e-3, 1e-2, 1e-1]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 2, "retries": 0})
    outcome = run(path, project_root)
    assert outcome.ok, outcome
    (trials,) = studies(project_root, "grid_fail").values()
    assert len(trials) == 3 and len(attempts(project_root)) == 3  # no point asked or run twice
    report = (project_root / "reports" / "grid_fail.md").read_text()
    assert "| specialization=paper (stopped: every point of the space ran) | 2/3 | 2 | 0 | 1 | 1.00e-03 |" in report


def test_a_study_stopped_mid_search_resumes_where_it_was(tmp_path, project_root, stand_in, cli_env):
    """SIGKILL the orchestrator mid-search (its trainers keep running, as on a cluster). The next
    run fails the Optuna trials left RUNNING, asks them again with the same values (same trial ids:
    the runs are re-attached, not restarted), keeps every finished trial, and fills the budget."""
    stand_in.behave(**{"": {"search": {"points": 6, "step_s": 0.5}}})
    path = search_spec(tmp_path, "resume", {
        "metric": "val/linear_top1_cls", "sampler": "random", "pruner": "none", "trials_per_cell": 5,
        "params": {"optimizer.lr": {"low": 1e-5, "high": 1e-1, "log": True}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"max_parallel": 2})
    env = {**cli_env, "ORCHESTRATOR_TRAINER_COMMAND": f"{PYTHON} {stand_in.script}"}
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(path), "--no-report", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def mid_search():
        if proc.poll() is not None:
            raise AssertionError(f"orchestrator exited early:\n{proc.communicate()[0]}")
        trials = read_ledger(project_root, "resume")["trials"].values()
        done = [t for t in trials if t["state"] == "done"]
        running = [t for t in trials if t["state"] == "running"]
        return (done, running) if done and running else None

    done_before, running_before = wait_for(mid_search, timeout=60, interval=0.1, what="one done, one running")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    outcome = run(path, project_root)
    assert outcome.ok, outcome
    (trials,) = studies(project_root, "resume").values()
    orphans = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("orchestrator stopped")]
    assert orphans and all(t.state == optuna.trial.TrialState.FAIL for t in orphans)
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in orphans)
    for retry in retries:  # same values -> same trial id -> the same run dir
        orphan = next(t for t in trials if t.number == retry.user_attrs["retry_of"])
        assert retry.params == orphan.params and retry.user_attrs["trial_id"] == orphan.user_attrs["trial_id"]
        assert retry.state == optuna.trial.TrialState.COMPLETE
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.user_attrs["trial_id"] for t in complete}) == 5  # the budget, filled exactly
    # nothing finished before the kill ran again, and the runs alive at the kill were re-attached
    runs = attempts(project_root)
    for record in [*done_before, *running_before]:
        assert runs[record["trial_id"]] == 1, record
    assert set(runs.values()) == {1}


def test_search_trials_are_mlflow_children_of_their_cell(tmp_path, project_root, stand_in, mlflow_db):
    from mlflow.tracking import MlflowClient

    stand_in.behave(**{"": {"search": {"points": 1, "step_s": 0.01}}})
    path = search_spec(tmp_path, "mlflow_cells", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "none",
        "params": {"optimizer.lr": {"choices": [1e-3, 1e-2]}}}, tracking={"enabled": True}, seeds=[0, 1])
    assert run(path, project_root).ok
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    experiment = client.get_experiment_by_name("mlflow_cells")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    cells = {r.data.tags["cell_key"]: r for r in runs if r.data.tags.get("sweep_role") == "cell"}
    assert len(parent) == 1 and set(cells) == {"specialization=none", "specialization=paper"}
    for cell in cells.values():
        assert cell.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert cell.data.params["best.optimizer.lr"] == "0.001"
        assert cell.data.metrics["search/complete"] == 2
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == cell.info.run_id]
        # 2 search trials + seed 1 at the chosen lr (seed 0's final is the best search trial)
        assert len(children) == 3 and len({r.data.tags["trial_id"] for r in children}) == 3
        assert {r.data.tags["search.optimizer.lr"] for r in children} == {"0.001", "0.01"}
