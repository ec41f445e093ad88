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

from orchestrator.report.csv_export import table_csv
from orchestrator.report.document import ReportHeader, TableAssets, report_markdown
from orchestrator.report.glance import at_a_glance
from orchestrator.report.markdown_table import table_markdown, value_text
from orchestrator.report.metrics import metric_spec, table_metrics
from orchestrator.report.outcome import Collection, TrialOutcome
from orchestrator.report.stats import summarize
from orchestrator.report.tables import MetricCell, build_tables


@dataclass
class Axis:
    name: str
    values: dict


@dataclass
class Report:
    compare: list = field(default_factory=list)
    metrics: list = field(default_factory=lambda: ["linear_top1_cls", "seg_miou", "depth_rmse"])
    baseline: dict | None = None


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


def render_first_table():
    table = build()[0]
    lines, notes, _ = table_markdown(table, "http://ui", "7", "abc")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return table, header, {row[0]: dict(zip(header, row)) for row in table_rows(lines)}, notes


def test_single_axis_table_holds_other_axes_at_the_baseline():
    table = build()[0]
    assert table.axes == ("specialization",)
    assert [r.key for r in table.rows] == [("none",), ("norms",), ("paper",), ("all",), ("mlp",)]
    assert all(r.cell["framework"] == "supervised" for r in table.rows)
    assert table.rows[0].is_reference and all(r.reference == 0 for r in table.rows)


def test_no_cell_is_ever_blank_and_every_gap_has_a_footnote():
    superscripts = "⁰¹²³⁴⁵⁶⁷⁸⁹"
    for table in build():
        lines, notes, _ = table_markdown(table, "http://ui", "7", "abc")
        for row in table_rows(lines):
            assert all(cell for cell in row), row
            for cell in row:
                if cell.startswith(("—", "n/a")):
                    assert cell[-1] in superscripts, f"unexplained gap {cell!r} in {row}"
                    assert int(cell.lstrip("—n/a").translate(str.maketrans(superscripts, "0123456789"))) <= len(notes.texts)


