"""The power of a paired comparison: how large a difference a design with n seeds can detect, how
many seeds a target difference needs, and the paired SD both rest on.

A paired comparison (variant vs reference, seed by seed) is a one-sample t test on the per-seed
differences, so statsmodels' `TTestPower` (one-sample / paired t) is the model: two-sided,
alpha 0.05, 80% power unless told otherwise. Effect sizes there are Cohen's d = mean difference /
SD of the differences; `MetricPower` converts them to a metric's own units with the paired SD.

The paired SD is pooled over comparisons: each (variant, reference) pair with >= 2 seeds adds its
squared deviations from its own mean difference and n - 1 degrees of freedom; the pooled variance
is their ratio: the design-level noise, for when the pairs differ in their true effect more than in
their noise. Where one arm is much noisier than the rest, `plan` also shows each comparison's own
SD, and `seeds_by_cell` gives that arm the seeds it needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ALPHA = 0.05  # two-sided
POWER = 0.80
MIN_SEEDS = 2  # a paired t test needs two pairs to estimate its noise
MAX_SEEDS = 10_000  # beyond this "seeds needed" is "not with seeds": the answer is a better probe


@dataclass(frozen=True)
class PooledSD:
    """The SD of per-seed paired differences, pooled over `pairs` comparisons with `dof` degrees of freedom."""

    sd: float
    dof: int
    pairs: int


def pooled_paired_sd(differences: Iterable[Sequence[float]]) -> PooledSD | None:
    """Pool the per-seed differences of several comparisons (one sequence per comparison, its
    seeds' variant - reference values); None when no comparison has two seeds."""
    squares, dof, pairs = 0.0, 0, 0
    for diffs in differences:
        values = [float(d) for d in diffs if d is not None and math.isfinite(float(d))]
        if len(values) < MIN_SEEDS:
            continue
        mean = sum(values) / len(values)
        squares += sum((v - mean) ** 2 for v in values)
        dof += len(values) - 1
        pairs += 1
    if dof == 0:
        return None
    return PooledSD(sd=math.sqrt(squares / dof), dof=dof, pairs=pairs)


def _paired_t_power():
    # statsmodels brings scipy.stats and pandas (1-2 s to import): only `plan`'s power section and
    # the report pay for it, never `status` or a trial.
    from statsmodels.stats.power import TTestPower

    return TTestPower()


def power_at(effect_size: float, seeds: int, alpha: float = ALPHA) -> float:
    """The probability that a two-sided paired t test at `alpha` on `seeds` pairs finds a true
    standardized difference `effect_size` (Cohen's d)."""
    return float(_paired_t_power().power(effect_size=effect_size, nobs=seeds, alpha=alpha, alternative="two-sided"))


def detectable_effect_size(seeds: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest Cohen's d found with probability `power` at `seeds` pairs; None below two seeds."""
    if seeds < MIN_SEEDS:
        return None
    d = _paired_t_power().solve_power(effect_size=None, nobs=seeds, alpha=alpha, power=power,
                                      alternative="two-sided")
    d = float(d)
    return d if math.isfinite(d) and d > 0 else None


def seeds_for_effect_size(effect_size: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seeds (paired trials per cell) that find Cohen's d `effect_size` with probability
    `power`; None when it would take more than MAX_SEEDS.

    The smallest n whose detectable effect is at most `effect_size` (the detectable effect falls
    with n), found by bisection on `detectable_effect_size`: statsmodels' own solve for nobs fails to
    converge for large effects, where the noncentral t's far tail is NaN in scipy.
    """
    if not effect_size > 0:
        return None

    def enough(seeds: int) -> bool:
        d = detectable_effect_size(seeds, alpha, power)
        return d is not None and d <= effect_size

    if not enough(MAX_SEEDS):
        return None
    low, high = MIN_SEEDS - 1, MAX_SEEDS  # not enough at low (or below the minimum), enough at high
    while high - low > 1:
        middle = (low + high) // 2
        if middle >= MIN_SEEDS and enough(middle):
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class MetricPower:
    """One metric's power at a design's seed count, in the metric's logged units.

    `sd_source` says where the paired SD came from, in words (finished trials, a prior, unknown).
    """

    metric: str
    seeds: int
    sd: float | None
    sd_source: str
    target: float | None = None
    alpha: float = ALPHA
    power: float = POWER

    @property
    def detectable_effect_size(self) -> float | None:
        """Cohen's d detectable at `seeds` (known even when the SD is not)."""
        return detectable_effect_size(self.seeds, self.alpha, self.power)

    @property
    def detectable(self) -> float | None:
        """The smallest paired difference (logged units) found with `power` at `seeds`."""
        d = self.detectable_effect_size
        return d * self.sd if d is not None and self.sd is not None else None

    @property
    def seeds_for_target(self) -> int | None:
        """Seeds that find a true difference of `target` with `power`; None without SD or target."""
        if self.target is None or self.sd is None:
            return None
        if self.sd == 0:
            return MIN_SEEDS  # no noise at all: two pairs show any difference
        return seeds_for_effect_size(self.target / self.sd, self.alpha, self.power)


SD_FROM_PRIOR = "the spec's prior (report.paired_sd)"
SD_UNKNOWN = "unknown"


def metric_power(metric: str, seeds: int, pooled: PooledSD | None, pooled_source: str, prior: float | None,
                 target: float | None) -> MetricPower:
    """The metric's power from the first paired SD there is: `pooled` (said as `pooled_source`, with
    its comparisons and degrees of freedom), else the spec's prior, else unknown."""
    if pooled is not None:
        return MetricPower(metric, seeds, pooled.sd, pooled_source, target)
    if prior is not None:
        return MetricPower(metric, seeds, prior, SD_FROM_PRIOR, target)
    return MetricPower(metric, seeds, None, SD_UNKNOWN, target)
