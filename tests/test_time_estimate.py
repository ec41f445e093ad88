"""`plan`'s time estimate against real trials: the default sweep's micro trials run by the real
trainer through the CLI, the estimate fitted on some, checked against the measured time of the rest."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from conftest import PYTHON, REPO
from orchestrator.identity import code_version
from orchestrator.ledger import Ledger
from orchestrator.plan import diff_plan, estimate_train_flops, fit_time_model, measured, planned_trials
from orchestrator.spec import load_spec
from orchestrator.store import ProjectPaths
from orchestrator.views import duration, plan_view

pytestmark = pytest.mark.slow

DEFAULT_SWEEP = REPO / "sweeps" / "component_ablation.yaml"
# The default sweep, one seed, one trial at a time (per-trial times on a shared 2-core machine),
# without MLflow; fewer steps than its 160 so the test takes minutes, not a quarter of an hour.
COMMON = ["seeds=[0]", "tracking.enabled=false", "backend.max_parallel=1"]


def overrides(steps: int, values: str) -> list[str]:
    return [*COMMON, f"base.schedule.steps={steps}", f"axes.specialization.values={values}"]


def run_sweep_cli(items: list[str], env: dict[str, str]) -> None:
    sets = [arg for item in items for arg in ("--set", item)]
    done = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(DEFAULT_SWEEP), "--no-progress", "--no-report",
                           *sets], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_plan_estimates_the_default_sweep_within_25_percent_of_measured(project_root, cli_env):
    # Fit on two sizes of the vanilla trial, then predict both trials at a third size.
    run_sweep_cli(overrides(20, "{none: none}"), cli_env)
    run_sweep_cli(overrides(60, "{none: none}"), cli_env)
    paths = ProjectPaths.discover(project_root)
    rest = overrides(40, "{none: none, paper: paper}")
    spec = load_spec(DEFAULT_SWEEP, rest)
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    model = fit_time_model(paths, ledger)
    assert model is not None and model.basis == "fitted on 2 finished trial(s)"
    assert model.fixed_s > 5  # start-up and evaluation: what a FLOP-only rate missed
    trials = planned_trials(spec, paths, code_version())
    estimates = {t.trial_id: model.seconds(estimate_train_flops(t.config)) for t in trials}
    shown = _plan_text(spec, trials, paths)
    for trial_id, estimate in estimates.items():
        assert duration(estimate) in shown.split(trial_id)[1].splitlines()[0]

    run_sweep_cli(rest, cli_env)
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    shown = _plan_text(spec, trials, paths)
    for trial_id, estimate in estimates.items():
        took = measured(paths.trial(trial_id), ledger.get(trial_id))
        assert took is not None and took.from_ledger
        print(f"{trial_id}: estimate {estimate:.1f} s, measured {took.seconds:.1f} s ({model.describe()})")
        assert abs(estimate - took.seconds) <= 0.25 * took.seconds
        # A finished trial shows its measured time, not an estimate.
        cells = [c.strip() for c in shown.split(trial_id)[1].splitlines()[0].split("│")]
        assert "done" in cells[2] and cells[4] == "" and cells[5] == duration(took.seconds)


def _plan_text(spec, trials, paths: ProjectPaths) -> str:
    """The plan table of `trials` (planned once: ids stay put even if the checkout's code changes)."""
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    console = Console(file=io.StringIO(), width=200)
    console.print(plan_view(spec, trials, diff_plan(trials, [r.trial_id for r in ledger]), ledger, paths))
    return console.file.getvalue()
