"""The trial folder's contract: what `python -m trainer --out DIR` leaves in DIR and how it exits.

The one owner of these facts. The trainer writes them; the orchestrator (local, Slurm, Ray
backends, tracking, report, search) reads them through this module and nothing else. Torch-free,
so the orchestrator imports it without importing torch.

    DIR/config.yaml            the trial config the orchestrator wrote (input)
    DIR/config.resolved.yaml   the config after validation (the trainer's first write)
    DIR/trainer.log            stdout + stderr of the trainer (rank 0)
    DIR/trainer.pid            who runs the trial right now (written by the backend)
    DIR/checkpoint.pt          the latest resumable state (checkpoint.prev.pt: the one before)
    DIR/progress.jsonl         one line per intermediate evaluation: {"step": s, "metrics": {...}}
    DIR/metrics.jsonl          every point logged to MLflow: {"step": s, "timestamp": ms, "metrics": {...}}
    DIR/result.json            the verdict: `TrialResult`, written last and atomically
    DIR/mlflow_run_id          the MLflow run the trial logs to (kept across resumes)
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Literal

# -- file names ----------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
LOG_FILE = "trainer.log"
PID_FILE = "trainer.pid"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before: the fallback when the latest is unreadable
PROGRESS_FILE = "progress.jsonl"
METRICS_FILE = "metrics.jsonl"  # the local copy of every MLflow point, curves included
RESULT_FILE = "result.json"
RUN_ID_FILE = "mlflow_run_id"
TOKEN_PLOT_FILE = "token_interaction.png"
# The files a finished trial's MLflow run holds as artifacts (the trainer logs them; `sync` adds any
# the run lacks: logged while the server was down, or a trial reused from another sweep).
RUN_ARTIFACT_FILES = (RESOLVED_CONFIG_FILE, RESULT_FILE, TOKEN_PLOT_FILE)

# -- config keys that do not define a trial ------------------------------------------------------
# Where a trial logs (tracking) and what it is called (name) change no number it computes: two
# configs that differ only there are the same trial (same id, same folder, same result).
NON_IDENTITY_KEYS = frozenset({"tracking", "name"})
# How a trial runs (devices, compile, workers) may differ between attempts of the same trial: a
# resume on another machine is still the same trial.
RESUME_FREE_KEYS = NON_IDENTITY_KEYS | {"runtime"}

# Metrics measured on the hold-out of the training set (`data.val_fraction`) carry this prefix.
VALIDATION_PREFIX = "val/"

# -- exit codes ----------------------------------------------------------------------------------
EXIT_DONE = 0  # result.json says done (or the folder was finished already)
EXIT_FAILED = 1  # result.json says failed, with a failure class
EXIT_BAD_CONFIG = 2  # refused before any work: bad config or an --out folder that cannot be used
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; run again to resume

# -- failure classes -----------------------------------------------------------------------------
# The trainer writes nan/oom/error into result.json; backends add the rest.
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


def failure_from_exit(returncode: int | None, last_log_line: str = "") -> tuple[str, str]:
    """(failure class, message) for a trainer process that ended without writing result.json.

    `returncode` as `subprocess` reports it (negative: killed by that signal); None when nobody
    saw the exit (the process was not our child).
    """
    tail = f": {last_log_line}" if last_log_line else ""
    if returncode is None:
        return LOST, "the process ended while no orchestrator watched it, without result.json"
    if returncode == EXIT_INTERRUPTED:
        return PREEMPTED, f"stopped at a checkpoint by a signal (exit {EXIT_INTERRUPTED})"
    if returncode < 0:
        signum = -returncode
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        return KILLED, f"killed by {name}"
    if returncode == EXIT_DONE:
        return ERROR, "exited 0 without writing result.json"
    if returncode == EXIT_BAD_CONFIG:
        return ERROR, f"invalid trial config or output folder (exit {EXIT_BAD_CONFIG}){tail}"
    return ERROR, f"exit code {returncode}{tail}"


# -- result.json ---------------------------------------------------------------------------------
Status = Literal["done", "failed"]


@dataclass(frozen=True)
class TrialResult:
    """DIR/result.json. `metrics` are the final evaluation's (test split, and `val/...`)."""

    status: Status
    failure_class: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)  # the last logged training losses
    params: dict[str, Any] = field(default_factory=dict)  # parameter_report(...).as_dict()
    flops: float | None = None
    throughput_img_s: float | None = None
    wall_time_s: float | None = None  # training wall time, summed over resumes
    eval_time_s: float | None = None
    peak_memory_mb: float | None = None
    steps: int | None = None  # steps trained (a failed trial: the step it failed at)
    world_size: int | None = None
    device: str | None = None
    mlflow_run_id: str | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    @classmethod
    def failed(cls, failure_class: str, error: str | None, **known: Any) -> TrialResult:
        return cls(status="failed", failure_class=failure_class, error=error, **known)

    @classmethod
    def from_dict(cls, data: Any) -> TrialResult | None:
        """The result in `data`, or None when it is not a result (wrong shape, unknown status)."""
        if not isinstance(data, Mapping) or data.get("status") not in ("done", "failed"):
            return None
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "steps" not in values and isinstance(data.get("step"), int):  # failed results before the contract
            values["steps"] = data["step"]
        for name in ("metrics", "train", "params"):
            if not isinstance(values.get(name) or {}, Mapping):
                return None
            values[name] = dict(values.get(name) or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_result(run_dir: Path | str) -> TrialResult | None:
    """DIR/result.json, or None when it is absent, unreadable or not a result."""
    return TrialResult.from_dict(read_json(Path(run_dir) / RESULT_FILE))


def write_result(run_dir: Path | str, result: TrialResult) -> None:
    write_json_atomic(Path(run_dir) / RESULT_FILE, result.to_dict())


# -- durable files -------------------------------------------------------------------------------
def write_atomic(path: Path | str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Write via a temp file in the same folder, fsync it, rename it over `path`, fsync the folder:
    after a crash at any moment the file is the old version or the new one, never part of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems (e.g. some network mounts) do not fsync folders
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path | str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: Path | str, data: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True, default=str)))


def read_json(path: Path | str) -> Any | None:
    """The JSON in `path`, or None when it is absent or not JSON (a torn or foreign file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, a folder, unreadable; JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def append_jsonl(path: Path | str, record: Any) -> None:
    """One JSON line, appended and fsynced in one write: a reader sees whole lines (a torn last
    line only if the machine dies mid-write, which `read_jsonl` skips)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path | str) -> list[Any]:
    """Every whole JSON line of `path` ([] when absent); torn or foreign lines are skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, ValueError):
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_metric_points(run_dir: Path | str) -> list[tuple[str, float, int, int]]:
    """DIR/metrics.jsonl as (name, value, timestamp ms, step) points, in the order they were logged."""
    points = []
    for record in read_jsonl(Path(run_dir) / METRICS_FILE):
        if not (isinstance(record, Mapping) and isinstance(record.get("metrics"), Mapping)):
            continue
        step, timestamp = record.get("step"), record.get("timestamp")
        if not (isinstance(step, int) and isinstance(timestamp, int)):
            continue
        points += [(str(k), float(v), timestamp, step) for k, v in record["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return points
