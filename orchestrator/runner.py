"""The sweep loop: plan -> (re)attach -> submit -> poll -> ledger -> retries -> MLflow sync -> report.

`run_sweep(spec)` is what `python -m orchestrator run` calls. It holds the sweep's lock for its
whole life, so the ledger has one writer. It can be killed at any moment (even SIGKILL) and run
again: trials still running are re-attached, dead ones restarted (the trainer resumes from its
checkpoint and continues its MLflow run), finished ones are never trained again.

What happens to each trial of the plan when a run starts:
    result.json done in the shared store  -> done (reused if another sweep trained it)
    running in the ledger, process alive  -> watched again (re-attached)
    running in the ledger, process gone   -> its result.json decides; none -> launched again
    failed, transient class, budget left  -> launched again (budget: backend.retries)
    failed otherwise                      -> left failed (`run --retry-failed` tries again)
    planned / cancelled                   -> launched
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from orchestrator.backends import Backend, JobHandle, JobState, get_backend, is_transient, read_result
from orchestrator.backends.base import CONFIG_FILE, JobStatus
from orchestrator.ledger import Ledger, ProjectPaths, SweepAlreadyRunning, SweepLock, TrialClaim, TrialRecord

if TYPE_CHECKING:
    from orchestrator.search.scheduler import SearchScheduler
    from orchestrator.spec import SweepSpec, TrialPlan
    from orchestrator.tracking import SweepTracker

ORCHESTRATOR_LOG = "orchestrator.log"
MIN_POLL_S = 0.05


@dataclass
class SweepOutcome:
    sweep: str
    output_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # trial ids that ended failed for good
    interrupted: bool = False
    parent_run_id: str | None = None
    report_path: Path | None = None
    detached_pid: int | None = None  # run --detach: the background orchestrator
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        # `failed` leaves out a search's failed explorations (recorded by its study); pruned is a
        # search's decision. Anything still planned, running or cancelled is unfinished work.
        unfinished = sum(self.counts.get(state, 0) for state in ("planned", "running", "cancelled"))
        return not self.interrupted and not self.failed and unfinished == 0 and self.counts.get("done", 0) > 0


@dataclass
class _Queued:
    trial: TrialPlan
    not_before: float = 0.0  # retries wait a little: a busy device or node gets a moment


class SweepRunner:
    """Drives one sweep's trials through a backend until each is done, failed for good, or stopped."""

    def __init__(self, *, sweep: str, trials: Sequence[TrialPlan], ledger: Ledger, backend: Backend,
                 paths: ProjectPaths, tracker: SweepTracker | None = None, retries: int = 0,
                 retry_failed: bool = False, poll_interval: float = 1.0, retry_delay_s: float = 1.0,
                 console: Console | None = None, progress: bool = False, supports_run_id: bool = True,
                 search: SearchScheduler | None = None) -> None:
        self.sweep = sweep
        self.trials = list({t.trial_id: t for t in reversed(trials)}.values())[::-1]  # first of each id wins
        self.by_id = {t.trial_id: t for t in self.trials}
        self.ledger = ledger
        self.backend = backend
        self.paths = paths
        self.tracker = tracker
        self.retries = retries
        self.retry_failed = retry_failed
        self.poll_interval = poll_interval
        self.retry_delay_s = retry_delay_s
        self.console = console or Console()
        self.show_progress = progress
        self.supports_run_id = supports_run_id
        self.search = search  # tuned sweeps: trials come from each cell's Optuna study as it goes
        self._queue: deque[_Queued] = deque()
        self._waiting: dict[str, TrialPlan] = {}  # claimed by another orchestrator (another sweep)
        self._in_flight: dict[str, JobHandle] = {}
        self._claims: dict[str, TrialClaim] = {}
        self._stop = threading.Event()
        self._force_stop = False
        self.cancelling = False  # inside the SIGTERM -> grace -> SIGKILL of running trials
        self._progress: Progress | None = None
        self._task: Any = None

    # -- public -----------------------------------------------------------------------------------
    def request_stop(self, force: bool = False) -> None:
        """Stop launching; cancel running trials (SIGTERM, grace, SIGKILL; force: SIGKILL now)."""
        self._force_stop = self._force_stop or force
        self._stop.set()

    def run(self) -> SweepOutcome:
        if self.search is not None:
            self._adopt_plans(self.search.start())
        self._register_plan()
        if self.tracker is not None:
            parent = self.tracker.start(self.ledger.meta.get("parent_run_id"))
            self.ledger.meta["parent_run_id"] = parent
            self.ledger.save()
        connect = getattr(self.backend, "connect", None)
        if connect is not None:  # fail once, clearly, when a cluster is unreachable
            connect()
        self._recover_running()
        self._enqueue_plan()
        interrupted = False
        try:
            with self._progress_display():
                interrupted = self._loop()
        finally:
            if self._in_flight:  # stopped by a signal, or an exception escaped the loop
                interrupted = True
                self._cancel_in_flight()
        return self._finish(interrupted)

    # -- plan and recovery ------------------------------------------------------------------------
    def _register_plan(self) -> None:
        wanted = set(self.by_id)
        for record in self.ledger:
            record.in_plan = record.trial_id in wanted
        for trial in self.trials:
            self._record(trial)
        self.ledger.meta.update({"sweep": self.sweep, "orchestrator_pid": os.getpid(), "started_at": time.time(),
                                 "backend": self.backend.name, "store": str(self.paths.trials_dir)})
        self.ledger.save()

    def _record(self, trial: TrialPlan) -> None:
        record = self.ledger.get(trial.trial_id)
        if record is None:
            self.ledger.trials[trial.trial_id] = TrialRecord(
                trial.trial_id, label=trial.label, cell=dict(trial.cell), seed=trial.seed,
                run_dir=str(self.paths.trial_dir(trial.trial_id)))
        else:
            record.label, record.cell, record.seed = trial.label, dict(trial.cell), trial.seed
            record.in_plan = True

    def _adopt_plans(self, trials: Sequence[TrialPlan]) -> list[TrialPlan]:
        """Trials that join the plan while it runs (a search's); returns those not in it before."""
        new = [t for t in dict.fromkeys(trials) if t.trial_id not in self.by_id]
        for trial in new:
            self.trials.append(trial)
            self.by_id[trial.trial_id] = trial
        return new

    def _add_trials(self, trials: Sequence[TrialPlan]) -> None:
        """A search's new trials: recorded and queued, or settled at once when already decided."""
        if not trials:
            return
        busy = set(self._in_flight) | set(self._waiting) | {q.trial.trial_id for q in self._queue}
        self._adopt_plans(trials)
        for trial in dict.fromkeys(trials):
            self._record(trial)
            if trial.trial_id not in busy:
                self._enqueue(trial)
        self.ledger.save()
        if self._progress is not None:
            self._progress.update(self._task, total=len(self.trials))

    def _settle(self, tid: str, state: str) -> None:
        """Tell the search (if any) how a trial ended: done, failed for good, or pruned."""
        if self.search is not None:
            self.search.settled(tid, state, read_result(self._run_dir(tid)))

    def _recover_running(self) -> None:
        """Trials the ledger says are running: an earlier orchestrator launched them and died."""
        for record in self.ledger.in_state("running"):
            handle = None
            if record.job and record.job.get("backend") == self.backend.name:
                handle = self.backend.reattach(record.job)
            if handle is not None and record.in_plan:
                self._in_flight[record.trial_id] = handle
                # Jobs on other machines (Ray) cannot inherit the claim lock: hold it here again.
                claim = TrialClaim.try_acquire(self._run_dir(record.trial_id), self.sweep)
                if claim is not None:
                    self._claims[record.trial_id] = claim
                self.ledger.update(record.trial_id, note=f"reattached by orchestrator pid {os.getpid()}")
                self._event("reattached", record.label, f"job {handle.job_id}")
                continue
            if handle is not None:  # alive but no longer asked for
                self.backend.cancel_many([handle])
            self._settle_orphan(record)

    def _settle_orphan(self, record: TrialRecord) -> None:
        """A running trial whose process is gone: its result.json says how it ended, if it got that far."""
        result = read_result(self._run_dir(record.trial_id))
        if result and result.get("status") == "done":
            self.ledger.mark_finished(record.trial_id, "done")
        elif result and result.get("status") == "failed":
            self._record_failure(record.trial_id, str(result.get("failure_class") or "error"), result.get("error"))
        else:  # killed with the orchestrator: not the trial's fault, no retry budget spent
            self.ledger.mark_finished(record.trial_id, "planned", "lost", "process gone after an orchestrator restart")

    def _enqueue_plan(self) -> None:
        for trial in self.trials:
            self._enqueue(trial)

    def _enqueue(self, trial: TrialPlan) -> None:
        tid = trial.trial_id
        if tid in self._in_flight:
            return
        record = self.ledger.trials[tid]
        if self._adopt_finished_result(trial):
            return
        if record.state == "pruned":  # a search stopped it; asking again gets the same answer
            self._settle(tid, "pruned")
            return
        if record.state == "failed":
            if self.retry_failed:
                self.ledger.update(tid, failures=0, note="retrying (--retry-failed)")
            elif not self._may_retry(record):
                self._settle(tid, "failed")
                return
        if record.state == "done":  # its result vanished from the store: train it again
            self.ledger.update(tid, state="planned", note="result.json missing; running again")
        self._queue.append(_Queued(trial))

    def _may_retry(self, record: TrialRecord) -> bool:
        return is_transient(record.failure_class) and record.failures <= self.retries

    def _adopt_finished_result(self, trial: TrialPlan) -> bool:
        """A result.json done in the shared store (this sweep's or another's): never train again."""
        result = read_result(self._run_dir(trial.trial_id))
        if not (result and result.get("status") == "done"):
            return False
        record = self.ledger.trials[trial.trial_id]
        if record.state != "done":
            self.ledger.update(trial.trial_id, state="done", failure_class=None, error=None, job=None, note=None,
                               reused=record.state != "running", run_dir=str(self._run_dir(trial.trial_id)),
                               log_path=str(self._run_dir(trial.trial_id) / "trainer.log"))
            self._event("reused", trial.label, "result.json done in the shared store")
        self._settle(trial.trial_id, "done")
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> bool:
        """Returns True when stopped by request before the work ran out."""
        # Poll fast right after something happened (short trials, a freed slot), then back off to
        # `poll_interval`: quick turnaround without busy-polling hour-long trials.
        wait = MIN_POLL_S
        while True:
            if self._stop.is_set():
                return True
            self._retry_waiting()
            if self.search is not None:
                self._add_trials(self.search.more(max(0, self.backend.free_slots - len(self._queue))))
            launched = self._launch_ready()
            finished = 0
            if self._in_flight:
                states = self.backend.poll(list(self._in_flight.values()))
                for tid, state in states.items():
                    if state.finished and tid in self._in_flight:
                        self._on_finished(tid, state)
                        finished += 1
                if self.search is not None:
                    for tid in self.search.to_prune(list(self._in_flight)):
                        self._prune(tid)
                        finished += 1
            self._update_progress()
            if not (self._in_flight or self._queue or self._waiting):
                if self.search is None or self.search.finished:
                    return False
                if not finished and not launched:  # nothing running and the search asks for nothing
                    self._add_trials(self.search.more(self.backend.free_slots))
                    if not self._queue:
                        self._event("warning", "search", "no cell asks for more trials; stopping")
                        return False
            if finished and self._queue:
                continue  # a slot just freed up: fill it now
            wait = MIN_POLL_S if (launched or finished) else min(wait * 2, self.poll_interval)
            self._stop.wait(min(wait, self.poll_interval))

    def _launch_ready(self) -> int:
        now = time.time()
        batch: list[tuple[TrialPlan, Path, TrialClaim, str | None]] = []
        for _ in range(len(self._queue)):
            if self.backend.free_slots - len(batch) <= 0 or self._stop.is_set():
                break
            item = self._queue.popleft()
            if item.not_before > now:
                self._queue.append(item)
                continue
            prepared = self._prepare_launch(item.trial)
            if prepared is not None:
                batch.append(prepared)
        if not batch:
            return 0
        submit_many = getattr(self.backend, "submit_many", None)
        if submit_many is not None and len(batch) > 1:  # one job array instead of N jobs
            try:
                handles = submit_many([(trial, run_dir) for trial, run_dir, _, _ in batch])
            except Exception as err:
                for trial, _, claim, _ in batch:
                    self._submit_failed(trial, claim, err)
                return 0
            for (trial, run_dir, claim, child_run_id), handle in zip(batch, handles):
                self._started(trial, run_dir, claim, child_run_id, handle)
            return len(batch)
        launched = 0
        for trial, run_dir, claim, child_run_id in batch:
            try:
                handle = self.backend.submit(trial, run_dir, keep_fds=[claim.fd])
            except Exception as err:
                self._submit_failed(trial, claim, err)
                continue
            self._started(trial, run_dir, claim, child_run_id, handle)
            launched += 1
        return launched

    def _retry_waiting(self) -> None:
        for tid, trial in list(self._waiting.items()):
            if TrialClaim.holder(self._run_dir(tid)) is None:
                del self._waiting[tid]
                if not self._adopt_finished_result(trial):
                    self._queue.appendleft(_Queued(trial))

    def _prepare_launch(self, trial: TrialPlan) -> tuple[TrialPlan, Path, TrialClaim, str | None] | None:
        """Claim the trial's run dir and write its config; None when it must not be launched now."""
        tid = trial.trial_id
        run_dir = self._run_dir(tid)
        run_dir.mkdir(parents=True, exist_ok=True)
        claim = TrialClaim.try_acquire(run_dir, self.sweep)
        if claim is None:  # another orchestrator runs this very trial now (a sweep sharing it)
            holder = TrialClaim.holder(run_dir) or {}
            note = f"running elsewhere (sweep {holder.get('sweep', '?')}, pid {holder.get('pid', '?')}); waiting"
            self.ledger.update(tid, note=note)
            self._waiting[tid] = trial
            self._event("waiting", trial.label, note)
            return None
        if self._adopt_finished_result(trial):  # finished while we waited for the claim
            claim.release()
            return None
        self._archive_stale_result(run_dir, self.ledger.trials[tid].attempts)
        child_run_id = None
        if self.tracker is not None:
            self.tracker.parent_for(trial)  # a tuned sweep's trial lives under its cell's run
            child = self.tracker.find_child(tid)
            child_run_id = child.info.run_id if child is not None else None
        self._write_config(trial, run_dir, child_run_id)
        return trial, run_dir, claim, child_run_id

    def _submit_failed(self, trial: TrialPlan, claim: TrialClaim, err: Exception) -> None:
        tid = trial.trial_id
        claim.release()
        self.ledger.update(tid, state="failed", failure_class="error", error=f"submit failed: {err}",
                           failures=self.ledger.trials[tid].failures + 1, ended_at=time.time())
        self._event("failed", trial.label, f"submit failed: {err}")

    def _started(self, trial: TrialPlan, run_dir: Path, claim: TrialClaim, child_run_id: str | None,
                 handle: JobHandle) -> None:
        tid = trial.trial_id
        self._claims[tid] = claim
        self._in_flight[tid] = handle
        self.ledger.mark_running(tid, handle.to_dict(), run_dir, handle.log_path, child_run_id)
        attempt = self.ledger.trials[tid].attempts
        self._event("started", trial.label, f"{tid} attempt {attempt} job {handle.job_id}")

    def _write_config(self, trial: TrialPlan, run_dir: Path, child_run_id: str | None) -> None:
        config = copy.deepcopy(dict(trial.config))
        if self.tracker is not None:
            config["tracking"] = self.tracker.trial_tracking_section(trial, child_run_id, self.supports_run_id)
        else:
            config["tracking"] = {**(config.get("tracking") or {}), "enabled": False}
        tmp = run_dir / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        tmp.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        os.replace(tmp, run_dir / CONFIG_FILE)

    @staticmethod
    def _archive_stale_result(run_dir: Path, attempt: int) -> None:
        """A failed attempt's result.json would be read as the next attempt's verdict: move it aside."""
        result = run_dir / "result.json"
        if result.exists():
            os.replace(result, run_dir / f"result.attempt{attempt}.json")

    def _on_finished(self, tid: str, state: JobState) -> None:
        self._in_flight.pop(tid)
        trial = self.by_id[tid]
        if state.status == JobStatus.DONE:
            self.ledger.mark_finished(tid, "done")
            record = self.ledger.trials[tid]
            self._event("done", trial.label, f"{record.wall_time_s or 0:.1f} s")
            self._settle(tid, "done")
        else:
            self._record_failure(tid, state.failure_class or "error", state.error)
            record = self.ledger.trials[tid]
            if record.state == "planned":
                self._queue.append(_Queued(trial, time.time() + self.retry_delay_s * record.failures))
                self._event("retry", trial.label, f"{state.failure_class}: {state.error} "
                            f"(retry {record.failures}/{self.retries})")
            else:
                self._event("failed", trial.label, f"{state.failure_class}: {state.error}")
                self._close_child(tid, "FAILED")
                self._settle(tid, "failed")
        claim = self._claims.pop(tid, None)
        if claim is not None:
            claim.release()

    def _prune(self, tid: str) -> None:
        """Stop a search trial its pruner gave up on. The trainer checkpoints on SIGTERM, so the run
        dir keeps its progress; the ledger says `pruned`, and the trial is not run again."""
        handle = self._in_flight.pop(tid)
        self.backend.cancel_many([handle])
        result = read_result(handle.run_dir)
        if result and result.get("status") == "done":  # finished before the signal landed
            self.ledger.mark_finished(tid, "done")
            self._settle(tid, "done")
        else:
            self.ledger.mark_finished(tid, "pruned")
            self.ledger.update(tid, note="stopped early by the search's pruner")
            self._close_child(tid, "KILLED")
            self._settle(tid, "pruned")
        claim = self._claims.pop(tid, None)
        if claim is not None:
            claim.release()

    def _record_failure(self, tid: str, failure_class: str, error: str | None) -> None:
        record = self.ledger.mark_finished(tid, "failed", failure_class, error, counts_as_failure=True)
        if self._may_retry(record) and record.in_plan:
            self.ledger.update(tid, state="planned", note=f"will retry after {failure_class}")

    # -- stopping ---------------------------------------------------------------------------------
    def _cancel_in_flight(self) -> None:
        handles = list(self._in_flight.values())
        self.cancelling = True
        self._event("stopping", f"{len(handles)} running trial(s)", "SIGTERM, then SIGKILL after the grace period")
        try:
            self.backend.cancel_many(handles, **({"grace_s": 0.0} if self._force_stop else {}))
        except KeyboardInterrupt:  # a second Ctrl-C during the grace period: no more waiting
            self.backend.cancel_many(handles, grace_s=0.0)
        for handle in handles:
            tid = handle.trial_id
            self._in_flight.pop(tid, None)
            result = read_result(handle.run_dir)
            if result and result.get("status") == "done":
                self.ledger.mark_finished(tid, "done")
            else:  # resumable: the next `run` continues it from its checkpoint
                self.ledger.mark_finished(tid, "cancelled", None, "stopped by the orchestrator")
                self._close_child(tid, "KILLED")
            claim = self._claims.pop(tid, None)
            if claim is not None:
                claim.release()

    def _close_child(self, tid: str, status: str) -> None:
        if self.tracker is None:
            return
        try:
            self.tracker.mark_child(tid, status)
        except Exception as err:  # tracking must never break the sweep
            self._event("warning", tid, f"MLflow: {err}")

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, interrupted: bool) -> SweepOutcome:
        counts = dict(self.ledger.counts())
        failed = [r.trial_id for r in self.ledger if r.in_plan and r.state == "failed"
                  and not (self.search is not None and self.search.is_exploration(r.trial_id))]
        summaries = self.search.summaries() if self.search is not None else {}
        if summaries:
            self.ledger.meta["search"] = [dataclasses.asdict(s) for s in summaries.values()]
        if self.tracker is not None:
            try:
                done = [t for t in self.trials if self.ledger.trials[t.trial_id].state == "done"]
                summary = self.tracker.sync_trials(done, self._run_dir)
                for tid, run_id in summary.run_ids.items():
                    self.ledger.trials[tid].mlflow_run_id = run_id
                if summary.created or summary.completed:
                    self._event("mlflow", "sync", f"{len(summary.created)} child run(s) created, "
                                f"{len(summary.completed)} completed from result.json")
                for summary in summaries.values():
                    self.tracker.log_cell_search(summary.cell, dataclasses.asdict(summary), summary.finished)
                status = "KILLED" if interrupted else ("FAILED" if failed else "FINISHED")
                self.tracker.finish(status, counts)
            except Exception as err:
                self._event("warning", "MLflow", f"could not finish tracking: {err}")
        self.ledger.meta["finished_at"] = time.time()
        self.ledger.save()
        return SweepOutcome(sweep=self.sweep, output_dir=self.ledger.path.parent, counts=counts, failed=failed,
                            interrupted=interrupted, parent_run_id=self.ledger.meta.get("parent_run_id"))

    # -- display ----------------------------------------------------------------------------------
    def _progress_display(self):
        if not self.show_progress:
            return _nullcontext()
        self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=self.console, transient=False)
        self._task = self._progress.add_task(self.sweep, total=len(self.trials), detail="")
        return self._progress

    def _update_progress(self) -> None:
        if self._progress is None:
            return
        records = [self.ledger.trials[t.trial_id] for t in self.trials]
        finished = sum(r.state in ("done", "failed") for r in records)
        failed = sum(r.state == "failed" for r in records)
        detail = f"running {len(self._in_flight)} · queued {len(self._queue)}"
        if self._waiting:
            detail += f" · waiting {len(self._waiting)}"
        if failed:
            detail += f" · [red]failed {failed}[/red]"
        self._progress.update(self._task, completed=finished, detail=detail)

    def _event(self, kind: str, what: str, detail: str = "") -> None:
        style = {"done": "green", "failed": "red", "retry": "yellow", "warning": "yellow", "stopping": "yellow"}
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"{stamp} [{style.get(kind, 'cyan')}]{kind:>10}[/] {escape(what)}  [dim]{escape(detail)}[/]",
                           highlight=False)

    def _run_dir(self, trial_id: str) -> Path:
        return self.paths.trial_dir(trial_id)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _plain(value: Any) -> Any:
    """YAML-safe copy: paths and tuples become strings and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def sweep_output_dir(spec: SweepSpec, paths: ProjectPaths) -> Path:
    return paths.resolve(spec.output_dir)


def planned_trials(spec: SweepSpec, paths: ProjectPaths, version: str) -> list[TrialPlan]:
    """What the sweep asks for: `expand(spec)`; for a tuned sweep, the runs its searches made so
    far plus each cell's final trials (at its chosen settings once its search is over)."""
    from orchestrator.spec import expand

    if spec.search is None:
        return expand(spec, code_version=version)
    from orchestrator.search import tuned_plan

    tuned = tuned_plan(spec, sweep_output_dir(spec, paths), version)
    return list({t.trial_id: t for t in [*tuned.search, *tuned.final]}.values())


