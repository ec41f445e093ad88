"""The actor of one attempt: lives on a Ray worker and runs `python -m trainer` there as a subprocess.

Ray imports this module on the worker (the class travels by reference), so it imports no ray at
module level and nothing the worker would not have.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.backends.process import ProcessIdentity, log_header, signal_group, trainer_argv
from orchestrator.store import TrialDir

TRAINER_LOCK = ".trainer.lock"  # held by the running trainer (inherited fd): one trainer per run dir


class TrialProcess:
    """One attempt of one trial on a Ray worker (wrapped by `ray.remote` at submit time).

    Threaded (max_concurrency > 1): `result()` blocks for the whole attempt while `stop()` and
    `status()` answer concurrently.
    """

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        self.trial_dir = TrialDir(Path(job["run_dir"]))
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
                    "error": f"another trainer still holds {self.trial_dir.file(TRAINER_LOCK)}"}
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
        self.trial_dir.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.trial_dir.file(TRAINER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
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
        info = self.trial_dir.read_pid()
        identity = ProcessIdentity.from_info(info)
        if info.get("hostname") != socket.gethostname() or identity is None or not identity.is_alive():
            return False
        signal_group(int(info.get("pgid", info["pid"])), signal.SIGKILL)
        return True

    def _start(self, lock_fd: int) -> subprocess.Popen:
        argv = trainer_argv(self.job.get("command"), self.trial_dir.path)
        env = {**os.environ, **self.job.get("env", {})}  # the worker's own env carries Ray's GPU assignment
        cwd = self.job.get("cwd")
        cwd = cwd if cwd and os.path.isdir(cwd) else None
        host = socket.gethostname()
        with open(self.trial_dir.log_path, "ab") as log:
            log_header(log, f"orchestrator (ray actor {self.job['actor']} on {host}, worker pid {os.getpid()})", argv)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True, pass_fds=(lock_fd,),
                                    preexec_fn=_die_with_parent())
        self._proc = proc
        self._started.set()
        self.trial_dir.write_pid({
            **ProcessIdentity.of(proc.pid).info(), "hostname": host, "worker_pid": os.getpid(),
            "attempt": self.job["attempt"], "actor": self.job["actor"], "node_id": self.job.get("node_id"),
            "argv": argv, "started_at": time.time(),
        })
        return proc

    def _record_exit(self, outcome: Mapping[str, Any]) -> None:
        """The exit code beside the pid, so a later orchestrator knows how the attempt ended."""
        info = self.trial_dir.read_pid()
        if info.get("attempt") not in (None, self.job["attempt"]):
            return  # a newer attempt owns the file now
        info.update({"attempt": self.job["attempt"], "actor": self.job["actor"], "outcome": dict(outcome)})
        try:
            self.trial_dir.write_pid(info)
        except OSError:
            pass

    def _expire_later(self, linger_s: float) -> None:
        """A detached actor nobody collects (its orchestrator is gone) frees its resources by itself."""
        def expire() -> None:
            time.sleep(linger_s)
            try:
                import ray  # on the worker, where ray is loaded already; the module must not need it

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


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: SIGTERM the trainer when the thread that started it dies (the Ray worker was killed).

    The trainer then checkpoints at its next step and exits; without this it would train on,
    unsupervised and unaccounted for, and collide with the retry."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
