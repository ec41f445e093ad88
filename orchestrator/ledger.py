"""A sweep's state on disk, and the locks that keep two orchestrators from running the same work.

Layout (all paths absolute, `<root>` is the project root, see `ProjectPaths`):

    <output_dir>/ledger.json          one JSON snapshot: every trial's state, attempts, job handle
    <output_dir>/.orchestrator.lock   flock held by the one `orchestrator run` of this sweep
    <root>/runs/trials/<trial_id>/    the trial's run dir, SHARED by every sweep (see below)
        config.yaml  trainer.log  trainer.pid  result.json  checkpoint.pt  .claim.lock

Crash consistency: the ledger is rewritten whole to a temp file, fsynced, then `os.replace`d over
the old one (and the directory fsynced), so a crash at any moment leaves the old or the new
snapshot, never a mix. Leftover temp files are ignored. The ledger is a cache of what the
orchestrator did; the truth about a trial's outcome is its `result.json`, which the runner
re-reads on every start.

Shared trial store: a trial's id hashes its resolved config and the trainer's code
(`orchestrator.identity`), so two sweeps that ask for the same trial get the same run dir. The
second sweep finds `result.json` done and reuses it instead of training again. While a trial runs,
its `.claim.lock` is flocked by the orchestrator that launched it and inherited by the trainer
process itself, so the claim outlives a killed orchestrator: no trial ever runs twice at once,
whichever sweep asks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

LEDGER_FILE = "ledger.json"
SWEEP_LOCK_FILE = ".orchestrator.lock"
CLAIM_FILE = ".claim.lock"
ROOT_ENV = "CLS_ABLATION_ROOT"
LEDGER_VERSION = 1

TrialState = Literal["planned", "running", "done", "failed", "cancelled", "pruned"]  # pruned: by a search
TRIAL_STATES: tuple[TrialState, ...] = ("planned", "running", "done", "failed", "cancelled", "pruned")


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectPaths:
    """Where shared things live: the trial store, the default MLflow store, reports.

    The root is `$CLS_ABLATION_ROOT` when set (tests, several checkouts sharing one store),
    otherwise the checkout that holds this package.
    """

    root: Path

    @classmethod
    def discover(cls, root: Path | str | None = None) -> ProjectPaths:
        if root is None:
            root = os.environ.get(ROOT_ENV) or Path(__file__).resolve().parents[1]
        return cls(Path(root).resolve())

    @property
    def trials_dir(self) -> Path:
        return self.root / "runs" / "trials"

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def resolve(self, path: Path | str) -> Path:
        """A spec's relative path (output_dir, report output) is relative to the project root."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Temp file in the same directory + fsync + rename + fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, indent=1, sort_keys=True, default=str).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------------------------
# Ledger
# ----------------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    trial_id: str
    label: str = ""
    cell: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    state: TrialState = "planned"
    failure_class: str | None = None
    error: str | None = None
    attempts: int = 0  # launches, whatever their end
    failures: int = 0  # attempts that failed: what the retry budget counts
    started_at: float | None = None
    ended_at: float | None = None
    job: dict[str, Any] | None = None  # the backend's JobHandle.to_dict() while running
    run_dir: str | None = None
    log_path: str | None = None
    mlflow_run_id: str | None = None
    in_plan: bool = True  # False once the spec no longer asks for it ("gone")
    reused: bool = False  # done by another sweep (or earlier run) in the shared store, not trained here
    note: str | None = None  # why it waits, e.g. "claimed by another orchestrator"
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished attempt

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def wall_time_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None and self.state != "running" else time.time()
        return max(0.0, end - self.started_at)


class Ledger:
    """The sweep's trials and their states; every mutation is saved before it returns.

    Only the holder of the sweep's `SweepLock` writes; anyone may read (snapshots are atomic).
    """

    def __init__(self, path: Path, trials: dict[str, TrialRecord] | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.trials: dict[str, TrialRecord] = trials or {}
        self.meta: dict[str, Any] = meta or {}

    @classmethod
    def for_sweep(cls, output_dir: Path) -> Ledger:
        return cls.load(Path(output_dir) / LEDGER_FILE)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except json.JSONDecodeError as err:
            # Cannot come from our own writes (atomic rename); a hand edit or a broken disk can.
            raise LedgerError(f"{path} is not valid JSON ({err}); fix or delete it") from None
        if data.get("version", LEDGER_VERSION) > LEDGER_VERSION:
            raise LedgerError(f"{path} was written by a newer orchestrator (version {data['version']})")
        trials = {tid: TrialRecord.from_dict(rec) for tid, rec in data.get("trials", {}).items()}
        return cls(path, trials, data.get("meta", {}))

    def save(self) -> None:
        self.meta["updated_at"] = time.time()
        write_json_atomic(self.path, {
            "version": LEDGER_VERSION,
            "meta": self.meta,
            "trials": {tid: asdict(rec) for tid, rec in self.trials.items()},
        })

    @property
    def exists(self) -> bool:
        return self.path.exists()

    # -- queries ----------------------------------------------------------------------------------
    def __contains__(self, trial_id: str) -> bool:
        return trial_id in self.trials

    def __iter__(self) -> Iterator[TrialRecord]:
        return iter(self.trials.values())

    def get(self, trial_id: str) -> TrialRecord | None:
        return self.trials.get(trial_id)

    def in_state(self, *states: TrialState) -> list[TrialRecord]:
        return [r for r in self.trials.values() if r.state in states]

    def counts(self, in_plan_only: bool = True) -> Counter[str]:
        counts: Counter[str] = Counter({state: 0 for state in TRIAL_STATES})
        counts.update(r.state for r in self.trials.values() if r.in_plan or not in_plan_only)
        return counts

    # -- mutations (each one saved) ---------------------------------------------------------------
    def add(self, record: TrialRecord) -> TrialRecord:
        self.trials[record.trial_id] = record
        self.save()
        return record

    def update(self, trial_id: str, **changes: Any) -> TrialRecord:
        record = self.trials[trial_id]
        for key, value in changes.items():
            if not hasattr(record, key):
                raise AttributeError(f"TrialRecord has no field {key!r}")
            setattr(record, key, value)
        self.save()
        return record

    def mark_running(self, trial_id: str, job: Mapping[str, Any], run_dir: Path, log_path: Path,
                     mlflow_run_id: str | None = None) -> TrialRecord:
        record = self.trials[trial_id]
        return self.update(trial_id, state="running", job=dict(job), run_dir=str(run_dir), log_path=str(log_path),
                           attempts=record.attempts + 1, started_at=time.time(), ended_at=None, note=None,
                           failure_class=None, error=None, reused=False,
                           mlflow_run_id=mlflow_run_id or record.mlflow_run_id)

    def mark_finished(self, trial_id: str, state: TrialState, failure_class: str | None = None,
                      error: str | None = None, counts_as_failure: bool = False) -> TrialRecord:
        """End the current attempt; its summary goes to `history`."""
        record = self.trials[trial_id]
        now = time.time()
        if record.job is not None:
            record.history.append({"attempt": record.attempts, "state": state, "failure_class": failure_class,
                                   "error": error, "started_at": record.started_at, "ended_at": now,
                                   "job_id": record.job.get("job_id")})
        return self.update(trial_id, state=state, failure_class=failure_class, error=error, ended_at=now, job=None,
                           failures=record.failures + (1 if counts_as_failure else 0))


class LedgerError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------
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
