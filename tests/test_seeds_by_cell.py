"""`seeds_by_cell`: the noisy arms, and their reference, get the seeds their intervals need; the
spec refuses a rule the report could not pair; plan and the report state the power of each."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
import yaml
from statsmodels.stats.power import TTestPower

from conftest import PYTHON, REPO
from orchestrator.report.document import ReportHeader, report_markdown
from orchestrator.report.glance import at_a_glance
from orchestrator.report.metrics import table_metrics
from orchestrator.report.outcome import Collection, TrialOutcome
from orchestrator.report.tables import build_tables
from orchestrator.spec import SpecError, expand, spec_hash
from test_report_render import Axis, Report, Spec
from test_spec import load

VERSION = "test-code"
AXIS = """
axes:
  specialization:
    key: model.specialization
    values: {none: none, norms: norms, paper: paper}
baseline: {specialization: none}
seeds: [0, 1, 2]
"""
RULES = """
seeds_by_cell:
  - {cell: {specialization: none}, seeds: [0, 1, 2, 3, 4]}
  - {cell: {specialization: paper}, seeds: [0, 1, 2, 3, 4]}
  - {cell: {specialization: norms}, seeds: [0, 1]}
"""


def test_each_cell_runs_its_rules_seeds_and_the_other_trials_keep_their_ids(tmp_path):
    plain = expand(load(tmp_path, AXIS), VERSION)
    spec = load(tmp_path, AXIS + RULES)
    ruled = expand(spec, VERSION)
    assert Counter(t.cell["specialization"] for t in ruled) == {"none": 5, "paper": 5, "norms": 2}
    assert [t.seed for t in ruled if t.cell["specialization"] == "norms"] == [0, 1]
    assert spec.all_seeds == [0, 1, 2, 3, 4]
    # a trial both specs ask for is the same trial: the store keeps it when rules are added
    by_slot = {(t.cell["specialization"], t.seed): t.trial_id for t in plain}
    assert all(by_slot[(t.cell["specialization"], t.seed)] == t.trial_id for t in ruled if t.seed < 3)
    assert [t.seed for t in ruled] == sorted(t.seed for t in ruled)  # still seed-major
    # the hash names the trials: a rule changes it, an empty list does not
    assert spec_hash(spec) != spec_hash(load(tmp_path, AXIS))
    assert spec_hash(load(tmp_path, AXIS + "seeds_by_cell: []\n")) == spec_hash(load(tmp_path, AXIS))


@pytest.mark.parametrize("rules, message", [
    ("  - {cell: {specialization: paper}, seeds: [0, 1, 2, 3]}\n",
     "seeds_by_cell: specialization=paper runs seeds [3] that its reference specialization=none does not: the "
     "report pairs by seed and would drop them; give the reference those seeds too"),
    ("  - {cell: {specialization: mlp}, seeds: [0]}\n",
     "seeds_by_cell.0.cell.specialization: unknown value 'mlp' of axis 'specialization'"),
    ("  - {cell: {specialization: norms}, seeds: [0]}\n  - {cell: {specialization: norms}, seeds: [1]}\n",
     "seeds_by_cell.1.cell: specialization=norms already has its seeds from seeds_by_cell.0: give each cell one rule"),
    ("  - {cell: {specialization: norms}, seeds: [0, 0]}\n", "seeds_by_cell.0.seeds: duplicate seeds [0]"),
    ("  - {cell: {specialization: paper}, seeds: [0]}\nexclude: [{specialization: paper}]\n",
     "seeds_by_cell.0.cell: {'specialization': 'paper'} is not a cell of the sweep (excluded?)"),
    ("  - {cell: {specialization: norms}, seed: [0]}\n", "seeds_by_cell.0: unknown key 'seed'; allowed here: cell, seeds"),
])
def test_a_rule_the_report_could_not_use_is_refused_naming_the_field(tmp_path, rules, message):
    with pytest.raises(SpecError) as err:
        load(tmp_path, AXIS + "seeds_by_cell:\n" + rules)
    assert message in str(err.value)


def test_the_cli_refuses_an_unpaired_rule_before_anything_runs(tmp_path, cli_env):
    spec = yaml.safe_load((REPO / "sweeps" / "component_ablation.yaml").read_text())
    rules = spec["seeds_by_cell"]
    extra = sorted(set(next(r["seeds"] for r in rules if r["cell"] == {"specialization": "all"})) - set(spec["seeds"]))
    assert extra, "the default sweep gives `all` more seeds than the rest"
    spec["seeds_by_cell"] = [r for r in rules if r["cell"] != {"specialization": "none"}]  # the reference's rule gone
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(path), "--no-progress"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = " ".join((done.stdout + done.stderr).split())  # rich wraps the lines
    assert "nothing was run" in said
    assert f"specialization=all runs seeds {extra} that its reference specialization=none does not" in said
    assert not (tmp_path / "runs").exists()


def test_plan_states_the_detectable_effect_at_each_rules_seeds(tmp_path):
    spec = load(tmp_path, AXIS + RULES + "report: {metrics: [seg_miou], paired_sd: {seg_miou: 0.01}}\n")
    from orchestrator.store import ProjectPaths  # noqa: PLC0415 (a store the test owns)
    from orchestrator.views import power_view  # noqa: PLC0415
    from orchestrator.ledger import Ledger  # noqa: PLC0415

    paths = ProjectPaths.discover(tmp_path)
    lines = [str(line) for line in power_view(spec, expand(spec, VERSION), Ledger(tmp_path / "ledger.json"), paths)]
    d5 = TTestPower().solve_power(effect_size=None, nobs=5, alpha=0.05, power=0.8, alternative="two-sided")
    assert f"seeds_by_cell: specialization=paper runs 5 seed(s); detectable Δ there: seg_miou {d5:.2f} pts" in lines
    assert "seeds_by_cell: specialization=none (the reference) runs 5 seed(s)" in lines[-4]


# --- the report -------------------------------------------------------------------------------
SPEC = Spec(name="unit", axes=[Axis("specialization", {"none": {}, "norms": {}, "paper": {}, "all": {}})],
            report=Report(compare=["specialization"], metrics=["seg_miou"]), baseline={"specialization": "none"})
# per-seed differences to none (mIoU, fractions): norms and paper over 3 seeds, all over 6
DIFFERENCES = {"norms": [0.010, 0.012, 0.014], "paper": [0.020, 0.021, 0.025],
               "all": [0.01, 0.03, -0.01, 0.02, 0.04, 0.00]}


def _outcomes() -> list[TrialOutcome]:
    out = []
    for spec, seeds in (("none", 6), ("norms", 3), ("paper", 3), ("all", 6)):
        for seed in range(seeds):
            value = 0.5 + 0.003 * seed + (DIFFERENCES[spec][seed] if spec != "none" else 0.0)
            out.append(TrialOutcome(trial_id=f"{spec}-{seed}", cell={"specialization": spec}, seed=seed,
                                    metrics={"seg_miou": value}, state="done", source="mlflow", code_version="abc"))
    return out


def test_the_glance_states_the_power_at_each_planned_seed_count_with_that_groups_sd():
    outcomes = _outcomes()
    text = at_a_glance(build_tables(SPEC, outcomes, table_metrics(["seg_miou"])),
                       Collection(outcomes=outcomes, tracking_uri="x", experiment="unit"))

    def pooled(*arms):
        return (sum((x - sum(DIFFERENCES[a]) / len(DIFFERENCES[a])) ** 2 for a in arms for x in DIFFERENCES[a])
                / sum(len(DIFFERENCES[a]) - 1 for a in arms)) ** 0.5

    d3, d6 = (TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
              for n in (3, 6))
    quiet, noisy = pooled("norms", "paper"), pooled("all")
    assert (f"the design detects ±{d3 * quiet * 100:.2f} pts (80% power at 3 seeds, paired SD "
            f"{quiet * 100:.2f} pts, observed over 2 comparisons), ±{d6 * noisy * 100:.2f} pts at 6 seeds "
            f"(`specialization=all`: paired SD {noisy * 100:.2f} pts)") in text


def test_the_header_lists_the_seeds_of_each_rule():
    header = ReportHeader(sweep="unit", description="", generated="now", seeds=[0, 1, 2], spec_hash="h",
                          code_versions={}, current_code_version="abc", tracking_uri="x", experiment="unit",
                          experiment_id=None, mlflow_error=None,
                          seeds_by_cell=[("specialization=all", [0, 1, 2, 3, 4, 5])])
    outcomes = _outcomes()
    text = report_markdown(header, Collection(outcomes=outcomes, tracking_uri="x", experiment="unit"),
                           build_tables(SPEC, outcomes, table_metrics(["seg_miou"])), {})
    assert "- **Seeds:** 0, 1, 2; specialization=all: 0, 1, 2, 3, 4, 5" in text
