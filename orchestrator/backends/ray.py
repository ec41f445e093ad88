"""Trials on a Ray cluster: one detached, named Ray actor per attempt runs `python -m trainer` as a subprocess.

Why actors, and not Ray Tune or plain tasks:
- Ray Tune wants to own the loop: its own trial scheduler, retries, checkpoint bookkeeping and
  results. Here the runner owns all of that (ledger, retry budget, failure classes, MLflow), and
  the trainer owns its checkpoints; Tune would be a second, conflicting source of truth.
- Plain tasks fit submit/poll/`ray.cancel`, but they fate-share with the driver: when the
  orchestrator dies, Ray kills its tasks, and a new orchestrator has no way to find one again
  (reattach could only ever say "gone"). `ray.cancel(force=True)` also kills the worker without
  letting the trainer checkpoint.
- A *detached, named, threaded* actor is a task with an address: its constructor starts the
  trainer (GCS owns the creation of a detached actor, so it survives the orchestrator), `result()`
  returns when the attempt ends, `stop()` (SIGTERM to the trainer, so it checkpoints and exits 75;
  SIGKILL after `grace_s`) answers concurrently, and a restarted orchestrator finds it again with
  `ray.get_actor(name)`.

One attempt, step by step:
    submit   -> actor `trial-<trial id>-<attempt nonce>` (num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                memory=mem_gb) is created; the handle keeps its name, the ref of `result()` is polled
    actor    -> waits until no earlier trainer holds `DIR/.trainer.lock` (a previous attempt may still
                be writing its checkpoint), starts the trainer in its own session with that lock
                inherited and PR_SET_PDEATHSIG=SIGTERM (if the Ray worker dies, the trainer checkpoints
                and exits instead of living on unsupervised), writes `DIR/trainer.pid` (pid, host,
                worker pid, attempt), enforces `time_min`, and records the exit code in `trainer.pid`
    poll     -> one `ray.wait(refs, num_returns=len(refs), timeout=0)` for all jobs; a finished job's
                verdict is `DIR/result.json` when the trainer wrote one, else the exit code (75:
                preempted, signal: killed, time limit: timeout), else what Ray reports (the actor
                died: killed). The actor is then killed to free its resources.

Retries: Ray-side retries are off (`max_restarts=0`). A worker or node that dies mid-trial fails the
attempt as `killed`, a transient class, so the runner spends one retry from its budget, records the
attempt in the ledger, and submits again; the new attempt resumes from `DIR/checkpoint.pt` and the
trainer continues its MLflow run (`DIR/mlflow_run_id`). One retry policy, one count of attempts.

Clusters: `options.address` (`ray://head:10001`, `auto`, `head:6379`) connects to a running cluster;
the run dirs (and this checkout, the trainer's working directory) must be on a filesystem every
worker sees. Without an address a local cluster is started with `ray.init(address="local")`; it
dies with the orchestrator (Ray then SIGKILLs the trainers, which resume from their last periodic
checkpoint), so its trials cannot be re-attached: `reattach` returns None and the runner restarts
them without spending a retry. On a real cluster, trials outlive the orchestrator and `reattach`
finds their actors by name; an actor nobody collects frees its resources `linger_s` after its
trainer ended (the verdict stays on disk: result.json, and the exit code in trainer.pid).

Ray is imported lazily (first submit/poll/reattach), so sweeps on other backends never pay for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.backends import register_backend
from orchestrator.backends.base import (
    CONFIG_FILE,
    ERROR,
    KILLED,
    LOG_FILE,
    LOST,
    PREEMPTED,
    TIMEOUT,
    Backend,
    BackendError,
    JobHandle,
    JobState,
    JobStatus,
    read_result,
    state_from_result,
)
from orchestrator.backends.local import (
    COMMAND_ENV,
    EXIT_INTERRUPTED,
    PID_FILE,
    THREAD_VARIABLES,
    ProcessIdentity,
    last_log_line,
    signal_group,
)

if TYPE_CHECKING:
    from orchestrator.spec import TrialPlan

TRAINER_LOCK = ".trainer.lock"  # held by the running trainer (inherited fd): one trainer per run dir
DEFAULT_NAMESPACE = "cls_ablation"
ACTOR_PREFIX = "trial-"
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "CLS_ABLATION_")  # the driver's settings the trainer needs on any node
GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# The actor: lives on a Ray worker, runs one attempt of one trial
# ----------------------------------------------------------------------------------------------
class TrialProcess:
    """One attempt of one trial on a Ray worker (wrapped by `ray.remote` at submit time).

    Threaded (max_concurrency > 1): `result()` blocks for the whole attempt while `stop()` and
    `status()` answer concurrently.
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        self.run_dir = Path(job["run_dir"])
        self.log_path = Path(job["log_path"])
        self._proc: subprocess.Popen | None = None
        self._outcome: dict[str, Any] | None = None
        self._done = threading.Event()
        self._stopping = threading.Event()
        self._started = threading.Event()
        # The attempt starts with the actor, not with a later method call: the creation of a detached
        # actor survives its orchestrator, a queued call from a dead orchestrator would not. The
        # thread that starts the trainer also waits for it, so PDEATHSIG fires only if the worker dies.
        threading.Thread(target=self._attempt, daemon=True, name="trial").start()

    # -- the attempt ------------------------------------------------------------------------------
    def _attempt(self) -> None:
        try:
            outcome = self._run()
        except Exception as err:  # the trainer never ran: bad command, unwritable run dir, ...
            outcome = {"returncode": None, "error": f"{type(err).__name__}: {err}"}
        outcome.update(attempt=self.job["attempt"], actor=self.job["actor"], ended_at=time.time())
        self._outcome = outcome
        self._record_exit(outcome)
        self._done.set()
        self._expire_later(float(self.job.get("linger_s", 60.0)))

    def _run(self) -> dict[str, Any]:
        lock_fd = self._acquire_run_dir()
        if lock_fd is None:
            if self._stopping.is_set():
                return {"returncode": None, "cancelled": True}
            return {"returncode": None, "busy": True,
                    "error": f"another trainer still holds {self.run_dir / TRAINER_LOCK}"}
        try:
            if self._stopping.is_set():
                return {"returncode": None, "cancelled": True}
            proc = self._start(lock_fd)
        finally:
            os.close(lock_fd)  # the trainer keeps its inherited copy: the lock lives exactly as long as it does
        if self._stopping.is_set():  # stop() came while the trainer was being started
            self._terminate(proc, float(self.job.get("grace_s", 30.0)))
        deadline = time.monotonic() + float(self.job["time_limit_s"]) if self.job.get("time_limit_s") else None
        timed_out = False
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                returncode = proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                timed_out = True  # the scheduler's time limit: stop at a checkpoint, then for good
                self._terminate(proc, float(self.job.get("grace_s", 30.0)))
                deadline = None
        return {"returncode": returncode, "timed_out": timed_out, "pid": proc.pid,
                "cancelled": self._stopping.is_set()}

    def _acquire_run_dir(self) -> int | None:
        """The run dir's trainer lock; waits while an earlier attempt's trainer is still checkpointing."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / TRAINER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        wait_s = float(self.job.get("lock_wait_s", 120.0))
        deadline = time.monotonic() + wait_s
        killed_previous = False
        while not self._stopping.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                if killed_previous or not self._kill_previous_trainer():
                    break
                killed_previous, deadline = True, time.monotonic() + 15.0
            time.sleep(0.1)
        os.close(fd)
        return None

    def _kill_previous_trainer(self) -> bool:
        """An earlier attempt's trainer on this very host that outstayed its grace: SIGKILL its group."""
        try:
            info = json.loads((self.run_dir / PID_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if info.get("hostname") != socket.gethostname() or "pid" not in info:
            return False
        identity = ProcessIdentity(int(info["pid"]), info.get("start_ticks"), info.get("boot_id"))
        if not identity.is_alive():
            return False
        signal_group(int(info.get("pgid", info["pid"])), signal.SIGKILL)
        return True

    def _start(self, lock_fd: int) -> subprocess.Popen:
        command = self.job.get("command") or [sys.executable, "-m", "trainer"]
        argv = [*command, "--config", str(self.run_dir / CONFIG_FILE), "--out", str(self.run_dir)]
        env = {**os.environ, **self.job.get("env", {})}  # the worker's own env carries Ray's GPU assignment
        cwd = self.job.get("cwd")
        cwd = cwd if cwd and os.path.isdir(cwd) else None
        host = socket.gethostname()
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== {stamp} orchestrator (ray actor {self.job['actor']} on {host}, worker pid "
                      f"{os.getpid()}): {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True, pass_fds=(lock_fd,),
                                    preexec_fn=_die_with_parent())
        self._proc = proc
        self._started.set()
        identity = ProcessIdentity.of(proc.pid)
        _write_json_atomic(self.run_dir / PID_FILE, {
            "pid": proc.pid, "pgid": proc.pid, "start_ticks": identity.start_ticks, "boot_id": identity.boot_id,
            "hostname": host, "worker_pid": os.getpid(), "attempt": self.job["attempt"],
            "actor": self.job["actor"], "node_id": self.job.get("node_id"), "argv": argv, "started_at": time.time(),
        })
        return proc

    def _record_exit(self, outcome: Mapping[str, Any]) -> None:
        """The exit code beside the pid, so a later orchestrator knows how the attempt ended."""
        path = self.run_dir / PID_FILE
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        if info.get("attempt") not in (None, self.job["attempt"]):
            return  # a newer attempt owns the file now
        info.update({"attempt": self.job["attempt"], "actor": self.job["actor"], "outcome": dict(outcome)})
        try:
            _write_json_atomic(path, info)
        except OSError:
            pass

    def _expire_later(self, linger_s: float) -> None:
        """A detached actor nobody collects (its orchestrator is gone) frees its resources by itself."""
        def expire() -> None:
            time.sleep(linger_s)
            try:
                import ray

                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            except Exception:
                pass
            time.sleep(10)
            os._exit(0)

        threading.Thread(target=expire, daemon=True, name="expire").start()

    # -- concurrent calls -------------------------------------------------------------------------
    def stop(self, grace_s: float) -> dict[str, Any]:
        """SIGTERM the trainer's process group (it checkpoints and exits 75), SIGKILL after `grace_s`."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._terminate(proc, grace_s)
        self._done.wait(timeout=10.0)
        return self.status()

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        signal_group(proc.pid, signal.SIGKILL)  # also the trainer's own children (data-loader workers)

    def status(self) -> dict[str, Any]:
        proc = self._proc
        return {"attempt": self.job["attempt"], "started": self._started.is_set(), "finished": self._done.is_set(),
                "pid": proc.pid if proc else None, "worker_pid": os.getpid(), "outcome": self._outcome}

    def result(self) -> dict[str, Any]:
        """Blocks until the attempt ends; what the orchestrator polls (one call per (re)attach)."""
        self._done.wait()
        assert self._outcome is not None
        return self._outcome


def _die_with_parent():
    """preexec_fn: SIGTERM the trainer when the thread that started it dies (the Ray worker was killed).

    The trainer then checkpoints at its next step and exits; without this it would train on,
    unsupervised and unaccounted for, and collide with the retry."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The backend: runs in the orchestrator (the Ray driver)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Job:
    handle: JobHandle
    actor: Any  # ray.actor.ActorHandle
    ref: Any  # ObjectRef of result(): ready when the attempt has ended


@register_backend("ray")
class RayBackend(Backend):
    """Up to `max_parallel` trials at once as Ray actors, each reserving its resources on the cluster.

    options: `address` (cluster to join; default: start a local one), `command`, `env`, `grace_s`
    (like the local backend), and for programmatic use `namespace` (of the detached actors),
    `num_cpus`/`num_gpus` (size of a local cluster), `lock_wait_s`, `linger_s`.
    resources: `cpus_per_trial` -> num_cpus, `gpus_per_trial` -> num_gpus, `mem_gb` -> memory,
    `time_min` -> wall-clock limit of one attempt (then SIGTERM: checkpoint, failure class timeout).
    """

    def __init__(self, max_parallel: int = 1, resources: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, *, address: str | None = None,
                 command: Sequence[str] | str | None = None, env: Mapping[str, str] | None = None,
                 grace_s: float | None = None, namespace: str | None = None) -> None:
        super().__init__(max_parallel, resources, options)
        self.address: str | None = address or self.options.get("address") or None
        command = command if command is not None else (self.options.get("command") or os.environ.get(COMMAND_ENV))
        if isinstance(command, str):
            command = shlex.split(command)
        self.command: list[str] | None = list(command) if command else None  # None: the worker's python -m trainer
        self.cpus_per_trial = float(self.resources.get("cpus_per_trial") or self.resources.get("cpus") or 1)
        self.gpus_per_trial = float(self.resources.get("gpus_per_trial") or 0)
        mem_gb = self.resources.get("mem_gb")
        self.memory_bytes = int(float(mem_gb) * GIB) if mem_gb else None
        time_min = self.resources.get("time_min")
        self.time_limit_s = float(time_min) * 60.0 if time_min else None
        self.grace_s = float(grace_s if grace_s is not None else self.options.get("grace_s", 30.0))
        self.namespace = str(namespace or self.options.get("namespace") or DEFAULT_NAMESPACE)
        self.lock_wait_s = float(self.options.get("lock_wait_s", self.grace_s + 60.0))
        self.linger_s = float(self.options.get("linger_s", 60.0))
        self.extra_env = {str(k): str(v) for k, v in {**self.options.get("env", {}), **(env or {})}.items()}
        self._jobs: dict[str, _Job] = {}  # job_id (actor name) -> live job
        self._ray: Any = None
        self._owns_connection = False
        self._local_cluster = self.address is None
        self._feasibility_checked: set[tuple[float, float, int | None]] = set()

    # -- connection -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join (or start) the cluster now, so an unreachable one fails the sweep before any trial
        (otherwise the first submit/reattach connects). Raises BackendError."""
        self._connect()

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": self.namespace, "log_to_driver": False,
                                      "logging_level": "WARNING"}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs.update(address="local", include_dashboard=False,
                              num_cpus=int(self.options.get("num_cpus") or os.cpu_count() or 1))
                if self.options.get("num_gpus") is not None:
                    kwargs["num_gpus"] = int(self.options["num_gpus"])
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
    def submit(self, trial: TrialPlan, run_dir: Path, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        """Create the attempt's actor (which starts the trainer); `keep_fds` is ignored (the trainer may run on
        another node); `DIR/.trainer.lock` keeps a second trainer out of the run dir instead."""
        if self.free_slots <= 0:
            raise BackendError(f"ray backend is full ({self.active}/{self.max_parallel} trials running)")
        run_dir = Path(run_dir).resolve()
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise BackendError(f"{config} does not exist: write the trial config before submitting")
        ray = self._connect()
        self._check_feasible(ray)
        attempt = uuid.uuid4().hex[:8]
        name = f"{ACTOR_PREFIX}{trial.trial_id}-{attempt}"
        log_path = run_dir / LOG_FILE
        job = {
            "actor": name, "attempt": attempt, "trial_id": trial.trial_id, "run_dir": str(run_dir),
            "log_path": str(log_path), "command": self.command, "env": self._trainer_env(),
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
        handle = JobHandle(trial_id=trial.trial_id, backend=self.name, job_id=name, run_dir=run_dir,
                           log_path=log_path, info=info)
        self._jobs[name] = _Job(handle, actor, ref)
        return handle

    def _trainer_env(self) -> dict[str, str]:
        threads = str(max(1, int(self.cpus_per_trial)))
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        env.update({name: threads for name in THREAD_VARIABLES})
        env["ORCHESTRATOR_CPUS_PER_TRIAL"] = threads
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

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
        wanted = {"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial, "memory": self.memory_bytes or 0}

        def fits(node: Mapping[str, Any]) -> bool:
            have = node.get("Resources") or {}
            return all(have.get(k, 0) >= v for k, v in wanted.items() if v)

        if nodes and not any(fits(n) for n in nodes):
            largest = ", ".join(f"{k}={max((n.get('Resources') or {}).get(k, 0) for n in nodes):g}" for k in wanted)
            message = (f"no Ray node can hold one trial (cpus_per_trial={self.cpus_per_trial:g}, "
                       f"gpus_per_trial={self.gpus_per_trial:g}, mem_gb={(self.memory_bytes or 0) / GIB:g}); "
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
                states[handle.trial_id] = _state_from_disk(handle, None)
            elif job.ref in ready:
                states[handle.trial_id] = self._collect(job)
            else:
                states[handle.trial_id] = JobState(JobStatus.RUNNING if _started(handle) else JobStatus.PENDING)
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
            ray_error = _classify_ray_error(ray, err)
        self._jobs.pop(job.handle.job_id, None)
        self._kill_actor(job.actor)
        return _state_from_disk(job.handle, outcome, ray_error)

    def _kill_actor(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:
            pass

    @property
    def active(self) -> int:
        return len(self._jobs)

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, handle: JobHandle) -> None:
        self.cancel_many([handle])

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
        from ray._private import state

        entry = state.actors(actor_id=actor._actor_id.hex())
        return str(entry.get("State")) if entry else None
    except Exception:  # a private API: when it moves, fall back to asking the actor itself
        return None


def _code_root() -> str:
    """The checkout that holds `trainer/`: the trainer's working directory on every node (shared FS)."""
    return str(Path(__file__).resolve().parents[2])


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


def _read_pid_file(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(run_dir) / PID_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _started(handle: JobHandle) -> bool:
    """This attempt's trainer has started (its actor wrote the pid file)."""
    return _read_pid_file(handle.run_dir).get("attempt") == handle.info.get("attempt")


def _state_from_disk(handle: JobHandle, outcome: Mapping[str, Any] | None,
                     ray_error: tuple[str, str] | None = None) -> JobState:
    """A finished attempt's state: the trainer's result.json, else its exit code, else Ray's word."""
    result = read_result(handle.run_dir)
    if result is not None:
        return state_from_result(result)
    if outcome is None:  # the actor's answer is lost: the exit code it wrote down, if any
        pid_info = _read_pid_file(handle.run_dir)
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
    returncode = outcome.get("returncode")
    if outcome.get("timed_out"):
        limit = handle.info.get("time_limit_s")
        return JobState.failed(TIMEOUT, "hit the time limit (resources.time_min)" + (f" of {limit:g} s" if limit else ""))
    if returncode == EXIT_INTERRUPTED:
        return JobState.failed(PREEMPTED, "stopped at a checkpoint by a signal (exit 75)")
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return JobState.failed(KILLED, f"killed by {name}")
    if returncode == 0:
        return JobState.failed(ERROR, "exited 0 without writing result.json")
    last = last_log_line(handle.log_path)
    return JobState.failed(ERROR, f"exit code {returncode}" + (f": {last}" if last else ""))


def _classify_ray_error(ray: Any, err: BaseException) -> tuple[str, str]:
    """(failure class, message) for an attempt whose actor Ray reports dead."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    summary = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    if isinstance(err, ray.exceptions.RayActorError):
        if getattr(err, "actor_init_failed", False):  # e.g. the worker cannot import the orchestrator package
            return ERROR, f"the Ray actor could not start: {' '.join(lines)[:500]}"
        if getattr(err, "preempted", False):
            return PREEMPTED, f"the Ray node running the trial was drained (preempted): {summary}"
        detail = next((line for line in lines if "worker" in line.lower() or "node" in line.lower()), "")
        return KILLED, f"the Ray worker running the trial died: {summary}" + (f" ({detail[:200]})" if detail else "")
    if isinstance(err, ray.exceptions.RayTaskError):
        return ERROR, f"the Ray actor failed: {summary}"
    return KILLED, f"the Ray actor is unreachable: {summary}"


def _stop_local_leftover(handle: JobHandle, grace_s: float) -> None:
    """A trainer whose actor is gone but which still runs on this host (e.g. checkpointing after its
    worker died): SIGTERM, grace, SIGKILL. Other hosts' processes are out of reach (and PDEATHSIG ends them)."""
    info = _read_pid_file(handle.run_dir)
    if info.get("attempt") != handle.info.get("attempt") or info.get("hostname") != socket.gethostname():
        return
    if "outcome" in info or "pid" not in info:
        return
    identity = ProcessIdentity(int(info["pid"]), info.get("start_ticks"), info.get("boot_id"))
    if not identity.is_alive():
        return
    pgid = int(info.get("pgid", info["pid"]))
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and identity.is_alive():
        time.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
