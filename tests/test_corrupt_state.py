"""Corrupt state files through the real CLI (`python -m orchestrator ...` in a subprocess): a broken
ledger, MLflow store or search journal ends in one line on stderr naming the file and the safe fix,
exit 4, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import MICRO_BASE, PYTHON, REPO, write_spec
from orchestrator.cli import EXIT_STATE
from orchestrator.ledger import LEDGER_FILE, Ledger, LedgerError, TrialRecord

LEDGER_SHAPES = {
    "truncated": b'{"version": 1, "meta": {}, "trials": {"a": {"trial_id": "a", "sta',
    "binary": bytes(range(128, 256)) * 4,
    "a list": b"[1, 2, 3]",
    "trials as a list": b'{"version": 1, "trials": [{"trial_id": "a"}]}',
    "record not a mapping": b'{"version": 1, "trials": {"a": "done"}}',
    "wrong field type": b'{"version": 1, "trials": {"a": {"trial_id": "a", "attempts": "many"}}}',
    "unknown state": b'{"version": 1, "trials": {"a": {"trial_id": "a", "state": "finished"}}}',
    "bool for a time": b'{"version": 1, "trials": {"a": {"trial_id": "a", "started_at": true}}}',
    "version not a number": b'{"version": "one", "trials": {}}',
}
REBUILD = "delete it (or move it aside); the next run rebuilds it from the trial store"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def assert_one_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == EXIT_STATE, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sweep(tmp_path: Path, project_root: Path, stand_in) -> tuple[Path, Path]:
    """A two-trial sweep (stand-in trainer, no MLflow) and its ledger's path."""
    spec = write_spec(tmp_path, "corrupt", tracking={"enabled": False}, output_dir="runs/corrupt")
    ledger = project_root / "runs" / "corrupt" / LEDGER_FILE
    ledger.parent.mkdir(parents=True)
    return spec, ledger


@pytest.mark.parametrize("shape", list(LEDGER_SHAPES))
def test_each_corrupt_ledger_shape_is_one_line_in_status_and_run(shape, sweep, cli_env):
    spec, ledger = sweep
    ledger.write_bytes(LEDGER_SHAPES[shape])
    for command in ("status", "run"):
        assert_one_line(cli(cli_env, command, str(spec)), f"ledger {ledger}:",
                        "rebuilds it from the trial store" if shape != "version not a number" else "version")
    assert ledger.read_bytes() == LEDGER_SHAPES[shape]  # nothing overwrote the evidence


@pytest.mark.parametrize("command", ["plan", "cancel", "sync"])
def test_every_command_names_a_garbage_ledger_and_the_fix(command, sweep, cli_env):
    spec, ledger = sweep
    ledger.write_bytes(LEDGER_SHAPES["binary"])
    assert_one_line(cli(cli_env, command, str(spec)), str(ledger), REBUILD)


def test_report_goes_on_without_a_garbage_ledger_and_says_so(sweep, cli_env):
    spec, ledger = sweep
    ledger.write_bytes(LEDGER_SHAPES["a list"])
    done = cli(cli_env, "report", str(spec))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert str(ledger) in done.stdout + done.stderr


def test_the_fix_works_a_deleted_ledger_is_rebuilt_from_the_trial_store(sweep, cli_env, stand_in):
    spec, ledger = sweep
    assert cli(cli_env, "run", str(spec), "--no-report").returncode == 0
    ledger.write_bytes(LEDGER_SHAPES["truncated"])
    assert cli(cli_env, "run", str(spec), "--no-report").returncode == EXIT_STATE
    ledger.unlink()  # what the message says to do
    assert cli(cli_env, "run", str(spec), "--no-report").returncode == 0
    assert len(stand_in.events("start")) == 2  # nothing trained twice: the store had both results
    assert {r.state for r in Ledger.load(ledger)} == {"done"}


def test_ledger_load_names_the_file_and_field(tmp_path):
    path = tmp_path / LEDGER_FILE
    Ledger(path, {"a": TrialRecord("a", started_at=1.0, ended_at=2.5)}).save()
    assert Ledger.load(path).trials["a"].started_at == 1.0  # our own writes pass
    path.write_bytes(LEDGER_SHAPES["wrong field type"])
    with pytest.raises(LedgerError, match=r"trials\.a\.attempts: expected an integer, got 'many'") as err:
        Ledger.load(path)
    assert err.value.path == path and "\n" not in str(err.value)


def test_garbage_and_truncated_mlflow_store_are_one_line(tmp_path, project_root, stand_in, cli_env, mlflow_db):
    spec = write_spec(tmp_path, "tracked", tracking=None)
    size = mlflow_db.stat().st_size
    with open(mlflow_db, "r+b") as db:  # a truncated copy: the header survives, the pages do not
        db.truncate(size // 3)
    assert_one_line(cli(cli_env, "sync", str(spec)), f"MLflow store {mlflow_db}", "move it aside")

    mlflow_db.write_bytes(os.urandom(4096))
    assert_one_line(cli(cli_env, "sync", str(spec)), f"MLflow store {mlflow_db}", "file is not a database",
                    "move it aside")
    run = cli(cli_env, "run", str(spec), "--no-report", "--no-progress")
    assert "Traceback" not in run.stderr + run.stdout  # degraded tracking, or the one line
    assert run.returncode in (0, EXIT_STATE), run.stdout[-2000:] + run.stderr[-2000:]


SEARCH = {"metric": "val/linear_top1_cls", "sampler": "random", "pruner": "none", "trials_per_cell": 2,
          "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}


@pytest.mark.parametrize("garbage", [os.urandom(2048), b'{"op_code": 0, "worker_id": "w", "study_name": 5}\n'])
def test_a_garbage_search_journal_is_one_line(garbage, tmp_path, project_root, stand_in, cli_env):
    base = {**MICRO_BASE, "data": {**MICRO_BASE["data"], "val_fraction": 0.25},
            "evaluation": {**MICRO_BASE["evaluation"], "every_steps": 10}}
    spec = write_spec(tmp_path, "tuned", base=base, search=SEARCH, tracking={"enabled": False},
                      output_dir="runs/tuned")
    journal = project_root / "runs" / "tuned" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(garbage)
    for command in ("plan", "status", "run"):
        assert_one_line(cli(cli_env, command, str(spec)), f"search journal {journal}", "move it aside")
    assert stand_in.events("start") == []
