"""The Ray backend, in the orchestrator (the Ray driver): one detached actor per attempt, its
result polled with one `ray.wait` for all jobs, stopped through the actor, found again by name."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends import register_backend
from orchestrator.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, require_config
from orchestrator.backends.process import ProcessIdentity, stop_groups, trainer_command, trainer_env
from orchestrator.backends.ray.actor import TrialProcess
from orchestrator.backends.ray.outcome import classify_ray_error, started, state_from_outcome
from orchestrator.spec import RayBackendSpec, TrialPlan
from orchestrator.store import TrialDir

DEFAULT_NAMESPACE = "cls_ablation"
ACTOR_PREFIX = "trial-"
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "CLS_ABLATION_")  # the driver's settings the trainer needs on any node
GIB = 1024 ** 3


@dataclass
class _Job:
    handle: JobHandle
    actor: Any  # ray.actor.ActorHandle
    ref: Any  # ObjectRef of result(): ready when the attempt has ended


@register_backend("ray")
class RayBackend(Backend):
    """Up to `max_parallel` trials at once as Ray actors, each reserving its resources on the cluster.

    options: `address` (cluster to join; default: start a local one), `command`, `env`, `grace_s`
    (like the local backend), `namespace` (of the detached actors), `num_cpus`/`num_gpus` (size of
    a local cluster). Test knobs: `lock_wait_s` (how long an attempt waits for an earlier trainer
    to leave the run dir), `linger_s` (how long an uncollected actor outlives its trainer).
    resources: `cpus_per_trial` -> num_cpus, `gpus_per_trial` -> num_gpus, `mem_gb` -> memory,
    `time_min` -> wall-clock limit of one attempt (then SIGTERM: checkpoint, failure class timeout).
    """

    def __init__(self, spec: RayBackendSpec, *, lock_wait_s: float | None = None, linger_s: float = 60.0) -> None:
        super().__init__(spec)
        options, resources = spec.options, spec.resources
        self.address: str | None = options.address or None
        self.command = trainer_command(options.command)  # None: the worker's python -m trainer
        self.cpus_per_trial = float(resources.cpus_per_trial)
        self.gpus_per_trial = float(resources.gpus_per_trial)
        self.memory_bytes = int(float(resources.mem_gb) * GIB)
        self.time_limit_s = float(resources.time_min) * 60.0
        self.grace_s = options.grace_s
        self.namespace = options.namespace or DEFAULT_NAMESPACE
        self.lock_wait_s = float(lock_wait_s if lock_wait_s is not None else self.grace_s + 60.0)
        self.linger_s = float(linger_s)
        self.extra_env = dict(options.env)
        self._jobs: dict[str, _Job] = {}  # job_id (actor name) -> live job
        self._ray: Any = None
        self._owns_connection = False
        self._local_cluster = self.address is None
        self._feasibility_checked: set[tuple[float, float, int]] = set()

    # -- connection -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join (or start) the cluster now, so an unreachable one fails the sweep before any trial
        (otherwise the first submit/reattach connects). Raises BackendError."""
        self._connect()

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        import ray  # heavy and optional: only sweeps on Ray pay for it

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": self.namespace, "log_to_driver": False,
                                      "logging_level": "WARNING"}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs.update(address="local", include_dashboard=False,
                              num_cpus=int(self.options.num_cpus or os.cpu_count() or 1))
                if self.options.num_gpus is not None:
                    kwargs["num_gpus"] = int(self.options.num_gpus)
            with _signal_handlers_kept():  # ray.init installs its own SIGTERM handler: keep the runner's
                try:
                    ray.init(**kwargs)
                except Exception as err:
                    where = self.address or "a local cluster"
                    raise BackendError(f"could not connect to Ray ({where}): {err}") from err
            self._owns_connection = True
        self._ray = ray
        return ray

    def close(self) -> None:
        """Disconnect. Trials on a real cluster keep running (re-attach later); a local cluster ends here."""
        self._jobs.clear()
        if self._ray is not None and self._owns_connection:
            try:
                self._ray.shutdown()
            except Exception:
                pass
        self._ray = None
        self._owns_connection = False

    # -- submit -----------------------------------------------------------------------------------
    def submit(self, trial: TrialPlan, trial_dir: TrialDir, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        """Create the attempt's actor (which starts the trainer); `keep_fds` is ignored (the trainer may run on
        another node); `DIR/.trainer.lock` keeps a second trainer out of the run dir instead."""
        if self.free_slots <= 0:
            raise BackendError(f"ray backend is full ({self.active}/{self.max_parallel} trials running)")
        trial_dir = TrialDir(trial_dir.path.resolve())
        require_config(trial_dir)
        ray = self._connect()
        self._check_feasible(ray)
        attempt = uuid.uuid4().hex[:8]
        name = f"{ACTOR_PREFIX}{trial.trial_id}-{attempt}"
        job = {
            "actor": name, "attempt": attempt, "trial_id": trial.trial_id, "run_dir": str(trial_dir.path),
            "command": self.command, "env": self._trainer_env(),
            "cwd": _code_root(), "grace_s": self.grace_s, "time_limit_s": self.time_limit_s,
            "lock_wait_s": self.lock_wait_s, "linger_s": self.linger_s,
        }
        options: dict[str, Any] = {
            "name": name, "namespace": self.namespace, "lifetime": "detached", "max_concurrency": 8,
            "max_restarts": 0, "max_task_retries": 0, "num_cpus": self.cpus_per_trial,
            "num_gpus": self.gpus_per_trial,
        }
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        try:
            actor = _actor_class(ray).options(**options).remote(job)
            ref = actor.result.remote()
        except Exception as err:
            raise BackendError(f"Ray refused the trial: {err}") from err
        info = {"actor": name, "namespace": self.namespace, "attempt": attempt, "address": self.address,
                "local_cluster": self._local_cluster, "driver_host": socket.gethostname(),
                "time_limit_s": self.time_limit_s,
                "resources": {"num_cpus": self.cpus_per_trial, "num_gpus": self.gpus_per_trial,
                              "memory": self.memory_bytes}}
        handle = JobHandle(trial_id=trial.trial_id, backend=self.name, job_id=name, run_dir=trial_dir.path,
                           log_path=trial_dir.log_path, info=info)
        self._jobs[name] = _Job(handle, actor, ref)
        return handle

    def _trainer_env(self) -> dict[str, str]:
        """What the trainer gets on top of its worker's environment (which carries Ray's GPU assignment)."""
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        return trainer_env(max(1, int(self.cpus_per_trial)), self.extra_env, forwarded)

    def _check_feasible(self, ray: Any) -> None:
        """A request no node can ever hold would wait forever: refuse it on a local cluster (nothing
        will join it), warn on a real one (an autoscaler may still add a node that fits)."""
        key = (self.cpus_per_trial, self.gpus_per_trial, self.memory_bytes)
        if key in self._feasibility_checked:
            return
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
        except Exception:
            return
        wanted = {"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial, "memory": self.memory_bytes}

        def fits(node: Mapping[str, Any]) -> bool:
            have = node.get("Resources") or {}
            return all(have.get(k, 0) >= v for k, v in wanted.items() if v)

        if nodes and not any(fits(n) for n in nodes):
            largest = ", ".join(f"{k}={max((n.get('Resources') or {}).get(k, 0) for n in nodes):g}" for k in wanted)
            message = (f"no Ray node can hold one trial (cpus_per_trial={self.cpus_per_trial:g}, "
                       f"gpus_per_trial={self.gpus_per_trial:g}, mem_gb={(self.memory_bytes) / GIB:g}); "
                       f"largest node: {largest} (memory in bytes)")
            if self._local_cluster:
                raise BackendError(message)
            warnings.warn(message + "; the trials wait until a node that fits joins", stacklevel=3)
        self._feasibility_checked.add(key)

    # -- poll -------------------------------------------------------------------------------------
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        handles = list(handles)
        tracked = [self._jobs[h.job_id] for h in handles if h.job_id in self._jobs]
        ready: set[Any] = set()
        if tracked:
            ray = self._connect()
            done, _ = ray.wait([job.ref for job in tracked], num_returns=len(tracked), timeout=0, fetch_local=False)
            ready = set(done)
        states: dict[str, JobState] = {}
        for handle in handles:
            job = self._jobs.get(handle.job_id)
            if job is None:  # not ours (any more): the files in its run dir tell
                states[handle.trial_id] = state_from_outcome(handle, None)
            elif job.ref in ready:
                states[handle.trial_id] = self._collect(job)
            else:
                states[handle.trial_id] = JobState(JobStatus.RUNNING if started(handle) else JobStatus.PENDING)
        return states

    def _collect(self, job: _Job) -> JobState:
        ray = self._ray
        outcome: dict[str, Any] | None = None
        ray_error: tuple[str, str] | None = None
        try:
            outcome = ray.get(job.ref, timeout=30)
        except ray.exceptions.ActorUnavailableError:  # a network blip, not a death: ask again next time
            job.ref = job.actor.result.remote()
            return JobState(JobStatus.RUNNING)
        except Exception as err:  # the actor died (worker or node lost, killed) or could not start
            ray_error = classify_ray_error(ray, err)
        self._jobs.pop(job.handle.job_id, None)
        self._kill_actor(job.actor)
        return state_from_outcome(job.handle, outcome, ray_error)

    def _kill_actor(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:
            pass

    @property
    def active(self) -> int:
        return len(self._jobs)

    # -- cancel -----------------------------------------------------------------------------------
    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """Ask every trial's actor to stop it at once (SIGTERM: the trainer checkpoints), wait up to
        `grace_s`, SIGKILL the rest, then kill the actors."""
        grace = self.grace_s if grace_s is None else grace_s
        handles = list(handles)
        jobs = [self._jobs[h.job_id] for h in handles if h.job_id in self._jobs]
        if jobs:
            ray = self._connect()
            stops = []
            for job in jobs:
                try:
                    stops.append(job.actor.stop.remote(grace))
                except Exception:
                    pass
            if stops:  # a pending actor (never scheduled) never answers: bounded wait, then ray.kill
                ray.wait(stops, num_returns=len(stops), timeout=grace + 15.0, fetch_local=False)
            for job in jobs:
                self._kill_actor(job.actor)
        for handle in handles:
            self._jobs.pop(handle.job_id, None)
            _stop_local_leftover(handle, grace)  # an actor already gone left its trainer behind (same host only)

    # -- reattach ---------------------------------------------------------------------------------
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        handle = JobHandle.from_dict(handle_dict)
        info = handle.info
        if info.get("local_cluster") or self._local_cluster:
            return None  # a local cluster ends with its orchestrator: nothing left to find
        ray = self._connect()
        try:
            actor = ray.get_actor(str(info.get("actor") or handle.job_id),
                                  namespace=str(info.get("namespace") or self.namespace))
        except ValueError:
            return None  # gone: finished and collected, expired, or lost with its node
        state = _actor_state(ray, actor)
        if state == "DEAD":
            return None
        if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
            status = None  # still waiting for resources: this attempt, still ours (the name is unique)
        else:
            try:
                status = ray.get(actor.status.remote(), timeout=30)
            except ray.exceptions.GetTimeoutError:
                status = None  # not scheduled yet (waiting for resources)
            except Exception:
                return None  # dead
        if status is not None and status.get("attempt") != info.get("attempt"):
            return None
        if handle.job_id in self._jobs:
            return self._jobs[handle.job_id].handle
        self._jobs[handle.job_id] = _Job(handle, actor, actor.result.remote())
        return handle


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
_ACTOR_CLASSES: dict[int, Any] = {}


def _actor_class(ray: Any) -> Any:
    key = id(ray)
    if key not in _ACTOR_CLASSES:
        _ACTOR_CLASSES[key] = ray.remote(TrialProcess)
    return _ACTOR_CLASSES[key]


def _actor_state(ray: Any, actor: Any) -> str | None:
    """ALIVE / PENDING_CREATION / DEAD ... from the GCS (no dashboard needed); None when unknown."""
    try:
        from ray._private import state  # ray's private API (no public call gives an actor's state)

        entry = state.actors(actor_id=actor._actor_id.hex())
        return str(entry.get("State")) if entry else None
    except Exception:  # a private API: when it moves, fall back to asking the actor itself
        return None


def _code_root() -> str:
    """The checkout that holds `trainer/`: the trainer's working directory on every node (shared FS)."""
    return str(Path(__file__).resolve().parents[3])


class _signal_handlers_kept:
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> None:
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.getsignal(s) for s in self.SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.saved.items():
            if handler is not None:
                signal.signal(s, handler)


def _stop_local_leftover(handle: JobHandle, grace_s: float) -> None:
    """A trainer whose actor is gone but which still runs on this host (e.g. checkpointing after its
    worker died): SIGTERM, grace, SIGKILL. Other hosts' processes are out of reach (and PDEATHSIG ends them)."""
    info = handle.trial_dir.read_pid()
    if info.get("attempt") != handle.info.get("attempt") or info.get("hostname") != socket.gethostname():
        return
    identity = ProcessIdentity.from_info(info)
    if "outcome" in info or identity is None or not identity.is_alive():
        return
    stop_groups([(int(info.get("pgid", info["pid"])), identity.is_alive)], grace_s)
