"""The sweep commands `run`, `cancel`, `sync` and `report`: the one module that wires the runner, the
MLflow tracker, the search scheduler and the report together for a loaded spec.

`run_sweep(spec)` holds the sweep's lock for its whole life, so the ledger has one writer; a run
can be stopped at any moment and started again (see orchestrator/runner.py for what resumes how).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from orchestrator.backends import Backend, get_backend
from orchestrator.identity import code_version
from orchestrator.ledger import Ledger
from orchestrator.locks import SweepAlreadyRunning, SweepLock
from orchestrator.plan import planned_trials, sweep_output_dir
from orchestrator.progress import SweepProgress
from orchestrator.report import build_report
from orchestrator.lifecycle import SweepOutcome
from orchestrator.runner import SweepRunner
from orchestrator.search.scheduler import SearchScheduler, cell_trials
from orchestrator.spec import SpecError, SweepSpec, expand, spec_hash
from orchestrator.spec.controls import control_trials
from orchestrator.store import ROOT_ENV, ProjectPaths
from orchestrator.tracking import SweepTracker, SyncSummary

__all__ = ["build_sweep_report", "cancel_sweep", "run_sweep", "sweep_output_dir", "sync_sweep"]

ORCHESTRATOR_LOG = "orchestrator.log"
DETACH_TIMEOUT_S = 120.0  # how long a detached orchestrator may take to hold the sweep's lock


def run_sweep(spec: SweepSpec, *, detach: bool = False, progress: bool = True, overrides: Sequence[str] = (),
              max_parallel: int | None = None, retry_failed: bool = False, root: Path | str | None = None,
              backend: Backend | None = None, poll_interval: float = 1.0, retry_delay_s: float = 1.0,
              report: bool = True, console: Console | None = None) -> SweepOutcome:
    """Run (or resume) every trial of `spec`; returns when all are done/failed or on SIGINT/SIGTERM.

    detach: start the same command in the background (log: <output_dir>/orchestrator.log) and
    return at once; `overrides` are the `--set` items that produced `spec`, passed on to it.
    backend: an already built backend (tests, embedding); default: `get_backend(spec.backend)`.
    """
    paths = ProjectPaths.discover(root)
    console = console or Console()
    output_dir = sweep_output_dir(spec, paths)
    if output_dir == paths.trials_dir or paths.trials_dir in output_dir.parents:
        raise SpecError([f"{spec.source}: output_dir: {output_dir} is inside the shared trial store "
                         f"{paths.trials_dir}; pick another directory"])
    if detach:
        return _detach(spec, paths, output_dir, overrides, max_parallel, retry_failed)

    version = code_version()
    # Expanded before anything is written (it may raise SpecError). A tuned sweep's trials come
    # from its cells' studies as they go (SearchScheduler.start/more), built on these cell trials.
    per_cell = cell_trials(spec, version) if spec.search is not None else None
    trials = expand(spec, code_version=version) if per_cell is None else []
    trials += control_trials(spec, version)  # the report's floors: trials like any other, shared via the store
    digest = spec_hash(spec)
    with SweepLock(output_dir, spec.name):
        ledger = Ledger.for_sweep(output_dir)
        ledger.meta.update({"spec_hash": digest, "code_version": version, "source": str(Path(spec.source).resolve())})
        shown = SweepProgress(spec.name, console, bar=progress)
        tracker = None
        if spec.tracking.enabled:
            tracker = SweepTracker.for_spec(spec, paths, digest, version)
            ledger.meta.update({"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment})
        search = None
        if per_cell is not None:
            search = SearchScheduler(spec, output_dir, version, per_cell, paths.trial, event=shown.event)
        own_backend = backend is None
        if backend is None:
            settings = spec.backend.model_copy(update={"max_parallel": max_parallel}) if max_parallel else spec.backend
            backend = get_backend(settings)
        runner = SweepRunner(sweep=spec.name, trials=trials, ledger=ledger, backend=backend, paths=paths,
                             tracker=tracker, search=search, progress=shown, retries=spec.backend.retries,
                             retry_failed=retry_failed, poll_interval=poll_interval, retry_delay_s=retry_delay_s)
        try:
            with StopOnSignals(runner):
                outcome = runner.run()
                if tracker is not None:
                    _close_tracking(tracker, runner, outcome)
        finally:
            if own_backend:
                backend.close()
        if tracker is not None and not outcome.interrupted and tracker.parent_run_id:
            tracker.guarded("storing the spec in MLflow", lambda: tracker.log_spec(Path(spec.source)),
                            lambda message: shown.event("warning", "MLflow", message))
    if report and not outcome.interrupted:
        outcome.report_path = build_sweep_report(spec, paths, console)
    return outcome


def _close_tracking(tracker: SweepTracker, runner: SweepRunner, outcome: SweepOutcome) -> None:
    """After the loop: what MLflow lacks of the finished trials (a child for a trial reused from
    another sweep, points logged while MLflow was away, metrics a crashed trainer never logged),
    each cell's search, the parent's status. Tried even when MLflow failed earlier: it may be back."""
    tracker.guarded("syncing the sweep to MLflow", lambda: _sync_finished(tracker, runner, outcome),
                    lambda message: runner.progress.event("warning", "MLflow", message), now=True)
    runner.ledger.save()


def _sync_finished(tracker: SweepTracker, runner: SweepRunner, outcome: SweepOutcome) -> None:
    ledger = runner.ledger
    if tracker.parent_run_id is None:  # MLflow was away when the sweep started
        ledger.meta["parent_run_id"] = tracker.start(ledger.meta.get("parent_run_id"))
    done = [t for t in runner.trials if ledger.trials[t.trial_id].state == "done"]
    summary = tracker.sync_trials(done, runner.paths.trial)
    for tid, run_id in summary.run_ids.items():
        ledger.trials[tid].mlflow_run_id = run_id
    if summary.created or summary.completed:
        runner.progress.event("mlflow", "sync", f"{len(summary.created)} child run(s) created, "
                              f"{len(summary.completed)} completed from the trial folders")
    cells = ledger.meta["search"] if runner.search is not None else []  # the runner's last CellSummary each
    for cell in cells:
        tracker.log_cell_search(cell["cell"], cell, cell["finished"])
    tracker.finish("KILLED" if outcome.interrupted else ("FAILED" if outcome.failed else "FINISHED"),
                   outcome.counts)


class StopOnSignals:
    """SIGINT/SIGTERM/SIGHUP: the first stops the sweep cleanly, a second one stops it now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, runner: SweepRunner) -> None:
        self.runner = runner
        self.previous: dict[int, Any] = {}
        self.received = 0

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received += 1
        if self.received == 1:
            self.runner.request_stop()
            return
        self.runner.request_stop(force=True)
        if self.runner.cancelling:
            raise KeyboardInterrupt  # cuts the grace-period wait short; raised elsewhere it could orphan a launch

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _detach(spec: SweepSpec, paths: ProjectPaths, output_dir: Path, overrides: Sequence[str],
            max_parallel: int | None, retry_failed: bool) -> SweepOutcome:
    """`run` again in a new session, logging to <output_dir>/orchestrator.log; returns once it holds the lock."""
    holder = SweepLock.holder(output_dir)
    if holder:
        raise SweepAlreadyRunning(spec.name, holder.get("pid"), holder.get("host"))
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / ORCHESTRATOR_LOG
    argv = [sys.executable, "-m", "orchestrator", "--root", str(paths.root), "run", str(Path(spec.source).resolve()),
            "--no-progress", "--foreground"]
    for item in overrides:
        argv += ["--set", item]
    if max_parallel:
        argv += ["--max-parallel", str(max_parallel)]
    if retry_failed:
        argv.append("--retry-failed")
    env = {**os.environ, ROOT_ENV: str(paths.root)}
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} detached: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    while time.monotonic() < deadline:  # wait until it holds the sweep lock, or died trying
        holder = SweepLock.holder(output_dir)
        if holder and holder.get("pid") == proc.pid:
            break
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the detached orchestrator exited with code {proc.returncode}:\n" + "\n".join(tail))
        time.sleep(0.1)
    return SweepOutcome(sweep=spec.name, output_dir=output_dir, detached_pid=proc.pid, log_path=log_path)


