"""The locks that keep two orchestrators from running the same work.

    <output_dir>/.orchestrator.lock   flock held by the one `orchestrator run` of a sweep
    <trial dir>/.claim.lock           flock held while a trial runs, by whichever sweep launched it

A trial's claim is flocked by the orchestrator that launched it and inherited by the trainer
process itself, so the claim outlives a killed orchestrator: no trial ever runs twice at once,
whichever sweep asks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SWEEP_LOCK_FILE = ".orchestrator.lock"
CLAIM_FILE = ".claim.lock"


class SweepAlreadyRunning(RuntimeError):
    def __init__(self, sweep: str, pid: int | None, host: str | None = None) -> None:
        where = f"pid {pid}" if pid else "pid unknown"
        if host and host != socket.gethostname():
            where += f" on {host}"
        super().__init__(f"sweep {sweep} is already running ({where})")
        self.sweep, self.pid = sweep, pid


class _FileLock:
    """An exclusive, non-blocking flock on a file that also records who holds it.

    flock locks belong to the open file description: they vanish when every descriptor is closed,
    including on SIGKILL, so a dead holder never leaves a stale lock behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def try_acquire(self, holder: Mapping[str, Any]) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(holder)).encode(), 0)
        self.fd = fd
        return True

    def release(self) -> None:
        # Close only, never LOCK_UN: an unlock would also release a child process that inherited
        # this descriptor (a trial's claim); closing our copy leaves the child's lock in place.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    @staticmethod
    def read_holder(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(Path(path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def is_locked(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's shared lock, if it got one
        return False


class SweepLock:
    """One `orchestrator run` per sweep: a second one fails with "sweep X is already running (pid N)"."""

    def __init__(self, output_dir: Path, sweep: str) -> None:
        self.sweep = sweep
        self._lock = _FileLock(Path(output_dir) / SWEEP_LOCK_FILE)

    def acquire(self) -> SweepLock:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "sweep": self.sweep}
        if not self._lock.try_acquire(holder):
            other = _FileLock.read_holder(self._lock.path)
            raise SweepAlreadyRunning(self.sweep, other.get("pid"), other.get("host"))
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def holder(output_dir: Path) -> dict[str, Any] | None:
        """Who runs the sweep now ({pid, host, since}), or None when nobody does."""
        path = Path(output_dir) / SWEEP_LOCK_FILE
        if not _FileLock.is_locked(path):
            return None
        return _FileLock.read_holder(path) or {"pid": None}


class TrialClaim:
    """The right to run one trial dir now, across sweeps and orchestrator restarts.

    `fd` is handed to the trainer process (`Backend.submit(keep_fds=...)`), so the claim lasts as
    long as either the orchestrator or the trainer is alive.
    """

    def __init__(self, run_dir: Path) -> None:
        self._lock = _FileLock(Path(run_dir) / CLAIM_FILE)

    @classmethod
    def try_acquire(cls, run_dir: Path, sweep: str) -> TrialClaim | None:
        claim = cls(run_dir)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "sweep": sweep}
        return claim if claim._lock.try_acquire(holder) else None

    @property
    def fd(self) -> int:
        assert self._lock.fd is not None, "claim already released"
        return self._lock.fd

    def release(self) -> None:
        self._lock.release()

    @staticmethod
    def holder(run_dir: Path) -> dict[str, Any] | None:
        path = Path(run_dir) / CLAIM_FILE
        return (_FileLock.read_holder(path) or {"pid": None}) if _FileLock.is_locked(path) else None
