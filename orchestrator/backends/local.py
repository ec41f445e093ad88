"""Trials as local subprocesses: `python -m trainer --config DIR/config.yaml --out DIR`.

Each trial runs in its own session (so its own process group: Ctrl-C in the terminal reaches the
orchestrator only, which then stops trials deliberately, and a cancel reaches the trainer's
data-loader workers too), logs to `DIR/trainer.log` (appended, one header per attempt), and gets
`cpus_per_trial` threads through OMP/MKL variables so parallel trials do not oversubscribe cores.

A trial outlives a SIGKILLed orchestrator. `DIR/trainer.pid` records pid, process group and the
kernel's start time of the process; `reattach` accepts a pid only if all of them still match, so a
recycled pid is never mistaken for the trial (nor killed by a cancel).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
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
    Backend,
    BackendError,
    JobHandle,
    JobState,
    JobStatus,
    read_result,
    state_from_result,
)

if TYPE_CHECKING:
    from orchestrator.spec import TrialPlan

PID_FILE = "trainer.pid"
COMMAND_ENV = "ORCHESTRATOR_TRAINER_COMMAND"  # replaces `python -m trainer` (a wrapper, a profiler, a test double)
EXIT_INTERRUPTED = 75  # the trainer's "stopped at a checkpoint by a signal, run again to resume"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus what makes it unique over time: its start time (clock ticks since boot) and the boot."""

    pid: int
    start_ticks: int | None
    boot_id: str | None

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, _start_ticks(pid), _boot_id())

    def is_alive(self) -> bool:
        """Still this very process, and not a zombie."""
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            if Path("/proc").is_dir():
                return False
            try:  # no procfs (macOS): the best available check
                os.kill(self.pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        state, start_ticks = stat
        if state in ("Z", "X"):
            return False
        return self.start_ticks is None or start_ticks == self.start_ticks


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])  # state (field 3), starttime (field 22)


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def last_log_line(log_path: Path, max_bytes: int = 4096) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


