"""Feeds a tuned sweep's runner: asks each cell's study for trials, tells it their outcomes, prunes
runs whose learning curves fall behind, and, once a cell's search is over, adds the cell's final
trials (its best settings, by the validation metric, at every seed of the sweep).

The runner (orchestrator/runner.py) calls, from its one loop thread:
    start()             -> trials already known (so a restart re-attaches and reuses them)
    more(free_slots)    -> new trials to queue
    to_prune(running)   -> trial ids to stop now
    trial_ended(id, state, result)   after each trial ends (done, failed for good, pruned)
    finished            True when no cell will ask for more

Identical trials run once: a suggestion whose trial id is already running (asked twice under
parallelism, or by a grid retry) joins that run, and one already done anywhere in the shared store
is told its stored result at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.search.study import CellStudy, CellSummary, journal_storage, study_name, tuned_trial
from orchestrator.spec import SweepSpec, TrialPlan, expand
from orchestrator.store import TrialDir
from trainer.contract import TrialResult

CellTrials = dict[tuple[str, ...], dict[int, TrialPlan]]  # cell values -> seed -> its untuned trial


def search_seed(spec: SweepSpec) -> int:
    """The seed the searches train at: `search.seed`, else the sweep's first."""
    assert spec.search is not None
    return spec.search.seed if spec.search.seed is not None else spec.seeds[0]


def cell_trials(spec: SweepSpec, code_version: str) -> CellTrials:
    """The untuned trial of every (cell, seed), for the sweep's seeds and the search seed."""
    seeds = list(dict.fromkeys([*spec.seeds, search_seed(spec)]))
    per_cell: CellTrials = {}
    for trial in expand(spec.model_copy(update={"seeds": seeds}), code_version=code_version):
        per_cell.setdefault(tuple(trial.cell.values()), {})[trial.seed] = trial
    return per_cell


def open_studies(spec: SweepSpec, output_dir: Path, code_version: str, per_cell: CellTrials, *,
                 create: bool = True) -> list[CellStudy]:
    """One study per cell (created on first use; create=False: only those that exist, read-only use)."""
    assert spec.search is not None
    seed = search_seed(spec)
    storage = journal_storage(output_dir)
    existing = {s.study_name for s in storage.get_all_studies()}
    base = next(iter(next(iter(per_cell.values())).values())).config
    studies = []
    for per_seed in per_cell.values():
        cell_trial = per_seed[seed]
        if not create and study_name(spec.search, cell_trial) not in existing:
            continue
        studies.append(CellStudy(storage, spec.search, cell_trial, code_version, create=create,
                                 every_steps=base["evaluation"]["every_steps"], total_steps=base["schedule"]["steps"]))
    return studies


def final_trials(spec: SweepSpec, code_version: str, summaries: Mapping[tuple[str, ...], CellSummary],
                 per_cell: CellTrials) -> list[TrialPlan]:
    """What the report compares: each cell at its best settings, every seed (seed-major, like
    `expand`). A cell whose search has no complete trial yet shows its untuned trials."""
    out = []
    for seed in spec.seeds:
        for cell, per_seed in per_cell.items():
            summary = summaries.get(cell)
            best = summary.best_params if summary is not None and summary.finished else None
            out += cell_finals(per_seed, best, [seed], code_version) if best else [per_seed[seed]]
    return out


def cell_finals(per_seed: Mapping[int, TrialPlan], best_params: dict[str, Any], seeds: Iterable[int],
                code_version: str) -> list[TrialPlan]:
    """A cell at its chosen settings, one trial per seed."""
    return [tuned_trial(per_seed[seed], best_params, code_version) for seed in seeds]


class SearchScheduler:
    """The runner's source of trials for a tuned sweep (see the module's docstring for its hooks)."""

    def __init__(self, spec: SweepSpec, output_dir: Path, code_version: str, per_cell: CellTrials,
                 trial_dir_of: Callable[[str], TrialDir], event: Callable[[str, str, str], None] | None = None) -> None:
        assert spec.search is not None
        self.spec = spec
        self.search = spec.search
        self.code_version = code_version
        self.trial_dir_of = trial_dir_of
        self.event = event or (lambda kind, what, detail="": None)
        self.per_cell = per_cell
        studies = open_studies(spec, output_dir, code_version, per_cell)
        self.studies = {tuple(s.cell_trial.cell.values()): s for s in studies}
        self.owners: dict[str, list[tuple[CellStudy, int]]] = {}  # trial id -> the Optuna trials waiting on it
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
            number, trial = study.ask()
            if trial.trial_id in self.outcomes:  # these settings ran already: the same answer, no run
                study.duplicate_asks += 1
                study.tell(number, *self.outcomes[trial.trial_id])
                self.event("search", trial.label, f"Optuna trial {number} repeats a finished trial: told its result")
                summaries[cell] = study.summary()
                continue
            waiting = self.owners.setdefault(trial.trial_id, [])
            if waiting:  # the same settings are running for another Optuna trial: share that run
                study.duplicate_asks += 1
                self.event("search", trial.label, f"Optuna trial {number} = a running trial: shares its run")
            else:
                study.duplicate_asks = 0
                out.append(trial)
                self.event("search", trial.label, f"Optuna trial {number} of {study.name}")
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
            for step, metrics in self.trial_dir_of(tid).progress():  # the study skips steps it has seen
                if self.metric in metrics and study.report(number, step, float(metrics[self.metric])):
                    prune.append(tid)
                    self.event("pruned", tid, f"{self.metric}={metrics[self.metric]:.4f} at step {step} "
                                              f"({self.search.pruner})")
                    break
        return prune

    def trial_ended(self, tid: str, state: str, result: TrialResult | None) -> None:
        """A run ended (done, failed for good, pruned): tell every Optuna trial waiting on it."""
        if state == "done":
            value = result.metrics.get(self.metric) if result is not None else None
            outcome = ("complete", float(value), None) if value is not None else \
                ("failed", None, f"result.json has no {self.metric}")
        elif state == "pruned":
            outcome = ("pruned", None, None)
        else:
            outcome = ("failed", None, str((result.error if result is not None else None) or state))
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
            finals = cell_finals(self.per_cell[cell], summary.best_params, self.spec.seeds, self.code_version)
            self.final_ids.update(t.trial_id for t in finals)
            out += finals
        return out

    def is_exploration(self, tid: str) -> bool:
        """A search trial that is not also a final one: its failure (a diverging lr, say) is a
        result the study has recorded, not a failure of the sweep."""
        return tid not in self.final_ids and tid in self.outcomes
