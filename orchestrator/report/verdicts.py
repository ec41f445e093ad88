"""What each comparison says, in one word: significant, no effect larger than the target, or inconclusive.

Rules, per (variant vs reference, quality metric), in this order:
- **significant**: the paired t test's p-value, Holm-adjusted over the report's family of
  simultaneous comparisons, is below alpha (0.05); the table still shows the uncorrected 95% CI;
- **no effect larger than X**: the 95% CI lies inside [-X, +X], X the metric's
  `report.target_effects` entry: evidence of no effect that matters, not mere absence of evidence;
- **inconclusive**: anything else, including a delta without an interval (one seed pair, or
  per-seed differences all identical: no estimate of the noise).

The family is every distinct (variant cell, reference cell, metric) the report shows with an
interval: a comparison repeated by a crossing table is one test, counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.report.stats import DeltaEstimate
from orchestrator.stats.power import ALPHA

SIGNIFICANT = "significant"
NO_LARGER_EFFECT = "no effect larger than"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SIGNIFICANT, NO_LARGER_EFFECT, INCONCLUSIVE)


@dataclass(frozen=True)
class Verdict:
    kind: str  # one of VERDICTS
    p_holm: float | None = None  # Holm-adjusted over the family; None when the delta has no interval
    bound: float | None = None  # X of "no effect larger than X" (logged units), the metric's target effect
    family_size: int = 0

    @property
    def has_test(self) -> bool:
        return self.p_holm is not None


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Holm step-down adjusted p-values, in the input order (statsmodels' multipletests)."""
    if not p_values:
        return []
    # statsmodels costs 1-2 s to import (scipy.stats, pandas): only a report with tests pays for it.
    from statsmodels.stats.multitest import multipletests

    _, adjusted, _, _ = multipletests(list(p_values), alpha=alpha, method="holm")
    return [float(p) for p in adjusted]


def decide(delta: DeltaEstimate, p_holm: float | None, target: float | None, alpha: float = ALPHA,
           family_size: int = 0) -> Verdict:
    """The verdict of one comparison (the module docstring's rules)."""
    if not delta.has_ci or p_holm is None:
        return Verdict(INCONCLUSIVE, None, target, family_size)
    if p_holm < alpha:
        return Verdict(SIGNIFICANT, p_holm, target, family_size)
    if target is not None and -target <= delta.low and delta.high <= target:
        return Verdict(NO_LARGER_EFFECT, p_holm, target, family_size)
    return Verdict(INCONCLUSIVE, p_holm, target, family_size)
