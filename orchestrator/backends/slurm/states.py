"""How an ended Slurm job ended, as a job state: the trainer's result.json when it wrote one, else
what only Slurm knows (time limit, node failure, preemption, memory, scancel), else the trainer's
exit code as the job's wrapper recorded it (`trainer.contract.failure_from_exit`)."""

from __future__ import annotations

from orchestrator.backends.base import JobHandle, JobState, state_from_result
from orchestrator.backends.slurm.job import attempt_file
from orchestrator.backends.slurm.watcher import SlurmRecord
from orchestrator.store import last_line, tail
from trainer.contract import EXIT_INTERRUPTED, KILLED, LOST, OOM, PREEMPTED, TIMEOUT, failure_from_exit, read_json

OOM_LOG_MARKERS = ("exceeded memory limit", "exceeded job memory limit", "out of memory", "oom-kill", "oom_kill")


def ended_state(handle: JobHandle, record: SlurmRecord) -> JobState | None:
    """The state of a job Slurm no longer runs; None for COMPLETED without a result.json (which may
    show up a moment later on a shared file system: the caller decides how long to wait)."""
    trial_dir = handle.trial_dir
    result = trial_dir.result()
    if result is not None:
        return state_from_result(result)  # the trainer's own verdict wins
    state, jid = record.state, handle.job_id
    if state == "COMPLETED":
        return None
    if state in ("TIMEOUT", "DEADLINE"):
        return JobState.failed(TIMEOUT, f"job {jid} hit its time limit ({state})")
    if state in ("NODE_FAIL", "BOOT_FAIL", "LOST"):
        return JobState.failed(LOST, f"job {jid} ended with {state}")
    if state == "PREEMPTED":
        return JobState.failed(PREEMPTED, f"job {jid} was preempted and not requeued")
    if state == "OUT_OF_MEMORY" or log_mentions_oom(handle):
        return JobState.failed(OOM, f"job {jid} exceeded its memory ({state})")
    if state == "CANCELLED":
        who = f" ({record.reason})" if record.reason else ""
        return JobState.failed(KILLED, f"job {jid} was cancelled outside the orchestrator{who}")
    attempt = read_json(attempt_file(trial_dir.path, jid))
    trainer_exit = attempt.get("trainer_exit") if isinstance(attempt, dict) else None
    # The trainer's own exit when the wrapper saw it, unless Slurm killed the job by a signal
    # (which exit 75, stopped at a checkpoint, still beats); else the job's.
    if trainer_exit == EXIT_INTERRUPTED or (isinstance(trainer_exit, int) and not record.exit_signal):
        returncode = trainer_exit
    elif record.exit_signal:
        returncode = -record.exit_signal
    else:
        returncode = record.exit_code
    failure_class, message = failure_from_exit(returncode, last_line(handle.log_path))
    return JobState.failed(failure_class, f"job {jid} ({state.lower()}): {message}")


def log_mentions_oom(handle: JobHandle) -> bool:
    """Slurm's cgroup OOM kill shows up in the job's own logs only (the state can be FAILED)."""
    folder = handle.trial_dir.slurm_dir
    for suffix in ("err", "out"):
        text = tail(folder / f"{handle.job_id}_0_log.{suffix}").lower()
        if any(marker in text for marker in OOM_LOG_MARKERS):
            return True
    return False
