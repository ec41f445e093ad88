"""Planning (orchestrator/plan.py): what a spec asks for, plain and tuned, read without writing, and
the per-machine time estimate from finished trials in the store."""

from __future__ import annotations

from conftest import MICRO_BASE, write_spec
from orchestrator.plan import (
    planned_trials,
    seconds_per_tflop,
    sweep_output_dir,
    tuned_trials,
    unique_by_id,
)
from orchestrator.spec import TrialPlan, expand, load_spec
from orchestrator.store import ProjectPaths
from trainer.contract import CONFIG_FILE, RESOLVED_CONFIG_FILE, TrialResult, write_result

SEARCH_BASE = {**MICRO_BASE, "data": {**MICRO_BASE["data"], "val_fraction": 0.25},
               "evaluation": {**MICRO_BASE["evaluation"], "every_steps": 10}}


def trial(tid: str, label: str) -> TrialPlan:
    return TrialPlan(trial_id=tid, cell={"case": label}, seed=0, config={})


def test_unique_by_id_keeps_the_first_of_each_id_in_order():
    a, b, a_again, c = trial("a", "first"), trial("b", "b"), trial("a", "second"), trial("c", "c")
    assert unique_by_id([a, b, a_again, c]) == [a, b, c]
    assert unique_by_id([a, b, a_again, c])[0].cell == {"case": "first"}


def test_a_plain_sweep_plans_its_expansion(tmp_path, project_root):
    spec = load_spec(write_spec(tmp_path, "plain"))
    paths = ProjectPaths.discover(project_root)
    assert planned_trials(spec, paths, "v1") == expand(spec, code_version="v1")


def test_a_tuned_sweep_before_its_search_plans_each_cell_untuned_and_writes_nothing(tmp_path, project_root):
    spec = load_spec(write_spec(tmp_path, "tuned", base=SEARCH_BASE, seeds=[0, 1], search={
        "metric": "val/linear_top1_cls", "sampler": "random", "pruner": "none", "trials_per_cell": 3,
        "params": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}))
    paths = ProjectPaths.discover(project_root)
    tuned = tuned_trials(spec, sweep_output_dir(spec, paths), "v1")
    assert tuned.search == [] and tuned.cells == []
    assert [(t.cell["specialization"], t.seed) for t in tuned.final] == [
        ("none", 0), ("paper", 0), ("none", 1), ("paper", 1)]  # seed-major, like expand
    assert all(t.params is None for t in tuned.final)
    assert planned_trials(spec, paths, "v1") == tuned.trials == tuned.final
    assert list(project_root.iterdir()) == []  # no study, no journal, no folder


def test_time_per_tflop_comes_from_trials_the_trainer_resolved(project_root):
    paths = ProjectPaths.discover(project_root)
    assert seconds_per_tflop(paths) == (None, "")
    config = "model: {scale: micro}\nschedule: {steps: 10, batch_size: 8}\n"
    for name, resolved in (("resolved", True), ("stand_in", False)):
        folder = paths.trial(name).path
        folder.mkdir(parents=True)
        (folder / (RESOLVED_CONFIG_FILE if resolved else CONFIG_FILE)).write_text(config)
        write_result(folder, TrialResult(status="done", wall_time_s=3.0, eval_time_s=1.0))
    rate, basis = seconds_per_tflop(paths)
    assert rate is not None and rate > 0 and basis == "from 1 finished trial(s)"
