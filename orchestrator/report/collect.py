"""Gather one outcome per planned trial: its state, its final metrics and where they came from.

Sources, per trial of `expand(spec)` (joined on `trial_id`):
- MLflow: the sweep's experiment, child runs tagged `trial_id` (one search for the whole sweep);
- disk: `runs/trials/<trial_id>/result.json`, the trainer's own verdict (the truth about outcome);
- the ledger: `<output_dir>/ledger.json`, for trials with no result yet (running, planned, ...).

Metrics come from MLflow when its run finished with metrics, otherwise from result.json (MLflow
unreachable, a trainer that could not log, a trial reused from another sweep's store before
`orchestrator sync`). Each outcome records its source so the report can say so.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.report.mlflow_runs import TRIAL_ID_TAG, MlflowFetch, MlflowRun, fetch_mlflow_runs, pick_run

log = logging.getLogger(__name__)

__all__ = ["Collection", "MlflowFetch", "MlflowRun", "TrialOutcome", "collect_outcomes", "fetch_mlflow_runs",
           "outcomes_csv", "pick_run"]

RESULT_FILE = "result.json"
# MLflow run status -> trial state, for trials without a result.json (e.g. run dir on another host).
MLFLOW_STATUS_TO_STATE = {"FINISHED": "done", "FAILED": "failed", "RUNNING": "running", "SCHEDULED": "planned",
                          "KILLED": "stopped"}
SUMMARY_KEYS = ("flops", "throughput_img_s", "wall_time_s", "peak_memory_mb")


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    cell: Mapping[str, str]
    seed: int
    state: str  # done | failed | running | planned | cancelled | stopped
    failure_class: str | None = None
    error: str | None = None
    source: str = "none"  # where the metrics came from: mlflow | disk | none
    run_id: str | None = None
    experiment_id: str | None = None
    code_version: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Set when the numbers come from an identical config run under another trainer code version
    # (this trial itself has not run yet): the id of that older trial.
    stale_from: str | None = None

    @property
    def has_metrics(self) -> bool:
        return self.state == "done" and bool(self.metrics)


@dataclass
class Collection:
    """Every planned trial's outcome, plus what the report must say about its sources."""

    outcomes: list[TrialOutcome]
    tracking_uri: str
    experiment: str
    experiment_id: str | None = None
    mlflow_error: str | None = None  # why MLflow contributed nothing, when it did not
    current_code_version: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.outcomes:
            out[outcome.state] = out.get(outcome.state, 0) + 1
        return out

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.outcomes:
            if outcome.has_metrics:
                out[outcome.source] = out.get(outcome.source, 0) + 1
        return out


# ----------------------------------------------------------------------------------------------
# Where things live (kept small so they follow the runner / ledger if those change)
# ----------------------------------------------------------------------------------------------
def project_paths(root: Path | str | None = None):
    from orchestrator.ledger import ProjectPaths

    return ProjectPaths.discover(root)


def trial_dir(trial_id: str, paths, ledger_entry: Mapping[str, Any] | None = None) -> Path:
    """The trial's run dir: the one the ledger recorded (the runner decided), else the shared store's."""
    recorded = (ledger_entry or {}).get("run_dir")
    return Path(recorded) if recorded else paths.trial_dir(trial_id)


def tracking_target(spec, paths) -> tuple[str, str]:
    """(tracking URI, experiment name) exactly as the runner resolves them."""
    from orchestrator.tracking import resolve_tracking_uri

    tracking = getattr(spec, "tracking", None)
    uri = resolve_tracking_uri(getattr(tracking, "tracking_uri", None), paths)
    experiment = getattr(tracking, "experiment", None) or spec.name
    return uri, experiment


