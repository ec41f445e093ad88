"""`plan`'s time estimate against real trials: the default sweep's micro trials run by the real
trainer through the CLI, the estimate fitted on some, checked against the measured time of the rest."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
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
STEPS = {"s20": 20, "s40": 40, "s60": 60}


def default_sweep_by_steps(folder: Path, specializations: dict[str, str]) -> Path:
    """The default sweep's trials (its base as written) at three training lengths, one seed, one
    trial at a time (per-trial times on a shared 2-core machine), without MLflow."""
    spec = yaml.safe_load(DEFAULT_SWEEP.read_text())
    spec["axes"] = {"specialization": {"key": "model.specialization", "values": specializations},
                    "steps": {"key": "schedule.steps", "values": STEPS}}
    spec.update(seeds=[0], tracking={"enabled": False})
    spec.pop("seeds_by_cell", None)  # its rules name arms this one-arm sweep lacks
    spec["report"].pop("controls", None)  # evaluation-only trials: nothing to fit a training time on
    spec["backend"]["max_parallel"] = 1
    path = folder / DEFAULT_SWEEP.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_plan_estimates_the_default_sweep_within_40_percent_of_measured(tmp_path, project_root, cli_env):
    # The three lengths run back to back in one sweep (the same machine load for all three).
    spec_path = default_sweep_by_steps(tmp_path, {"none": "none"})
    done = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(spec_path), "--no-progress", "--no-report"],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = ProjectPaths.discover(project_root)
    spec = load_spec(spec_path)
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    trials = {t.cell["steps"]: t for t in planned_trials(spec, paths, code_version())}

    # Fit on the shortest and longest trial alone (a store holding only those two), predict the middle one.
    fit_store = ProjectPaths.discover(tmp_path / "fit_store")
    fit_store.trials_dir.mkdir(parents=True)
    for name in ("s20", "s60"):
        shutil.copytree(paths.trial_dir(trials[name].trial_id), fit_store.trial_dir(trials[name].trial_id))
    model = fit_time_model(fit_store, ledger)
    assert model is not None and model.basis == "fitted on 2 finished trial(s)"
    assert model.fixed_s > 5  # start-up and evaluation: what a FLOP-only rate missed
    middle = trials["s40"]
    estimate = model.seconds(estimate_train_flops(middle.config))
    took = measured(paths.trial(middle.trial_id), ledger.get(middle.trial_id))
    assert took is not None and took.from_ledger
    print(f"estimate {estimate:.1f} s, measured {took.seconds:.1f} s ({model.describe()})")
    # 40%, not tighter: one trial of ~30 s on a shared 2-core machine can be slowed that much by its
    # neighbours (a CI run measured the middle trial at 35.6 s, longer than the 60-step one, against
    # 26.6 s estimated). A FLOP-only rate is caught by fixed_s above, a broken fit by this bound.
    assert abs(estimate - took.seconds) <= 0.40 * took.seconds

    # `plan` shows the measured time of a finished trial, and the fitted estimate of one not run yet.
    both = load_spec(default_sweep_by_steps(tmp_path, {"none": "none", "paper": "paper"}))
    planned = planned_trials(both, paths, code_version())
    shown = _plan_text(both, planned, paths)
    fitted = fit_time_model(paths, ledger)
    for trial in planned:
        cells = [c.strip() for c in shown.split(trial.trial_id)[1].splitlines()[0].split("│")]
        if trial.cell["specialization"] == "none":
            took = measured(paths.trial(trial.trial_id), ledger.get(trial.trial_id))
            assert "done" in cells[2] and cells[4] == "" and cells[5] == duration(took.seconds)
        else:
            assert cells[4] == duration(fitted.seconds(estimate_train_flops(trial.config))) and cells[5] == ""


def _plan_text(spec, trials, paths: ProjectPaths) -> str:
    """The plan table of `trials` (planned once: ids stay put even if the checkout's code changes)."""
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    console = Console(file=io.StringIO(), width=200)
    console.print(plan_view(spec, trials, diff_plan(trials, [r.trial_id for r in ledger]), ledger, paths))
    return console.file.getvalue()
