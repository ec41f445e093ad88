"""A sweep's state on disk: `<output_dir>/ledger.json`, one snapshot of every trial's state,
attempts and job handle.

Crash consistency: the ledger is rewritten whole through `trainer.contract.write_json_atomic`
(temp file, fsync, rename, folder fsync), so a crash at any moment leaves the old or the new
snapshot, never a mix. The ledger is a cache of what the orchestrator did; the truth about a
trial's outcome is its `result.json` in the shared trial store (`orchestrator.store`), which the
runner re-reads on every start. Only the holder of the sweep's lock (`orchestrator.locks`) writes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from trainer.contract import write_json_atomic

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1

TrialState = Literal["planned", "running", "done", "failed", "cancelled", "pruned"]  # pruned: by a search
TRIAL_STATES: tuple[TrialState, ...] = ("planned", "running", "done", "failed", "cancelled", "pruned")


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
        """The ledger in `path` (empty when there is none); LedgerError naming the file and the fix
        when it is not one. Our own writes are atomic, so only a hand edit or a broken disk gets here."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return cls(path)
        except OSError as err:
            raise LedgerError(path, f"cannot be read ({err.strerror or err})",
                              fix="make it a readable file, or move it aside") from None
        except UnicodeDecodeError:
            raise LedgerError(path, "is not text (binary garbage)") from None
        except json.JSONDecodeError as err:
            raise LedgerError(path, f"is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise LedgerError(path, f"holds {_type_name(type(data))}, not an object with `trials`")
        version = data.get("version", LEDGER_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise LedgerError(path, f"version: expected an integer, got {version!r}")
        if version > LEDGER_VERSION:
            raise LedgerError(path, f"was written by a newer orchestrator (version {version})",
                              fix="run this sweep with that orchestrator's checkout")
        trials, meta = data.get("trials", {}), data.get("meta", {})
        if not isinstance(trials, dict):
            raise LedgerError(path, f"trials: expected an object of trial id -> record, got {_type_name(type(trials))}")
        if not isinstance(meta, dict):
            raise LedgerError(path, f"meta: expected an object, got {_type_name(type(meta))}")
        records = {}
        for trial_id, record in trials.items():
            problem = record_problem(record)
            if problem:
                raise LedgerError(path, f"trials.{trial_id}{problem}")
            records[trial_id] = TrialRecord.from_dict(record)
        return cls(path, records, meta)

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


# The trial store keeps every finished result and the runner re-reads it on each start, so a lost
# ledger costs nothing but the attempt history.
REBUILD_FIX = "delete it (or move it aside); the next run rebuilds it from the trial store"


class LedgerError(RuntimeError):
    """A ledger file that cannot be used, as one line: the file, what is wrong, the safe fix."""

    def __init__(self, path: Path, problem: str, fix: str = REBUILD_FIX) -> None:
        super().__init__(f"ledger {path}: {problem}; {fix}")
        self.path, self.problem, self.fix = Path(path), problem, fix


RECORD_TYPES = get_type_hints(TrialRecord)  # field -> annotation, resolved once


def record_problem(record: Any) -> str:
    """What is wrong with one ledger record (`: ...` or `.field: ...`, to follow its key path); ''."""
    if not isinstance(record, dict):
        return f": expected an object (a trial record), got {_type_name(type(record))}"
    if "trial_id" not in record:
        return ": no trial_id"
    for name, value in record.items():
        if name in RECORD_TYPES and not _has_type(value, RECORD_TYPES[name]):
            return f".{name}: expected {_type_name(RECORD_TYPES[name])}, got {value!r:.60}"
    return ""


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a TrialRecord field's annotation (containers checked shallowly)."""
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if hint is Any:
        return True
    if isinstance(value, bool) and hint is not bool:  # JSON true is no count and no time
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object",
             list: "a list", type(None): "null"}
    return names.get(get_origin(hint) or hint, str(hint))


