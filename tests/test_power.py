"""Power of the paired comparison (orchestrator/stats/power.py) against statsmodels, against the
noncentral t computed here with scipy, and against a printed value; the pooled paired SD by hand;
the comparison pairs `plan` pools over; and the spec fields that feed them."""

from __future__ import annotations

import math

import pytest
from scipy.integrate import quad
from scipy.stats import chi2, nct, norm, t
from statsmodels.stats.power import TTestPower

from conftest import write_spec
from orchestrator.spec import SpecError, load_spec
from orchestrator.stats.design import cell_key, compared_pairs
from orchestrator.stats.power import (
    MIN_SEEDS,
    MetricPower,
    detectable_effect_size,
    pooled_paired_sd,
    power_at,
    seeds_for_effect_size,
)


def noncentral_t_power(d: float, n: int, alpha: float = 0.05) -> float:
    """Two-sided paired t test power by hand, from the definition: the t statistic of n pairs under
    a true standardized difference d is T = (Z + d sqrt(n)) / sqrt(V / k), Z standard normal, V
    chi-square with k = n - 1 dof; the test rejects when |T| exceeds the central t's critical c, so
    power = E_V[ P(Z > c sqrt(V/k) - d sqrt(n)) + P(Z < -c sqrt(V/k) - d sqrt(n)) ], integrated over V.
    (scipy's noncentral t gives NaN in its far tail at 1 dof, so it is used only where it works.)"""
    k, shift = n - 1, d * math.sqrt(n)
    c = t.ppf(1 - alpha / 2, k)
    inner = lambda v: (norm.sf(c * math.sqrt(v / k) - shift) + norm.cdf(-c * math.sqrt(v / k) - shift)) * chi2.pdf(v, k)  # noqa: E731
    value, _ = quad(inner, 0, math.inf, limit=200)
    return value


def test_power_matches_a_printed_value_the_noncentral_t_and_its_definition():
    # G*Power (one-sample t, two-tailed, alpha 0.05): d = 1.0 with n = 10 has power 0.803.
    assert power_at(1.0, 10) == pytest.approx(0.803, abs=5e-4)
    # scipy's noncentral t: P(T > c) + P(T < -c), T ~ nct(9, 1.0 * sqrt(10))
    c = t.ppf(0.975, 9)
    assert power_at(1.0, 10) == pytest.approx(nct.sf(c, 9, math.sqrt(10)) + nct.cdf(-c, 9, math.sqrt(10)), abs=1e-9)
    for d, n in ((1.0, 10), (0.5, 20), (2.0, 4), (10.4, 2)):
        assert power_at(d, n) == pytest.approx(noncentral_t_power(d, n), abs=1e-6)


@pytest.mark.parametrize("seeds", [2, 3, 5, 10, 30])
def test_detectable_effect_is_statsmodels_and_has_80_percent_power(seeds):
    d = detectable_effect_size(seeds)
    expected = TTestPower().solve_power(effect_size=None, nobs=seeds, alpha=0.05, power=0.8, alternative="two-sided")
    assert d == pytest.approx(expected, rel=1e-9)
    assert noncentral_t_power(d, seeds) == pytest.approx(0.80, abs=1e-4)  # by hand: that d has 80% power
    assert noncentral_t_power(0.9 * d, seeds) < 0.80  # and nothing smaller does


def test_one_seed_detects_nothing():
    assert detectable_effect_size(1) is None and MIN_SEEDS == 2


@pytest.mark.parametrize("sd,target,seeds", [(0.58, 1.0, 5), (0.58, 0.5, 13), (2.84, 2.0, 18)])
def test_seeds_for_a_target_reproduce_the_issue_s_numbers(sd, target, seeds):
    # Issue 15, measured on the default sweep: paired SD 0.58 mIoU pts and 2.84 top-1 pts.
    assert seeds_for_effect_size(target / sd) == seeds
    # the smallest sufficient seed count, by hand
    assert noncentral_t_power(target / sd, seeds) >= 0.8 > noncentral_t_power(target / sd, seeds - 1)


def test_a_huge_effect_still_needs_two_seeds_and_a_tiny_one_none():
    assert seeds_for_effect_size(50.0) == 2
    assert seeds_for_effect_size(1e-4) is None  # beyond any sensible seed count
    assert seeds_for_effect_size(0.0) is None