def test_failed_and_unfinished_rows_say_why_with_footnotes():
    _, header, rows, notes = render_first_table()
    miou = "Seg. mIoU (%) ↑"
    # all seeds of `all` failed or wait: every value cell is "—" + a footnote naming classes and seeds
    all_row = rows["all"]
    mark = all_row[miou].removeprefix("—")
    assert mark and all_row[miou].startswith("—")
    text = notes.texts[int(mark.translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789"))) - 1]
    assert text == "failed: nan (seeds 0, 1); planned (seed 2)"
    assert rows["all"]["n"] == "0/3"
    # planned only
    assert any(t == "planned (seeds 0, 1, 2)" for t in notes.texts)
    # partial seeds: value shown, n = 1/3 with a footnote naming the missing seeds and why
    assert rows["paper"]["n"].startswith("1/3")
    assert "running (seed 1); failed: oom (seed 2)" in notes.texts
    assert rows["paper"][miou] == "**35.00**"  # the best mean (bold), one seed: no std


def test_values_are_mean_std_and_paired_delta_with_ci():
    _, header, rows, _ = render_first_table()
    # none: mIoU 30, 31, 32 -> 31.00 ± 1.00; norms deltas 1.5, 2, 2.5: mean 2, s 0.5,
    # half width t(0.975, 2) * 0.5 / sqrt(3) = 4.3027 * 0.2887 = 1.242 -> [+0.76, +3.24]
    assert rows["none (ref.)"]["Seg. mIoU (%) ↑"] == "31.00 ± 1.00"
    assert rows["none (ref.)"]["Δ Seg. mIoU (pts)"] == "ref."
    assert rows["norms"]["Δ Seg. mIoU (pts)"] == "+2.00 [+0.76, +3.24]"
    # top-1: +0.1 pts on every seed: significant (no dagger) despite the 1-pt seed spread
    assert rows["norms"]["Δ Linear top-1 [CLS] (pts)"] == "+0.10 [+0.05, +0.15]"  # s 0.02: half width 0.0497
    # a single paired seed: no CI, marked °
    assert rows["paper"]["Δ Seg. mIoU (pts)"] == "+5.00 °"
    # params are constant over seeds: no "± 0.00"; relative change to the reference is shown
    assert rows["norms"]["Params (M) ↓"] == "1.00 (±0%)"


def test_delta_whose_ci_includes_zero_gets_a_dagger():
    # depth: none 0.50 0.49 0.51, norms 0.48 0.47 0.49 -> -0.02 each seed: significant; make one noisy row.
    outcomes = sample_outcomes()
    noisy = {0: 0.40, 1: 0.60, 2: 0.55}
    outcomes = [TrialOutcome(**{**o.__dict__, "metrics": {**o.metrics, "depth_rmse": noisy[o.seed]}})
                if o.cell["specialization"] == "norms" else o for o in outcomes]
    table = build(outcomes)[0]
    lines, _, _ = table_markdown(table, "http://ui", "7", "abc")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[0]: dict(zip(header, r)) for r in table_rows(lines)}
    assert rows["norms"]["Δ Depth RMSE"].endswith("†")
    assert not rows["norms"]["Δ Seg. mIoU (pts)"].endswith("†")


def test_bold_marks_the_best_mean_direction_aware():
    _, _, rows, _ = render_first_table()
    # mIoU (higher is better): paper's 35.00 (one seed) beats norms' 33.00
    assert rows["paper"]["Seg. mIoU (%) ↑"].startswith("**35.00**")
    assert not rows["norms"]["Seg. mIoU (%) ↑"].startswith("**")
    # depth RMSE (lower is better): norms' 0.4800 beats none's 0.5000 and paper's 0.5200
    assert rows["norms"]["Depth RMSE ↓"].startswith("**0.4800**")
    assert not rows["paper"]["Depth RMSE ↓"].startswith("**")
    # cost columns are never bolded
    assert not any(r["Params (M) ↓"].startswith("**") for r in rows.values())


def test_crossing_groups_rows_and_uses_a_reference_per_group():
    table = build()[1]
    assert table.axes == ("specialization", "framework")
    dinov2 = [r for r in table.rows if r.group == ("dinov2",)]
    assert [r.key for r in dinov2] == [("none", "dinov2"), ("paper", "dinov2")]
    assert {"specialization": "norms", "framework": "dinov2"} in table.absent  # not planned: listed, not a row
    assert all(table.rows[r.reference].key == ("none", "dinov2") for r in dinov2)
    lines, _, _ = table_markdown(table, "http://ui", "7", "abc")
    assert all(all(cell for cell in row) for row in table_rows(lines))  # all-planned group: no crash, no blank


def test_missing_reference_row_and_unlogged_metric_are_footnoted():
    spec = Spec(name="unit", axes=SPEC.axes, report=Report(compare=["specialization"],
                                                          metrics=["seg_miou", "knn_top1"]),
                baseline={"specialization": "none", "framework": "supervised"})
    outcomes = [o for o in sample_outcomes() if o.cell["specialization"] != "none"]
    table = build(outcomes, spec)[0]
    assert all(r.reference is None for r in table.rows)
    lines, notes, _ = table_markdown(table, "http://ui", "7", "abc")
    text = "\n".join(lines)
    assert "n/a" in text  # knn_top1 was never logged
    assert any("not logged by any finished seed" in t for t in notes.texts)
    assert any("no reference row" in t for t in notes.texts)
    assert {"specialization": "none", "framework": "supervised"} in table.absent


def test_provenance_links_use_the_mlflow_ui_pattern():
    _, _, rows, _ = render_first_table()
    table = build()[0]
    _, _, links = table_markdown(table, "http://ui:5000", "7", "abc")
    run_id = "runnone0supervised" + "0" * 24
    assert links[run_id] == f"http://ui:5000/#/experiments/7/runs/{run_id}"
    assert f"[{run_id[:8]}][{run_id}]" in rows["none (ref.)"]["runs"]


def test_csv_has_the_same_rows_and_raw_numbers():
    table = build()[0]
    rows = list(csv.DictReader(io.StringIO(table_csv(table))))
    assert [r["specialization"] for r in rows] == ["none", "norms", "paper", "all", "mlp"]
    norms = rows[1]
    assert float(norms["seg_miou_mean"]) == pytest.approx(0.33)
    assert float(norms["seg_miou_delta"]) == pytest.approx(0.02)
    assert norms["seg_miou_delta_significant"] == "True"
    assert rows[3]["seeds_done"] == "0" and rows[3]["missing"] == "failed: nan (seeds 0, 1); planned (seed 2)"
    assert rows[3]["seg_miou_mean"] == ""


def test_at_a_glance_names_the_largest_significant_gain():
    tables = build()
    collection = Collection(outcomes=sample_outcomes(), tracking_uri="sqlite:///x", experiment="unit")
    text = at_a_glance(tables, collection)
    assert "**Seg. mIoU**: largest significant gain `specialization=norms` (+2.00 pts, 95% CI [+0.76, +3.24], n=3)" in text
    # top-1: norms +0.1 pts on every seed (significant); paper's single pair has no CI; nothing dropped
    assert "**Linear top-1 [CLS]**: largest significant gain `specialization=norms` (+0.10 pts" in text
    # depth RMSE: lower is better, so norms' -0.02 is the gain and paper's +0.02 (one seed, no CI) no drop
    assert "**Depth RMSE**: largest significant gain `specialization=norms` (-0.0200" in text
    assert "have no results yet" in text


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


def test_at_a_glance_warns_about_many_uncorrected_intervals():
    variants = [f"v{i}" for i in range(12)]
    spec = Spec(name="many", axes=[Axis("specialization", {v: {} for v in ["none", *variants]})],
                report=Report(compare=["specialization"], metrics=["seg_miou", "depth_rmse"]))
    rng = random.Random(0)  # continuous noise: every paired difference has a spread, so every delta has a CI
    outcomes = [TrialOutcome(trial_id=f"{v}{s}", cell={"specialization": v}, seed=s, state="done", source="disk",
                             metrics={"seg_miou": 0.3 + 0.05 * rng.random(), "depth_rmse": 0.5 + 0.05 * rng.random()})
                for v in ["none", *variants] for s in (0, 1, 2)]
    text = at_a_glance(build(outcomes, spec), Collection(outcomes=outcomes, tracking_uri="x", experiment="many"))
    assert "Over 12 variant-vs-reference comparisons" in text
    assert "These are 24 uncorrected intervals: about 1 would exclude 0 by chance alone" in text


def test_identical_seeds_keep_their_zero_std_but_constant_costs_do_not():
    same = MetricCell(summary=summarize([0.375, 0.375]))
    assert value_text(metric_spec("linear_top1_cls"), same, 2) == "37.50 ± 0.00"
    assert value_text(metric_spec("params_total"), MetricCell(summary=summarize([2e6, 2e6])), 2) == "2.00"
