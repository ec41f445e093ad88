"""Rendering of the comparison tables: missing/failed cells, bold best, delta markers, CSV.

These tests feed hand-made outcomes into the table builder through a minimal spec object with the
attributes the report reads (`axes`, `baseline`, `report`), so they need neither MLflow nor torch.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass, field

import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from orchestrator.report.csv_export import table_csv
from orchestrator.report.document import ReportHeader, TableAssets, report_markdown
from orchestrator.report.glance import at_a_glance
from orchestrator.report.markdown_table import table_markdown, value_text
from orchestrator.report.metrics import metric_spec, table_metrics
from orchestrator.report.outcome import Collection, TrialOutcome
from orchestrator.report.stats import summarize
from orchestrator.report.tables import MetricCell, add_control_row, build_tables, judge


@dataclass
class Axis:
    name: str
    values: dict


@dataclass
class Report:
    compare: list = field(default_factory=list)
    metrics: list = field(default_factory=lambda: ["linear_top1_cls", "seg_miou", "depth_rmse"])
    baseline: dict | None = None
    target_effects: dict = field(default_factory=dict)
    paired_sd: dict = field(default_factory=dict)


@dataclass
class Spec:
    name: str
    axes: list
    report: Report
    baseline: dict | None = None
    seeds: list = field(default_factory=lambda: [0, 1, 2])


SPEC = Spec(
    name="unit",
    axes=[Axis("specialization", {"none": {}, "norms": {}, "paper": {}, "all": {}, "mlp": {}}),
          Axis("framework", {"supervised": {}, "dinov2": {}})],
    report=Report(compare=["specialization", ["specialization", "framework"]]),
    baseline={"specialization": "none", "framework": "supervised"},
)

# seg_miou / linear_top1 / depth_rmse per (specialization, seed) for framework=supervised.
VALUES = {
    "none": {0: (0.30, 0.60, 0.50), 1: (0.31, 0.61, 0.49), 2: (0.32, 0.62, 0.51)},
    # per-seed deltas vs none: mIoU +1.5/+2.0/+2.5 pts, top-1 +0.08/+0.10/+0.12 pts, depth -0.015/-0.020/-0.025
    "norms": {0: (0.315, 0.6008, 0.485), 1: (0.33, 0.611, 0.47), 2: (0.345, 0.6212, 0.485)},
    "paper": {0: (0.35, 0.59, 0.52)},  # seeds 1, 2 not done
}


def outcome(spec: str, seed: int, framework: str = "supervised", **kw) -> TrialOutcome:
    cell = {"specialization": spec, "framework": framework}
    metrics = {}
    if kw.get("state", "done") == "done" and spec in VALUES and seed in VALUES[spec] and framework == "supervised":
        miou, top1, rmse = VALUES[spec][seed]
        metrics = {"seg_miou": miou, "linear_top1_cls": top1, "depth_rmse": rmse, "params_total": 1e6,
                   "flops": 2e9, "throughput_img_s": 100.0}
    kw.setdefault("state", "done")
    kw.setdefault("source", "mlflow" if metrics else "none")
    return TrialOutcome(trial_id=f"{spec}-{framework}-{seed}", cell=cell, seed=seed, metrics=metrics,
                        run_id=f"run{spec}{seed}{framework}" + "0" * 24 if metrics else None, experiment_id="7",
                        code_version="abc", **kw)


def sample_outcomes() -> list[TrialOutcome]:
    out = [outcome(s, seed) for s in ("none", "norms") for seed in (0, 1, 2)]
    out += [outcome("paper", 0), outcome("paper", 1, state="running"), outcome("paper", 2, state="failed",
                                                                                failure_class="oom")]
    out += [outcome("all", 0, state="failed", failure_class="nan"), outcome("all", 1, state="failed", failure_class="nan"),
            outcome("all", 2, state="planned")]
    out += [outcome("mlp", seed, state="planned") for seed in (0, 1, 2)]
    out += [outcome(s, seed, framework="dinov2", state="planned") for s in ("none", "paper") for seed in (0, 1, 2)]
    return out


def build(outcomes=None, spec=SPEC):
    return build_tables(spec, outcomes if outcomes is not None else sample_outcomes(),
                        table_metrics(spec.report.metrics))


def table_rows(lines: list[str]) -> list[list[str]]:
    """Body rows of a Markdown table as lists of stripped cell texts."""
    rows = []
    for line in lines[2:]:
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def header_of(lines: list[str]) -> list[str]:
    return [c.strip() for c in lines[0].strip("|").split("|")]


def main_rows(lines: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """The main table's rows keyed by (metric header, first axis cell)."""
    header = header_of(lines)
    return {(row[0], row[1]): dict(zip(header, row)) for row in table_rows(lines)}


