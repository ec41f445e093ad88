"""The report's statistics against values computed by hand (t quantiles from a printed table, the
t test's p-value in closed form, Holm step by step) and the verdict rules on planted effects."""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.report.stats import (
    best_indices,
    finite,
    mean_with_ci,
    paired_delta,
    paired_differences,
    relative_change,
    sample_std,
    summarize,
    t_quantile,
)
from orchestrator.report.verdicts import INCONCLUSIVE, NO_LARGER_EFFECT, SIGNIFICANT, decide, holm

# Two-sided 95% critical values of Student's t, as printed in any statistics table.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("dof,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_printed_table(dof, expected):
    assert t_quantile(0.95, dof) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_summary_is_mean_and_sample_std():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (n-1) = 7/3; sqrt = 1.5275
    s = summarize([1.0, 2.0, 4.0])
    assert s.n == 3
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(math.sqrt(7 / 3))
    assert s.std == pytest.approx(1.5275, abs=1e-4)


def test_summary_of_one_value_has_no_std_and_of_none_has_no_mean():
    assert summarize([0.5]) == summarize([0.5, None, float("nan")])
    one = summarize([0.5])
    assert (one.mean, one.std, one.n) == (0.5, None, 1)
    empty = summarize([])
    assert (empty.mean, empty.std, empty.n) == (None, None, 0)
    assert sample_std([3.0]) is None


def test_non_finite_values_are_not_measurements():
    assert finite([1.0, None, float("nan"), float("inf"), 2]) == [1.0, 2.0]


def test_paired_delta_uses_same_seed_differences_and_t_interval():
    variant = {0: 10.0, 1: 12.0, 2: 11.0}
    reference = {0: 9.0, 1: 10.0, 2: 10.5}
    # differences [1, 2, 0.5]: mean 3.5/3 = 1.1667
    # squared deviations 1/36 + 25/36 + 16/36 = 42/36; / 2 = 0.58333; s = 0.76376; s/sqrt(3) = 0.44096
    # half width = 4.303 * 0.44096 = 1.8975 -> [-0.7308, 3.0641], includes 0
    d = paired_delta(variant, reference)
    assert d.n == 3
    assert d.mean == pytest.approx(1.16667, abs=1e-5)
    assert d.low == pytest.approx(1.16667 - 1.8975, abs=1e-3)
    assert d.high == pytest.approx(1.16667 + 1.8975, abs=1e-3)
    assert d.significant is False


