"""The ledger survives a kill at any moment; the locks keep one orchestrator per sweep and per trial."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.ledger import LEDGER_FILE, Ledger, LedgerError, TrialRecord
from orchestrator.locks import SweepAlreadyRunning, SweepLock, TrialClaim
from orchestrator.store import ProjectPaths

from conftest import PYTHON, REPO, wait_for


def test_records_round_trip_and_history(tmp_path):
    ledger = Ledger.for_sweep(tmp_path)
    ledger.add(TrialRecord("a", label="x=1 seed=0", cell={"x": "1"}))
    ledger.add(TrialRecord("b", label="x=2 seed=0", cell={"x": "2"}))
    ledger.mark_running("a", {"job_id": "123", "backend": "local"}, tmp_path / "a", tmp_path / "a" / "trainer.log")
    ledger.mark_finished("a", "failed", "oom", "CUDA out of memory", counts_as_failure=True)
    ledger.mark_running("a", {"job_id": "124", "backend": "local"}, tmp_path / "a", tmp_path / "a" / "trainer.log")
    ledger.mark_finished("a", "done")

    again = Ledger.for_sweep(tmp_path)
    a = again.get("a")
    assert (a.state, a.attempts, a.failures, a.job) == ("done", 2, 1, None)
    assert [h["state"] for h in a.history] == ["failed", "done"]
    assert a.history[0]["failure_class"] == "oom" and a.history[0]["job_id"] == "123"
    assert again.counts()["done"] == 1 and again.counts()["planned"] == 1
    assert again.get("b").cell == {"x": "2"}


WRITER = textwrap.dedent("""
    import sys
    from orchestrator.ledger import Ledger, TrialRecord
    ledger = Ledger.for_sweep(sys.argv[1])
    i = 0
    while True:  # every snapshot is self-consistent: meta.n == number of trials, each with a 20 kB payload
        i += 1
        ledger.trials[f"t{i}"] = TrialRecord(f"t{i}", label="x" * 20000)
        ledger.meta["n"] = len(ledger.trials)
        ledger.save()
        if i == 3:
            print("saving", flush=True)
""")


def test_kill_during_writes_never_leaves_a_torn_ledger(tmp_path):
    rng = random.Random(0)
    for round_ in range(6):
        folder = tmp_path / f"round{round_}"
        proc = subprocess.Popen([PYTHON, "-c", WRITER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(rng.uniform(0.0, 0.3))  # land the SIGKILL anywhere inside the write/fsync/rename cycle
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ledger = Ledger.for_sweep(folder)
        assert ledger.meta["n"] == len(ledger.trials) >= 3
        assert all(len(r.label) == 20000 for r in ledger)


def test_leftover_temp_file_is_ignored_and_a_corrupt_ledger_is_reported(tmp_path):
    ledger = Ledger.for_sweep(tmp_path)
    ledger.add(TrialRecord("a"))
    (tmp_path / f".{LEDGER_FILE}.999.tmp").write_text('{"trials": {"half')  # a writer killed mid-write
    assert list(Ledger.for_sweep(tmp_path).trials) == ["a"]

    (tmp_path / LEDGER_FILE).write_text('{"trials": {"a": ')  # never produced by save(); a hand edit can
    with pytest.raises(LedgerError, match="not valid JSON"):
        Ledger.for_sweep(tmp_path)


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from orchestrator.locks import SweepLock
    SweepLock(sys.argv[1], "demo").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_orchestrator_on_a_sweep_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([PYTHON, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepAlreadyRunning, match=rf"sweep demo is already running \(pid {holder.pid}\)"):
            SweepLock(tmp_path, "demo").acquire()
        assert SweepLock.holder(tmp_path)["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        holder.wait()
    assert SweepLock.holder(tmp_path) is None
    with SweepLock(tmp_path, "demo"):
        assert SweepLock.holder(tmp_path)["pid"] == os.getpid()
    assert SweepLock.holder(tmp_path) is None


def test_trial_claim_is_exclusive_and_outlives_the_orchestrator_in_its_trainer(tmp_path):
    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    claim = TrialClaim.try_acquire(run_dir, "sweep_a")
    assert claim is not None
    assert TrialClaim.try_acquire(run_dir, "sweep_b") is None
    assert TrialClaim.holder(run_dir)["sweep"] == "sweep_a"

    # The trainer inherits the claim's descriptor: closing ours keeps the trial claimed.
    trainer = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"], pass_fds=[claim.fd])
    try:
        claim.release()
        assert TrialClaim.try_acquire(run_dir, "sweep_b") is None
    finally:
        trainer.kill()
        trainer.wait()
    again = wait_for(lambda: TrialClaim.try_acquire(run_dir, "sweep_b"), timeout=5, what="claim freed")
    again.release()


def test_project_paths_resolve_relative_to_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLS_ABLATION_ROOT", str(tmp_path))
    paths = ProjectPaths.discover()
    assert paths.root == tmp_path.resolve()
    assert paths.trial_dir("abc") == tmp_path.resolve() / "runs" / "trials" / "abc"
    assert paths.resolve("runs/sweep") == tmp_path.resolve() / "runs" / "sweep"
    assert paths.resolve("/abs/x") == Path("/abs/x")
    assert paths.default_tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("CLS_ABLATION_ROOT")
    assert ProjectPaths.discover().root == REPO


def test_ledger_file_is_plain_json(tmp_path):
    ledger = Ledger.for_sweep(tmp_path)
    ledger.add(TrialRecord("a", label="l"))
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert data["version"] == 1 and data["trials"]["a"]["state"] == "planned"
