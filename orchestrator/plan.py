"""What a spec asks for against what already exists: trials to run, trials to keep, trials gone.

Pure set arithmetic on trial ids, so it works the same for a ledger, a directory listing or a
cluster's job records; the caller decides where `existing_ids` come from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.spec import TrialPlan


@dataclass
class PlanDiff:
    new: list[TrialPlan] = field(default_factory=list)  # produced by the spec, not on disk yet
    kept: list[TrialPlan] = field(default_factory=list)  # produced by the spec and already on disk
    gone: list[str] = field(default_factory=list)  # ids on disk that the spec no longer produces

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.kept)} kept, {len(self.gone)} gone"


def diff_plan(trials: list[TrialPlan], existing_ids: Iterable[str]) -> PlanDiff:
    """Split `trials` (in their order) into new / kept; `gone` keeps the order of `existing_ids`."""
    existing = list(dict.fromkeys(existing_ids))  # dedupe, keep first-seen order
    existing_set = set(existing)
    diff = PlanDiff()
    for trial in trials:
        (diff.kept if trial.trial_id in existing_set else diff.new).append(trial)
    wanted = {trial.trial_id for trial in trials}
    diff.gone = [trial_id for trial_id in existing if trial_id not in wanted]
    return diff
