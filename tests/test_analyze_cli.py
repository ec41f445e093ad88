"""`python -m trainer analyze --checkpoint PATH`: a checkpoint's probes and token analysis, no training."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml

from trainer.cli import main as trainer_main
from trainer.contract import CHECKPOINT_FILE, RESULT_FILE

TINY = {
    "data": {"scenes": {"train_size": 128, "val_size": 64}},
    "schedule": {"steps": 4, "batch_size": 32, "warmup_steps": 1, "checkpoint_every": 4, "log_every": 4},
    "evaluation": {"probe_epochs": 2, "max_train_samples": 64, "max_val_samples": 64, "knn_k": 5},
    "model": {"specialization": "paper"},
    "tracking": {"enabled": False},
    "runtime": {"threads": 1},
}


def _metrics(out) -> dict:
    return json.loads((out / RESULT_FILE).read_text())["metrics"]


def test_analyzing_a_trials_own_checkpoint_gives_its_final_metrics(tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(TINY))
    trained = tmp_path / "trained"
    assert trainer_main(["--config", str(config), "--out", str(trained)]) == 0
    analyzed = tmp_path / "analyzed"
    code = trainer_main(["analyze", "--checkpoint", str(trained / CHECKPOINT_FILE), "--config", str(config),
                         "--out", str(analyzed)])
    assert code == 0
    result = json.loads((analyzed / RESULT_FILE).read_text())
    assert result["steps"] == 0 and result["status"] == "done"
    assert (analyzed / "token_interaction.png").stat().st_size > 0
    assert not (analyzed / CHECKPOINT_FILE).exists()  # nothing trained, nothing to resume
    expected = _metrics(trained)
    assert set(result["metrics"]) == set(expected)
    for name, value in expected.items():  # the same weights through the same probes
        assert result["metrics"][name] == pytest.approx(value, abs=1e-5), name


def test_analyzing_a_vanilla_timm_checkpoint_specialized(tmp_path):
    vanilla = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=6,
                                num_heads=4, num_classes=0, init_values=1e-4)
    path = tmp_path / "vanilla.pth"
    torch.save(vanilla.state_dict(), path)
    out = tmp_path / "out"
    code = trainer_main(["analyze", "--checkpoint", str(path), "--out", str(out),
                         *[f"--set={k}={v}" for k, v in (("data.scenes.train_size", 128), ("data.scenes.val_size", 64),
                                                         ("schedule.batch_size", 32),
                                                         ("evaluation.probe_epochs", 1),
                                                         ("tracking.enabled", "false"), ("runtime.threads", 1))]])
    assert code == 0
    metrics = _metrics(out)
    assert {"seg_miou", "linear_top1_cls", "tokens/early_cls_patch_cos_pre"} <= set(metrics)


def test_analyze_refuses_a_missing_checkpoint_with_exit_2(tmp_path, capsys):
    code = trainer_main(["analyze", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "model.pretrained" in capsys.readouterr().err