def side_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    header = header_of(lines)
    return {row[0]: dict(zip(header, row)) for row in table_rows(lines)}


MIOU, TOP1, RMSE = "Seg. mIoU (%) ↑", "Linear top-1 [CLS] (%) ↑", "Depth RMSE ↓"


def render_first_table(outcomes=None):
    table = build(outcomes)[0]
    text = table_markdown(table, "http://ui", "7", "abc")
    return table, text, main_rows(text.main), text.notes


def test_single_axis_table_holds_other_axes_at_the_baseline():
    table = build()[0]
    assert table.axes == ("specialization",)
    assert [r.key for r in table.rows] == [("none",), ("norms",), ("paper",), ("all",), ("mlp",)]
    assert all(r.cell["framework"] == "supervised" for r in table.rows)
    assert table.rows[0].is_reference and all(r.reference == 0 for r in table.rows)


def test_no_value_is_ever_blank_and_every_gap_has_a_footnote():
    superscripts = "⁰¹²³⁴⁵⁶⁷⁸⁹"
    for table in build():
        text = table_markdown(table, "http://ui", "7", "abc")
        header = header_of(text.main)
        delta_at = header.index("Δ")
        for lines in (text.main, text.costs):
            for row in table_rows(lines):
                shown = row[:delta_at + 1] if lines is text.main else row
                assert all(cell for cell in shown), row
                for cell in shown:
                    if cell.startswith(("—", "n/a")):
                        assert cell[-1] in superscripts, f"unexplained gap {cell!r} in {row}"
                        number = int(cell.lstrip("—n/a").translate(str.maketrans(superscripts, "0123456789")))
                        assert number <= len(text.notes.texts)
                if lines is text.main and not all(row[delta_at + 1:]):
                    # interval, p and verdict are left blank only where Δ says why there is no comparison
                    assert row[delta_at] in ("ref.", "control") or row[delta_at].startswith("—"), row


