"""MLflow logging for one trial, off the training loop.

Every point is appended to `DIR/metrics.jsonl` first (the local copy that `orchestrator sync`
compares with MLflow's history), then handed to a background thread that ships it. The training
loop never waits on MLflow: while the server is unreachable the thread drops what it cannot ship
and tries again a little later; the points stay on disk and `sync` (or the next `run`) logs the
missing ones. HTTP calls are bounded (timeout, few retries), so an outage costs seconds at the end
of a trial, not minutes. The run id is kept in `DIR/mlflow_run_id`, so a resumed trial continues
its run instead of opening a second one.
"""

from __future__ import annotations

import fcntl
import math
import os
import queue
import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from trainer.config import TrackingConfig
from trainer.contract import METRICS_FILE, RUN_ID_FILE, append_jsonl, write_text_atomic

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

T = TypeVar("T")

# An unreachable server fails a call within seconds (defaults; the environment may override them).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
OFFLINE_RETRY_S = 10.0  # after a failed call, how long the shipper drops work before trying again
FLUSH_TIMEOUT_S = 15.0  # how long a finishing trial waits for the shipper
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """A trial config as MLflow params: flattened, values as text, without the `tracking` section
    (where a trial logs is no parameter of it). The orchestrator's sync writes the same params."""
    return {k: ("" if v is None else str(v))[:MAX_PARAM_CHARS] for k, v in flatten(dict(config)).items()
            if k.split(".")[0] != "tracking"}


def sqlite_path(uri: str) -> Path | None:
    """The file of a local SQLite store, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root_for(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of in the current directory."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def prepare_sqlite_store(uri: str) -> None:
    """Create a local SQLite store's schema once, under a file lock beside it: MLflow's migration
    races when several processes open a fresh store at once ("duplicate column name"). Also turns
    on WAL journaling, so readers (the UI, polling) never block writers. No-op for other stores."""
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient  # heavy: only a process that logs pays for it

    with _file_lock(path.with_name(path.name + ".lock")):
        try:
            with sqlite3.connect(path, timeout=30) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as err:  # busy right now: WAL is an optimization, not a need
            warnings.warn(f"could not switch {path} to WAL journaling: {err}", stacklevel=2)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # migrates the schema


def open_client(uri: str) -> MlflowClient:
    """An MLflow client whose HTTP calls are bounded in time, on a store that exists."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient  # as above

    prepare_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def _retryable(err: Exception) -> bool:
    # Parallel trials on one SQLite file meet "database is locked"; anything else (a refused
    # connection, a timeout) means the store is away: retrying at once would only block.
    return "locked" in str(err).lower()


class Tracker:
    """One trial's MLflow run, shipped by a background thread; a no-op off the main process.

    The loop calls start / log_metrics / log_artifact / set_tags / finish; only `finish` waits
    (at most FLUSH_TIMEOUT_S) for the thread. With tracking disabled, points still go to
    DIR/metrics.jsonl: a sweep that reuses the trial can log them later.
    """

    def __init__(self, cfg: TrackingConfig, out_dir: Path, enabled: bool = True, attempts: int = 5) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.local = enabled  # the main process keeps the local points
        self.enabled = enabled and cfg.enabled
        self.attempts = attempts
        self.run_id: str | None = None
        self.client: MlflowClient | None = None
        self._config: dict[str, Any] | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._offline_until = 0.0
        self._warned = False

    # -- the loop's side ---------------------------------------------------------------------------
    def start(self, config: dict[str, Any]) -> str | None:
        """Queue the run's creation (or resumption); returns the run id when it is known already."""
        if not self.enabled:
            return None
        run_file = self.out_dir / RUN_ID_FILE
        # The orchestrator's run id wins: trial folders are shared by sweeps, each with its own runs.
        known = self.cfg.run_id or (run_file.read_text().strip() if run_file.exists() else None)
        if known:
            self.run_id = known
            if not run_file.exists() or run_file.read_text().strip() != known:
                write_text_atomic(run_file, known)
        self._config = config
        self._thread = threading.Thread(target=self._ship, name="mlflow-shipper", daemon=True)
        self._thread.start()
        self._submit(lambda: None)  # opens (or resumes) the run
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        self._submit(lambda: self._log_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.local:
            return
        values = {k.replace("@", "_"): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if not values:
            return
        timestamp, step = int(time.time() * 1000), int(step or 0)
        append_jsonl(self.out_dir / METRICS_FILE, {"step": step, "timestamp": timestamp, "metrics": values})
        self._submit(lambda: self._log_metrics(values, timestamp, step))

    def log_artifact(self, path: Path) -> None:
        if Path(path).exists():
            self._submit(lambda: self.client.log_artifact(self.run_id, str(path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit(lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED (preempted / stopped, to be resumed). Waits at most
        FLUSH_TIMEOUT_S for what is queued; anything left is on disk for `orchestrator sync`."""
        if self._thread is None:
            return
        self._submit(lambda: self.client.set_terminated(self.run_id, status=status))
        self._jobs.put(None)
        self._thread.join(FLUSH_TIMEOUT_S)
        if self._thread.is_alive():
            warnings.warn(f"MLflow did not take the last points within {FLUSH_TIMEOUT_S:.0f} s; they are in "
                          f"{self.out_dir / METRICS_FILE} for `orchestrator sync`", stacklevel=2)
        self._thread = None

    def _submit(self, job: Callable[[], Any]) -> None:
        if self.enabled and self._thread is not None:
            self._jobs.put(job)

    # -- the shipping thread -----------------------------------------------------------------------
    def _ship(self) -> None:
        while (job := self._jobs.get()) is not None:
            if time.monotonic() < self._offline_until:
                continue  # the store is away: the points are on disk, `sync` logs them later
            try:
                if self._open_run():
                    self._call(job)
            except Exception as err:  # MLflow raises many types (sqlalchemy, requests, MlflowException)
                self._offline_until = time.monotonic() + OFFLINE_RETRY_S
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"MLflow unreachable, training goes on (points kept in "
                                  f"{self.out_dir / METRICS_FILE}): {err}", stacklevel=1)

    def _call(self, fn: Callable[[], T]) -> T:
        delay = 0.2
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as err:  # as above
                if attempt == self.attempts - 1 or not _retryable(err):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _open_run(self) -> bool:
        """Create (or resume) the run on the first job that reaches the store."""
        if self.client is not None:
            return True
        uri = self.cfg.tracking_uri or default_tracking_uri()
        client = self._call(lambda: open_client(uri))
        if self.run_id:
            self._call(lambda: client.update_run(self.run_id, status="RUNNING"))
            self.client = client
            return True
        experiment_id = self._call(lambda: self._experiment_id(client, self.cfg.experiment, uri))
        tags = dict(self.cfg.tags)
        if self.cfg.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        run = self._call(lambda: client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags))
        self.client, self.run_id = client, run.info.run_id
        write_text_atomic(self.out_dir / RUN_ID_FILE, self.run_id)
        self._log_params(config_params(self._config or {}))
        return True

    @staticmethod
    def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_root_for(uri))
        except Exception:  # created meanwhile by a parallel trial
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # as above: mlflow only when logging

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def _log_metrics(self, values: dict[str, float], timestamp: int, step: int) -> None:
        from mlflow.entities import Metric  # as above

        # The local point's own timestamp: a point logged twice is the same row (MLflow keeps one).
        items = [Metric(k, v, timestamp, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self._call(lambda chunk=items[i:i + 1000]: self.client.log_batch(self.run_id, metrics=chunk))