def report_output(spec: SweepSpec, paths: ProjectPaths) -> Path:
    """`report.output` from the spec when it has one, else reports/<sweep name>.md."""
    if spec.report.output:
        return paths.resolve(spec.report.output)
    return paths.reports_dir / f"{spec.name}.md"


def build_sweep_report(spec: SweepSpec, paths: ProjectPaths, console: Console | None = None, *,
                       output: Path | None = None, strict: bool = False) -> Path | None:
    """The report builder (orchestrator/report), when installed. After a sweep (strict=False) a
    missing or failing builder only prints a warning: the results are safe either way."""
    console = console or Console()
    try:
        from orchestrator.report import build_report
    except ImportError as err:  # no report package (yet), or one without build_report
        if strict:
            raise
        console.print(f"[yellow]report skipped: {escape(str(err))}[/]")
        return None
    kwargs: dict[str, Any] = {"output": output or report_output(spec, paths)}
    if "root" in inspect.signature(build_report).parameters:
        kwargs["root"] = paths.root
    try:
        return Path(build_report(spec, **kwargs))
    except Exception as err:
        if strict:
            raise
        console.print(f"[yellow]report failed ({type(err).__name__}: {escape(str(err))}); results are safe, "
                      f"run `python -m orchestrator report {getattr(spec, 'source', 'SPEC')}` to retry[/]")
        return None


