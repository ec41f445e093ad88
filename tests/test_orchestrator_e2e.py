"""End to end with the REAL trainer (`python -m trainer`) at micro size and a local SQLite MLflow store.

- a small sweep, two trainers in parallel on one SQLite file: one parent run, one child per trial,
  each with params and final metrics logged by the trainer itself; a re-run does nothing;
- the orchestrator and its trainers SIGKILLed mid-sweep, then run again: the killed trials resume
  from their checkpoints, continue their own MLflow runs, nothing is lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import MICRO_BASE, PYTHON, REPO, pid_alive, read_ledger, wait_for, write_spec

pytestmark = pytest.mark.slow

FINAL_METRICS = ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "flops", "wall_time_s", "params_total")
SPECIALIZATIONS = {"none": "none", "paper": "paper", "norms": "norms"}


def orchestrator(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sweep_runs(db: Path, experiment: str):
    """(parents, children) of the sweep's experiment, straight from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) + len(children) == len(runs), "a run that is neither the parent nor a child"
    return parents, children


def assert_one_complete_child_per_trial(db: Path, sweep: str, ledger: dict) -> dict[str, str]:
    parents, children = sweep_runs(db, sweep)
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    assert parent.info.run_id == ledger["meta"]["parent_run_id"]
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert len(by_trial) == len(children), "two child runs for one trial"
    assert set(by_trial) == set(ledger["trials"]), "children and trials differ"
    for trial_id, child in by_trial.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED", (trial_id, child.info.status)
        assert child.data.params.get("model.specialization"), f"{trial_id}: no params"
        missing = [m for m in FINAL_METRICS if m not in child.data.metrics]
        assert not missing, f"{trial_id}: final metrics missing {missing}"
        assert child.data.tags.get("spec_hash") and child.data.tags.get("code_version")
        assert child.info.run_name == ledger["trials"][trial_id]["label"]
    return {trial_id: child.info.run_id for trial_id, child in by_trial.items()}


def test_small_sweep_end_to_end_with_parallel_trainers_on_sqlite(tmp_path, project_root, cli_env):
    spec = write_spec(tmp_path, "e2e_small", base=MICRO_BASE,
                      axes={"specialization": {"key": "model.specialization", "values": SPECIALIZATIONS}},
                      backend={"max_parallel": 2, "retries": 1, "resources": {"cpus_per_trial": 1}})
    first = orchestrator("run", str(spec), env=cli_env)
    assert first.returncode == 0, first.stdout + first.stderr

    ledger = read_ledger(project_root, "e2e_small")
    assert len(ledger["trials"]) == 3
    assert {t["state"] for t in ledger["trials"].values()} == {"done"}
    db = project_root / "mlflow.db"
    run_ids = assert_one_complete_child_per_trial(db, "e2e_small", ledger)
    for trial_id, trial in ledger["trials"].items():
        run_dir = Path(trial["run_dir"])
        assert run_dir == project_root / "runs" / "trials" / trial_id  # the shared store
        log = (run_dir / "trainer.log").read_text()
        assert "database is locked" not in log and "MLflow" not in log, log[-2000:]  # no tracking trouble
        assert (run_dir / "mlflow_run_id").read_text().strip() == run_ids[trial_id]
    _, children = sweep_runs(db, "e2e_small")
    assert not any("synced_from" in c.data.tags for c in children)  # the trainers logged it all themselves
    assert (project_root / "reports" / "e2e_small.md").exists()

    # Run again: nothing to train, still one parent and one child per trial.
    again = orchestrator("run", str(spec), "--no-report", env=cli_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started" not in again.stdout
    ledger = read_ledger(project_root, "e2e_small")
    assert {t["attempts"] for t in ledger["trials"].values()} == {1}
    assert assert_one_complete_child_per_trial(db, "e2e_small", ledger) == run_ids


def test_sigkill_orchestrator_and_trainers_mid_sweep_then_resume(tmp_path, project_root, cli_env):
    # Long enough that a kill after the first checkpoint (step 10) finds trials mid-training.
    base = {**MICRO_BASE, "schedule": {**MICRO_BASE["schedule"], "steps": 80, "checkpoint_every": 10}}
    spec = write_spec(tmp_path, "e2e_kill", base=base,
                      axes={"specialization": {"key": "model.specialization", "values": SPECIALIZATIONS}},
                      backend={"max_parallel": 2, "retries": 1})
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report"], cwd=REPO, env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running_with_checkpoint():
        if proc.poll() is not None:
            raise AssertionError(f"the orchestrator exited ({proc.returncode}) before the kill:\n{proc.communicate()[0]}")
        trials = read_ledger(project_root, "e2e_kill")["trials"].values()
        live = [t for t in trials if t["state"] == "running"]
        ready = [t for t in live if (Path(t["run_dir"]) / "checkpoint.pt").exists()
                 and (Path(t["run_dir"]) / "mlflow_run_id").exists()]
        return live if ready else None

    try:
        victims = wait_for(running_with_checkpoint, timeout=300, interval=0.2, what="a trial past its first checkpoint")
    except AssertionError:
        proc.kill()
        raise
    checkpointed = {t["trial_id"] for t in victims if (Path(t["run_dir"]) / "checkpoint.pt").exists()}
    run_ids_before = {t["trial_id"]: (Path(t["run_dir"]) / "mlflow_run_id").read_text().strip()
                      for t in victims if (Path(t["run_dir"]) / "mlflow_run_id").exists()}
    # kill -9 the orchestrator AND its trainers (each in its own process group)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for t in victims:
        try:
            os.killpg(t["job"]["info"]["pgid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(pid_alive(t["job"]["info"]["pid"]) for t in victims), timeout=30, what="trainers dead")
    killed = [t for t in victims if not (Path(t["run_dir"]) / "result.json").exists()]
    assert killed, "every trial finished before the kill; the test needs longer trials"
    assert checkpointed & {t["trial_id"] for t in killed}, "no killed trial had a checkpoint to resume from"

    rerun = orchestrator("run", str(spec), "--no-report", env=cli_env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    ledger = read_ledger(project_root, "e2e_kill")
    assert {t["state"] for t in ledger["trials"].values()} == {"done"}
    run_ids = assert_one_complete_child_per_trial(project_root / "mlflow.db", "e2e_kill", ledger)
    for victim in killed:
        record = ledger["trials"][victim["trial_id"]]
        log = Path(record["run_dir"], "trainer.log").read_text()
        if victim["trial_id"] in checkpointed:  # continued from its checkpoint, not from scratch
            assert "resumed from" in log, log[-3000:]
        assert record["history"][0]["failure_class"] == "lost" and record["failures"] == 0  # no retry spent
        # attempts of one trial never overlap: the next started after the previous one was found dead
        for before, after in zip(record["history"], record["history"][1:]):
            assert after["started_at"] >= before["ended_at"]
        if victim["trial_id"] in run_ids_before:  # the resumed trainer continued its own MLflow run
            assert run_ids[victim["trial_id"]] == run_ids_before[victim["trial_id"]]
