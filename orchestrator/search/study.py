"""One Optuna study per cell of the ablation, kept in the sweep folder's journal file.

Optuna runs here, in the orchestrator (ask/tell): a study never trains anything itself. Each asked
trial becomes an ordinary trial config (the cell's config with the suggested values), so it gets a
trial id, a run dir in the shared store and any backend, like every other trial; the id is stored
on the Optuna trial (`user_attrs["trial_id"]`) so a restarted orchestrator finds its runs again.

The journal (`<output_dir>/optuna.journal`, Optuna's JournalFileBackend) is an append-only log with
file locks: safe on a shared filesystem with no database server, and readable while a sweep runs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import identity
from orchestrator.spec import TrialPlan
from orchestrator.spec.search import SearchParam, SearchSpec
from trainer.config import TrialConfig

if TYPE_CHECKING:
    import optuna

JOURNAL_FILE = "optuna.journal"
TRIAL_ID_ATTR = "trial_id"
RETRY_OF_ATTR = "retry_of"  # a trial enqueued again after its orchestrator died
FAIL_REASON_ATTR = "fail_reason"
ORPHANED = "orchestrator stopped while it ran; retried as a new Optuna trial (its run resumes)"
# Settings that only say how much to search: raising the budget continues a study instead of starting over.
BUDGET_KEYS = ("trials_per_cell", "max_failures", "parallel_per_cell")


def _quiet_optuna() -> None:
    import optuna  # optional and slow to import: only tuned sweeps load it

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def journal_storage(output_dir: Path) -> optuna.storages.JournalStorage:
    import optuna  # only tuned sweeps load it
    from optuna.storages.journal import JournalFileBackend

    _quiet_optuna()
    output_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(output_dir / JOURNAL_FILE)))


def distribution(param: SearchParam) -> optuna.distributions.BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # tuned sweeps only

    if param.choices is not None:
        return CategoricalDistribution(param.choices)
    if param.is_int:
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def tuned_trial(cell_trial: TrialPlan, params: dict[str, Any], code_version: str) -> TrialPlan:
    """The cell's trial with `params` set: validated through the trial schema (so 1e-3 and 0.001
    are one trial) and identified like any other trial."""
    config = copy.deepcopy(cell_trial.config)
    for key, value in params.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config = TrialConfig.model_validate(config).model_dump(mode="json")
    return TrialPlan(trial_id=identity.trial_id(config, code_version), cell=dict(cell_trial.cell),
                     seed=cell_trial.seed, config=config, params=dict(params))


def study_name(search: SearchSpec, cell_trial: TrialPlan) -> str:
    """`specialization=paper [3f2a...]`: the cell, and a hash of what makes its results comparable
    (the cell's config and trainer code via its trial id, the searched space, sampler, pruner and
    metric). Change any of those and the cell starts a new study; raise the budget and it goes on."""
    what = {"cell_trial": cell_trial.trial_id, "search": search.model_dump(mode="json", exclude=set(BUDGET_KEYS))}
    digest = hashlib.sha256(identity.canonical_json(what).encode()).hexdigest()[:12]
    cell = " ".join(f"{axis}={value}" for axis, value in cell_trial.cell.items())
    return f"{cell} [{digest}]"


def _sampler(search: SearchSpec, seed: int) -> optuna.samplers.BaseSampler:
    import optuna  # tuned sweeps only

    if search.sampler == "grid":
        space = {key: param.grid for key, param in search.params.items()}
        return _grid_sampler(space, seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = search.startup_trials if search.startup_trials is not None else max(1, search.budget() // 3)
    # constant_liar: trials still running count as "as bad as the worst", so parallel asks spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def _grid_sampler(space: dict[str, list[Any]], seed: int) -> optuna.samplers.BaseSampler:
    import optuna  # tuned sweeps only

    class SpecOrderGridSampler(optuna.samplers.BaseSampler):
        """Every point of a finite space once, in the order the spec writes the values (Optuna's
        GridSampler shuffles them so that distributed workers collide less; one orchestrator asks
        them one at a time, and needs no `study.stop()`: the budget, capped at the grid's size,
        ends the search). Trial n < grid size gets point n; later ones a point not yet run."""

        def __init__(self) -> None:
            self.names = sorted(space)
            self.points = list(itertools.product(*(space[name] for name in self.names)))
            self.rng = random.Random(seed)
            self.chosen: dict[int, tuple[Any, ...]] = {}  # trial number -> its point

        def infer_relative_search_space(self, study, trial) -> dict:
            return {}

        def sample_relative(self, study, trial, search_space) -> dict:
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
            if trial.number not in self.chosen:
                self.chosen[trial.number] = self._pick(study, trial.number)
            return self.chosen[trial.number][self.names.index(param_name)]

        def _pick(self, study, number: int) -> tuple[Any, ...]:
            if number < len(self.points):
                return self.points[number]
            finished, running = set(), set()
            for t in study.get_trials(deepcopy=False):
                if t.number != number and set(t.params) == set(self.names):
                    (finished if t.state.is_finished() else running).add(tuple(t.params[n] for n in self.names))
            unvisited = [p for p in self.points if p not in finished | running]
            return self.rng.choice(unvisited or [p for p in self.points if p not in finished] or self.points)

    return SpecOrderGridSampler()


def _pruner(search: SearchSpec, every_steps: int, total_steps: int) -> optuna.pruners.BasePruner:
    import optuna  # tuned sweeps only

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials, n_warmup_steps=0)
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, every_steps),
                                                      reduction_factor=search.reduction_factor)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, every_steps), max_resource=total_steps,
                                              reduction_factor=search.reduction_factor)
    return optuna.pruners.NopPruner()


@dataclass
class CellSummary:
    """What a cell's search has done so far (read from the journal; no Optuna objects leak out)."""

    cell: dict[str, str]
    study: str
    budget: int
    complete: int = 0  # distinct runs
    pruned: int = 0
    failed: int = 0  # Optuna trials that failed (a run that failed, not an orchestrator restart)
    running: int = 0
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    best_trial_id: str | None = None
    best_number: int | None = None
    finished: bool = False  # no more trials will be asked
    space_covered: bool = False  # a finite space (grid, choices) whose every point ran
    gave_up: str | None = None  # why the search stopped short (too many failures, ...)
    trial_ids: list[str] = field(default_factory=list)  # every run the search made, in order

    @property
    def trials(self) -> int:
        return self.complete + self.pruned


