"""trainer.metric_names lists what a trial reports without running one (for `report.metrics`); a
real tiny trial must report exactly the names it says, and nothing it says is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.mlflow_store import final_metrics
from trainer.config import parse_config
from trainer.loop import Trial
from trainer.metric_names import metric_table

from support.protocols import DINOV2_SMALL

TINY = {
    "model": {"specialization": "paper"},
    "data": {"scenes": {"train_size": 64, "val_size": 32}, "val_fraction": 0.25},
    "schedule": {"steps": 3, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1},
    "evaluation": {"probe_epochs": 1, "max_train_samples": 32, "max_val_samples": 16},
    "tracking": {"enabled": False},
    "runtime": {"threads": 1, "compile": "off"},
}


def measured(table: dict[str, str | None]) -> set[str]:
    return {name for name, why in table.items() if why is None}


def test_a_trial_reports_exactly_the_listed_metrics(tmp_path: Path):
    cfg = parse_config(TINY)
    result = Trial(cfg, tmp_path / "out", log=lambda message: None).run()
    assert result is not None and result.done
    assert set(final_metrics(result)) == measured(metric_table(cfg))


@pytest.mark.parametrize("framework", ["supervised", "dinov2"])
def test_a_dinov2_protocol_trial_reports_exactly_the_listed_metrics(tmp_path: Path, framework: str):
    """The dinov2 protocol's own names (its grid choice, k values, +ms and lin. 4 heads); the
    `val/` metrics are the quick protocol's global probes."""
    cfg = parse_config({**TINY, "framework": framework,
                        "evaluation": {**TINY["evaluation"], "protocol": "dinov2", "dinov2": DINOV2_SMALL}})
    result = Trial(cfg, tmp_path / "out", log=lambda message: None).run()
    assert result is not None and result.done
    table = metric_table(cfg)
    assert set(final_metrics(result)) == measured(table)
    assert {"seg_miou_ms", "depth_rmse_lin4", "knn_top1_k5", "linear_best_lr", "val/knn_top1"} <= measured(table)
    assert "val/seg_miou" not in measured(table) and "linear_top1_cls_patch" not in table
    assert ("head_top1" in measured(table)) is (framework == "supervised")


def test_disabled_evaluations_name_the_setting_that_enables_them():
    cfg = parse_config({**TINY, "evaluation": {"segmentation": False, "token_interaction": False},
                        "data": {"val_fraction": 0.0}})
    table = metric_table(cfg)
    assert table["seg_miou"] == "evaluation.segmentation is false: set it to true"
    assert table["val/knn_top1"].startswith("measured on the validation split: set data.val_fraction")
    assert table["tokens/early_cls_patch_cos_post"] == "evaluation.token_interaction is false: set it to true"
    assert table["tokens/block5/patch_patch_cos_pre"] is not None and "tokens/block6/patch_patch_cos_pre" not in table
    assert table["tokens/norm2/late_patch_patch_cos_post"] == table["tokens/final_norm/cls_patch_cos_pre"] is not None
    assert table["params_added/qkv"] is None and table["params_added/fc1"].startswith("counted only for specialized")
    assert {"knn_top1", "depth_rmse", "flops", "wall_time_s", "throughput_img_s"} <= measured(table)
    short = parse_config({**TINY, "schedule": {"steps": 2, "warmup_steps": 1}})
    assert metric_table(short)["throughput_img_s"].startswith("timed after the first 2 steps")


def test_folder_datasets_measure_only_the_tasks_with_data(tmp_path: Path):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    table = metric_table(parse_config({"data": {"dataset": "folders", "classification_root": str(root)}}))
    assert table["linear_top1_cls"] is None and table["tokens/late_cls_patch_cos_pre"] is None
    assert table["depth_rmse"] == "data.dataset folders has no depth data: set data.depth_root"
