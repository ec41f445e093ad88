"""MLflow for a sweep: one experiment per sweep, one parent run per sweep, one child run per trial.

Identity rules that keep runs unique across retries, restarts and re-runs:
- the parent is found again by tags `sweep_role=parent` + `sweep_name` in the sweep's experiment
  (its id is also kept in the ledger); a changed spec updates the parent's `sweep_spec_hash` tag
  instead of opening a second parent, because it is still the same sweep (same ledger, same dir);
- a child is found by tags `trial_id` + `mlflow.parentRunId`; the runner passes an existing child's
  id to the trainer (`tracking.run_id`), so a resumed or retried trial continues its run;
- a tuned sweep (spec `search:`) adds one run per cell between the two (tags `sweep_role=cell` +
  `cell_key`): every search trial and final trial of the cell is its child;
- `sync` writes what MLflow lacks for finished trials (a child for a trial reused from another
  sweep's store, final metrics a crashed trainer never logged) and never creates a second child.

Concurrency on the default SQLite store: the store is created (schema migrated) by the runner
before any trainer starts, and switched to WAL journaling so readers (the UI, polling) never block
writers; MLflow itself sets a 20 s busy timeout, and the trainer retries with back-off.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from orchestrator.backends.base import read_result

from trainer.tracking import flatten  # the trainer logs params flattened the same way

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from orchestrator.ledger import ProjectPaths
    from orchestrator.spec import SweepSpec, TrialPlan

PARENT_ROLE_TAG = "sweep_role"
SWEEP_NAME_TAG = "sweep_name"
SWEEP_HASH_TAG = "sweep_spec_hash"
TRIAL_ID_TAG = "trial_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
RESOLVED_CONFIG = "config.resolved.yaml"  # what the trainer writes: the config after validation
SUMMARY_KEYS = ("flops", "throughput_img_s", "wall_time_s", "peak_memory_mb")
_INVALID_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
T = TypeVar("T")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Store plumbing
# ----------------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None, paths: ProjectPaths) -> str:
    """An absolute URI: relative SQLite/file paths would otherwise depend on each process's cwd."""
    if not uri:
        return paths.default_tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{paths.resolve(uri[len('sqlite:///'):])}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (the trainer uses the same rule), not in the cwd."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path else None


def prepare_sqlite_store(uri: str) -> None:
    """WAL journaling: the UI and the runner read while trainers write, without "database is locked"."""
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sqlite3.connect(path, timeout=30) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as err:  # busy right now: WAL is an optimization, not a need
        log.warning("could not switch %s to WAL journaling: %s", path, err)


def with_retries(what: str, fn: Callable[[], T], attempts: int = 8) -> T:
    """Retry transient store errors (a locked SQLite file, a restarting server) with back-off."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts - 1 or not _is_transient_store_error(err):
                raise
            log.debug("MLflow %s failed (%s), retrying", what, err)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _is_transient_store_error(err: Exception) -> bool:
    text = str(err).lower()
    code = getattr(err, "error_code", "")
    return (code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or "locked" in text or "timed out" in text
            or "connection" in text or "max retries" in text)


def metric_name(key: str) -> str:
    return _INVALID_METRIC_CHARS.sub("_", key.replace("@", "_"))


def final_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """What a finished trial's child run should show: its metrics, parameter counts and cost."""
    values: dict[str, Any] = dict(flatten(result.get("metrics") or {}))
    values.update(result.get("params") or {})  # parameter counts (params_total, params_added, ...)
    values.update({k: result.get(k) for k in SUMMARY_KEYS})
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        out[metric_name(str(key))] = float(value)
    return out


def trial_params(run_dir: Path) -> dict[str, str]:
    """The trial's config as MLflow params (like the trainer logs them), from its run dir."""
    for name in (RESOLVED_CONFIG, "config.yaml"):
        path = Path(run_dir) / name
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            return {k: ("" if v is None else str(v))[:6000] for k, v in flatten(config).items()
                    if k.split(".")[0] != "tracking"}
    return {}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "") + "'"  # ids and sweep names never need quotes; keep filters valid


