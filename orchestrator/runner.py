"""The scheduling loop: queue -> claim -> submit -> poll -> finish -> retry -> prune, for one sweep.

`SweepRunner` drives trials through a backend and keeps the ledger (orchestrator/lifecycle.py says
what each record becomes); what it is handed (backend, tracker, search scheduler, progress display)
is wired by `orchestrator.commands`. It can be killed at any moment (even SIGKILL) and run again:
trials still running are re-attached, dead ones restarted (the trainer resumes from its
checkpoint), finished ones are never trained again.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from orchestrator.backends.base import Backend, JobHandle, JobState, JobStatus, Submission
from orchestrator.ledger import Ledger
from orchestrator import lifecycle
from orchestrator.lifecycle import SweepOutcome
from orchestrator.locks import TrialClaim
from orchestrator.plan import unique_by_id
from orchestrator.progress import SweepProgress
from orchestrator.spec import TrialPlan
from orchestrator.store import ProjectPaths, TrialDir
from trainer.contract import ERROR

if TYPE_CHECKING:  # injected by orchestrator.commands; imported here for their types only
    from orchestrator.search.scheduler import SearchScheduler
    from orchestrator.tracking import SweepTracker

T = TypeVar("T")
MIN_POLL_S = 0.05


@dataclass
class _Queued:
    trial: TrialPlan
    not_before: float = 0.0  # retries wait a little: a busy device or node gets a moment


@dataclass
class _Launch:  # a trial ready to submit: its folder claimed and its config written
    trial: TrialPlan
    trial_dir: TrialDir
    claim: TrialClaim
    child_run_id: str | None


class SweepRunner:
    """Drives one sweep's trials through a backend until each is done, failed for good, or stopped."""

    def __init__(self, *, sweep: str, trials: Sequence[TrialPlan], ledger: Ledger, backend: Backend,
                 paths: ProjectPaths, tracker: SweepTracker | None = None, search: SearchScheduler | None = None,
                 progress: SweepProgress | None = None, retries: int = 0, retry_failed: bool = False,
                 poll_interval: float = 1.0, retry_delay_s: float = 1.0) -> None:
        self.sweep = sweep
        self.trials = unique_by_id(trials)
        self.by_id = {t.trial_id: t for t in self.trials}
        self.ledger = ledger
        self.backend = backend
        self.paths = paths
        self.tracker = tracker
        self.search = search  # tuned sweeps: trials come from each cell's Optuna study as it goes
        self.progress = progress or SweepProgress(sweep)
        self.retries = retries
        self.retry_failed = retry_failed
        self.poll_interval = poll_interval
        self.retry_delay_s = retry_delay_s
        self._queue: deque[_Queued] = deque()
        self._waiting: dict[str, TrialPlan] = {}  # claimed by another orchestrator (another sweep)
        self._in_flight: dict[str, JobHandle] = {}
        self._claims: dict[str, TrialClaim] = {}
        self._stop = threading.Event()
        self._force_stop = False
        self.cancelling = False  # inside the SIGTERM -> grace -> SIGKILL of running trials

    # -- public -----------------------------------------------------------------------------------
    def request_stop(self, force: bool = False) -> None:
        """Stop launching; cancel running trials (SIGTERM, grace, SIGKILL; force: SIGKILL now)."""
        self._force_stop = self._force_stop or force
        self._stop.set()

    def run(self) -> SweepOutcome:
        if self.search is not None:
            self._join(self.search.start())
        lifecycle.record_trials(self.ledger, self.trials, self.paths.trial)
        self.ledger.meta.update({"sweep": self.sweep, "orchestrator_pid": os.getpid(), "started_at": time.time(),
                                 "backend": self.backend.name, "store": str(self.paths.trials_dir)})
        self.ledger.save()
        if self.tracker is not None:
            self._tracked("starting the sweep's MLflow run", self._start_parent)
            self.ledger.save()
        self.backend.connect()  # fails once, clearly, when a cluster is unreachable
        self._recover_running()
        for trial in self.trials:
            self._enqueue(trial)
        interrupted = False
        try:
            with self.progress.showing(len(self.trials)):
                interrupted = self._loop()
        finally:
            if self._in_flight:  # stopped by a signal, or an exception escaped the loop
                interrupted = True
                self._cancel_in_flight()
        return self._finish(interrupted)

    # -- trials joining, and recovery -------------------------------------------------------------
    def _join(self, trials: Sequence[TrialPlan]) -> None:
        """Trials that join the sweep while it runs (a search's)."""
        for trial in unique_by_id(trials):
            if trial.trial_id not in self.by_id:
                self.trials.append(trial)
                self.by_id[trial.trial_id] = trial

    def _add_search_trials(self, trials: Sequence[TrialPlan]) -> None:
        """A search's new trials: recorded and queued, or told to the search at once when decided."""
        if not trials:
            return
        busy = set(self._in_flight) | set(self._waiting) | {q.trial.trial_id for q in self._queue}
        self._join(trials)
        for trial in unique_by_id(trials):
            lifecycle.record_trial(self.ledger, trial, self.paths.trial(trial.trial_id))
            if trial.trial_id not in busy:
                self._enqueue(trial)
        self.ledger.save()

    def _tell_search(self, tid: str, state: str) -> None:
        """How a trial ended (done, failed for good, pruned), for the search that asked for it (a
        control is no search's: told, it would count as an exploration, whose failure is no failure)."""
        trial = self.by_id.get(tid)
        if self.search is not None and (trial is None or trial.control is None):
            self.search.trial_ended(tid, state, self.paths.trial(tid).result())

    def _recover_running(self) -> None:
        """Trials the ledger says are running: an earlier orchestrator launched them and died."""
        for record in self.ledger.in_state("running"):
            handle = None
            if record.job and record.job.get("backend") == self.backend.name:
                handle = self.backend.reattach(record.job)
            if handle is not None and record.in_plan:
                self._in_flight[record.trial_id] = handle
                # Jobs on other machines (Ray) cannot inherit the claim lock: hold it here again.
                claim = TrialClaim.try_acquire(self.paths.trial(record.trial_id).path, self.sweep)
                if claim is not None:
                    self._claims[record.trial_id] = claim
                self.ledger.update(record.trial_id, note=f"reattached by orchestrator pid {os.getpid()}")
                self.progress.event("reattached", record.label, f"job {handle.job_id}")
                continue
            if handle is not None:  # alive but no longer asked for
                self.backend.cancel_many([handle])
            lifecycle.close_orphan(self.ledger, record, self.paths.trial(record.trial_id), self.retries)

    def _enqueue(self, trial: TrialPlan) -> None:
        tid = trial.trial_id
        if tid in self._in_flight:
            return
        record = self.ledger.trials[tid]
        if self._adopt_finished_result(trial):
            return
        if record.state == "pruned":  # a search stopped it; asking again gets the same answer
            self._tell_search(tid, "pruned")
            return
        if record.state == "failed":
            if self.retry_failed:
                self.ledger.update(tid, failures=0, note="retrying (--retry-failed)")
            elif not lifecycle.may_retry(record, self.retries):
                self._tell_search(tid, "failed")
                return
        if record.state == "done":  # its result vanished from the store: train it again
            self.ledger.update(tid, state="planned", note="result.json missing; running again")
        self._queue.append(_Queued(trial))

    def _adopt_finished_result(self, trial: TrialPlan) -> bool:
        """A result.json done in the shared store (this sweep's or another's): never train again."""
        trial_dir = self.paths.trial(trial.trial_id)
        if not trial_dir.is_done():
            return False
        if lifecycle.adopt_done(self.ledger, trial.trial_id, trial_dir):
            self.progress.event("reused", trial.label, "result.json done in the shared store")
        self._tell_search(trial.trial_id, "done")
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
                self._add_search_trials(self.search.more(max(0, self.backend.free_slots - len(self._queue))))
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
            self._show_progress()
            if not (self._in_flight or self._queue or self._waiting):
                if self.search is None or self.search.finished:
                    return False
                if not finished and not launched:  # nothing running and the search asks for nothing
                    self._add_search_trials(self.search.more(self.backend.free_slots))
                    if not self._queue:
                        self.progress.event("warning", "search", "no cell asks for more trials; stopping")
                        return False
            if finished and self._queue:
                continue  # a slot just freed up: fill it now
            wait = MIN_POLL_S if (launched or finished) else min(wait * 2, self.poll_interval)
            self._stop.wait(min(wait, self.poll_interval))

    def _launch_ready(self) -> int:
        now = time.time()
        batch: list[_Launch] = []
        for _ in range(len(self._queue)):
            if self.backend.free_slots - len(batch) <= 0 or self._stop.is_set():
                break
            item = self._queue.popleft()
            if item.not_before > now:
                self._queue.append(item)
                continue
            launch = self._prepare_launch(item.trial)
            if launch is not None:
                batch.append(launch)
        if not batch:
            return 0
        try:  # Slurm submits a batch as one job array, and may refuse it as a whole
            handles = self.backend.submit_many([Submission(b.trial, b.trial_dir, (b.claim.fd,)) for b in batch])
        except Exception as err:
            handles = [err] * len(batch)
        launched = 0
        for launch, handle in zip(batch, handles):
            if isinstance(handle, Exception):
                self._submit_failed(launch, handle)
            else:
                self._started(launch, handle)
                launched += 1
        return launched

    def _retry_waiting(self) -> None:
        for tid, trial in list(self._waiting.items()):
            if TrialClaim.holder(self.paths.trial(tid).path) is None:
                del self._waiting[tid]
                if not self._adopt_finished_result(trial):
                    self._queue.appendleft(_Queued(trial))

    def _prepare_launch(self, trial: TrialPlan) -> _Launch | None:
        """Claim the trial's folder and write its config; None when it must not be launched now."""
        tid = trial.trial_id
        trial_dir = self.paths.trial(tid)
        trial_dir.path.mkdir(parents=True, exist_ok=True)
        claim = TrialClaim.try_acquire(trial_dir.path, self.sweep)
        if claim is None:  # another orchestrator runs this very trial now (a sweep sharing it)
            holder = TrialClaim.holder(trial_dir.path) or {}
            note = f"running elsewhere (sweep {holder.get('sweep', '?')}, pid {holder.get('pid', '?')}); waiting"
            self.ledger.update(tid, note=note)
            self._waiting[tid] = trial
            self.progress.event("waiting", trial.label, note)
            return None
        if self._adopt_finished_result(trial):  # finished while we waited for the claim
            claim.release()
            return None
        trial_dir.archive_result(self.ledger.trials[tid].attempts)
        child_run_id = None
        config = dict(trial.config)
        section = self._tracked("looking up the trial's MLflow run", lambda: self.tracker.launch_section(trial))
        if section is not None:
            child_run_id, config["tracking"] = section
            self.ledger.meta["parent_run_id"] = self.tracker.parent_run_id
        else:  # no tracking, or MLflow is unreachable: the trial logs locally, `sync` fills MLflow in
            config["tracking"] = {**(config.get("tracking") or {}), "enabled": False}
        trial_dir.write_config(config)
        return _Launch(trial, trial_dir, claim, child_run_id)

    def _tracked(self, what: str, fn: Callable[[], T]) -> T | None:
        """A tracker call that never stops the sweep: None when there is no tracker or MLflow failed."""
        if self.tracker is None:
            return None
        return self.tracker.guarded(what, fn, lambda message: self.progress.event("warning", "MLflow", message))

    def _start_parent(self) -> str:
        self.ledger.meta["parent_run_id"] = self.tracker.start(self.ledger.meta.get("parent_run_id"))
        return self.ledger.meta["parent_run_id"]

    def _submit_failed(self, launch: _Launch, err: Exception) -> None:
        launch.claim.release()
        lifecycle.record_submit_failure(self.ledger, launch.trial.trial_id, err)
        self.progress.event("failed", launch.trial.label, f"submit failed: {err}")

    def _started(self, launch: _Launch, handle: JobHandle) -> None:
        tid = launch.trial.trial_id
        self._claims[tid] = launch.claim
        self._in_flight[tid] = handle
        record = self.ledger.mark_running(tid, handle.to_dict(), launch.trial_dir.path, handle.log_path,
                                          launch.child_run_id)
        self.progress.event("started", launch.trial.label, f"{tid} attempt {record.attempts} job {handle.job_id}")

    def _on_finished(self, tid: str, state: JobState) -> None:
        self._in_flight.pop(tid)
        trial = self.by_id[tid]
        if state.status == JobStatus.DONE:
            record = self.ledger.mark_finished(tid, "done")
            self.progress.event("done", trial.label, f"{record.wall_time_s or 0:.1f} s")
            self._tell_search(tid, "done")
        else:
            record = lifecycle.record_failure(self.ledger, tid, state.failure_class or ERROR, state.error, self.retries)
            if record.state == "planned":
                self._queue.append(_Queued(trial, time.time() + self.retry_delay_s * record.failures))
                self.progress.event("retry", trial.label, f"{state.failure_class}: {state.error} "
                                    f"(retry {record.failures}/{self.retries})")
            else:
                self.progress.event("failed", trial.label, f"{state.failure_class}: {state.error}")
                self._close_child(tid, "FAILED")
                self._tell_search(tid, "failed")
        self._release_claim(tid)

    def _prune(self, tid: str) -> None:
        """Stop a search trial its pruner gave up on. The trainer checkpoints on SIGTERM, so the
        folder keeps its progress; the ledger says `pruned`, and the trial is not run again."""
        handle = self._in_flight.pop(tid)
        self.backend.cancel_many([handle])
        if handle.trial_dir.is_done():  # finished before the signal landed
            self.ledger.mark_finished(tid, "done")
            self._tell_search(tid, "done")
        else:
            self.ledger.mark_finished(tid, "pruned")
            self.ledger.update(tid, note="stopped early by the search's pruner")
            self._close_child(tid, "KILLED")
            self._tell_search(tid, "pruned")
        self._release_claim(tid)

    def _release_claim(self, tid: str) -> None:
        if (claim := self._claims.pop(tid, None)) is not None:
            claim.release()

    # -- stopping, and the end ---------------------------------------------------------------------
    def _cancel_in_flight(self) -> None:
        handles = list(self._in_flight.values())
        self.cancelling = True
        self.progress.event("stopping", f"{len(handles)} running trial(s)",
                            "SIGTERM, then SIGKILL after the grace period")
        try:
            self.backend.cancel_many(handles, grace_s=0.0 if self._force_stop else None)
        except KeyboardInterrupt:  # a second Ctrl-C during the grace period: no more waiting
            self.backend.cancel_many(handles, grace_s=0.0)
        for handle in handles:
            tid = handle.trial_id
            self._in_flight.pop(tid, None)
            if handle.trial_dir.is_done():
                self.ledger.mark_finished(tid, "done")
            else:  # resumable: the next `run` continues it from its checkpoint
                self.ledger.mark_finished(tid, "cancelled", None, "stopped by the orchestrator")
                self._close_child(tid, "KILLED")
            self._release_claim(tid)

    def _close_child(self, tid: str, status: str) -> None:
        self._tracked("closing the trial's MLflow run", lambda: self.tracker.mark_child(tid, status))

    def _finish(self, interrupted: bool) -> SweepOutcome:
        counts = dict(self.ledger.counts())
        failed = [r.trial_id for r in self.ledger if r.in_plan and r.state == "failed"
                  and not (self.search is not None and self.search.is_exploration(r.trial_id))]
        if self.search is not None:
            self.ledger.meta["search"] = [dataclasses.asdict(s) for s in self.search.summaries().values()]
        self.ledger.meta["finished_at"] = time.time()
        self.ledger.save()
        return SweepOutcome(sweep=self.sweep, output_dir=self.ledger.path.parent, counts=counts, failed=failed,
                            interrupted=interrupted, parent_run_id=self.ledger.meta.get("parent_run_id"))

    def _show_progress(self) -> None:
        states = [self.ledger.trials[t.trial_id].state for t in self.trials]
        self.progress.update(states, running=len(self._in_flight), queued=len(self._queue), waiting=len(self._waiting))