class CellStudy:
    """A cell's search: ask for a trial, tell its outcome, report its learning curve."""

    def __init__(self, storage: optuna.storages.BaseStorage, search: SearchSpec, cell_trial: TrialPlan,
                 code_version: str, *, every_steps: int, total_steps: int, create: bool = True) -> None:
        import optuna  # tuned sweeps only

        self.storage = storage
        self.search = search
        self.cell_trial = cell_trial  # the cell at the search seed, untuned
        self.code_version = code_version
        self.name = study_name(search, cell_trial)
        self.budget = search.budget()
        self.space_size = search.grid_size()  # None for a continuous space
        if create:
            self.study = optuna.create_study(
                study_name=self.name, storage=storage, direction=search.resolved_direction, load_if_exists=True,
                pruner=_pruner(search, every_steps, total_steps))
        else:
            self.study = optuna.load_study(study_name=self.name, storage=storage)
        # A restarted orchestrator must not replay the sampler's first draws: seed it past them.
        seed_text = f"{search.sampler_seed}|{self.name}|{len(self.study.get_trials(deepcopy=False))}"
        self.study.sampler = _sampler(search, int(hashlib.sha256(seed_text.encode()).hexdigest()[:8], 16))
        self.distributions = {key: distribution(param) for key, param in search.params.items()}
        self.live: dict[int, optuna.trial.Trial] = {}  # number -> trial asked by this process
        self.last_step: dict[int, int] = {}  # number -> the last learning-curve step reported
        self.duplicate_asks = 0

    # -- reading --------------------------------------------------------------------------------
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def summary(self) -> CellSummary:
        from optuna.trial import TrialState  # tuned sweeps only

        out = CellSummary(cell=dict(self.cell_trial.cell), study=self.name, budget=self.budget)
        by_state: dict[TrialState, set[str]] = {}
        tried: set[str] = set()  # distinct settings run (or running), whatever came of them
        for t in self.trials():
            tid = t.user_attrs.get(TRIAL_ID_ATTR)
            if tid and tid not in out.trial_ids:
                out.trial_ids.append(tid)
            if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_REASON_ATTR) == ORPHANED:
                continue  # not the trial's fault: retried under a new number
            if t.state == TrialState.FAIL:
                out.failed += 1
                if tid:
                    tried.add(tid)
            elif tid:
                tried.add(tid)
                by_state.setdefault(t.state, set()).add(tid)
        out.space_covered = self.space_size is not None and len(tried) >= self.space_size
        done = by_state.get(TrialState.COMPLETE, set())
        out.complete = len(done)
        out.pruned = len(by_state.get(TrialState.PRUNED, set()) - done)
        out.running = len(by_state.get(TrialState.RUNNING, set()) - done)
        best = self.best_trial()
        if best is not None:
            out.best_value, out.best_params = best.value, dict(best.params)
            out.best_trial_id, out.best_number = best.user_attrs.get(TRIAL_ID_ATTR), best.number
        out.finished, out.gave_up = self._finished(out)
        return out

    def searched_trials(self) -> list[TrialPlan]:
        """Every run the study made (one trial per id), rebuilt from the values it asked."""
        found: dict[str, TrialPlan] = {}
        for t in self.trials():
            if t.user_attrs.get(TRIAL_ID_ATTR) and set(t.params) == set(self.search.params):
                trial = tuned_trial(self.cell_trial, dict(t.params), self.code_version)
                found.setdefault(trial.trial_id, trial)
        return list(found.values())

    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        """The best complete trial by the validation metric (ties: the earliest)."""
        from optuna.trial import TrialState  # tuned sweeps only

        complete = [t for t in self.trials() if t.state == TrialState.COMPLETE and t.value is not None
                    and math.isfinite(t.value)]
        if not complete:
            return None
        sign = -1.0 if self.search.resolved_direction == "maximize" else 1.0
        return min(complete, key=lambda t: (sign * t.value, t.number))

    def _finished(self, summary: CellSummary) -> tuple[bool, str | None]:
        if summary.failed >= max(1, self.search.failure_budget) and summary.running == 0:
            return True, f"{summary.failed} failed trials (search.max_failures {self.search.failure_budget})"
        if summary.space_covered and summary.running == 0:
            return True, None if summary.trials >= self.budget else "every point of the space ran"
        if self.duplicate_asks >= 50 and summary.running == 0:
            return True, "the sampler keeps proposing settings that already ran: the space is exhausted"
        return summary.trials >= self.budget and summary.running == 0, None

    def wants_more(self, summary: CellSummary) -> bool:
        if summary.finished or summary.gave_up or summary.space_covered or self.duplicate_asks >= 50:
            return False
        if summary.failed >= max(1, self.search.failure_budget):
            return False
        limit = self.search.parallel_per_cell
        return summary.trials + summary.running < self.budget and (limit is None or summary.running < limit)

    # -- writing --------------------------------------------------------------------------------
    def recover(self) -> int:
        """Optuna trials left RUNNING by an orchestrator that died: failed, and enqueued again with
        the same values (Optuna's RetryFailedTrialCallback pattern). The retry maps to the same
        trial id, so its run resumes from its checkpoint instead of starting over."""
        from optuna.trial import TrialState  # tuned sweeps only

        count = 0
        orphans = [t for t in self.trials() if t.state == TrialState.RUNNING]
        if orphans:
            study_id = self.storage.get_study_id_from_name(self.name)
        for t in orphans:
            # Asked by another process: no Trial object here, so the reason goes through the storage
            # this study was opened on (BaseStorage's public interface).
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            self.storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, ORPHANED)
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            self.study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF_ATTR: t.number})
            count += 1
        return count

    def ask(self) -> tuple[int, TrialPlan]:
        trial = self.study.ask(self.distributions)
        params = {key: trial.params[key] for key in self.search.params}
        tuned = tuned_trial(self.cell_trial, params, self.code_version)
        trial.set_user_attr(TRIAL_ID_ATTR, tuned.trial_id)
        self.live[trial.number] = trial
        return trial.number, tuned

    def tell(self, number: int, state: str, value: float | None = None, reason: str | None = None) -> None:
        """The outcome of a trial this process asked for (a second word on it is ignored)."""
        from optuna.trial import TrialState  # tuned sweeps only

        trial = self.live.pop(number, None)
        self.last_step.pop(number, None)
        if trial is None:
            return
        if reason:
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
        if state == "complete":
            self.study.tell(trial, value, skip_if_finished=True)
        elif state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def report(self, number: int, step: int, value: float) -> bool:
        """Record one point of the learning curve; True when the pruner says stop."""
        trial = self.live.get(number)
        if trial is None or step <= self.last_step.get(number, -1):
            return False
        self.last_step[number] = step
        trial.report(value, step)
        return trial.should_prune()