def run_sweep(spec: SweepSpec, *, detach: bool = False, progress: bool = True, overrides: Sequence[str] = (),
              max_parallel: int | None = None, retry_failed: bool = False, root: Path | str | None = None,
              backend: Backend | None = None, poll_interval: float = 1.0, retry_delay_s: float = 1.0,
              report: bool = True, console: Console | None = None) -> SweepOutcome:
    """Run (or resume) every trial of `spec`; returns when all are done/failed or on SIGINT/SIGTERM.

    detach: start the same command in the background (log: <output_dir>/orchestrator.log) and
    return at once; `overrides` are the `--set` items that produced `spec`, passed on to it.
    backend: an already built backend (tests, embedding); default: `get_backend(spec.backend)`.
    """
    from orchestrator.identity import code_version
    from orchestrator.spec import expand, spec_hash

    from orchestrator.spec import SpecError

    paths = ProjectPaths.discover(root)
    console = console or Console()
    output_dir = sweep_output_dir(spec, paths)
    if output_dir == paths.trials_dir or paths.trials_dir in output_dir.parents:
        raise SpecError([f"{spec.source}: output_dir: {output_dir} is inside the shared trial store "
                         f"{paths.trials_dir}; pick another directory"])
    if detach:
        return _detach(spec, paths, output_dir, overrides, max_parallel, retry_failed)

    version = code_version()
    trials = expand(spec, code_version=version)  # may raise SpecError: before anything is written
    the_hash = spec_hash(spec)
    if spec.search is not None:
        trials = []  # a tuned sweep's trials come from its cells' studies (SearchScheduler.start/more)
    with SweepLock(output_dir, spec.name):
        ledger = Ledger.for_sweep(output_dir)
        ledger.meta.update({"spec_hash": the_hash, "code_version": version,
                            "source": str(Path(spec.source).resolve())})
        own_backend = backend is None
        if backend is None:
            backend = get_backend(spec.backend, **({"max_parallel": max_parallel} if max_parallel else {}))
        tracker = None
        if getattr(getattr(spec, "tracking", None), "enabled", True):
            from orchestrator.tracking import SweepTracker, trainer_supports_run_id

            tracker = SweepTracker.for_spec(spec, paths, the_hash, version)
            ledger.meta.update({"tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment})
        runner = SweepRunner(sweep=spec.name, trials=trials, ledger=ledger, backend=backend, paths=paths,
                             tracker=tracker, retries=spec.backend.retries, retry_failed=retry_failed,
                             poll_interval=poll_interval, retry_delay_s=retry_delay_s, console=console,
                             progress=progress,
                             supports_run_id=tracker is not None and trainer_supports_run_id())
        if spec.search is not None:
            from orchestrator.search.scheduler import SearchScheduler

            runner.search = SearchScheduler(spec, output_dir, version, paths.trial_dir, event=runner._event)
        try:
            with _StopOnSignals(runner):
                outcome = runner.run()
        finally:
            if own_backend:
                backend.close()
        if tracker is not None and not outcome.interrupted:
            tracker.log_spec(Path(spec.source))
    if report and not outcome.interrupted:
        outcome.report_path = build_sweep_report(spec, paths, console)
    return outcome


class _StopOnSignals:
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

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _detach(spec: SweepSpec, paths: ProjectPaths, output_dir: Path, overrides: Sequence[str],
            max_parallel: int | None, retry_failed: bool) -> SweepOutcome:
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
    env = {**os.environ, "CLS_ABLATION_ROOT": str(paths.root)}
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} detached: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it holds the sweep lock, or died trying
        holder = SweepLock.holder(output_dir)
        if holder and holder.get("pid") == proc.pid:
            break
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the detached orchestrator exited with code {proc.returncode}:\n" + "\n".join(tail))
        time.sleep(0.1)
    return SweepOutcome(sweep=spec.name, output_dir=output_dir, detached_pid=proc.pid, log_path=log_path)


def cancel_sweep(spec: SweepSpec, *, root: Path | str | None = None, timeout_s: float = 120.0,
                 console: Console | None = None) -> str:
    """Stop a sweep: signal its orchestrator, or, when none is alive, stop its orphaned trials."""
    paths = ProjectPaths.discover(root)
    console = console or Console()
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
    ledger_path = output_dir / "ledger.json"
    if not ledger_path.exists():
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
                result = read_result(paths.trial_dir(record.trial_id))
                if result and result.get("status") == "done":
                    ledger.mark_finished(record.trial_id, "done")
                else:
                    ledger.mark_finished(record.trial_id, "cancelled", None, "cancelled by `orchestrator cancel`")
        return f"cancelled {stopped} orphaned trial(s) of sweep {spec.name}"
