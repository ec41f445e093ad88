"""Feeds a tuned sweep's runner: asks each cell's study for trials, tells it their outcomes, prunes
runs whose learning curves fall behind, and, once a cell's search is over, adds the cell's final
trials (its best settings, by the validation metric, at every seed of the sweep).

The runner (orchestrator/runner.py) calls, from its one loop thread:
    start()             -> trials already known (so a restart re-attaches and reuses them)
    more(free_slots)    -> new trials to queue
    to_prune(running)   -> trial ids to stop now
    settled(id, state, result)   after each trial ends (done, failed for good, pruned)
    finished            True when no cell will ask for more

Identical trials run once: a suggestion whose trial id is already running (asked twice under
parallelism, or by a grid retry) joins that run, and one already done anywhere in the shared store
is told its stored result at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.search.study import CellStudy, CellSummary, journal_storage, read_progress, tuned_trial

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec, TrialPlan


def cell_plans(spec: SweepSpec, code_version: str) -> tuple[dict[tuple[str, ...], dict[int, TrialPlan]], int]:
    """The untuned trial of every (cell, seed), for the sweep's seeds and the search seed."""
    from orchestrator.spec import expand

    assert spec.search is not None
    search_seed = spec.search.seed if spec.search.seed is not None else spec.seeds[0]
    seeds = list(dict.fromkeys([*spec.seeds, search_seed]))
    plans: dict[tuple[str, ...], dict[int, TrialPlan]] = {}
    for plan in expand(spec.model_copy(update={"seeds": seeds}), code_version=code_version):
        plans.setdefault(tuple(plan.cell.values()), {})[plan.seed] = plan
    return plans, search_seed


def open_studies(spec: SweepSpec, output_dir: Path, code_version: str, *, create: bool = True) -> list[CellStudy]:
    """One study per cell (created on first use; create=False: only those that exist, read-only use)."""
    from orchestrator.search.study import study_name

    plans, search_seed = cell_plans(spec, code_version)
    storage = journal_storage(output_dir)
    existing = {s.study_name for s in storage.get_all_studies()}
    base = next(iter(next(iter(plans.values())).values())).config
    studies = []
    for per_seed in plans.values():
        cell_plan = per_seed[search_seed]
        if not create and study_name(spec.search, cell_plan) not in existing:
            continue
        studies.append(CellStudy(storage, spec.search, cell_plan, code_version, create=create,
                                 every_steps=base["evaluation"]["every_steps"], total_steps=base["schedule"]["steps"]))
    return studies


def final_trials(spec: SweepSpec, code_version: str, summaries: Mapping[tuple[str, ...], CellSummary],
                 plans: Mapping[tuple[str, ...], Mapping[int, TrialPlan]] | None = None) -> list[TrialPlan]:
    """What the report compares: each cell at its best settings, every seed (seed-major, like
    `expand`). A cell whose search has no complete trial yet shows its untuned trials."""
    if plans is None:
        plans, _ = cell_plans(spec, code_version)
    out = []
    for seed in spec.seeds:
        for cell, per_seed in plans.items():
            summary = summaries.get(cell)
            best = summary.best_params if summary is not None and summary.finished else None
            out += cell_finals(per_seed, best, [seed], code_version) if best else [per_seed[seed]]
    return out


def cell_finals(per_seed: Mapping[int, TrialPlan], best_params: dict[str, Any], seeds: Iterable[int],
                code_version: str) -> list[TrialPlan]:
    """A cell at its chosen settings, one trial per seed."""
    return [tuned_trial(per_seed[seed], best_params, code_version) for seed in seeds]