@register_backend("local")
class LocalBackend(Backend):
    """Up to `max_parallel` trainer subprocesses on this machine.

    options: `command` (argv list or string; default `$ORCHESTRATOR_TRAINER_COMMAND`, else
    `python -m trainer`; the backend appends `--config DIR/config.yaml --out DIR`), `grace_s` (seconds
    between SIGTERM and SIGKILL on cancel; the trainer checkpoints at the next step on SIGTERM),
    `env` (extra environment variables). resources: `cpus_per_trial` (default: cores / max_parallel).
    """

    def __init__(self, max_parallel: int = 1, resources: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, *, command: Sequence[str] | str | None = None,
                 cpus_per_trial: int | None = None, grace_s: float | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(max_parallel, resources, options)
        command = command if command is not None else (self.options.get("command") or os.environ.get(COMMAND_ENV))
        if isinstance(command, str):
            command = shlex.split(command)
        self.command: list[str] = list(command) if command else [sys.executable, "-m", "trainer"]
        cpus = cpus_per_trial or self.resources.get("cpus_per_trial") or self.resources.get("cpus")
        self.cpus_per_trial = int(cpus) if cpus else max(1, (os.cpu_count() or 1) // max_parallel)
        self.grace_s = float(grace_s if grace_s is not None else self.options.get("grace_s", 30.0))
        self.extra_env = {str(k): str(v) for k, v in {**self.options.get("env", {}), **(env or {})}.items()}
        self._children: dict[str, subprocess.Popen] = {}  # job_id -> our own child processes
        self._adopted: dict[str, ProcessIdentity] = {}  # job_id -> processes reattached after a restart

    # -- submit -----------------------------------------------------------------------------------
    def submit(self, trial: TrialPlan, run_dir: Path, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        if self.free_slots <= 0:
            raise BackendError(f"local backend is full ({self.active}/{self.max_parallel} trials running)")
        run_dir = Path(run_dir)
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise BackendError(f"{config} does not exist: write the trial config before submitting")
        log_path = run_dir / LOG_FILE
        argv = [*self.command, "--config", str(config), "--out", str(run_dir)]
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== {stamp} orchestrator: {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._child_env(), start_new_session=True, pass_fds=tuple(keep_fds),
            )
        identity = ProcessIdentity.of(proc.pid)
        info = {"pid": proc.pid, "pgid": proc.pid, "start_ticks": identity.start_ticks, "boot_id": identity.boot_id,
                "hostname": os.uname().nodename, "argv": argv}
        _write_json_atomic(run_dir / PID_FILE, info)
        job_id = str(proc.pid)
        self._children[job_id] = proc
        return JobHandle(trial_id=trial.trial_id, backend=self.name, job_id=job_id, run_dir=run_dir,
                         log_path=log_path, info=info)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self.cpus_per_trial)
        env.update({name: threads for name in THREAD_VARIABLES})
        env["ORCHESTRATOR_CPUS_PER_TRIAL"] = threads
        env["PYTHONUNBUFFERED"] = "1"  # the log file shows progress as it happens
        env.update(self.extra_env)
        return env

    # -- poll -------------------------------------------------------------------------------------
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        for handle in handles:
            states[handle.trial_id] = self._poll_one(handle)
        return states

    def _poll_one(self, handle: JobHandle) -> JobState:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            returncode = proc.poll()
            if returncode is None:
                return JobState(JobStatus.RUNNING)
            del self._children[handle.job_id]
            return self._finished_state(handle, returncode)
        identity = self._adopted.get(handle.job_id)
        if identity is not None:
            if identity.is_alive():
                return JobState(JobStatus.RUNNING)
            del self._adopted[handle.job_id]
            return self._finished_state(handle, None)  # not our child: its exit code is gone
        return self._finished_state(handle, None)

    @staticmethod
    def _finished_state(handle: JobHandle, returncode: int | None) -> JobState:
        result = read_result(handle.run_dir)
        if result is not None:
            return state_from_result(result)  # the trainer's own verdict wins
        if returncode is None:
            return JobState.failed(LOST, "the process ended while no orchestrator watched it, without result.json")
        if returncode == EXIT_INTERRUPTED:
            return JobState.failed(PREEMPTED, "stopped at a checkpoint by a signal (exit 75)")
        if returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
            return JobState.failed(KILLED, f"killed by {name}")
        last = last_log_line(handle.log_path)
        if returncode == 0:
            return JobState.failed(ERROR, "exited 0 without writing result.json")
        return JobState.failed(ERROR, f"exit code {returncode}" + (f": {last}" if last else ""))

    @property
    def active(self) -> int:
        return len(self._children) + len(self._adopted)

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, handle: JobHandle) -> None:
        self.cancel_many([handle])

    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """SIGTERM every job's process group at once, wait up to `grace_s`, then SIGKILL the rest."""
        grace = self.grace_s if grace_s is None else grace_s
        targets = [(h, pgid) for h in handles if (pgid := self._live_group(h)) is not None]
        for _, pgid in targets:
            signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(self._is_running(h) for h, _ in targets):
            time.sleep(0.05)
        for handle, pgid in targets:
            signal_group(pgid, signal.SIGKILL)  # also reaps stragglers (data-loader workers)
            self._wait_gone(handle)
        for handle in handles:
            self._children.pop(handle.job_id, None)
            self._adopted.pop(handle.job_id, None)

    def _live_group(self, handle: JobHandle) -> int | None:
        """The job's process group if it is still ours to signal (never a recycled pid's)."""
        pgid = int(handle.info.get("pgid", handle.job_id))
        if handle.job_id in self._children:
            return pgid if self._children[handle.job_id].poll() is None else None
        identity = self._adopted.get(handle.job_id) or _identity_from(handle.info)
        return pgid if identity is not None and identity.is_alive() else None

    def _is_running(self, handle: JobHandle) -> bool:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            return proc.poll() is None
        identity = self._adopted.get(handle.job_id) or _identity_from(handle.info)
        return identity is not None and identity.is_alive()

    def _wait_gone(self, handle: JobHandle, timeout: float = 10.0) -> None:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._is_running(handle):
            time.sleep(0.05)

    # -- reattach ---------------------------------------------------------------------------------
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        handle = JobHandle.from_dict(handle_dict)
        if handle.info.get("hostname") not in (None, os.uname().nodename):
            return None  # another machine's process: not ours to watch
        identity = _identity_from(handle.info)
        if identity is None or not identity.is_alive():
            return None
        try:  # the pid file must name this very process too (same pid and start time)
            on_disk = json.loads((handle.run_dir / PID_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if on_disk.get("pid") != identity.pid or on_disk.get("start_ticks") != identity.start_ticks:
            return None
        self._adopted[handle.job_id] = identity
        return handle

    def close(self) -> None:
        self._children.clear()
        self._adopted.clear()


def _identity_from(info: Mapping[str, Any]) -> ProcessIdentity | None:
    if "pid" not in info:
        return None
    return ProcessIdentity(int(info["pid"]), info.get("start_ticks"), info.get("boot_id"))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
