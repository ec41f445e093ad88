"""What every backend speaks: a submitted job's handle, its state, and the Backend interface.

Modelled on submitit's Executor/Job split, reduced to what a sweep needs:

    backend.submit(trial, run_dir) -> JobHandle    # start (or queue) one trial
    backend.poll(handles)          -> {trial_id: JobState}   # one batched call per loop tick
    backend.cancel(handle)                         # stop it, resumably (SIGTERM, then SIGKILL)
    backend.reattach(handle_dict)  -> JobHandle | None       # after an orchestrator restart
    backend.close()

A backend never decides retries and never writes the ledger: it reports what happened, with a
failure class, and the runner decides. The trainer's own verdict is `DIR/result.json`; backends
only add what the trainer could not write itself (killed by a signal, preempted, vanished).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from orchestrator.spec import TrialPlan

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "trainer.log"

# Failure classes. The trainer writes nan/oom/error into result.json; backends add the rest.
NAN = "nan"  # diverged: deterministic, retrying gives the same NaN
OOM = "oom"  # out of memory: often a busy/fragmented device, worth another try
ERROR = "error"  # the trainer raised: a bug or bad data, retrying repeats it
KILLED = "killed"  # ended by a signal nobody in this sweep sent (OOM killer, admin, node reboot)
PREEMPTED = "preempted"  # stopped at a checkpoint on request (exit 75, Slurm preemption)
LOST = "lost"  # vanished without a result while the orchestrator was away
TIMEOUT = "timeout"  # hit a scheduler time limit
TRANSIENT_FAILURES = frozenset({OOM, KILLED, PREEMPTED, LOST, TIMEOUT})


def is_transient(failure_class: str | None) -> bool:
    """Whether another attempt can end differently (infrastructure), as opposed to a property of the trial."""
    return failure_class in TRANSIENT_FAILURES


class JobStatus(str, Enum):
    PENDING = "pending"  # accepted, not started (queued by the backend or the scheduler)
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED)


@dataclass(frozen=True)
class JobState:
    status: JobStatus
    failure_class: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def failed(cls, failure_class: str, error: str | None = None) -> JobState:
        return cls(JobStatus.FAILED, failure_class, error)


@dataclass(frozen=True)
class JobHandle:
    """Everything needed to find a job again; stored as a dict in the ledger."""

    trial_id: str
    backend: str
    job_id: str  # pid (local), Slurm job id, Ray object ref id
    run_dir: Path
    log_path: Path
    submitted_at: float = field(default_factory=time.time)
    info: Mapping[str, Any] = field(default_factory=dict)  # backend specifics (process start time, pgid, ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "backend": self.backend,
            "job_id": self.job_id,
            "run_dir": str(self.run_dir),
            "log_path": str(self.log_path),
            "submitted_at": self.submitted_at,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobHandle:
        return cls(
            trial_id=str(data["trial_id"]),
            backend=str(data["backend"]),
            job_id=str(data["job_id"]),
            run_dir=Path(data["run_dir"]),
            log_path=Path(data["log_path"]),
            submitted_at=float(data.get("submitted_at") or 0.0),
            info=dict(data.get("info") or {}),
        )


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """DIR/result.json, or None when absent or unreadable (the trainer writes it atomically)."""
    try:
        data = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def result_is_done(run_dir: Path) -> bool:
    result = read_result(run_dir)
    return bool(result) and result.get("status") == "done"


def state_from_result(result: Mapping[str, Any]) -> JobState:
    if result.get("status") == "done":
        return JobState(JobStatus.DONE)
    return JobState.failed(str(result.get("failure_class") or ERROR), result.get("error"))


class BackendError(RuntimeError):
    """A backend could not do what was asked (no free slot, scheduler refused, ...)."""


class Backend(ABC):
    """Runs trials somewhere. Subclasses register with `@register_backend("name")`."""

    name: ClassVar[str] = "base"

    def __init__(self, max_parallel: int = 1, resources: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None) -> None:
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
        self.max_parallel = max_parallel
        self.resources = dict(resources or {})
        self.options = dict(options or {})

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> Backend:
        """Build from a `BackendSpec` (kind, max_parallel, resources, options); overrides win."""
        kwargs: dict[str, Any] = {
            "max_parallel": spec.max_parallel,
            "resources": dict(spec.resources or {}),
            "options": dict(spec.options or {}),
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- the interface ----------------------------------------------------------------------------
    @abstractmethod
    def submit(self, trial: TrialPlan, run_dir: Path, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        """Start the trial whose config is `run_dir/config.yaml`; results land in `run_dir`.

        `keep_fds`: file descriptors the job should hold open for its whole life (the trial's claim
        lock, so a trial outliving a killed orchestrator stays claimed). Backends whose jobs run on
        other machines ignore it.
        """

    @abstractmethod
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        """The state of each handle, keyed by trial id: one call for all of a sweep's jobs."""

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None:
        """Stop the job (resumably where possible) and wait until it is gone."""

    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """Stop several jobs; `grace_s` bounds the wait before a hard kill (None: the backend's default).
        Backends override this to stop the jobs concurrently."""
        for handle in handles:
            self.cancel(handle)

    @abstractmethod
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        """A handle from the ledger of an earlier orchestrator: the live job, or None if it is gone."""

    def close(self) -> None:
        """Release backend resources (connections, clusters). Never cancels running jobs."""

    # -- capacity ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def active(self) -> int:
        """Jobs submitted or reattached and not yet seen finished or cancelled."""

    @property
    def free_slots(self) -> int:
        return max(0, self.max_parallel - self.active)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
