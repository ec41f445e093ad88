"""Gather one outcome per planned trial: its state, its final metrics and where they came from.

Sources, per trial of `expand(spec)` (joined on `trial_id`):
- MLflow: the sweep's experiment, child runs tagged `trial_id` (one search for the whole sweep);
- disk: the trial's `result.json` in the shared store, the trainer's own verdict (the truth about outcome);
- the ledger: `<output_dir>/ledger.json`, for trials with no result yet (running, planned, ...).

Metrics come from MLflow when its run finished with metrics, otherwise from result.json (MLflow
unreachable, a trainer that could not log, a trial reused from another sweep's store before
`orchestrator sync`). Each outcome records its source so the report can say so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.ledger import Ledger, LedgerError
from orchestrator.mlflow_store import CODE_VERSION_TAG, FAILURE_CLASS_TAG, final_metrics, tracking_target
from orchestrator.plan import sweep_output_dir
from orchestrator.report.borrow import borrow_from_other_code_versions
from orchestrator.report.mlflow_runs import MlflowFetch, MlflowRun, fetch_mlflow_runs, pick_run
from orchestrator.report.outcome import Collection, TrialOutcome
from trainer.config import TrialConfig
from trainer.metric_names import metric_table

if TYPE_CHECKING:
    from orchestrator.ledger import TrialRecord
    from orchestrator.spec import SweepSpec, TrialPlan
    from orchestrator.store import ProjectPaths
    from trainer.contract import TrialResult

log = logging.getLogger(__name__)

# MLflow run status -> trial state, for trials without a result.json (e.g. run dir on another host).
MLFLOW_STATUS_TO_STATE = {"FINISHED": "done", "FAILED": "failed", "RUNNING": "running", "SCHEDULED": "planned",
                          "KILLED": "stopped"}


def read_ledger(output_dir: Path) -> dict[str, TrialRecord]:
    """trial_id -> ledger record; {} when there is no (readable) ledger yet."""
    try:
        ledger = Ledger.for_sweep(output_dir)
    except (LedgerError, OSError) as err:
        log.warning("ignoring the ledger: %s", err)
        return {}
    return dict(ledger.trials)


def merge_outcome(plan: TrialPlan, run: MlflowRun | None, result: TrialResult | None, record: TrialRecord | None,
                  current_code_version: str | None) -> TrialOutcome:
    """One trial's outcome from whatever sources know about it.

    State: result.json first (the trainer's verdict), then a terminal MLflow status, then the
    ledger (running / failed before the trainer could write / cancelled), then "planned".
    Metrics: MLflow's when that run finished with metrics, else result.json's.
    """
    if run is not None:
        run_id = run.run_id
    else:  # the run the trial logged to, as the ledger or the trainer recorded it
        run_id = (record.mlflow_run_id if record else None) or (result.mlflow_run_id if result else None)
    base = dict(trial_id=plan.trial_id, cell=dict(plan.cell), seed=plan.seed, run_id=run_id, control=plan.control,
                experiment_id=run.experiment_id if run else None,
                # Trial ids hash the trainer code, so a trial of expand(spec) ran under the current version
                # unless its run says otherwise.
                code_version=(run.tags.get(CODE_VERSION_TAG) if run else None) or current_code_version)
    ledger_state = record.state if record else None
    if result is not None and result.done:
        if run is not None and run.status == "FINISHED" and run.metrics:
            return TrialOutcome(state="done", source="mlflow", metrics=dict(run.metrics), **base)
        return TrialOutcome(state="done", source="disk", metrics=final_metrics(result), **base)
    if result is not None:  # failed
        if ledger_state in ("running", "planned"):  # a retry is under way or queued: say so, not "failed"
            return TrialOutcome(state=ledger_state, failure_class=result.failure_class, error=result.error, **base)
        return TrialOutcome(state="failed", failure_class=result.failure_class or "error", error=result.error, **base)
    if run is not None and run.status == "FINISHED" and run.metrics:
        return TrialOutcome(state="done", source="mlflow", metrics=dict(run.metrics), **base)
    if record is not None and ledger_state in ("running", "failed", "cancelled", "planned"):
        return TrialOutcome(state=ledger_state, failure_class=record.failure_class, error=record.error, **base)
    if run is not None and run.status == "FAILED":
        return TrialOutcome(state="failed", failure_class=run.tags.get(FAILURE_CLASS_TAG) or "error", **base)
    if run is not None:
        return TrialOutcome(state=MLFLOW_STATUS_TO_STATE.get(run.status, "planned"), **base)
    if ledger_state == "done":  # the ledger says done but its result is gone: no numbers to show
        return TrialOutcome(state="failed", failure_class="missing result", error="result.json not found", **base)
    return TrialOutcome(state="planned", **base)


def collect_outcomes(spec: SweepSpec, plans: Sequence[TrialPlan], paths: ProjectPaths,
                     current_code_version: str | None) -> Collection:
    """Outcomes of every trial in `plans`, in plan order.

    A trial not run yet under the current trainer code borrows the numbers of the same config run
    under an earlier code version (marked, and warned about in the report), so editing the trainer
    does not blank the report until the sweep has re-run.
    """
    uri, experiment = tracking_target(spec, paths)
    if spec.tracking.enabled:
        fetched = fetch_mlflow_runs(uri, experiment)
    else:
        fetched = MlflowFetch({}, error="MLflow tracking disabled for this sweep")
    ledger = read_ledger(sweep_output_dir(spec, paths))
    outcomes = []
    for plan in plans:
        run = pick_run(fetched.runs_by_trial.get(plan.trial_id, ()), spec.name)
        result = paths.trial(plan.trial_id).result()
        outcomes.append(merge_outcome(plan, run, result, ledger.get(plan.trial_id), current_code_version))
    outcomes = borrow_from_other_code_versions(plans, outcomes, fetched, ledger, paths, spec.name)
    error = fetched.error
    if error is None and not any(o.source == "mlflow" for o in outcomes) and any(o.has_metrics for o in outcomes):
        error = f"MLflow experiment {experiment!r} has no finished child runs for this sweep's trials"
    return Collection(outcomes=outcomes, tracking_uri=uri, experiment=experiment,
                      experiment_id=fetched.experiment_id, mlflow_error=error,
                      current_code_version=current_code_version)


def with_unavailable_reasons(outcomes: list[TrialOutcome], plans: Sequence[TrialPlan],
                             metrics: Sequence[str]) -> list[TrialOutcome]:
    """`outcomes` with, for each of `metrics` its trial's config cannot report (raw pixels have no
    classifier head, a disabled probe), the schema's reason (`trainer.metric_names.metric_table`)."""
    configs = {plan.trial_id: plan.config for plan in plans}
    out = []
    for outcome in outcomes:
        config = configs.get(outcome.trial_id)
        reasons: dict[str, str] = {}
        if config is not None and not set(metrics) <= set(outcome.metrics):  # most outcomes have them all
            table = metric_table(TrialConfig.model_validate(config))
            reasons = {m: why for m in metrics if (why := table.get(m))}
        out.append(replace(outcome, unavailable=reasons) if reasons else outcome)
    return out