class SearchScheduler:
    def __init__(self, spec: SweepSpec, output_dir: Path, code_version: str,
                 run_dir_of: Callable[[str], Path], event: Callable[[str, str, str], None] | None = None) -> None:
        assert spec.search is not None
        self.spec = spec
        self.search = spec.search
        self.code_version = code_version
        self.run_dir_of = run_dir_of
        self.event = event or (lambda kind, what, detail="": None)
        self.plans, self.search_seed = cell_plans(spec, code_version)
        self.studies = {tuple(s.cell_plan.cell.values()): s for s in open_studies(spec, output_dir, code_version)}
        self.owners: dict[str, list[tuple[CellStudy, int]]] = {}  # trial id -> the Optuna trials waiting on it
        self.reported: dict[tuple[str, int], int] = {}  # (study, number) -> last step reported
        self.finals_added: set[tuple[str, ...]] = set()
        self.outcomes: dict[str, tuple[str, float | None, str | None]] = {}  # trial id -> how it ended
        self.final_ids: set[str] = set()  # the trials the report compares
        self.metric = self.search.metric

    # -- the runner's hooks -------------------------------------------------------------------------
    def start(self) -> list[TrialPlan]:
        known: list[TrialPlan] = []
        for study in self.studies.values():
            retried = study.recover()
            if retried:
                self.event("search", study.name, f"{retried} trial(s) left running by a stopped orchestrator: retried")
            known += study.searched_trials()
        return known + self._new_finals(self.summaries())

    def more(self, free_slots: int) -> list[TrialPlan]:
        """Up to `free_slots` new runs, cells with the fewest trials first (all cells progress together)."""
        out: list[TrialPlan] = []
        summaries = {cell: study.summary() for cell, study in self.studies.items()}
        while len(out) < free_slots:
            open_cells = [c for c, s in summaries.items() if self.studies[c].wants_more(s)]
            if not open_cells:
                break
            cell = min(open_cells, key=lambda c: (summaries[c].trials + summaries[c].running, list(self.studies).index(c)))
            study = self.studies[cell]
            number, plan = study.ask()
            if plan.trial_id in self.outcomes:  # these settings ran already: the same answer, no run
                study.duplicate_asks += 1
                study.tell(number, *self.outcomes[plan.trial_id])
                self.event("search", plan.label, f"Optuna trial {number} repeats a finished trial: told its result")
                summaries[cell] = study.summary()
                continue
            waiting = self.owners.setdefault(plan.trial_id, [])
            if waiting:  # the same settings are running for another Optuna trial: share that run
                study.duplicate_asks += 1
                self.event("search", plan.label, f"Optuna trial {number} = a running trial: shares its run")
            else:
                study.duplicate_asks = 0
                out.append(plan)
                self.event("search", plan.label, f"Optuna trial {number} of {study.name}")
            waiting.append((study, number))
            summaries[cell] = study.summary()
        return out + self._new_finals(summaries)

    def to_prune(self, running: Iterable[str]) -> list[str]:
        """Runs whose latest validation point puts them behind, by the study's pruner."""
        prune = []
        for tid in running:
            owners = self.owners.get(tid)
            if not owners:
                continue
            study, number = owners[0]
            last = self.reported.get((study.name, number), -1)
            for step, metrics in read_progress(self.run_dir_of(tid)):
                if step <= last or self.metric not in metrics:
                    continue
                last = step
                if study.report(number, step, float(metrics[self.metric])):
                    prune.append(tid)
                    self.event("pruned", tid, f"{self.metric}={metrics[self.metric]:.4f} at step {step} "
                                              f"({self.search.pruner})")
                    break
            self.reported[(study.name, number)] = last
        return prune

    def settled(self, tid: str, state: str, result: Mapping[str, Any] | None) -> None:
        """A run ended: tell every Optuna trial waiting on it."""
        if state == "done":
            value = ((result or {}).get("metrics") or {}).get(self.metric)
            outcome = ("complete", float(value), None) if value is not None else \
                ("failed", None, f"result.json has no {self.metric}")
        elif state == "pruned":
            outcome = ("pruned", None, None)
        else:
            outcome = ("failed", None, str((result or {}).get("error") or state))
        self.outcomes[tid] = outcome
        for study, number in self.owners.pop(tid, []):
            study.tell(number, *outcome)

    @property
    def finished(self) -> bool:
        """Every cell's search is over and its final trials were handed out."""
        return not self.owners and len(self.finals_added) == len(self.studies)

    def summaries(self) -> dict[tuple[str, ...], CellSummary]:
        return {cell: study.summary() for cell, study in self.studies.items()}

    # -- internals ----------------------------------------------------------------------------------
    def _new_finals(self, summaries: Mapping[tuple[str, ...], CellSummary]) -> list[TrialPlan]:
        """Each cell's final trials, once: when its search is over."""
        out = []
        for cell, study in self.studies.items():
            summary = summaries[cell]
            if cell in self.finals_added or not summary.finished:
                continue
            self.finals_added.add(cell)
            if summary.best_params is None:
                self.event("failed", study.name, f"search ended without a complete trial: {summary.gave_up}")
                continue
            self.event("search", study.name, f"best {self.metric}={summary.best_value:.4f} with "
                       f"{summary.best_params} after {summary.trials} trial(s)")
            finals = cell_finals(self.plans[cell], summary.best_params, self.spec.seeds, self.code_version)
            self.final_ids.update(t.trial_id for t in finals)
            out += finals
        return out

    def is_exploration(self, tid: str) -> bool:
        """A search trial that is not also a final one: its failure (a diverging lr, say) is a
        result the study has recorded, not a failure of the sweep."""
        return tid not in self.final_ids and tid in self.outcomes