# ----------------------------------------------------------------------------------------------
# The tracker
# ----------------------------------------------------------------------------------------------
@dataclass
class SyncSummary:
    created: list[str] = field(default_factory=list)  # trial ids that got a new child run
    completed: list[str] = field(default_factory=list)  # trial ids whose child got missing params/metrics
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not done on disk
    run_ids: dict[str, str] = field(default_factory=dict)  # trial id -> its child run under the parent


class SweepTracker:
    """The MLflow side of one sweep, created once per orchestrator process."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str, spec_hash: str = "",
                 code_version: str = "") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.spec_hash = spec_hash
        self.code_version = code_version
        self.parent_run_id: str | None = None
        self._cell_runs: dict[str, str] = {}  # cell key -> its run (tuned sweeps)
        self._parent_of: dict[str, str] = {}  # trial id -> its parent run, when not the sweep's
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @classmethod
    def for_spec(cls, spec: SweepSpec, paths: ProjectPaths, spec_hash: str = "", code_version: str = "") -> SweepTracker:
        tracking = getattr(spec, "tracking", None)
        uri = resolve_tracking_uri(getattr(tracking, "tracking_uri", None), paths)
        experiment = getattr(tracking, "experiment", None) or spec.name
        return cls(uri, experiment, spec.name, spec_hash, code_version)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # no migration chatter on the console
            logging.getLogger("alembic").setLevel(logging.WARNING)
            prepare_sqlite_store(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- experiment and parent --------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = with_retries("experiment", self._get_or_create_experiment)
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_root_for(self.tracking_uri))
        except Exception:  # created meanwhile (a trainer, another sweep sharing the experiment)
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def find_parent(self, known_run_id: str | None = None) -> str | None:
        if known_run_id:
            run = self._get_run(known_run_id)
            if (run is not None and run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == self.experiment_id
                    and run.data.tags.get(SWEEP_NAME_TAG) == self.sweep_name):
                return known_run_id
        runs = with_retries("search parent", lambda: self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{PARENT_ROLE_TAG} = 'parent' and tags.{SWEEP_NAME_TAG} = {_quote(self.sweep_name)}",
            order_by=["attributes.start_time ASC"], max_results=10))
        return runs[0].info.run_id if runs else None

    def start(self, known_parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None) -> str:
        """Find or create the sweep's parent run and mark it RUNNING; returns its id."""
        parent = self.find_parent(known_parent_run_id)
        tags = {PARENT_ROLE_TAG: "parent", SWEEP_NAME_TAG: self.sweep_name, SWEEP_HASH_TAG: self.spec_hash,
                "code_version": self.code_version, **(extra_tags or {})}
        if parent is None:
            run = with_retries("create parent", lambda: self.client.create_run(
                self.experiment_id, run_name=self.sweep_name, tags=tags))
            parent = run.info.run_id
        else:
            with_retries("resume parent", lambda: self.client.update_run(parent, status="RUNNING"))
            self._set_tags(parent, tags)
        self.parent_run_id = parent
        return parent

    def finish(self, status: str, counts: Mapping[str, int] | None = None) -> None:
        """status: FINISHED (all done), FAILED (some failed), KILLED (stopped; `run` again resumes)."""
        if not self.parent_run_id:
            return
        parent = self.parent_run_id
        if counts:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(f"trials_{state}", float(n), now, 0) for state, n in counts.items()]
            with_retries("parent metrics", lambda: self.client.log_batch(parent, metrics=metrics))
        with_retries("finish parent", lambda: self.client.set_terminated(parent, status=status))

    def log_spec(self, source: Path) -> None:
        """The spec file as an artifact of the parent (best effort: artifacts are not essential)."""
        if not (self.parent_run_id and Path(source).is_file()):
            return
        try:
            self.client.log_artifact(self.parent_run_id, str(source))
        except Exception as err:
            log.warning("could not store %s in MLflow: %s", source, err)

    # -- cells (tuned sweeps) -----------------------------------------------------------------------
    def cell_run(self, cell: Mapping[str, str]) -> str:
        """The cell's run under the sweep's parent (found again by its tags, else created)."""
        assert self.parent_run_id, "start() first"
        key = " ".join(f"{axis}={value}" for axis, value in cell.items())
        if key in self._cell_runs:
            return self._cell_runs[key]
        runs = with_retries("search cell", lambda: self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.{PARENT_ROLE_TAG} = 'cell' and tags.cell_key = {_quote(key)} and "
                           f"tags.`{PARENT_RUN_TAG}` = {_quote(self.parent_run_id)}"),
            order_by=["attributes.start_time ASC"], max_results=1))
        if runs:
            run_id = runs[0].info.run_id
        else:
            tags = {PARENT_ROLE_TAG: "cell", "cell_key": key, SWEEP_NAME_TAG: self.sweep_name,
                    PARENT_RUN_TAG: self.parent_run_id, **{f"cell.{a}": str(v) for a, v in cell.items()}}
            run_id = with_retries("create cell", lambda: self.client.create_run(
                self.experiment_id, run_name=f"{key} (search)", tags=tags)).info.run_id
        self._cell_runs[key] = run_id
        return run_id

    def log_cell_search(self, cell: Mapping[str, str], summary: Mapping[str, Any], finished: bool) -> None:
        """The search's outcome on the cell's run: chosen values as params, counts as metrics."""
        from mlflow.entities import Metric, Param

        run_id = self.cell_run(cell)
        run = self._get_run(run_id)
        logged = run.data.params if run is not None else {}
        now = int(time.time() * 1000)
        params = [Param(f"best.{k}", str(v)) for k, v in (summary.get("best_params") or {}).items()
                  if f"best.{k}" not in logged]  # MLflow params are write-once
        metrics = [Metric(f"search/{k}", float(summary[k]), now, 0)
                   for k in ("complete", "pruned", "failed", "best_value") if summary.get(k) is not None]
        with_retries("log cell", lambda: self.client.log_batch(run_id, metrics=metrics, params=params))
        if finished:
            with_retries("finish cell", lambda: self.client.set_terminated(run_id, status="FINISHED"))

    def parent_for(self, trial: TrialPlan) -> str:
        """A tuned sweep's trials are children of their cell's run; others of the sweep's parent."""
        assert self.parent_run_id, "start() first"
        if trial.params is None:
            return self.parent_run_id
        parent = self._parent_of[trial.trial_id] = self.cell_run(trial.cell)
        return parent

    # -- children ---------------------------------------------------------------------------------
    def find_child(self, trial_id: str) -> Run | None:
        assert self.parent_run_id, "start() first"
        parent = self._parent_of.get(trial_id, self.parent_run_id)
        runs = with_retries("search child", lambda: self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.{TRIAL_ID_TAG} = {_quote(trial_id)} and "
                           f"tags.`{PARENT_RUN_TAG}` = {_quote(parent)}"),
            order_by=["attributes.start_time ASC"], max_results=10))
        if len(runs) > 1:
            log.warning("trial %s has %d child runs under %s; using the oldest", trial_id, len(runs), self.parent_run_id)
        return runs[0] if runs else None

    def child_tags(self, trial: TrialPlan) -> dict[str, str]:
        tags = {TRIAL_ID_TAG: trial.trial_id, "spec_hash": self.spec_hash, "code_version": self.code_version,
                "sweep": self.sweep_name, "seed": str(trial.seed)}
        tags.update({f"cell.{axis}": str(value) for axis, value in trial.cell.items()})
        tags.update({f"search.{key}": str(value) for key, value in (trial.params or {}).items()})
        return tags

    def trial_tracking_section(self, trial: TrialPlan, run_id: str | None, supports_run_id: bool = True) -> dict[str, Any]:
        """The trial config's `tracking` section: where and under which parent the trainer logs."""
        section: dict[str, Any] = {
            "enabled": True,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_for(trial),
            "run_name": trial.label,
            "tags": self.child_tags(trial),
        }
        if supports_run_id:
            section["run_id"] = run_id
        return section

    def record_result(self, trial: TrialPlan, run_dir: Path, result: Mapping[str, Any]) -> tuple[str, str | None]:
        """Make sure the trial's child under this parent shows its finished result.

        Returns (child run id, 'created' | 'completed' | None when nothing was missing)."""
        assert self.parent_run_id, "start() first"
        from mlflow.entities import Metric, Param, RunTag

        parent = self.parent_for(trial)
        run = self.find_child(trial.trial_id)
        outcome = None
        if run is None:
            tags = {**self.child_tags(trial), PARENT_RUN_TAG: parent, "synced_from": "result.json"}
            source = result.get("mlflow_run_id")
            if source:
                tags["reused_from_run_id"] = str(source)  # trained under another sweep (shared store)
            run = with_retries("create child", lambda: self.client.create_run(
                self.experiment_id, run_name=trial.label, tags=tags))
            outcome = "created"
        run_id = run.info.run_id
        logged_params = run.data.params
        params = [Param(k, v) for k, v in trial_params(run_dir).items() if k not in logged_params]
        logged_metrics = run.data.metrics
        step = int(result.get("steps") or 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in final_metrics(result).items() if k not in logged_metrics]
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            chunk = params[i:i + 100]
            with_retries("log params", lambda: self.client.log_batch(run_id, params=chunk))
        for i in range(0, len(metrics), 1000):
            chunk_m = metrics[i:i + 1000]
            with_retries("log metrics", lambda: self.client.log_batch(run_id, metrics=chunk_m))
        missing_tags = [RunTag(k, v) for k, v in self.child_tags(trial).items() if k not in run.data.tags]
        if missing_tags:
            with_retries("log tags", lambda: self.client.log_batch(run_id, tags=missing_tags))
        if run.info.status != "FINISHED":
            with_retries("finish child", lambda: self.client.set_terminated(run_id, status="FINISHED"))
        if outcome is None and (params or metrics or missing_tags or run.info.status != "FINISHED"):
            outcome = "completed"
        return run_id, outcome

    def mark_child(self, trial_id: str, status: str) -> None:
        """Close a stopped trial's child run (KILLED/FAILED) unless the trainer did; resuming reopens it."""
        run = self.find_child(trial_id)
        if run is not None and run.info.status == "RUNNING":
            with_retries("close child", lambda: self.client.set_terminated(run.info.run_id, status=status))

    def sync_trials(self, trials: Iterable[TrialPlan], run_dir_of: Callable[[str], Path]) -> SyncSummary:
        summary = SyncSummary()
        for trial in trials:
            run_dir = run_dir_of(trial.trial_id)
            result = read_result(run_dir)
            if not result or result.get("status") != "done":
                summary.skipped.append(trial.trial_id)
                continue
            summary.run_ids[trial.trial_id], outcome = self.record_result(trial, run_dir, result)
            {"created": summary.created, "completed": summary.completed}.get(outcome, summary.unchanged).append(trial.trial_id)
        return summary

    # -- helpers ----------------------------------------------------------------------------------
    def _get_run(self, run_id: str) -> Run | None:
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries("tags", lambda: self.client.log_batch(run_id, tags=batch))


def trainer_supports_run_id() -> bool:
    """Whether the trainer's schema has `tracking.run_id` (else it resumes by DIR/mlflow_run_id only)."""
    try:
        from trainer.config import TrackingConfig
    except Exception:
        return False
    return "run_id" in TrackingConfig.model_fields


def sync(spec: SweepSpec, *, root: Path | str | None = None) -> SyncSummary:
    """Write to MLflow every finished trial of `spec` that it lacks, without duplicating runs."""
    from orchestrator.identity import code_version
    from orchestrator.ledger import Ledger, ProjectPaths
    from orchestrator.runner import planned_trials
    from orchestrator.spec import spec_hash

    paths = ProjectPaths.discover(root)
    version = code_version()
    trials = planned_trials(spec, paths, version)
    output_dir = paths.resolve(spec.output_dir)
    ledger = Ledger.for_sweep(output_dir)
    tracker = SweepTracker.for_spec(spec, paths, spec_hash(spec), version)
    tracker.parent_run_id = tracker.find_parent(ledger.meta.get("parent_run_id"))
    if tracker.parent_run_id is None:
        tracker.start()
        tracker.finish("FINISHED")
    return tracker.sync_trials(trials, paths.trial_dir)