def test_metric_power_converts_to_the_metric_s_units():
    power = MetricPower("seg_miou", seeds=5, sd=0.0058, sd_source="prior", target=0.01)
    assert power.detectable == pytest.approx(detectable_effect_size(5) * 0.0058)
    assert power.seeds_for_target == 5
    unknown = MetricPower("seg_miou", seeds=5, sd=None, sd_source="unknown", target=0.01)
    assert unknown.detectable is None and unknown.seeds_for_target is None
    assert unknown.detectable_effect_size == pytest.approx(detectable_effect_size(5))


def test_pooled_paired_sd_by_hand():
    # pair A: [1, 2, 3] -> squares 2, dof 2; pair B: [0, 4] -> squares 8, dof 1; pair C: one seed, skipped.
    pooled = pooled_paired_sd([[1.0, 2.0, 3.0], [0.0, 4.0], [5.0]])
    assert (pooled.pairs, pooled.dof) == (2, 3)
    assert pooled.sd == pytest.approx(math.sqrt(10 / 3))
    assert pooled_paired_sd([[1.0], []]) is None
    assert pooled_paired_sd([[1.0, float("nan"), 3.0]]).sd == pytest.approx(math.sqrt(2))  # NaN is no seed


def test_compared_pairs_are_the_report_s_each_once(tmp_path):
    spec = load_spec(write_spec(tmp_path, "pairs", axes={
        "specialization": {"key": "model.specialization", "values": {"none": "none", "norms": "norms", "paper": "paper"}},
        "framework": {"key": "framework", "values": {"supervised": "supervised", "dinov2": "dinov2"}}},
        baseline={"specialization": "none", "framework": "supervised"},
        report={"compare": ["specialization", ["specialization", "framework"]]}))
    cells = [{"specialization": s, "framework": f} for s in ("none", "norms", "paper") for f in ("supervised", "dinov2")]
    present = {cell_key(c) for c in cells if c != {"specialization": "paper", "framework": "dinov2"}}
    pairs = compared_pairs(spec, present)
    key = lambda s, f: cell_key({"specialization": s, "framework": f})  # noqa: E731
    # norms/paper vs none under supervised (both tables: once), norms vs none under dinov2; paper/dinov2 absent
    assert pairs == [(key("norms", "supervised"), key("none", "supervised")),
                     (key("paper", "supervised"), key("none", "supervised")),
                     (key("norms", "dinov2"), key("none", "dinov2"))]


def test_target_effects_and_paired_sd_are_read_into_the_report_spec(tmp_path):
    spec = load_spec(write_spec(tmp_path, "targets", report={
        "metrics": ["seg_miou", "linear_top1_cls"], "target_effects": {"seg_miou": 0.01, "linear_top1_cls": 2.0e-2},
        "paired_sd": {"seg_miou": 0.0058}}))
    assert spec.report.target_effects == {"seg_miou": 0.01, "linear_top1_cls": 0.02}
    assert spec.report.paired_sd == {"seg_miou": 0.0058}
    assert load_spec(write_spec(tmp_path, "none_given")).report.target_effects == {}


@pytest.mark.parametrize("report,where,words", [
    ({"metrics": ["seg_miou"], "target_effects": {"seg_mIoU": 0.01}}, "report.target_effects.seg_mIoU",
     "'seg_mIoU' is not one of report.metrics (seg_miou); did you mean 'seg_miou'?"),
    ({"metrics": ["seg_miou"], "paired_sd": {"knn_top1": 0.03}}, "report.paired_sd.knn_top1",
     "add it to report.metrics or fix the name"),
    ({"metrics": ["seg_miou"], "target_effects": {"seg_miou": -0.01}}, "report.target_effects.seg_miou",
     "expected a positive number"),
    ({"metrics": ["seg_miou"], "target_effects": {"seg_miou": True}}, "report.target_effects.seg_miou",
     "expected a positive number"),
    ({"metrics": ["seg_miou"], "paired_sd": [0.01]}, "report.paired_sd", "expected a mapping of metric -> number"),
])
def test_bad_target_effects_and_priors_name_the_key_and_the_fix(tmp_path, report, where, words):
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, "bad", report=report))
    assert any(f": {where}: " in line and words in line for line in caught.value.errors), caught.value.errors


def test_the_default_metrics_validate_target_names_too(tmp_path):
    # no report.metrics given: the defaults are the report's metrics, and names are checked against them
    load_spec(write_spec(tmp_path, "defaults", report={"target_effects": {"seg_miou": 0.01}}))
    with pytest.raises(SpecError, match="not one of report.metrics"):
        load_spec(write_spec(tmp_path, "defaults_bad", report={"target_effects": {"seg_pixel_acc": 0.01}}))