def test_paired_delta_is_significant_when_the_interval_excludes_zero():
    # differences [2.0, 2.2, 1.8]: mean 2.0, s = 0.2, s/sqrt(3) = 0.11547, half width 4.303 * 0.11547 = 0.49686
    d = paired_delta({0: 3.0, 1: 3.2, 2: 2.8}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == (pytest.approx(1.50314, abs=1e-3), pytest.approx(2.49686, abs=1e-3))
    assert d.significant is True
    drop = paired_delta({0: 1.0, 1: 1.0, 2: 1.0}, {0: 3.0, 1: 3.2, 2: 2.8})
    assert drop.significant is True and drop.high == pytest.approx(-1.50314, abs=1e-3)


def test_pairing_removes_the_shared_seed_offset():
    # Unpaired, seeds 0..2 differ by 10 points; paired, the variant is +0.9/+1.0/+1.1: s = 0.1,
    # half width 4.3027 * 0.1 / sqrt(3) = 0.2484, so a tight interval that excludes 0.
    variant = {0: 10.9, 1: 21.0, 2: 31.1}
    reference = {0: 10.0, 1: 20.0, 2: 30.0}
    d = paired_delta(variant, reference)
    assert d.mean == pytest.approx(1.0)
    assert d.low == pytest.approx(1.0 - 0.2484, abs=1e-3) and d.high == pytest.approx(1.0 + 0.2484, abs=1e-3)
    assert d.significant is True


def test_identical_paired_differences_give_no_interval_not_certainty():
    # Both seeds moved by exactly +4 images of 256 (quantized accuracy): no spread, no evidence about noise.
    delta = paired_delta({0: 0.70, 1: 0.72}, {0: 0.68, 1: 0.70})
    assert delta.mean == pytest.approx(0.02) and not delta.has_ci and delta.significant is None


def test_two_pairs_use_one_degree_of_freedom():
    # differences [1, 3]: mean 2, s = sqrt(2), s/sqrt(2) = 1, half width 12.706
    d = paired_delta({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    assert d.n == 2
    assert (d.low, d.high) == (pytest.approx(2 - 12.706, abs=1e-3), pytest.approx(2 + 12.706, abs=1e-3))


def test_one_pair_gives_no_interval_and_unknown_significance():
    d = paired_delta({0: 5.0, 1: 7.0}, {0: 4.0})
    assert d.n == 1 and d.mean == pytest.approx(1.0)
    assert d.low is None and d.high is None and not d.has_ci
    assert d.significant is None  # "unknown", not "not significant"


def test_only_common_finite_seeds_are_paired():
    variant = {0: 1.0, 1: 2.0, 2: float("nan"), 3: 4.0}
    reference = {1: 1.5, 2: 1.0, 3: 3.0, 4: 9.0}
    assert paired_differences(variant, reference) == {1: 0.5, 3: 1.0}
    assert paired_delta({0: 1.0}, {1: 1.0}).n == 0
    assert paired_delta({0: 1.0}, {1: 1.0}).mean is None


def test_mean_with_ci_at_other_confidence():
    # [1, 2, 3, 4, 5]: mean 3, s = sqrt(2.5) = 1.5811, s/sqrt(5) = 0.70711; t_{0.95, 4} = 2.132 (90% two-sided)
    d = mean_with_ci([1, 2, 3, 4, 5], confidence=0.90)
    assert d.high - d.mean == pytest.approx(2.132 * 0.70711, abs=1e-3)


def test_best_index_is_direction_aware_and_keeps_ties():
    assert best_indices([0.30, 0.33, 0.31], higher_is_better=True) == {1}
    assert best_indices([0.52, 0.49, 0.50], higher_is_better=False) == {1}
    assert best_indices([0.5, None, 0.5], higher_is_better=True) == {0, 2}
    assert best_indices([None, None], higher_is_better=True) == set()


def test_relative_change():
    assert relative_change(108.23, 100.0) == pytest.approx(0.0823)
    assert relative_change(1.0, 0.0) is None
    assert relative_change(None, 1.0) is None


# ----------------------------------------------------------------------------------------------
# The paired t test's p-value, Holm, and the verdict rules
# ----------------------------------------------------------------------------------------------
def test_paired_p_value_matches_the_two_dof_closed_form():
    # differences [2.0, 2.2, 1.8]: t = 2.0 / (0.2 / sqrt(3)) = sqrt(300); with 2 dof the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(300/302).
    d = paired_delta({0: 3.0, 1: 3.2, 2: 2.8}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert d.p_value == pytest.approx(1 - math.sqrt(300 / 302), rel=1e-6)
    assert d.p_value == pytest.approx(0.003317, abs=1e-6)
    assert paired_delta({0: 0.70, 1: 0.72}, {0: 0.68, 1: 0.70}).p_value is None  # no spread: no test
    assert paired_delta({0: 5.0}, {0: 4.0}).p_value is None  # one pair: no test


def test_holm_against_hand_values():
    # sorted p: 0.005 * 4 = 0.02; 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> max with the
    # previous (step-down keeps adjusted p monotone) = 0.06. Back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])  # 0.02 * 2; 0.9 * 1
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 0.5 * 2 = 1.0; 0.9 * 1 lifted to 1.0 (monotone)
    assert holm([]) == []


def planted(mean: float, sd: float, seeds: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.gauss(0.0, sd) for _ in range(seeds)]


def test_verdicts_on_planted_effects():
    # One family of four comparisons, as a report would hold them (logged units: mIoU fractions):
    effect = mean_with_ci(planted(0.02, 0.002, 5, seed=1))  # +2 pts, tight: must be found
    null = mean_with_ci(planted(0.0, 0.001, 5, seed=2))  # nothing, measured precisely
    noisy_null = mean_with_ci(planted(0.0, 0.02, 3, seed=3))  # nothing, measured badly
    same = mean_with_ci([0.01, 0.01])  # identical differences: no interval
    family = [effect, null, noisy_null]
    adjusted = holm([d.p_value for d in family])
    target = 0.01  # 1 pt
    verdicts = [decide(d, p, target, family_size=3) for d, p in zip(family, adjusted)]
    assert [v.kind for v in verdicts] == [SIGNIFICANT, NO_LARGER_EFFECT, INCONCLUSIVE]
    # why: the planted null's interval sits inside ±1 pt, the noisy one's does not
    assert -target <= null.low and null.high <= target
    assert noisy_null.low < -target or noisy_null.high > target
    assert verdicts[1].bound == target and verdicts[0].p_holm == adjusted[0]
    # without a target a precise null is only "inconclusive": absence of evidence, nothing more
    assert decide(null, adjusted[1], None).kind == INCONCLUSIVE
    # no interval, no test: inconclusive whatever its size
    assert decide(same, None, target).kind == INCONCLUSIVE and not decide(same, None, target).has_test


def test_significance_is_judged_on_the_holm_adjusted_p_not_the_raw_one():
    # raw p 0.03 is below 0.05, but as one of four tests Holm lifts it above (see the hand values)
    delta = mean_with_ci(planted(0.02, 0.002, 5, seed=1))
    assert decide(delta, 0.06, None).kind == INCONCLUSIVE
    assert decide(delta, 0.049, None).kind == SIGNIFICANT
