"""scripts/token_observation.py: its settings are valid trial configs, its criterion is the stated
one, and one tiny real trial goes through run -> collect -> report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from trainer.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("token_observation", REPO / "scripts" / "token_observation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


obs = _load_script()


@pytest.mark.parametrize("setting", obs.SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_a_valid_vanilla_trial(setting):
    cfg = parse_config(obs.build_config(setting), setting.name)
    assert cfg.model.specialization == "none"
    assert not cfg.tracking.enabled and cfg.runtime.threads == 1
    assert cfg.evaluation.token_interaction


def test_setting_names_are_unique():
    names = [s.name for s in obs.SETTINGS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("pre", "post", "patch_patch", "expected"), [
    (0.35, 0.01, 0.5, True),
    (0.2, -0.05, 0.21, True),  # every bound inclusive except patch-patch
    (0.19, 0.0, 0.5, False),  # not clearly positive before the norm
    (0.4, 0.06, 0.5, False),  # not about 0 after it
    (0.4, -0.06, 0.5, False),
    (0.4, 0.0, 0.2, False),  # patch-patch not staying positive
])
def test_criterion(pre, post, patch_patch, expected):
    assert obs.observation_holds(pre, post, patch_patch) is expected


def test_overrides_reach_nested_keys_without_touching_the_base():
    setting = obs.Setting("x", "why", {"model.layer_scale_init": None, "schedule.steps": 7, "framework": "dinov2"})
    config = obs.build_config(setting)
    assert config["model"]["layer_scale_init"] is None and config["schedule"]["steps"] == 7
    assert config["framework"] == "dinov2" and config["model"]["scale"] == "micro"
    assert obs.BASE["model"]["layer_scale_init"] == 1.0e-4 and obs.BASE["framework"] == "supervised"


def test_a_tiny_real_trial_is_run_collected_reused_and_reported(tmp_path):
    tiny = obs.Setting("tiny", "2 steps on 64 scenes", {
        "schedule.steps": 2, "schedule.warmup_steps": 1, "schedule.batch_size": 16, "schedule.checkpoint_every": 2,
        "data.scenes.train_size": 64, "data.scenes.val_size": 32, "evaluation.probe_epochs": 1})
    runs = tmp_path / "runs"
    out = obs.run_setting(tiny, runs, sys.executable, REPO)
    outcome = obs.collect(tiny, runs)
    assert outcome is not None and outcome.result["steps"] == 2
    depth = len(outcome.curves["norm1"]["cls_patch_cos_pre"])
    assert depth == 6 and len(outcome.curves["norm1"]["cls_patch_cos_post"]) == depth
    for stage in obs.STAGES:
        pre, post, patch_patch = outcome.stage(stage)
        assert -1 <= pre <= 1 and -1 <= post <= 1 and -1 <= patch_patch <= 1
        assert outcome.holds(stage) is obs.observation_holds(pre, post, patch_patch)

    mtime = (out / "result.json").stat().st_mtime_ns
    assert obs.run_setting(tiny, runs, sys.executable, REPO) == out  # a finished run of the same config is reused
    assert (out / "result.json").stat().st_mtime_ns == mtime

    changed = obs.Setting("tiny", "same name, other config", {**tiny.overrides, "schedule.steps": 3})
    with pytest.raises(SystemExit, match="another config"):
        obs.run_setting(changed, runs, sys.executable, REPO)

    report = tmp_path / "reports" / "token_observation.md"
    png = obs.plot([outcome], report.with_suffix(".png"))
    obs.write_report([outcome], report, png, REPO, notes="A note.")
    text = report.read_text()
    assert "| tiny |" in text and "Criterion" in text and "A note." in text
    assert obs.git_version(REPO).split()[0] in text
    assert png.stat().st_size > 0 and "token_observation.png" in text