def cancel_sweep(spec: SweepSpec, *, root: Path | str | None = None, timeout_s: float = 120.0) -> str:
    """Stop a sweep: signal its orchestrator, or, when none is alive, stop its orphaned trials."""
    paths = ProjectPaths.discover(root)
    output_dir = sweep_output_dir(spec, paths)
    holder = SweepLock.holder(output_dir)
    if holder and holder.get("pid"):
        pid = int(holder["pid"])
        os.kill(pid, signal.SIGTERM)  # the orchestrator stops its trials and records them as cancelled
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and SweepLock.holder(output_dir):
            time.sleep(0.2)
        if SweepLock.holder(output_dir):
            return f"sent SIGTERM to orchestrator pid {pid}; it is still stopping"
        return f"stopped orchestrator pid {pid}"
    if not Ledger.for_sweep(output_dir).exists:
        return f"sweep {spec.name} has no ledger: nothing to cancel"
    with SweepLock(output_dir, spec.name):
        ledger = Ledger.for_sweep(output_dir)
        running = ledger.in_state("running")
        if not running:
            return f"sweep {spec.name}: nothing running"
        stopped = 0
        with get_backend(spec.backend) as backend:
            for record in running:
                handle = backend.reattach(record.job) if record.job else None
                if handle is not None:
                    backend.cancel_many([handle])
                    stopped += 1
                if paths.trial(record.trial_id).is_done():
                    ledger.mark_finished(record.trial_id, "done")
                else:
                    ledger.mark_finished(record.trial_id, "cancelled", None, "cancelled by `orchestrator cancel`")
        return f"cancelled {stopped} orphaned trial(s) of sweep {spec.name}"


def sync_sweep(spec: SweepSpec, *, root: Path | str | None = None) -> SyncSummary:
    """Write to MLflow every finished trial of `spec` that it lacks, without duplicating runs."""
    paths = ProjectPaths.discover(root)
    version = code_version()
    trials = planned_trials(spec, paths, version)
    ledger = Ledger.for_sweep(sweep_output_dir(spec, paths))
    tracker = SweepTracker.for_spec(spec, paths, spec_hash(spec), version)
    tracker.parent_run_id = tracker.find_parent(ledger.meta.get("parent_run_id"))
    if tracker.parent_run_id is None:
        tracker.start()
        tracker.finish("FINISHED")
    return tracker.sync_trials(trials, paths.trial)


def build_sweep_report(spec: SweepSpec, paths: ProjectPaths, console: Console | None = None, *,
                       output: Path | None = None, strict: bool = False) -> Path | None:
    """The sweep's report (default path: the spec's `report.output`, else reports/<name>.md). After
    a sweep (strict=False) a failing build only prints a warning: the results are safe either way."""
    try:
        return build_report(spec, output=output, root=paths.root)
    except Exception as err:
        if strict:
            raise
        (console or Console()).print(
            f"[yellow]report failed ({type(err).__name__}: {escape(str(err))}); results are safe, "
            f"run `python -m orchestrator report {spec.source}` to retry[/]")
        return None
