"""Planning (orchestrator/plan.py): what a spec asks for, plain and tuned, read without writing, the
per-machine time model fitted on finished trials in the store, GPU-hours from a device profile, and
the power section: the paired SD's source, the detectable effect and the seeds a target needs."""

from __future__ import annotations

import io
import math
import statistics

import pytest
import yaml
from rich.console import Console
from statsmodels.stats.power import TTestPower

from conftest import MICRO_BASE, REPO, write_spec
from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.plan import (
    PRIOR_FIXED_GPU_S,
    PRIOR_STARTUP_S,
    SD_FROM_EARLIER,
    SD_FROM_SWEEP,
    device_of,
    diff_plan,
    estimate_train_flops,
    fit_time_model,
    gpus_per_trial,
    measured,
    planned_trials,
    power_plan,
    sweep_output_dir,
    tuned_trials,
    unique_by_id,
)
from orchestrator.spec.profiles import GPU_PEAK_TFLOPS
from orchestrator.views import plan_view
from orchestrator.spec import TrialPlan, expand, load_spec
from orchestrator.stats.power import SD_UNKNOWN, detectable_effect_size, seeds_for_effect_size
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


# ----------------------------------------------------------------------------------------------
# Power: the paired SD's source, the detectable effect, the seeds a target needs
# ----------------------------------------------------------------------------------------------
def power_spec(tmp_path, name="power", seeds=(0, 1, 2), **report):
    return load_spec(write_spec(tmp_path, name, seeds=list(seeds),
                                report={"metrics": ["seg_miou", "linear_top1_cls"], **report}))


def finish(paths: ProjectPaths, trial_id: str, seg_miou: float, top1: float, config: dict | None = None) -> None:
    if config is not None:
        paths.trial(trial_id).write_config(config)
    write_result(paths.trial(trial_id).path, TrialResult(status="done", metrics={"seg_miou": seg_miou,
                                                                                "linear_top1_cls": top1}))


def shown_plan(spec, paths, ledger) -> str:
    trials = expand(spec, code_version="v1")
    console = Console(file=io.StringIO(), width=250)
    console.print(plan_view(spec, trials, diff_plan(trials, [r.trial_id for r in ledger]), ledger, paths))
    return console.file.getvalue()


def test_plan_prints_the_detectable_effect_and_seeds_from_the_spec_s_prior(tmp_path, project_root):
    spec = power_spec(tmp_path, seeds=[0, 1], target_effects={"seg_miou": 0.01, "linear_top1_cls": 0.02},
                      paired_sd={"seg_miou": 0.0058})
    text = shown_plan(spec, ProjectPaths.discover(project_root), Ledger(tmp_path / "ledger.json"))
    assert "power: paired t test, two-sided 5%, 80% power, 2 seed(s) per cell" in text
    miou = next(line for line in text.splitlines() if "seg_miou" in line)
    mde = TTestPower().solve_power(effect_size=None, nobs=2, alpha=0.05, power=0.8, alternative="two-sided")
    assert "0.58 pts" in miou and "the spec's prior (report.paired_sd)" in miou
    assert f"{mde * 0.58:.2f} pts" in miou  # 6.70 pts at 2 seeds
    assert miou.rstrip(" │").endswith("5")  # the number: 1 pt at SD 0.58 pts needs 5 seeds
    top1 = next(line for line in text.splitlines() if "linear_top1_cls" in line)
    assert "unknown" in top1 and f"{mde:.2f} × SD" in top1 and "2.00 pts" in top1
    assert "no paired SD yet for linear_top1_cls" in text and "report.paired_sd" in text


def test_the_paired_sd_comes_from_the_sweep_s_finished_trials(tmp_path, project_root):
    spec = power_spec(tmp_path, target_effects={"seg_miou": 0.01})
    paths = ProjectPaths.discover(project_root)
    trials = expand(spec, code_version="v1")
    # paper - none per seed: mIoU +0.010 / +0.014 / +0.012 -> SD 0.002
    miou = {("none", 0): 0.30, ("none", 1): 0.32, ("none", 2): 0.31, ("paper", 0): 0.31, ("paper", 1): 0.334,
            ("paper", 2): 0.322}
    for trial in trials:
        slot = (trial.cell["specialization"], trial.seed)
        finish(paths, trial.trial_id, miou[slot], 0.6 + 0.01 * trial.seed + (0.005 * trial.seed if slot[0] == "paper"
                                                                              else 0))
    powers = {p.metric: p for p in power_plan(spec, trials, Ledger(tmp_path / "l.json"), paths,
                                              ["seg_miou", "linear_top1_cls"])}
    assert powers["seg_miou"].sd == pytest.approx(0.002)
    assert powers["seg_miou"].sd_source == f"{SD_FROM_SWEEP}: 1 comparison(s), 2 degree(s) of freedom"
    assert powers["seg_miou"].seeds_for_target == seeds_for_effect_size(0.01 / 0.002)
    # top-1 differences 0, +0.005, +0.010: SD 0.005
    assert powers["linear_top1_cls"].sd == pytest.approx(0.005)
    text = shown_plan(spec, paths, Ledger(tmp_path / "l.json"))
    line = next(line for line in text.splitlines() if "seg_miou" in line)
    assert "0.20 pts" in line and SD_FROM_SWEEP in line
    assert f"{detectable_effect_size(3) * 0.2:.2f} pts" in line


