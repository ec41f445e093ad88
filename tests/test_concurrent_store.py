"""Concurrent first use of a fresh local MLflow store: MLflow's schema migration races when several
processes create the same SQLite file at once ("duplicate column name: step"); creating it is
serialised by a file lock beside it, for orchestrators and trainers alike."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, REPO, orchestrator_env, read_ledger, write_spec

pytestmark = pytest.mark.slow


def test_three_processes_create_one_fresh_store_at_once(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    code = f"from trainer.tracking import prepare_sqlite_store; prepare_sqlite_store('sqlite:///{db}')"
    procs = [subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env=orchestrator_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    from mlflow.tracking import MlflowClient  # heavy: only the checks need it

    assert MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # a usable, migrated store


def test_three_sweeps_started_at_once_on_an_empty_store(tmp_path, project_root, stand_in, cli_env):
    assert not (project_root / "mlflow.db").exists()
    specs = [write_spec(tmp_path, f"first_use_{i}", seeds=[i]) for i in range(3)]  # 2 trials each, none shared
    procs = [subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                              cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for spec in specs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert not any("Traceback" in out or "warning" in out for out in outputs), outputs
    from mlflow.tracking import MlflowClient  # as above

    client = MlflowClient(tracking_uri=f"sqlite:///{project_root / 'mlflow.db'}")
    for i in range(3):
        name = f"first_use_{i}"
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
        assert len(parents) == 1, name
        ledger = read_ledger(project_root, name)
        trial_ids = sorted(r.data.tags["trial_id"] for r in runs if "trial_id" in r.data.tags)
        assert trial_ids == sorted(ledger["trials"]) and len(trial_ids) == 2, (name, trial_ids)