# ----------------------------------------------------------------------------------------------
# Disk: ledger and result.json
# ----------------------------------------------------------------------------------------------
def read_ledger_entries(output_dir: Path) -> dict[str, dict[str, Any]]:
    """trial_id -> ledger record as a dict; {} when there is no (readable) ledger yet."""
    try:
        from orchestrator.ledger import Ledger, LedgerError
    except ImportError:  # ledger module unavailable: read its file defensively
        return _read_ledger_json(Path(output_dir) / "ledger.json")
    try:
        ledger = Ledger.for_sweep(Path(output_dir))
    except (LedgerError, OSError) as err:
        log.warning("ignoring the ledger: %s", err)
        return {}
    return {record.trial_id: dict(vars(record)) for record in ledger}


def _read_ledger_json(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    trials = data.get("trials") if isinstance(data, dict) else None
    return {str(k): v for k, v in trials.items() if isinstance(v, dict)} if isinstance(trials, dict) else {}


def read_result(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """A result.json's numbers under the names its MLflow child run uses (see orchestrator.tracking)."""
    try:
        from orchestrator.tracking import final_metrics
    except ImportError:
        final_metrics = _final_metrics_fallback
    return final_metrics(result)


def _final_metrics_fallback(result: Mapping[str, Any]) -> dict[str, float]:
    values: dict[str, Any] = dict(result.get("metrics") or {})
    values.update(result.get("params") or {})
    values.update({k: result.get(k) for k in SUMMARY_KEYS})
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


# ----------------------------------------------------------------------------------------------
# Merging the sources
# ----------------------------------------------------------------------------------------------
def merge_outcome(plan, run: MlflowRun | None, result: Mapping[str, Any] | None,
                  ledger_entry: Mapping[str, Any] | None, current_code_version: str | None) -> TrialOutcome:
    """One trial's outcome from whatever sources know about it.

    State: result.json first (the trainer's verdict), then a terminal MLflow status, then the
    ledger (running / failed before the trainer could write / cancelled), then "planned".
    Metrics: MLflow's when that run finished with metrics, else result.json's.
    """
    base = dict(trial_id=plan.trial_id, cell=dict(plan.cell), seed=plan.seed,
                run_id=run.run_id if run else (ledger_entry or {}).get("mlflow_run_id") or (result or {}).get("mlflow_run_id"),
                experiment_id=run.experiment_id if run else None,
                # Trial ids hash the trainer code, so a trial of expand(spec) ran under the current version
                # unless its run says otherwise.
                code_version=(run.tags.get("code_version") if run else None) or current_code_version)
    ledger_state = (ledger_entry or {}).get("state")
    if result is not None and result.get("status") == "done":
        if run is not None and run.status == "FINISHED" and run.metrics:
            return TrialOutcome(state="done", source="mlflow", metrics=dict(run.metrics), **base)
        return TrialOutcome(state="done", source="disk", metrics=result_metrics(result), **base)
    if result is not None and result.get("status") == "failed":
        if ledger_state in ("running", "planned"):  # a retry is under way or queued: say so, not "failed"
            return TrialOutcome(state=ledger_state, failure_class=result.get("failure_class"),
                                error=result.get("error"), **base)
        return TrialOutcome(state="failed", failure_class=result.get("failure_class") or "error",
                            error=result.get("error"), **base)
    if run is not None and run.status == "FINISHED" and run.metrics:
        return TrialOutcome(state="done", source="mlflow", metrics=dict(run.metrics), **base)
    if ledger_state in ("running", "failed", "cancelled", "planned"):
        return TrialOutcome(state=ledger_state, failure_class=(ledger_entry or {}).get("failure_class"),
                            error=(ledger_entry or {}).get("error"), **base)
    if run is not None and run.status == "FAILED":
        return TrialOutcome(state="failed", failure_class=run.tags.get("failure_class") or "error", **base)
    if run is not None:
        return TrialOutcome(state=MLFLOW_STATUS_TO_STATE.get(run.status, "planned"), **base)
    if ledger_state == "done":  # the ledger says done but its result is gone: no numbers to show
        return TrialOutcome(state="failed", failure_class="missing result", error="result.json not found", **base)
    return TrialOutcome(state="planned", **base)


def collect_outcomes(spec, plans: Iterable | None = None, *, root: Path | str | None = None,
                     current_code_version: str | None = None, use_mlflow: bool = True,
                     other_code_versions: bool = True) -> Collection:
    """Outcomes of every trial `expand(spec)` plans, in plan order.

    other_code_versions: a trial not run yet under the current trainer code borrows the numbers of
    the same config run under an earlier code version (marked, and warned about in the report),
    so editing the trainer does not blank the report until the sweep has re-run.
    """
    from orchestrator.identity import code_version
    from orchestrator.spec import expand

    paths = project_paths(root)
    version = current_code_version or code_version()
    plans = list(plans) if plans is not None else expand(spec, code_version=version)
    uri, experiment = tracking_target(spec, paths)
    if use_mlflow and getattr(getattr(spec, "tracking", None), "enabled", True):
        fetched = fetch_mlflow_runs(uri, experiment)
    else:
        fetched = MlflowFetch({}, error="MLflow tracking disabled for this sweep")
    ledger = read_ledger_entries(paths.resolve(spec.output_dir))
    outcomes = []
    for plan in plans:
        entry = ledger.get(plan.trial_id)
        run = pick_run(fetched.runs_by_trial.get(plan.trial_id, ()), spec.name)
        result = read_result(trial_dir(plan.trial_id, paths, entry))
        outcomes.append(merge_outcome(plan, run, result, entry, version))
    if other_code_versions:
        outcomes = borrow_from_other_code_versions(plans, outcomes, fetched, ledger, paths, spec.name)
    error = fetched.error
    if error is None and not any(o.source == "mlflow" for o in outcomes) and any(o.has_metrics for o in outcomes):
        error = f"MLflow experiment {experiment!r} has no finished child runs for this sweep's trials"
    return Collection(outcomes=outcomes, tracking_uri=uri, experiment=experiment,
                      experiment_id=fetched.experiment_id, mlflow_error=error, current_code_version=version)


# ----------------------------------------------------------------------------------------------
# Results of the same config under an earlier trainer code version
# ----------------------------------------------------------------------------------------------
IDENTITY_FREE_KEYS = ("tracking", "name")  # as in orchestrator.identity: they do not change results


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A trial config as the trainer logs it to MLflow params: flattened, values as text."""
    from orchestrator.tracking import flatten

    return {k: ("" if v is None else str(v))[:6000] for k, v in flatten(config).items()
            if k.split(".")[0] not in IDENTITY_FREE_KEYS}


def same_config(expected: Mapping[str, str], logged: Mapping[str, str]) -> bool:
    """Whether a run's logged config is the planned one. Every setting both know must agree; a
    setting the older run lacks is a field added to the trainer since, which the spec cannot have
    changed for that run. Too little overlap (params not logged) is no evidence: refuse."""
    shared = [k for k in expected if k in logged]
    if len(shared) < 0.8 * len(expected):
        return False
    return all(expected[k] == logged[k] for k in shared)


def borrow_from_other_code_versions(plans: Sequence, outcomes: list[TrialOutcome], fetched: MlflowFetch,
                                    ledger: Mapping[str, Mapping[str, Any]], paths, sweep: str) -> list[TrialOutcome]:
    """Planned / running trials take the newest finished run of the same (cell, seed) and the same
    resolved config from another code version: MLflow child runs first, then the ledger's
    previous trials on disk. Failed trials keep their failure: an older success must not hide it."""
    waiting = {i for i, o in enumerate(outcomes) if o.state in ("planned", "running") and not o.has_metrics}
    if not waiting:
        return outcomes
    planned_ids = {p.trial_id for p in plans}
    by_slot: dict[tuple, list[int]] = {}
    for i in waiting:
        by_slot.setdefault(_slot(outcomes[i].cell, outcomes[i].seed), []).append(i)

    mlflow_candidates: dict[tuple, list[MlflowRun]] = {}
    for trial_id, runs in fetched.runs_by_trial.items():
        if trial_id in planned_ids:
            continue
        for run in runs:
            slot = _run_slot(run)
            if slot in by_slot and run.status == "FINISHED" and run.metrics:
                mlflow_candidates.setdefault(slot, []).append(run)
    params = fetched.params_of([r for runs in mlflow_candidates.values() for r in runs])

    out = list(outcomes)
    for slot, indices in by_slot.items():
        for i in indices:
            plan, current = plans[i], outcomes[i]
            expected = config_params(plan.config)
            runs = sorted(mlflow_candidates.get(slot, ()), key=lambda r: (r.tags.get("sweep") == sweep, r.start_time),
                          reverse=True)
            match = next((r for r in runs if same_config(expected, params.get(r.run_id, {}))), None)
            if match is not None:
                out[i] = TrialOutcome(
                    trial_id=current.trial_id, cell=current.cell, seed=current.seed, state="done", source="mlflow",
                    run_id=match.run_id, experiment_id=match.experiment_id, metrics=dict(match.metrics),
                    code_version=match.tags.get("code_version") or "unknown", stale_from=match.tags[TRIAL_ID_TAG])
                continue
            borrowed = _from_ledger(slot, expected, ledger, planned_ids, paths)
            if borrowed is not None:
                old_id, result = borrowed
                out[i] = TrialOutcome(
                    trial_id=current.trial_id, cell=current.cell, seed=current.seed, state="done", source="disk",
                    run_id=result.get("mlflow_run_id"), metrics=result_metrics(result), code_version="unknown",
                    stale_from=old_id)
    return out


def _slot(cell: Mapping[str, str], seed: int) -> tuple:
    return tuple(sorted(cell.items())), int(seed)


def _run_slot(run: MlflowRun) -> tuple | None:
    cell = {k[len("cell."):]: v for k, v in run.tags.items() if k.startswith("cell.")}
    try:
        return _slot(cell, int(run.tags["seed"])) if cell else None
    except (KeyError, ValueError):
        return None


def _from_ledger(slot: tuple, expected: Mapping[str, str], ledger: Mapping[str, Mapping[str, Any]],
                 planned_ids: set[str], paths) -> tuple[str, dict[str, Any]] | None:
    import yaml

    candidates = [(tid, e) for tid, e in ledger.items() if tid not in planned_ids and e.get("state") == "done"
                  and isinstance(e.get("cell"), dict) and _slot(e["cell"], e.get("seed", -1)) == slot]
    for trial_id, entry in sorted(candidates, key=lambda c: c[1].get("ended_at") or 0, reverse=True):
        run_dir = trial_dir(trial_id, paths, entry)
        result = read_result(run_dir)
        if not result or result.get("status") != "done":
            continue
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and same_config(expected, config_params(config)):
            return trial_id, result
    return None


def outcomes_csv(collection: Collection) -> str:
    """One row per trial (cell, seed, state, source, run id, every metric): the report's raw data.

    Written with the csv module: pandas would add half a second of import for a plain table.
    """
    import csv
    import io

    metric_names = sorted({name for o in collection.outcomes for name in o.metrics})
    axes = list(dict.fromkeys(axis for o in collection.outcomes for axis in o.cell))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial_id", *(f"cell.{a}" for a in axes), "seed", "state", "failure_class", "source",
                     "mlflow_run_id", "code_version", "borrowed_from_trial", *metric_names])
    for o in collection.outcomes:
        writer.writerow([o.trial_id, *(o.cell.get(a, "") for a in axes), o.seed, o.state, o.failure_class or "",
                         o.source, o.run_id or "", o.code_version or "", o.stale_from or "",
                         *(repr(float(o.metrics[m])) if m in o.metrics else "" for m in metric_names)])
    return buffer.getvalue()