def test_earlier_trials_of_the_sweep_pair_only_within_one_setting(tmp_path, project_root):
    spec = power_spec(tmp_path, seeds=[0, 1])
    paths = ProjectPaths.discover(project_root)
    ledger = Ledger(tmp_path / "ledger.json")
    plans = {(t.cell["specialization"], t.seed): t for t in expand(spec, code_version="v1")}

    def earlier(name, variant, seed, steps, miou, ended):
        config = {**plans[variant, seed].config, "schedule": {**plans[variant, seed].config["schedule"], "steps": steps}}
        finish(paths, name, miou, 0.6, config)
        ledger.trials[name] = TrialRecord(name, cell={"specialization": variant}, seed=seed, state="done",
                                          ended_at=ended)

    # Setting A (20 steps): paper - none = +0.010, +0.016 -> SD 0.00424. Setting B (50 steps, newer):
    # only `paper` ran; pairing it with A's `none` would mix settings, and must not happen.
    for variant, seed, miou in (("none", 0, 0.30), ("none", 1, 0.32), ("paper", 0, 0.31), ("paper", 1, 0.336)):
        earlier(f"a-{variant}-{seed}", variant, seed, 20, miou, ended=100.0)
    for seed, miou in ((0, 0.50), (1, 0.40)):
        earlier(f"b-paper-{seed}", "paper", seed, 50, miou, ended=200.0)
    ledger.trials["failed"] = TrialRecord("failed", cell={"specialization": "none"}, seed=0, state="failed")
    (power,) = power_plan(spec, list(plans.values()), ledger, paths, ["seg_miou"])
    assert power.sd == pytest.approx(0.006 / math.sqrt(2))
    assert power.sd_source.startswith(SD_FROM_EARLIER)
    assert SD_FROM_EARLIER in shown_plan(spec, paths, ledger)


def test_without_trials_or_a_prior_the_sd_is_unknown(tmp_path, project_root):
    spec = power_spec(tmp_path, seeds=[0])
    (miou, top1) = power_plan(spec, expand(spec, code_version="v1"), Ledger(tmp_path / "l.json"),
                              ProjectPaths.discover(project_root), ["seg_miou", "linear_top1_cls"])
    assert miou.sd_source == SD_UNKNOWN and miou.sd is None and miou.detectable is None
    text = shown_plan(spec, ProjectPaths.discover(project_root), Ledger(tmp_path / "l.json"))
    assert "none (1 seed)" in text and "set report.target_effects" in text


def test_each_comparison_shows_its_own_noise_and_the_half_width_at_its_seeds(tmp_path, project_root):
    # paper and all each against none; all is the noisy arm and runs 4 seeds (seeds_by_cell), paper 3
    axes = {"specialization": {"key": "model.specialization", "values": {"none": "none", "paper": "paper", "all": "all"}}}
    rules = [{"cell": {"specialization": "none"}, "seeds": [0, 1, 2, 3]},
             {"cell": {"specialization": "all"}, "seeds": [0, 1, 2, 3]}]
    spec = load_spec(write_spec(tmp_path, "noise", axes=axes, seeds=[0, 1, 2], seeds_by_cell=rules,
                                report={"metrics": ["seg_miou"], "target_effects": {"seg_miou": 0.01}}))
    paths = ProjectPaths.discover(project_root)
    differences = {"paper": [0.010, 0.014, 0.012], "all": [0.0, 0.04, -0.02, 0.02]}  # SD 0.002 and 0.0258
    for trial in expand(spec, code_version="v1"):
        variant = trial.cell["specialization"]
        miou = 0.3 + 0.01 * trial.seed + (differences[variant][trial.seed] if variant != "none" else 0.0)
        finish(paths, trial.trial_id, miou, 0.6)
    text = shown_plan(spec, paths, Ledger(tmp_path / "l.json"))
    assert "per comparison, from its finished pairs" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if "│ seg_miou" in line and "pts" in line and line.count("│") == 7}
    sd_all = statistics.stdev(differences["all"])
    assert rows["specialization=paper"] == ["seg_miou", "3/3", "0.20 pts", f"±{4.303 * 0.2 / math.sqrt(3):.2f} pts",
                                            str(seeds_for_effect_size(0.01 / 0.002))]
    assert rows["specialization=all"][:4] == ["seg_miou", "4/4", f"{sd_all * 100:.2f} pts",
                                              f"±{3.182 * sd_all * 100 / 2:.2f} pts"]
    assert rows["specialization=all"][4] == str(seeds_for_effect_size(0.01 / sd_all))
