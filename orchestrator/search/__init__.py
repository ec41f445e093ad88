"""Per-cell hyperparameter search with Optuna (the spec's `search:` section).

    spec.py       the `search:` schema (params, budget, sampler, pruner, metric)
    study.py      one Optuna study per cell in the sweep folder's journal file; ask / tell / report
    scheduler.py  the runner's source of trials for a tuned sweep; pruning; final trials per cell

`tuned_plan` is the read-only view the report, `status` and `sync` use: what each cell's search
chose so far and the trials that compare the cells at their chosen settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.search.spec import SearchSpec
from orchestrator.search.study import CellSummary

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec, TrialPlan

__all__ = ["CellSummary", "SearchSpec", "TunedPlan", "tuned_plan"]


@dataclass
class TunedPlan:
    final: list[TrialPlan]  # each cell at its chosen settings, every seed (untuned while undecided)
    search: list[TrialPlan] = field(default_factory=list)  # every run the searches made
    cells: list[CellSummary] = field(default_factory=list)  # in the sweep's cell order


def tuned_plan(spec: SweepSpec, output_dir: Path, code_version: str) -> TunedPlan:
    """Read the sweep's studies (never creating one) into the trials that stand for each cell."""
    from orchestrator.search.scheduler import cell_plans, final_trials, open_studies
    from orchestrator.search.study import JOURNAL_FILE

    plans, _ = cell_plans(spec, code_version)
    if not (Path(output_dir) / JOURNAL_FILE).exists():
        return TunedPlan(final=final_trials(spec, code_version, {}, plans))
    studies = open_studies(spec, Path(output_dir), code_version, create=False)
    summaries = {tuple(s.cell_plan.cell.values()): s.summary() for s in studies}
    searched = {plan.trial_id: plan for study in studies for plan in study.searched_trials()}
    cells = [summaries[cell] for cell in plans if cell in summaries]
    return TunedPlan(final=final_trials(spec, code_version, summaries, plans), search=list(searched.values()),
                     cells=cells)
