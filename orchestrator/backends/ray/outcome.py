"""How a Ray attempt ended, as a job state: the trainer's result.json, else what the actor saw of
the trainer (exit code, time limit, never started), else what Ray says about the actor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.backends.base import JobHandle, JobState, state_from_result
from orchestrator.backends.process import state_from_exit
from trainer.contract import ERROR, KILLED, LOST, PREEMPTED, TIMEOUT


def started(handle: JobHandle) -> bool:
    """This attempt's trainer has started (its actor wrote the pid file)."""
    return handle.trial_dir.read_pid().get("attempt") == handle.info.get("attempt")


def state_from_outcome(handle: JobHandle, outcome: Mapping[str, Any] | None,
                       ray_error: tuple[str, str] | None = None) -> JobState:
    """A finished attempt's state from the actor's `result()` (None: lost, then the pid file's copy)."""
    trial_dir = handle.trial_dir
    result = trial_dir.result()
    if result is not None:
        return state_from_result(result)  # the trainer's own verdict wins
    if outcome is None:  # the actor's answer is lost: the exit code it wrote down, if any
        pid_info = trial_dir.read_pid()
        if pid_info.get("attempt") == handle.info.get("attempt"):
            outcome = pid_info.get("outcome")
    if outcome is None:
        if ray_error is not None:
            return JobState.failed(*ray_error)
        return JobState.failed(LOST, "the Ray actor is gone without result.json")
    if outcome.get("busy"):
        return JobState.failed(LOST, outcome.get("error"))
    if outcome.get("error"):
        return JobState.failed(ERROR, f"could not start the trainer: {outcome['error']}")
    if outcome.get("cancelled") and outcome.get("returncode") is None:
        return JobState.failed(PREEMPTED, "cancelled before the trainer started")
    if outcome.get("timed_out"):
        limit = handle.info.get("time_limit_s")
        return JobState.failed(TIMEOUT, "hit the time limit (resources.time_min)" + (f" of {limit:g} s" if limit else ""))
    return state_from_exit(handle, outcome.get("returncode"))


def classify_ray_error(ray: Any, err: BaseException) -> tuple[str, str]:
    """(failure class, message) for an attempt whose actor Ray reports dead."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    summary = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    if isinstance(err, ray.exceptions.RayActorError):
        if err.actor_init_failed:  # e.g. the worker cannot import the orchestrator package
            return ERROR, f"the Ray actor could not start: {' '.join(lines)[:500]}"
        if err.preempted:
            return PREEMPTED, f"the Ray node running the trial was drained (preempted): {summary}"
        detail = next((line for line in lines if "worker" in line.lower() or "node" in line.lower()), "")
        return KILLED, f"the Ray worker running the trial died: {summary}" + (f" ({detail[:200]})" if detail else "")
    if isinstance(err, ray.exceptions.RayTaskError):
        return ERROR, f"the Ray actor failed: {summary}"
    return KILLED, f"the Ray actor is unreachable: {summary}"
