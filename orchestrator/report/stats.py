"""Pure statistics for the report: summaries over seeds and paired deltas with t confidence intervals
and the paired t test's p-value.

Everything here takes plain numbers (or `{seed: value}` maps) and returns plain values, so it can be
checked against hand-computed numbers. No I/O, no pandas.

Why paired deltas: a variant and its baseline trained with the same seed share the data order and
the initialisation stream, so `variant[seed] - baseline[seed]` removes most seed-to-seed noise. The
CI of that mean difference is what tells whether a +0.3 mIoU is real with 3 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1) of one metric over seeds; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class DeltaEstimate:
    """Mean of the per-seed differences variant - reference, with a two-sided t CI.

    `low`/`high` are None when n < 2 (one pair gives no spread, hence no interval), and then
    `significant` is None too: "unknown", which the report must not present as "not significant".
    """

    mean: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float = DEFAULT_CONFIDENCE
    p_value: float | None = None  # the paired t test of "mean difference = 0", uncorrected; None without a CI

    @property
    def has_ci(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def significant(self) -> bool | None:
        """True when the CI excludes 0, False when it includes 0, None without a CI."""
        if not self.has_ci:
            return None
        return not (self.low <= 0.0 <= self.high)


def finite(values: Iterable[float | None]) -> list[float]:
    """Drop None and non-finite values (a NaN metric from a diverged eval is no measurement)."""
    out = []
    for value in values:
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out.append(value)
    return out


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with Bessel's correction (n - 1): seeds are a sample of possible runs."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def summarize(values: Iterable[float | None]) -> Summary:
    clean = finite(values)
    return Summary(mean=mean(clean), std=sample_std(clean), n=len(clean))


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided critical value t_{(1+confidence)/2, dof}, e.g. 4.303 for 95% and 2 dof."""
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}")
    # scipy costs ~1 s to import: only a report pays for it, not `plan`/`status`.
    from scipy.special import stdtrit  # the inverse Student t CDF, lighter than scipy.stats

    return float(stdtrit(dof, (1.0 + confidence) / 2.0))


def ci_half_width(sd: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """t * sd / sqrt(n) with n - 1 degrees of freedom: the half-width of a mean's t-interval."""
    return t_quantile(confidence, n - 1) * sd / math.sqrt(n)


def mean_with_ci(values: Iterable[float | None], confidence: float = DEFAULT_CONFIDENCE) -> DeltaEstimate:
    """Mean and t-interval mean ± t * s / sqrt(n) with n - 1 degrees of freedom."""
    clean = finite(values)
    n = len(clean)
    m = mean(clean)
    spread = sample_std(clean) if n >= 2 else 0.0
    if n < 2 or spread <= 1e-12 * max(1.0, max(abs(v) for v in clean)):
        # Identical differences (common with accuracies quantized by a small val set) would give a
        # zero-width interval: certainty claimed from no evidence about the noise. No interval.
        return DeltaEstimate(mean=m, low=None, high=None, n=n, confidence=confidence)
    half_width = ci_half_width(spread, n, confidence)
    return DeltaEstimate(mean=m, low=m - half_width, high=m + half_width, n=n, confidence=confidence,
                         p_value=t_test_p_value(clean))


def t_test_p_value(values: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test of mean 0 (on paired differences: the paired t test)."""
    # scipy.stats costs ~1 s to import: only a report pays for it.
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(values, 0.0).pvalue)


def paired_differences(variant: Mapping[int, float | None], reference: Mapping[int, float | None]) -> dict[int, float]:
    """variant[seed] - reference[seed] for every seed where both have a finite value."""
    out: dict[int, float] = {}
    for seed in sorted(set(variant) & set(reference)):
        a, b = finite([variant[seed]]), finite([reference[seed]])
        if a and b:
            out[seed] = a[0] - b[0]
    return out


def paired_delta(variant: Mapping[int, float | None], reference: Mapping[int, float | None],
                 confidence: float = DEFAULT_CONFIDENCE) -> DeltaEstimate:
    """Paired (same-seed) difference variant - reference: mean and t CI over the common seeds."""
    return mean_with_ci(paired_differences(variant, reference).values(), confidence)


def relative_change(value: float | None, reference: float | None) -> float | None:
    """(value - reference) / reference, or None when it is undefined (missing or zero reference)."""
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / reference


def best_indices(means: Sequence[float | None], higher_is_better: bool, tolerance: float = 1e-12) -> set[int]:
    """Indices of the best mean (all of them on a tie); empty when no row has a value."""
    present = [(i, m) for i, m in enumerate(means) if m is not None and math.isfinite(m)]
    if not present:
        return set()
    best = max(m for _, m in present) if higher_is_better else min(m for _, m in present)
    return {i for i, m in present if abs(m - best) <= tolerance * max(1.0, abs(best))}


def is_improvement(delta: float, higher_is_better: bool) -> bool:
    return delta > 0 if higher_is_better else delta < 0
