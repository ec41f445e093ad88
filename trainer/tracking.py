"""MLflow logging for one trial.

The run id is kept in `DIR/mlflow_run_id`, so a resumed trial continues its run instead of
opening a second one. Tracking never kills training: calls are retried with back-off (parallel
trials on one SQLite file can meet "database is locked"), then given up with a warning. The
results on disk stay the source of truth; `orchestrator sync` fills what MLflow missed.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

from trainer.config import TrackingConfig
from trainer.contract import RUN_ID_FILE, write_text_atomic

T = TypeVar("T")


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


MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """A trial config as MLflow params: flattened, values as text, without the `tracking` section
    (where a trial logs is no parameter of it). The orchestrator's sync writes the same params."""
    return {k: ("" if v is None else str(v))[:MAX_PARAM_CHARS] for k, v in flatten(dict(config)).items()
            if k.split(".")[0] != "tracking"}


def artifact_root_for(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of in the current directory."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return (Path(path).parent / "mlartifacts").resolve().as_uri() if path and path != ":memory:" else None


class Tracker:
    """A thin MLflow client for one run; a no-op when disabled or off the main process."""

    def __init__(self, cfg: TrackingConfig, out_dir: Path, enabled: bool = True, attempts: int = 8) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.enabled = enabled and cfg.enabled
        self.attempts = attempts
        self.run_id: str | None = None
        self.client = None

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        delay = 0.2
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as err:  # MLflow raises many types (sqlalchemy, requests, MlflowException)
                if attempt == self.attempts - 1:
                    warnings.warn(f"MLflow {what} failed after {self.attempts} attempts, continuing: {err}", stacklevel=2)
                    return None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 10.0)
        return None

    def start(self, config: dict[str, Any]) -> str | None:
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient  # mlflow is heavy: only a trial that logs pays for it

        uri = self.cfg.tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        run_file = self.out_dir / RUN_ID_FILE
        # The orchestrator's run id wins: trial folders are shared by sweeps, each with its own runs.
        known = self.cfg.run_id or (run_file.read_text().strip() if run_file.exists() else None)
        if known:
            self.run_id = known
            self._call("resume", lambda: self.client.update_run(known, status="RUNNING"))
            if not run_file.exists() or run_file.read_text().strip() != known:
                write_text_atomic(run_file, known)
            return known

        experiment_id = self._call("experiment", lambda: self._experiment_id(self.cfg.experiment, uri))
        if experiment_id is None:
            self.enabled = False
            return None
        tags = dict(self.cfg.tags)
        if self.cfg.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        run = self._call("create_run", lambda: self.client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags))
        if run is None:
            self.enabled = False
            return None
        self.run_id = run.info.run_id

        write_text_atomic(run_file, self.run_id)
        self.log_params(config_params(config))
        return self.run_id

    def _experiment_id(self, name: str, uri: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root_for(uri))
        except Exception:  # created meanwhile by a parallel trial
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    # -- logging --------------------------------------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Param  # as above: mlflow only when logging

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log_params", lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Metric  # as above: mlflow only when logging

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self._call("log_metrics", lambda chunk=items[i:i + 1000]: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, path: Path) -> None:
        if self.enabled and self.run_id and Path(path).exists():
            self._call("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            for k, v in tags.items():
                self._call("set_tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED (preempted / stopped, to be resumed)."""
        if self.enabled and self.run_id:
            self._call("terminate", lambda: self.client.set_terminated(self.run_id, status=status))
