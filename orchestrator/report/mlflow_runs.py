"""Reading a sweep's runs from MLflow: one search for the whole sweep, never one query per trial.

For the default local SQLite store the four tables the report needs are read with plain read-only
SQL (fast, and it never creates or migrates a store); anything unexpected there falls back to the
official `MlflowClient.search_runs`, which is also what other stores (a tracking server) use.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.mlflow_store import SWEEP_TAG, TRIAL_ID_TAG, quiet_mlflow_logs, sqlite_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowRun:
    """The parts of an MLflow run the report needs (decoupled from mlflow's entities)."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int
    tags: Mapping[str, str]
    metrics: Mapping[str, float]
    params: Mapping[str, str] | None = None  # None: not loaded (see MlflowFetch.params_of)


@dataclass
class MlflowFetch:
    runs_by_trial: dict[str, list[MlflowRun]]
    experiment_id: str | None = None
    error: str | None = None
    # Loads params for a few runs on demand (the direct SQLite read skips them: they are only
    # needed to check configs of runs from other code versions).
    params_loader: Callable[[list[str]], dict[str, dict[str, str]]] | None = None

    def params_of(self, runs: Sequence[MlflowRun]) -> dict[str, dict[str, str]]:
        out = {r.run_id: dict(r.params) for r in runs if r.params is not None}
        missing = [r.run_id for r in runs if r.params is None]
        if missing and self.params_loader is not None:
            try:
                out.update(self.params_loader(missing))
            except Exception as err:  # verification data unavailable: those runs are simply not used
                log.info("could not load MLflow params: %s", err)
        return out


@contextmanager
def _fail_fast_http():
    """A report must not hang for minutes on an unreachable server: few retries, short timeout."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    previous = {k: os.environ.get(k) for k in defaults}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)


def fetch_mlflow_runs(tracking_uri: str, experiment: str, page_size: int = 5000,
                      fast_sqlite: bool = True) -> MlflowFetch:
    """All active runs of `experiment` that carry a `trial_id` tag, grouped by trial id.

    One search for the whole sweep, never one query per trial. Never raises: an unreachable store
    is reported in `.error`. For a local SQLite store the runs are read with plain read-only SQL
    (see `read_sqlite_runs`); any surprise there falls back to MlflowClient.search_runs.
    """
    store = sqlite_path(tracking_uri)
    if store is not None and not store.exists():
        # Opening a missing SQLite store would create an empty one as a side effect of reading.
        return MlflowFetch({}, error=f"no MLflow store at {store}")
    if store is not None and fast_sqlite:
        try:
            return read_sqlite_runs(store, experiment)
        except (sqlite3.Error, _UnexpectedSchema) as err:
            log.info("reading %s directly failed (%s); using MlflowClient", store, err)
    return _search_with_client(tracking_uri, experiment, page_size)


class _UnexpectedSchema(Exception):
    pass


def read_sqlite_runs(path: Path, experiment: str) -> MlflowFetch:
    """The sweep's runs straight from MLflow's SQLite tables (experiments, runs, tags, latest_metrics).

    Why not MlflowClient.search_runs: it materializes every param, tag and metric as an ORM object
    (about 130,000 objects for 1,000 trial runs) and imports/initializes MLflow first: about 10 s
    on two cores, the whole report budget. These four tables have kept their shape since MLflow 1.x;
    if they ever do not, `_UnexpectedSchema` sends the caller to the official client.
    """
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        for table, columns in _SQLITE_COLUMNS.items():
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not columns <= present:
                raise _UnexpectedSchema(f"table {table} lacks {sorted(columns - present)}")
        found = conn.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                             (experiment,)).fetchall()
        if not found:
            return MlflowFetch({}, error=f"no MLflow experiment named {experiment!r} in sqlite:///{path}")
        if len(found) > 1:  # the same name in several workspaces: let MLflow pick the current one
            raise _UnexpectedSchema(f"{len(found)} experiments named {experiment!r}")
        experiment_id = found[0][0]
        in_sweep = ("FROM runs r WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND EXISTS "
                    "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = ? AND t.value != '')")
        info = conn.execute(f"SELECT r.run_uuid, r.status, r.start_time {in_sweep}",
                            (experiment_id, TRIAL_ID_TAG)).fetchall()
        tags: dict[str, dict[str, str]] = {run_id: {} for run_id, _, _ in info}
        metrics: dict[str, dict[str, float]] = {run_id: {} for run_id, _, _ in info}
        for run_id, key, value in conn.execute(
                f"SELECT t.run_uuid, t.key, t.value FROM tags t WHERE t.run_uuid IN (SELECT r.run_uuid {in_sweep})",
                (experiment_id, TRIAL_ID_TAG)):
            tags[run_id][key] = value
        for run_id, key, value, is_nan in conn.execute(
                "SELECT m.run_uuid, m.key, m.value, m.is_nan FROM latest_metrics m "
                f"WHERE m.run_uuid IN (SELECT r.run_uuid {in_sweep})", (experiment_id, TRIAL_ID_TAG)):
            metrics[run_id][key] = math.nan if is_nan else float(value)
    finally:
        conn.close()
    by_trial: dict[str, list[MlflowRun]] = {}
    for run_id, status, start_time in info:
        run = MlflowRun(run_id=run_id, experiment_id=str(experiment_id), status=status, start_time=start_time or 0,
                        tags=tags[run_id], metrics=metrics[run_id])
        by_trial.setdefault(run.tags[TRIAL_ID_TAG], []).append(run)
    return MlflowFetch(by_trial, experiment_id=str(experiment_id),
                       params_loader=lambda run_ids: read_sqlite_params(path, run_ids))


def read_sqlite_params(path: Path, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        for i in range(0, len(run_ids), 500):  # SQLite caps the number of bound variables
            chunk = list(run_ids[i:i + 500])
            marks = ",".join("?" * len(chunk))
            for run_id, key, value in conn.execute(
                    f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", chunk):
                out[run_id][key] = value
    finally:
        conn.close()
    return out


_SQLITE_COLUMNS = {
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
    "runs": {"run_uuid", "experiment_id", "status", "start_time", "lifecycle_stage"},
    "tags": {"key", "value", "run_uuid"},
    "latest_metrics": {"key", "value", "is_nan", "run_uuid"},
}


def _search_with_client(tracking_uri: str, experiment: str, page_size: int) -> MlflowFetch:
    quiet_mlflow_logs()
    try:
        with _fail_fast_http():
            from mlflow.tracking import MlflowClient  # heavy (about 1 s): only for stores SQL cannot read

            client = MlflowClient(tracking_uri=tracking_uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return MlflowFetch({}, error=f"no MLflow experiment named {experiment!r} in {tracking_uri}")
            runs: list[MlflowRun] = []
            token = None
            while True:
                page = client.search_runs([found.experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} != ''",
                                          max_results=page_size, page_token=token)
                runs.extend(_to_mlflow_run(run) for run in page)
                token = page.token
                if not token:
                    break
    except Exception as err:  # sqlalchemy, requests, MlflowException: all mean "fall back to disk"
        return MlflowFetch({}, error=f"MLflow unreachable at {tracking_uri}: {type(err).__name__}: {err}")
    by_trial: dict[str, list[MlflowRun]] = {}
    for run in runs:
        by_trial.setdefault(run.tags[TRIAL_ID_TAG], []).append(run)
    return MlflowFetch(by_trial, experiment_id=found.experiment_id)


def _to_mlflow_run(run) -> MlflowRun:
    return MlflowRun(run_id=run.info.run_id, experiment_id=run.info.experiment_id, status=run.info.status,
                     start_time=run.info.start_time or 0, tags=dict(run.data.tags), metrics=dict(run.data.metrics),
                     params=dict(run.data.params))


def pick_run(runs: Sequence[MlflowRun], sweep_name: str | None = None) -> MlflowRun | None:
    """The run that represents a trial when several carry its id (retries, a shared experiment):
    this sweep's own child first, then a finished one with metrics, then the most recent."""
    if not runs:
        return None
    return max(runs, key=lambda r: (r.tags.get(SWEEP_TAG) == sweep_name, r.status == "FINISHED", bool(r.metrics),
                                    r.start_time))
