"""What the report knows about each planned trial (`TrialOutcome`) and about the whole sweep's
sources (`Collection`): the data every table, paragraph and CSV is built from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


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
    control: str | None = None  # a control trial's name (report.controls): a floor, in no comparison
    # metric -> why this trial's config cannot report it (trainer.metric_names.metric_table), for
    # the footnote of a blank cell
    unavailable: Mapping[str, str] = field(default_factory=dict)

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

    def code_versions(self) -> dict[str, int]:
        """Code version -> trials with metrics that ran under it."""
        out: dict[str, int] = {}
        for outcome in self.outcomes:
            if outcome.has_metrics and outcome.code_version:
                out[outcome.code_version] = out.get(outcome.code_version, 0) + 1
        return out
