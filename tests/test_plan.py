"""Planning (orchestrator/plan.py): what a spec asks for, plain and tuned, read without writing, the
per-machine time model fitted on finished trials in the store, and GPU-hours from a device profile."""

from __future__ import annotations

import io

import pytest
import yaml
from rich.console import Console

from conftest import MICRO_BASE, REPO, write_spec
from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.plan import (
    PRIOR_FIXED_GPU_S,
    PRIOR_STARTUP_S,
    device_of,
    diff_plan,
    estimate_train_flops,
    fit_time_model,
    gpus_per_trial,
    measured,
    planned_trials,
    sweep_output_dir,
    tuned_trials,
    unique_by_id,
)
from orchestrator.spec.profiles import GPU_PEAK_TFLOPS
from orchestrator.views import plan_view
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


def test_time_model_comes_from_trials_the_trainer_resolved(project_root):
    paths = ProjectPaths.discover(project_root)
    assert fit_time_model(paths) is None
    config = "model: {scale: micro}\nschedule: {steps: 10, batch_size: 8}\n"
    for name, resolved in (("resolved", True), ("stand_in", False)):
        folder = paths.trial(name).path
        folder.mkdir(parents=True)
        (folder / (RESOLVED_CONFIG_FILE if resolved else CONFIG_FILE)).write_text(config)
        write_result(folder, TrialResult(status="done", wall_time_s=3.0, eval_time_s=1.0))
    model = fit_time_model(paths)
    assert model is not None and model.per_tflop_s > 0 and model.basis == "fitted on 1 finished trial(s)"
    # One trial: its training time scales with FLOPs, its evaluation and start-up (a prior) do not.
    flops = estimate_train_flops(yaml.safe_load(config))
    assert model.seconds(flops) == pytest.approx(3.0 + 1.0 + PRIOR_STARTUP_S)
    assert model.seconds(2 * flops) == pytest.approx(2 * 3.0 + 1.0 + PRIOR_STARTUP_S)


def finished(paths: ProjectPaths, name: str, steps: int, wall: float, evaluation: float, device: str = "cpu") -> str:
    folder = paths.trial(name).path
    folder.mkdir(parents=True)
    (folder / RESOLVED_CONFIG_FILE).write_text(f"model: {{scale: micro}}\nschedule: {{steps: {steps}, batch_size: 64}}\n")
    write_result(folder, TrialResult(status="done", wall_time_s=wall, eval_time_s=evaluation, device=device))
    return name


def test_least_squares_separates_the_fixed_cost_and_the_ledger_gives_the_slot_time(project_root, tmp_path):
    paths = ProjectPaths.discover(project_root)
    ledger = Ledger(tmp_path / "ledger.json")
    # Real numbers of the default sweep's micro trial on the 2-core machine: 40 steps trained in
    # 30 s, evaluated in 14 s, and held its slot 61 s; 160 steps: 4x the training.
    for name, steps, wall, span in (("s40", 40, 30.0, 61.0), ("s160", 160, 120.0, 151.0)):
        finished(paths, name, steps, wall, 14.0)
        record = TrialRecord(name, state="done", started_at=1000.0, ended_at=1000.0 + span)
        record.history.append({"attempt": 1, "started_at": 1000.0, "ended_at": 1000.0 + span})
        ledger.trials[name] = record
    model = fit_time_model(paths, ledger)
    flops40 = estimate_train_flops({"model": {"scale": "micro"}, "schedule": {"steps": 40, "batch_size": 64}})
    assert model.seconds(flops40) == pytest.approx(61.0) and model.seconds(4 * flops40) == pytest.approx(151.0)
    assert model.fixed_s == pytest.approx(31.0)  # start-up 17 s + evaluation 14 s
    assert measured(paths.trial("s40"), ledger.get("s40")).seconds == pytest.approx(61.0)
    assert measured(paths.trial("s40"), None).seconds == pytest.approx(44.0)  # no ledger: train + eval
    assert fit_time_model(paths, ledger, on_gpu=True) is None  # CPU trials say nothing about a GPU


def test_gpu_hours_come_from_the_device_the_spec_or_its_cluster_profile_names(tmp_path, project_root):
    paper = load_spec(REPO / "sweeps" / "paper" / "component_ablation_vitb.yaml")
    trial = expand(paper, code_version="v1")[0]
    gpus = gpus_per_trial(paper, trial.config)
    assert gpus == 8  # sweeps/paper/component_ablation_vitb.yaml asks for 8 per trial
    device = device_of(paper)  # slurm/profiles/default.yaml: a100 at 35 %
    assert (device.gpu, device.peak_tflops, device.utilisation) == ("a100", GPU_PEAK_TFLOPS["a100"], 0.35)
    flops = estimate_train_flops(trial.config)
    model = device.model(gpus)
    assert model.seconds(flops) == pytest.approx(PRIOR_FIXED_GPU_S + flops / (8 * 312e12 * 0.35))
    h100 = device_of(load_spec(REPO / "sweeps" / "paper" / "component_ablation_vitb.yaml",
                               ["backend.options.device={gpu: h100, utilisation: 0.5}"]))
    assert (h100.peak_tflops, h100.utilisation) == (989.0, 0.5)
    assert device_of(load_spec(write_spec(tmp_path, "cpu"))) is None  # a CPU sweep names no GPU
    shown = Console(file=io.StringIO(), width=250)
    shown.print(plan_view(paper, [trial], diff_plan([trial], []), Ledger(tmp_path / "l.json"),
                          ProjectPaths.discover(project_root)))
    text = shown.file.getvalue()
    assert "GPU-h" in text and "GPU-hours" in text and f"{8 * model.seconds(flops) / 3600:,.1f}" in text
