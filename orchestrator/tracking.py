"""The MLflow side of a sweep (`SweepTracker`): one experiment, one parent run, one child run per trial.

Identity rules that keep runs unique across retries, restarts and re-runs:
- the parent is found again by tags `sweep_role=parent` + `sweep_name` in the sweep's experiment
  (its id is also kept in the ledger); a changed spec updates the parent's `sweep_spec_hash` tag
  instead of opening a second parent, because it is still the same sweep (same ledger, same dir);
- a child is found by tags `trial_id` + `mlflow.parentRunId`; the runner passes an existing child's
  id to the trainer (`tracking.run_id`), so a resumed or retried trial continues its run; a control
  (`report.controls`) is a child too, tagged `sweep_role=control` and `control=<name>`;
- a tuned sweep (spec `search:`) adds one run per cell between the two (tags `sweep_role=cell` +
  `cell_key`): every search trial and final trial of the cell is its child;
- `sync_trials` writes what MLflow lacks for finished trials (a child for a trial reused from another
  sweep's store, final metrics a crashed trainer never logged, curve points logged while the server
  was away: the trial folder's metrics.jsonl against the run's history) and never creates a second
  child, nor a second copy of a point.

An unreachable store degrades the sweep instead of stopping it: `guarded` calls give up within
seconds, say so once, and skip MLflow for a while; trials launched meanwhile log locally only and
the end-of-run sync (or `orchestrator sync`) fills MLflow in.

Concurrency on the default SQLite store: the store is created (schema migrated, under a file lock,
see `trainer.tracking.prepare_sqlite_store`) before any trainer starts, and switched to WAL
journaling so readers (the UI, polling) never block writers; MLflow itself sets a 20 s busy
timeout, and the trainer retries with back-off. Where the store is, its tag names and retries live
in `orchestrator.mlflow_store`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.mlflow_store import (
    CELL_KEY_TAG,
    CELL_TAG_PREFIX,
    CODE_VERSION_TAG,
    CONTROL_TAG,
    PARENT_ROLE_TAG,
    PARENT_RUN_TAG,
    SEARCH_TAG_PREFIX,
    SEED_TAG,
    SPEC_HASH_TAG,
    SWEEP_HASH_TAG,
    SWEEP_NAME_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    artifact_root_for,
    config_params,
    final_metrics,
    open_client,
    quiet_mlflow_logs,
    tracking_target,
    with_retries,
)
from trainer.contract import RUN_ARTIFACT_FILES, read_metric_points

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from orchestrator.spec import SweepSpec, TrialPlan
    from orchestrator.store import ProjectPaths, TrialDir
    from trainer.contract import TrialResult

log = logging.getLogger(__name__)
T = TypeVar("T")
OFFLINE_RETRY_S = 30.0  # after MLflow failed, how long the sweep goes on without it before trying again
CONTROL_ROLE = "control"  # the PARENT_ROLE_TAG of a control trial's child run (report.controls)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "") + "'"  # ids and sweep names never need quotes; keep filters valid


@dataclass
class SyncSummary:
    """What `sync_trials` did, by trial id."""

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
        self._retry_at = 0.0  # MLflow failed: skipped until then
        self.warned = False

    @classmethod
    def for_spec(cls, spec: SweepSpec, paths: ProjectPaths, spec_hash: str = "", code_version: str = "") -> SweepTracker:
        uri, experiment = tracking_target(spec, paths)
        return cls(uri, experiment, spec.name, spec_hash, code_version)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            quiet_mlflow_logs()
            self._client = open_client(self.tracking_uri)
        return self._client

    def guarded(self, what: str, fn: Callable[[], T], warn: Callable[[str], None], now: bool = False) -> T | None:
        """fn(), or None when MLflow failed (now or within OFFLINE_RETRY_S; now=True tries anyway).
        The first failure is told to `warn`, once: tracking never stops a sweep, the results are on disk."""
        if not now and time.monotonic() < self._retry_at:
            return None
        try:
            return fn()
        except Exception as err:  # MLflow raises many types (sqlalchemy, requests, MlflowException)
            self._retry_at = time.monotonic() + OFFLINE_RETRY_S
            if not self.warned:
                self.warned = True
                warn(f"{what} failed, trials go on and log locally; `orchestrator sync` fills MLflow in later: "
                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            return None

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
                CODE_VERSION_TAG: self.code_version, **(extra_tags or {})}
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
            from mlflow.entities import Metric  # mlflow stays out of `import orchestrator.tracking`

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
            filter_string=(f"tags.{PARENT_ROLE_TAG} = 'cell' and tags.{CELL_KEY_TAG} = {_quote(key)} and "
                           f"tags.`{PARENT_RUN_TAG}` = {_quote(self.parent_run_id)}"),
            order_by=["attributes.start_time ASC"], max_results=1))
        if runs:
            run_id = runs[0].info.run_id
        else:
            tags = {PARENT_ROLE_TAG: "cell", CELL_KEY_TAG: key, SWEEP_NAME_TAG: self.sweep_name,
                    PARENT_RUN_TAG: self.parent_run_id, **{f"{CELL_TAG_PREFIX}{a}": str(v) for a, v in cell.items()}}
            run_id = with_retries("create cell", lambda: self.client.create_run(
                self.experiment_id, run_name=f"{key} (search)", tags=tags)).info.run_id
        self._cell_runs[key] = run_id
        return run_id

    def log_cell_search(self, cell: Mapping[str, str], summary: Mapping[str, Any], finished: bool) -> None:
        """The search's outcome on the cell's run: chosen values as params, counts as metrics."""
        from mlflow.entities import Metric, Param  # mlflow stays out of `import orchestrator.tracking`

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
        tags = {TRIAL_ID_TAG: trial.trial_id, SPEC_HASH_TAG: self.spec_hash, CODE_VERSION_TAG: self.code_version,
                SWEEP_TAG: self.sweep_name, SEED_TAG: str(trial.seed)}
        if trial.control is not None:  # a floor of the report (spec/controls.py), a child like the others
            tags.update({PARENT_ROLE_TAG: CONTROL_ROLE, CONTROL_TAG: trial.control})
        tags.update({f"{CELL_TAG_PREFIX}{axis}": str(value) for axis, value in trial.cell.items()})
        tags.update({f"{SEARCH_TAG_PREFIX}{key}": str(value) for key, value in (trial.params or {}).items()})
        return tags

    def trial_tracking_section(self, trial: TrialPlan, run_id: str | None) -> dict[str, Any]:
        """The trial config's `tracking` section: where, under which parent and in which run
        (`run_id`: the trial's existing child, None for a new one) the trainer logs."""
        return {
            "enabled": True,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "parent_run_id": self.parent_for(trial),
            "run_name": trial.label,
            "tags": self.child_tags(trial),
            "run_id": run_id,
        }

    def launch_section(self, trial: TrialPlan) -> tuple[str | None, dict[str, Any]]:
        """(the trial's existing child run id, its config's `tracking` section) for a launch; the
        parent is created first when MLflow was away as the sweep began."""
        if self.parent_run_id is None:
            self.start()
        child = self.find_child(trial.trial_id)
        child_run_id = child.info.run_id if child is not None else None
        return child_run_id, self.trial_tracking_section(trial, child_run_id)  # a tuned trial: under its cell

    def record_result(self, trial: TrialPlan, trial_dir: TrialDir, result: TrialResult) -> tuple[str, str | None]:
        """Make sure the trial's child under this parent shows its finished result.

        Returns (child run id, 'created' | 'completed' | None when nothing was missing)."""
        assert self.parent_run_id, "start() first"
        from mlflow.entities import Metric, Param, RunTag  # mlflow stays out of `import orchestrator.tracking`

        parent = self.parent_for(trial)
        run = self.find_child(trial.trial_id)
        outcome = None
        if run is None:
            tags = {**self.child_tags(trial), PARENT_RUN_TAG: parent, "synced_from": "result.json"}
            if result.mlflow_run_id:
                tags["reused_from_run_id"] = str(result.mlflow_run_id)  # trained under another sweep (shared store)
            run = with_retries("create child", lambda: self.client.create_run(
                self.experiment_id, run_name=trial.label, tags=tags))
            outcome = "created"
        run_id = run.info.run_id
        logged_params = run.data.params
        config = trial_dir.read_config() or {}
        params = [Param(k, v) for k, v in config_params(config).items() if k not in logged_params]
        logged_metrics = run.data.metrics
        points = read_metric_points(trial_dir.path)  # curves too; a reused trial's come from its source
        metrics = [Metric(*p) for p in self._missing_points(run_id, logged_metrics, points)]
        local = {p[0] for p in points}
        step = int(result.steps or 0)
        now = int(time.time() * 1000)
        metrics += [Metric(k, v, now, step) for k, v in final_metrics(result).items()
                    if k not in logged_metrics and k not in local]
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            chunk = params[i:i + 100]
            with_retries("log params", lambda: self.client.log_batch(run_id, params=chunk))
        for i in range(0, len(metrics), 1000):
            chunk_m = metrics[i:i + 1000]
            with_retries("log metrics", lambda: self.client.log_batch(run_id, metrics=chunk_m))
        missing_tags = [RunTag(k, v) for k, v in self.child_tags(trial).items() if k not in run.data.tags]
        if missing_tags:
            with_retries("log tags", lambda: self.client.log_batch(run_id, tags=missing_tags))
        artifacts = self._log_missing_artifacts(run_id, trial_dir)
        if run.info.status != "FINISHED":
            with_retries("finish child", lambda: self.client.set_terminated(run_id, status="FINISHED"))
        if outcome is None and (params or metrics or missing_tags or artifacts or run.info.status != "FINISHED"):
            outcome = "completed"
        return run_id, outcome

    def mark_child(self, trial_id: str, status: str) -> None:
        """Close a stopped trial's child run (KILLED/FAILED) unless the trainer did; resuming reopens it."""
        run = self.find_child(trial_id)
        if run is not None and run.info.status == "RUNNING":
            with_retries("close child", lambda: self.client.set_terminated(run.info.run_id, status=status))

    def sync_trials(self, trials: Iterable[TrialPlan], trial_dir_of: Callable[[str], TrialDir]) -> SyncSummary:
        """`record_result` for every trial that is done on disk; the others are skipped."""
        summary = SyncSummary()
        for trial in trials:
            trial_dir = trial_dir_of(trial.trial_id)
            result = trial_dir.result()
            if result is None or not result.done:
                summary.skipped.append(trial.trial_id)
                continue
            summary.run_ids[trial.trial_id], outcome = self.record_result(trial, trial_dir, result)
            {"created": summary.created, "completed": summary.completed}.get(outcome, summary.unchanged).append(trial.trial_id)
        return summary

    # -- helpers ----------------------------------------------------------------------------------
    def _missing_points(self, run_id: str, logged: Mapping[str, float],
                        points: list[tuple[str, float, int, int]]) -> list[tuple[str, float, int, int]]:
        """The local points the run's history lacks. A key with one local point whose value the run
        shows is logged (no history request); the others are compared point by point."""
        by_key: dict[str, list[tuple[str, float, int, int]]] = {}
        for point in points:
            by_key.setdefault(point[0], []).append(point)
        missing = []
        for key, mine in by_key.items():
            if key not in logged:
                missing += mine
                continue
            if len(mine) == 1 and logged[key] == mine[0][1]:
                continue
            history = with_retries("metric history", lambda key=key: self.client.get_metric_history(run_id, key))
            have = {(m.key, m.value, m.timestamp, m.step) for m in history}
            missing += [p for p in mine if p not in have]
        return list(dict.fromkeys(missing))  # the same point twice in the file (a retried write): once

    def _log_missing_artifacts(self, run_id: str, trial_dir: TrialDir) -> list[str]:
        """Upload the trial's run artifacts the run lacks (the trainer's uploads were lost while the
        server was down, or the trial was trained under another sweep); returns their names."""
        logged = {a.path for a in with_retries("list artifacts", lambda: self.client.list_artifacts(run_id))}
        missing = [name for name in RUN_ARTIFACT_FILES if name not in logged and (trial_dir.path / name).is_file()]
        for name in missing:
            with_retries("log artifact", lambda name=name: self.client.log_artifact(run_id, str(trial_dir.path / name)))
        return missing

    def _get_run(self, run_id: str) -> Run | None:
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag  # mlflow stays out of `import orchestrator.tracking`

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries("tags", lambda: self.client.log_batch(run_id, tags=batch))