def test_failed_and_unfinished_rows_say_why_with_footnotes():
    _, _, rows, notes = render_first_table()
    # all seeds of `all` failed or wait: every value cell is "—" + a footnote naming classes and seeds
    all_row = rows[(MIOU, "all")]
    mark = all_row["mean ± std"].removeprefix("—")
    assert mark and all_row["mean ± std"].startswith("—") and all_row["Δ"] == "—" + mark
    text = notes.texts[int(mark.translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789"))) - 1]
    assert text == "failed: nan (seeds 0, 1); planned (seed 2)"
    assert all_row["n"] == "0/3"
    # planned only
    assert any(t == "planned (seeds 0, 1, 2)" for t in notes.texts)
    # partial seeds: value shown, n = 1/3 with a footnote naming the missing seeds and why
    assert rows[(MIOU, "paper")]["n"].startswith("1/3")
    assert "running (seed 1); failed: oom (seed 2)" in notes.texts
    assert rows[(MIOU, "paper")]["mean ± std"] == "**35.00**"  # the best mean (bold), one seed: no std


def test_the_main_table_has_one_block_of_rows_per_quality_metric():
    table, text, rows, _ = render_first_table()
    assert header_of(text.main) == ["metric", "specialization", "n", "mean ± std", "Δ", "95% CI", "Holm p", "verdict"]
    body = table_rows(text.main)
    assert [r[0] for r in body] == [TOP1] * 5 + [MIOU] * 5 + [RMSE] * 5  # report.metrics order, rows in table order
    assert [r[1] for r in body[:5]] == ["none (ref.)", "norms", "paper", "all", "mlp"]
    # no cost, token or run column in the main table: those come after it
    assert not any("Params" in h or "cos" in h or "runs" in h for h in header_of(text.main))
    assert "Params (M) ↓" in header_of(text.costs)
    assert text.tokens == []  # no token metric logged here: test_token_columns_show_... has them


def test_values_are_mean_std_and_paired_delta_with_ci_and_verdict():
    _, _, rows, _ = render_first_table()
    # none: mIoU 30, 31, 32 -> 31.00 ± 1.00; norms deltas 1.5, 2, 2.5: mean 2, s 0.5,
    # half width t(0.975, 2) * 0.5 / sqrt(3) = 4.3027 * 0.2887 = 1.242 -> [+0.76, +3.24]
    assert rows[(MIOU, "none (ref.)")]["mean ± std"] == "31.00 ± 1.00"
    assert rows[(MIOU, "none (ref.)")]["Δ"] == "ref." and rows[(MIOU, "none (ref.)")]["verdict"] == ""
    norms = rows[(MIOU, "norms")]
    assert (norms["Δ"], norms["95% CI"]) == ("+2.00", "[+0.76, +3.24]")
    # Holm over the family of 3 tests (norms: mIoU, top-1, depth; paper has a single seed pair):
    # raw p (t with 2 dof: p = 1 - t / sqrt(2 + t^2)): mIoU t = sqrt(48) -> 0.020204, top-1 t = sqrt(75)
    # -> 0.013072, depth as mIoU -> 0.020204; Holm: 3 * 0.013072 = 0.0392, then 2 * 0.020204 = 0.0404 twice.
    assert norms["Holm p"] == "0.040" and norms["verdict"] == "**significant gain**"
    assert rows[(TOP1, "norms")]["Holm p"] == "0.039"
    # top-1: +0.1 pts on every seed: significant despite the 1-pt seed spread
    assert rows[(TOP1, "norms")]["Δ"] == "+0.10" and rows[(TOP1, "norms")]["95% CI"] == "[+0.05, +0.15]"
    # depth RMSE is lower-is-better: -0.02 is a gain
    assert rows[(RMSE, "norms")]["verdict"] == "**significant gain**"
    # a single paired seed: no CI, no test, inconclusive, marked °
    paper = rows[(MIOU, "paper")]
    assert (paper["Δ"], paper["95% CI"], paper["Holm p"], paper["verdict"]) == ("+5.00", "° none", "°", "inconclusive °")


def test_costs_sit_in_their_own_table_with_the_change_to_the_reference():
    _, text, _, _ = render_first_table()
    costs = side_rows(text.costs)
    # params are constant over seeds: no "± 0.00"; relative change to the reference is shown
    assert costs["norms"]["Params (M) ↓"] == "1.00 (±0%)"
    assert costs["none (ref.)"]["Train throughput, indicative (img/s) ↑"] == "100"
    assert not any(r["Params (M) ↓"].startswith("**") for r in costs.values())  # cost columns are never bolded


def test_a_noisy_delta_whose_ci_includes_zero_is_inconclusive():
    # depth: norms 0.40 / 0.60 / 0.55 against none's 0.50 / 0.49 / 0.51: the CI spans 0.
    noisy = {0: 0.40, 1: 0.60, 2: 0.55}
    outcomes = [TrialOutcome(**{**o.__dict__, "metrics": {**o.metrics, "depth_rmse": noisy[o.seed]}})
                if o.cell["specialization"] == "norms" else o for o in sample_outcomes()]
    _, _, rows, _ = render_first_table(outcomes)
    depth = rows[(RMSE, "norms")]
    low, high = (float(v) for v in depth["95% CI"].strip("[]").split(", "))
    assert low < 0 < high and depth["verdict"] == "inconclusive"
    assert rows[(MIOU, "norms")]["verdict"] == "**significant gain**"  # still: mIoU and top-1 stand


def test_bold_marks_the_best_mean_direction_aware():
    _, _, rows, _ = render_first_table()
    # mIoU (higher is better): paper's 35.00 (one seed) beats norms' 33.00
    assert rows[(MIOU, "paper")]["mean ± std"].startswith("**35.00**")
    assert not rows[(MIOU, "norms")]["mean ± std"].startswith("**")
    # depth RMSE (lower is better): norms' 0.4800 beats none's 0.5000 and paper's 0.5200
    assert rows[(RMSE, "norms")]["mean ± std"].startswith("**0.4800**")
    assert not rows[(RMSE, "paper")]["mean ± std"].startswith("**")


def test_token_columns_show_the_cosines_before_and_after_norm1_side_by_side():
    tokens = {"tokens/early_cls_patch_cos_pre": 0.61, "tokens/early_cls_patch_cos_post": 0.02,
              "tokens/late_cls_patch_cos_pre": 0.55, "tokens/late_cls_patch_cos_post": -0.01,
              "tokens/early_patch_patch_cos_pre": 0.48, "tokens/early_patch_patch_cos_post": 0.41}
    outcomes = [TrialOutcome(**{**o.__dict__, "metrics": {**o.metrics, **tokens}}) if o.metrics else o
                for o in sample_outcomes()]
    _, text, _, _ = render_first_table(outcomes)
    # Late patch-patch was not logged by any trial: its columns are left out.
    assert header_of(text.tokens) == ["specialization", "early, [CLS]-patch before", "early, [CLS]-patch after",
                                      "early, patch-patch before", "early, patch-patch after",
                                      "late, [CLS]-patch before", "late, [CLS]-patch after"]
    none = side_rows(text.tokens)["none (ref.)"]
    assert none["early, [CLS]-patch before"] == "0.610 ± 0.000" and none["late, [CLS]-patch after"] == "-0.010 ± 0.000"
    assert none["early, patch-patch before"] == "0.480 ± 0.000" and none["early, patch-patch after"] == "0.410 ± 0.000"


def test_columns_no_trial_logged_are_left_out_and_named_once():
    outcomes = sample_outcomes()  # no token metric anywhere
    tables = build(outcomes)
    text = table_markdown(tables[0], "http://ui", "7", "abc")
    assert text.tokens == []
    header = ReportHeader(sweep="unit", description="", generated="now", seeds=[0, 1, 2], spec_hash="h",
                          code_versions={"abc": 7}, current_code_version="abc", tracking_uri="x",
                          experiment="unit", experiment_id="7", mlflow_error=None)
    document = report_markdown(header, Collection(outcomes=outcomes, tracking_uri="x", experiment="unit"), tables, {})
    assert "Not logged by any finished trial of this comparison: `tokens/early_cls_patch_cos_pre`" in document


def test_crossing_groups_rows_and_uses_a_reference_per_group():
    table = build()[1]
    assert table.axes == ("specialization", "framework")
    dinov2 = [r for r in table.rows if r.group == ("dinov2",)]
    assert [r.key for r in dinov2] == [("none", "dinov2"), ("paper", "dinov2")]
    assert {"specialization": "norms", "framework": "dinov2"} in table.absent  # not planned: listed, not a row
    assert all(table.rows[r.reference].key == ("none", "dinov2") for r in dinov2)
    text = table_markdown(table, "http://ui", "7", "abc")
    rows = table_rows(text.main)
    assert all(all(cell for cell in row[:6]) for row in rows)  # all-planned group: no crash, no blank value


def test_a_comparison_shown_twice_is_one_test_of_the_family():
    tables = build()
    # norms vs none (supervised) appears in both tables: its cells carry one verdict, and the family
    # counts it once (3 tests: mIoU, top-1, depth), not twice.
    first = next(r for r in tables[0].rows if r.key == ("norms",)).cells["seg_miou"].verdict
    second = next(r for r in tables[1].rows if r.key == ("norms", "supervised")).cells["seg_miou"].verdict
    assert first == second and first.family_size == 3


def test_missing_reference_row_and_unlogged_metric_are_footnoted():
    spec = Spec(name="unit", axes=SPEC.axes, report=Report(compare=["specialization"],
                                                          metrics=["seg_miou", "knn_top1"]),
                baseline={"specialization": "none", "framework": "supervised"})
    outcomes = [o for o in sample_outcomes() if o.cell["specialization"] != "none"]
    table = build(outcomes, spec)[0]
    assert all(r.reference is None for r in table.rows)
    text = table_markdown(table, "http://ui", "7", "abc")
    assert "n/a" in "\n".join(text.main)  # knn_top1 was never logged
    assert any("not logged by any finished seed" in t for t in text.notes.texts)
    assert any("no reference row" in t for t in text.notes.texts)
    assert {"specialization": "none", "framework": "supervised"} in table.absent


def test_run_links_come_after_the_tables_in_the_mlflow_ui_pattern():
    table = build()[0]
    text = table_markdown(table, "http://ui:5000", "7", "abc")
    run_id = "runnone0supervised" + "0" * 24
    assert text.links[run_id] == f"http://ui:5000/#/experiments/7/runs/{run_id}"
    assert text.runs[0].startswith("- none (ref.): ") and f"[{run_id[:8]}][{run_id}]" in text.runs[0]
    assert not any(run_id in line for line in text.main + text.costs + text.tokens)


def test_a_control_row_shows_its_values_and_is_never_compared():
    table = build()[0]
    family_before = next(r for r in table.rows if r.key == ("norms",)).cells["seg_miou"].verdict.family_size
    control = [TrialOutcome(trial_id=f"pixels{s}", cell={}, seed=s, state="done", source="disk",
                            metrics={"seg_miou": 0.20 + 0.01 * s, "linear_top1_cls": 0.4, "depth_rmse": 0.6})
               for s in (0, 1, 2)]
    row = add_control_row(table, "raw pixels", control)
    assert row.is_control and not row.compared and not row.is_reference
    rows = main_rows(table_markdown(table, "http://ui", "7", "abc").main)
    pixels = rows[(MIOU, "raw pixels (control)")]
    assert pixels["mean ± std"] == "21.00 ± 1.00" and pixels["Δ"] == "control" and pixels["verdict"] == ""
    # the control is a floor, not a contender: never bold, not in the family, not in the plots' rows
    assert not row.cells["seg_miou"].best and row.cells["seg_miou"].delta is None
    assert judge([table]) == family_before
    # in a crossing it stands for every group unless told otherwise, and fills every axis column
    crossing = build()[1]
    assert add_control_row(crossing, "raw pixels", control).key == ("raw pixels", "any")
    rows = table_rows(table_markdown(crossing, "http://ui", "7", "abc").main)
    assert [r[1:3] for r in rows if r[1].endswith("(control)")][0] == ["raw pixels (control)", "any"]


def test_csv_has_the_same_rows_and_raw_numbers():
    table = build()[0]
    rows = list(csv.DictReader(io.StringIO(table_csv(table))))
    assert [r["specialization"] for r in rows] == ["none", "norms", "paper", "all", "mlp"]
    norms = rows[1]
    assert float(norms["seg_miou_mean"]) == pytest.approx(0.33)
    assert float(norms["seg_miou_delta"]) == pytest.approx(0.02)
    assert norms["seg_miou_delta_significant"] == "True"
    assert float(norms["seg_miou_p"]) == pytest.approx(0.020204, abs=1e-6)  # uncorrected, see above
    assert float(norms["seg_miou_p_holm"]) == pytest.approx(2 * 0.020204, abs=1e-5)
    assert norms["seg_miou_verdict"] == "significant"
    assert rows[2]["seg_miou_verdict"] == "inconclusive" and rows[2]["seg_miou_p"] == ""  # one seed pair
    assert rows[3]["seeds_done"] == "0" and rows[3]["missing"] == "failed: nan (seeds 0, 1); planned (seed 2)"
    assert rows[3]["seg_miou_mean"] == ""


def test_at_a_glance_counts_verdicts_and_names_the_largest_significant_gain():
    tables = build()
    collection = Collection(outcomes=sample_outcomes(), tracking_uri="sqlite:///x", experiment="unit")
    text = at_a_glance(tables, collection)
    assert ("Over 2 variant-vs-reference comparisons × 3 quality metrics (paired by seed): 3 significant, "
            "0 no effect larger than the target, 3 inconclusive.") in text
    assert "Holm's correction over the family of all 3 tests" in text
    assert ("**Seg. mIoU**: largest significant gain `specialization=norms` (+2.00 pts, 95% CI [+0.76, +3.24], "
            "n=3, Holm p 0.040); no significant drop; 1 inconclusive") in text
    # top-1: norms +0.1 pts on every seed (significant); paper's single pair has no CI; nothing dropped
    assert "**Linear top-1 [CLS]**: largest significant gain `specialization=norms` (+0.10 pts" in text
    # depth RMSE: lower is better, so norms' -0.02 is the gain and paper's +0.02 (one seed, no CI) no drop
    assert "**Depth RMSE**: largest significant gain `specialization=norms` (-0.0200" in text
    assert "No `report.target_effects` in the spec" in text
    assert "have no results yet" in text


def test_at_a_glance_states_the_smallest_effect_the_design_detects():
    tables = build()
    text = at_a_glance(tables, Collection(outcomes=sample_outcomes(), tracking_uri="x", experiment="unit"))
    # mIoU: one comparison with differences 1.5 / 2 / 2.5 pts -> paired SD 0.50 pts; 3 seeds planned.
    d = TTestPower().solve_power(effect_size=None, nobs=3, alpha=0.05, power=0.8, alternative="two-sided")
    assert (f"the design detects ±{d * 0.5:.2f} pts (80% power at 3 seeds, paired SD 0.50 pts, observed over "
            "1 comparison)") in text


def test_at_a_glance_uses_the_prior_sd_and_the_target_when_there_is_no_pair():
    spec = Spec(name="unit", axes=SPEC.axes, report=Report(compare=["specialization"], metrics=["seg_miou"],
                                                          target_effects={"seg_miou": 0.01},
                                                          paired_sd={"seg_miou": 0.0058}),
                baseline={"specialization": "none", "framework": "supervised"})
    outcomes = [o for o in sample_outcomes() if o.cell["specialization"] in ("none", "paper")]  # paper: 1 seed
    text = at_a_glance(build(outcomes, spec), Collection(outcomes=outcomes, tracking_uri="x", experiment="unit"))
    # the numbers: paired SD 0.58 pts, a 1-pt target needs 5 seeds
    assert "paired SD 0.58 pts, the spec's prior (report.paired_sd)); the target ±1.00 pts needs 5 seeds" in text
    assert "Every delta rests on a single seed pair" in text


def test_full_document_renders_for_an_empty_sweep():
    outcomes = [outcome(s, seed, state="planned") for s in ("none", "norms") for seed in (0, 1)]
    tables = build(outcomes)
    collection = Collection(outcomes=outcomes, tracking_uri="sqlite:///x", experiment="unit",
                            mlflow_error="no MLflow store at /x")
    header = ReportHeader(sweep="unit", description="", generated="now", seeds=[0, 1], spec_hash="h",
                          code_versions={}, current_code_version="abc", tracking_uri="sqlite:///x",
                          experiment="unit", experiment_id=None, mlflow_error=collection.mlflow_error)
    text = report_markdown(header, collection, tables, {t.slug: TableAssets(csv_name=f"{t.slug}.csv") for t in tables})
    assert "0 done · 0 failed · 0 running · 4 planned (of 4)" in text
    assert "no deltas to summarize" in text


def test_code_version_warning_block():
    outcomes = sample_outcomes()
    collection = Collection(outcomes=outcomes, tracking_uri="sqlite:///x", experiment="unit")
    header = ReportHeader(sweep="unit", description="", generated="now", seeds=[0, 1, 2], spec_hash="h",
                          code_versions={"abc": 5, "old": 2}, current_code_version="abc", tracking_uri="sqlite:///x",
                          experiment="unit", experiment_id="7", mlflow_error=None)
    text = report_markdown(header, collection, build(outcomes), {})
    assert "> [!WARNING]" in text and "`old` (2 trials)" in text


def test_many_comparisons_are_holm_adjusted_as_one_family():
    variants = [f"v{i}" for i in range(12)]
    spec = Spec(name="many", axes=[Axis("specialization", {v: {} for v in ["none", *variants]})],
                report=Report(compare=["specialization"], metrics=["seg_miou", "depth_rmse"]))
    rng = random.Random(0)  # continuous noise: every paired difference has a spread, so every delta has a CI
    outcomes = [TrialOutcome(trial_id=f"{v}{s}", cell={"specialization": v}, seed=s, state="done", source="disk",
                             metrics={"seg_miou": 0.3 + 0.05 * rng.random(), "depth_rmse": 0.5 + 0.05 * rng.random()})
                for v in ["none", *variants] for s in (0, 1, 2)]
    tables = build(outcomes, spec)
    text = at_a_glance(tables, Collection(outcomes=outcomes, tracking_uri="x", experiment="many"))
    assert "Over 12 variant-vs-reference comparisons × 2 quality metrics" in text
    assert "the family of all 24 tests" in text
    cells = [r.cells[m] for r in tables[0].rows if r.compared for m in ("seg_miou", "depth_rmse")]
    raw = [c.delta.p_value for c in cells]
    expected = multipletests(raw, method="holm")[1]
    assert [c.verdict.p_holm for c in cells] == pytest.approx(list(expected))
    assert all(c.verdict.p_holm >= c.delta.p_value for c in cells)  # a correction never makes a test bolder


def test_identical_seeds_keep_their_zero_std_but_constant_costs_do_not():
    same = MetricCell(summary=summarize([0.375, 0.375]))
    assert value_text(metric_spec("linear_top1_cls"), same, 2) == "37.50 ± 0.00"
    assert value_text(metric_spec("params_total"), MetricCell(summary=summarize([2e6, 2e6])), 2) == "2.00"
