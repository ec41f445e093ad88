"""How a sweep's ledger records what happened to a trial: joining the sweep, found done in the shared
store, failed (and whether another attempt is due), or left running by an orchestrator that died;
and how the sweep as a whole ended (`SweepOutcome`).

What each trial's record becomes when a run starts (the runner's loop then launches the planned):
    result.json done in the shared store  -> done (reused if another sweep trained it)
    running in the ledger, process alive  -> watched again (re-attached by the runner)
    running in the ledger, process gone   -> its result.json decides; none -> planned (lost, no retry spent)
    failed, transient class, budget left  -> planned again (budget: backend.retries)
    failed otherwise                      -> left failed (`run --retry-failed` tries again)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.spec import TrialPlan
from orchestrator.store import TrialDir
from trainer.contract import ERROR, LOST, is_transient


def record_trial(ledger: Ledger, trial: TrialPlan, trial_dir: TrialDir) -> None:
    """The trial's record, created or brought up to date (and back in the sweep)."""
    record = ledger.get(trial.trial_id)
    if record is None:
        ledger.trials[trial.trial_id] = TrialRecord(trial.trial_id, label=trial.label, cell=dict(trial.cell),
                                                    seed=trial.seed, run_dir=str(trial_dir.path))
    else:
        record.label, record.cell, record.seed = trial.label, dict(trial.cell), trial.seed
        record.in_plan = True


def record_trials(ledger: Ledger, trials: Sequence[TrialPlan], trial_dir_of: Callable[[str], TrialDir]) -> None:
    """The sweep's trials, recorded; the records of trials it no longer asks for leave its plan."""
    wanted = {trial.trial_id for trial in trials}
    for record in ledger:
        record.in_plan = record.trial_id in wanted
    for trial in trials:
        record_trial(ledger, trial, trial_dir_of(trial.trial_id))


def may_retry(record: TrialRecord, retries: int) -> bool:
    return is_transient(record.failure_class) and record.failures <= retries


def record_failure(ledger: Ledger, trial_id: str, failure_class: str, error: str | None, retries: int) -> TrialRecord:
    """An attempt failed: planned again when the failure is transient and the budget allows."""
    record = ledger.mark_finished(trial_id, "failed", failure_class, error, counts_as_failure=True)
    if may_retry(record, retries) and record.in_plan:
        ledger.update(trial_id, state="planned", note=f"will retry after {failure_class}")
    return ledger.trials[trial_id]


def record_submit_failure(ledger: Ledger, trial_id: str, err: Exception) -> None:
    """The backend refused the trial: failed for good (a submit error is not transient)."""
    record = ledger.trials[trial_id]
    ledger.update(trial_id, state="failed", failure_class=ERROR, error=f"submit failed: {err}",
                  failures=record.failures + 1, ended_at=time.time())


def adopt_done(ledger: Ledger, trial_id: str, trial_dir: TrialDir) -> bool:
    """The record says done when the store does; True when that is news to the ledger."""
    record = ledger.trials[trial_id]
    if record.state == "done":
        return False
    ledger.update(trial_id, state="done", failure_class=None, error=None, job=None, note=None,
                  reused=record.state != "running", run_dir=str(trial_dir.path), log_path=str(trial_dir.log_path))
    return True


def close_orphan(ledger: Ledger, record: TrialRecord, trial_dir: TrialDir, retries: int) -> None:
    """A running trial whose process is gone: its result.json says how it ended, if it got that far."""
    result = trial_dir.result()
    if result is not None and result.done:
        ledger.mark_finished(record.trial_id, "done")
    elif result is not None:
        record_failure(ledger, record.trial_id, result.failure_class or ERROR, result.error, retries)
    else:  # killed with the orchestrator: not the trial's fault, no retry budget spent
        ledger.mark_finished(record.trial_id, "planned", LOST, "process gone after an orchestrator restart")


UNFINISHED_STATES = ("planned", "running", "cancelled")


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
        unfinished = sum(self.counts.get(state, 0) for state in UNFINISHED_STATES)
        return not self.interrupted and not self.failed and unfinished == 0 and self.counts.get("done", 0) > 0
