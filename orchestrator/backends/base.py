"""What every backend speaks: a submitted job's handle, its state, and the Backend interface.

Modelled on submitit's Executor/Job split, reduced to what a sweep needs:

    backend = get_backend(spec.backend)           # built from the spec's typed backend settings
    backend.connect()                             # fail once, clearly, if the cluster is unreachable
    backend.submit(trial, trial_dir) -> JobHandle # start (or queue) one trial
    backend.submit_many(submissions)              # several at once (Slurm: one job array)
    backend.poll(handles)  -> {trial_id: JobState}   # one batched call per loop tick
    backend.cancel(handle)                        # stop it, resumably (SIGTERM, then SIGKILL)
    backend.reattach(handle_dict) -> JobHandle | None   # after an orchestrator restart
    backend.close()

A backend never decides retries and never writes the ledger: it reports what happened, with a
failure class (`trainer.contract`), and the runner decides. The trainer's own verdict is
`DIR/result.json`; backends only add what the trainer could not write itself (killed by a signal,
preempted, vanished, over a time limit).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.spec import BackendSpec, TrialPlan
from orchestrator.store import TrialDir
from trainer.contract import ERROR, TrialResult


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


def state_from_result(result: TrialResult) -> JobState:
    """The trainer's verdict (result.json) as a job state."""
    if result.done:
        return JobState(JobStatus.DONE)
    return JobState.failed(result.failure_class or ERROR, result.error)


@dataclass(frozen=True)
class JobHandle:
    """Everything needed to find a job again; stored as a dict in the ledger."""

    trial_id: str
    backend: str
    job_id: str  # pid (local), Slurm job id, Ray actor name
    run_dir: Path
    log_path: Path
    submitted_at: float = field(default_factory=time.time)
    info: Mapping[str, Any] = field(default_factory=dict)  # backend specifics (process start time, pgid, ...)

    @property
    def trial_dir(self) -> TrialDir:
        return TrialDir(self.run_dir)

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


@dataclass(frozen=True)
class Submission:
    """One trial to start: its plan, its folder (config.yaml written), the fds its job should hold."""

    trial: TrialPlan
    trial_dir: TrialDir
    keep_fds: tuple[int, ...] = ()


class BackendError(RuntimeError):
    """A backend could not do what was asked (no free slot, scheduler refused, ...)."""


def require_config(trial_dir: TrialDir) -> None:
    if not trial_dir.config_path.is_file():
        raise BackendError(f"{trial_dir.config_path} does not exist: write the trial config before submitting")


class Backend(ABC):
    """Runs trials somewhere. Subclasses register with `@register_backend("name")` and are built
    from the spec's backend settings of their kind (`LocalBackendSpec`, `SlurmBackendSpec`, ...)."""

    name: ClassVar[str] = "base"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.max_parallel = spec.max_parallel
        self.resources = spec.resources
        self.options = spec.options

    def connect(self) -> None:
        """Reach the cluster now, so an unreachable one fails the sweep once, before any trial.
        Raises BackendError. Backends without a cluster have nothing to do."""

    @abstractmethod
    def submit(self, trial: TrialPlan, trial_dir: TrialDir, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        """Start the trial whose config is `trial_dir.config_path`; results land in `trial_dir`.

        `keep_fds`: file descriptors the job should hold open for its whole life (the trial's claim
        lock, so a trial outliving a killed orchestrator stays claimed). Backends whose jobs run on
        other machines ignore it.
        """

    def submit_many(self, items: Sequence[Submission]) -> list[JobHandle | Exception]:
        """Start several trials; per item its handle, or the exception its submission raised (so a
        launched job never loses its handle because a later one failed)."""
        out: list[JobHandle | Exception] = []
        for item in items:
            try:
                out.append(self.submit(item.trial, item.trial_dir, keep_fds=item.keep_fds))
            except Exception as err:
                out.append(err)
        return out

    @abstractmethod
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        """The state of each handle, keyed by trial id: one call for all of a sweep's jobs."""

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job (resumably where possible) and wait until it is gone."""
        self.cancel_many([handle])

    @abstractmethod
    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """Stop several jobs at once; `grace_s` bounds the wait before a hard kill (None: the
        backend's default)."""

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
