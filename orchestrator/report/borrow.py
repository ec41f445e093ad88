"""Results of the same config under an earlier trainer code version, for trials not run yet.

A trainer edit gives every trial a new id, so without this the report would go blank until the
sweep re-ran. A waiting trial takes the newest finished run of the same (cell, seed) whose logged
config equals its own: MLflow child runs first, then the ledger's previous trials on disk. The
outcome says where the numbers came from (`stale_from`), and the report warns about the mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from orchestrator.mlflow_store import (
    CELL_TAG_PREFIX,
    CODE_VERSION_TAG,
    CONTROL_TAG,
    SEED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    config_params,
    final_metrics,
)
from orchestrator.report.mlflow_runs import MlflowFetch, MlflowRun
from orchestrator.report.outcome import TrialOutcome
from trainer.contract import NON_IDENTITY_KEYS

if TYPE_CHECKING:
    from orchestrator.ledger import TrialRecord
    from orchestrator.spec import TrialPlan
    from orchestrator.store import ProjectPaths
    from trainer.contract import TrialResult

Slot = tuple[tuple[tuple[str, str], ...], int]  # (sorted cell items, or (("control", name),) for a control; seed)


def identity_params(config: Mapping[str, object]) -> dict[str, str]:
    """A config's MLflow params without the keys that do not define a trial (its name, tracking)."""
    return {k: v for k, v in config_params(config).items() if k.split(".")[0] not in NON_IDENTITY_KEYS}


def same_config(expected: Mapping[str, str], logged: Mapping[str, str]) -> bool:
    """Whether a run's logged config is the planned one. Every setting both know must agree; a
    setting the older run lacks is a field added to the trainer since, which the spec cannot have
    changed for that run. Too little overlap (params not logged) is no evidence: refuse."""
    shared = [k for k in expected if k in logged]
    if len(shared) < 0.8 * len(expected):
        return False
    return all(expected[k] == logged[k] for k in shared)


def borrow_from_other_code_versions(plans: Sequence[TrialPlan], outcomes: list[TrialOutcome], fetched: MlflowFetch,
                                    ledger: Mapping[str, TrialRecord], paths: ProjectPaths,
                                    sweep: str) -> list[TrialOutcome]:
    """`outcomes` with planned / running trials filled in from an identical config of another code
    version, where one finished. Failed trials keep their failure: an older success must not hide it."""
    waiting = {i for i, o in enumerate(outcomes) if o.state in ("planned", "running") and not o.has_metrics}
    if not waiting:
        return outcomes
    planned_ids = {p.trial_id for p in plans}
    by_slot: dict[Slot, list[int]] = {}
    for i in waiting:
        by_slot.setdefault(_outcome_slot(outcomes[i]), []).append(i)

    mlflow_candidates: dict[Slot, list[MlflowRun]] = {}
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
            expected = identity_params(plan.config)
            runs = sorted(mlflow_candidates.get(slot, ()), key=lambda r: (r.tags.get(SWEEP_TAG) == sweep, r.start_time),
                          reverse=True)
            match = next((r for r in runs if same_config(expected, params.get(r.run_id, {}))), None)
            if match is not None:
                out[i] = TrialOutcome(
                    trial_id=current.trial_id, cell=current.cell, seed=current.seed, control=current.control,
                    state="done", source="mlflow",
                    run_id=match.run_id, experiment_id=match.experiment_id, metrics=dict(match.metrics),
                    code_version=match.tags.get(CODE_VERSION_TAG) or "unknown", stale_from=match.tags[TRIAL_ID_TAG])
                continue
            borrowed = _from_ledger(slot, expected, ledger, planned_ids, paths)
            if borrowed is not None:
                old_id, result = borrowed
                out[i] = TrialOutcome(
                    trial_id=current.trial_id, cell=current.cell, seed=current.seed, control=current.control,
                    state="done", source="disk",
                    run_id=result.mlflow_run_id, metrics=final_metrics(result), code_version="unknown",
                    stale_from=old_id)
    return out


def _slot(cell: Mapping[str, str], seed: int) -> Slot:
    return tuple(sorted(cell.items())), int(seed)


def _outcome_slot(outcome: TrialOutcome) -> Slot:
    """A control has no cell: its control's name stands in for one, as on its run (`_run_slot`)."""
    return _slot({CONTROL_TAG: outcome.control} if outcome.control else outcome.cell, outcome.seed)


def _run_slot(run: MlflowRun) -> Slot | None:
    cell = {k[len(CELL_TAG_PREFIX):]: v for k, v in run.tags.items() if k.startswith(CELL_TAG_PREFIX)}
    if not cell and run.tags.get(CONTROL_TAG):
        cell = {CONTROL_TAG: run.tags[CONTROL_TAG]}
    try:
        return _slot(cell, int(run.tags[SEED_TAG])) if cell else None
    except (KeyError, ValueError):
        return None


def _from_ledger(slot: Slot, expected: Mapping[str, str], ledger: Mapping[str, TrialRecord],
                 planned_ids: set[str], paths: ProjectPaths) -> tuple[str, TrialResult] | None:
    # A control's record has no cell (the ledger keeps none for it): its config tells which it is.
    control = len(slot[0]) == 1 and slot[0][0][0] == CONTROL_TAG
    candidates = [(tid, r) for tid, r in ledger.items() if tid not in planned_ids and r.state == "done"
                  and (_slot(r.cell, r.seed) == slot or (control and not r.cell and int(r.seed) == slot[1]))]
    for trial_id, _ in sorted(candidates, key=lambda c: c[1].ended_at or 0, reverse=True):
        trial = paths.trial(trial_id)
        result = trial.result()
        if result is None or not result.done:
            continue
        config = trial.read_config()
        if config is not None and same_config(expected, identity_params(config)):
            return trial_id, result
    return None
