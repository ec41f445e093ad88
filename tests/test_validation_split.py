"""The validation hold-out a hyperparameter search selects on (data.val_fraction), and the learning
curve it prunes on (evaluation.every_steps -> DIR/progress.jsonl)."""

from __future__ import annotations

import json
import hashlib

import pytest
import torch

from trainer.config import ConfigError, parse_config
from trainer.data import build_eval_datasets, build_train_dataset
from trainer.data.build import holdout_indices, scenes_for
from trainer.contract import PROGRESS_FILE, RESULT_FILE

from test_trainer_loop import run_trainer, tiny_config, write_config


def test_the_hold_out_is_disjoint_fixed_and_sized():
    kept, held = holdout_indices(200, 0.25)
    assert len(held) == 50 and len(kept) == 150
    assert not set(kept) & set(held) and sorted(kept + held) == list(range(200))
    assert holdout_indices(200, 0.25) == (kept, held)  # the same images every time, for every seed
    assert held != list(range(150, 200))  # a random draw, not the tail (scenes are not ordered, folders are)
    with pytest.raises(ValueError, match="data.val_fraction"):
        holdout_indices(3, 0.1)  # rounds to no validation item


def _image_keys(dataset) -> set[str]:
    return {hashlib.sha1(torch.as_tensor(dataset[i]["image"]).numpy().tobytes()).hexdigest()
            for i in range(len(dataset))}


def test_nothing_trains_on_the_validation_images_and_test_is_unchanged():
    data = {"data": {"scenes": {"train_size": 64, "val_size": 16}, "val_fraction": 0.25},
            "evaluation": {"max_train_samples": None, "max_val_samples": None}}
    cfg = parse_config(data)
    train = build_train_dataset(cfg)
    assert len(train) == 48
    scenes = scenes_for(cfg, "train")
    kept, held = holdout_indices(64, 0.25)
    trained = _image_keys(train.base)
    validation = build_eval_datasets(cfg, "validation").classification
    test = build_eval_datasets(cfg, "test").classification
    held_images = {hashlib.sha1(torch.as_tensor(scenes[i]["image"]).numpy().tobytes()).hexdigest() for i in held}
    assert trained.isdisjoint(held_images)
    assert len(validation[1]) == 16 and len(validation[0]) == 48  # probes fit on the kept part only
    assert len(test[1]) == 16 and len(test[0]) == 48
    # without a hold-out, the test split is the dataset's val split as before and nothing is held out
    plain = parse_config({**data, "data": {**data["data"], "val_fraction": 0.0}})
    assert len(build_train_dataset(plain)) == 64
    with pytest.raises(ValueError, match="val_fraction"):
        build_eval_datasets(plain, "validation")


def test_intermediate_evaluations_need_the_validation_split():
    with pytest.raises(ConfigError) as err:
        parse_config({"evaluation": {"every_steps": 10}})
    assert "data.val_fraction" in str(err.value) and "every_steps" in str(err.value)


def test_a_trial_writes_its_learning_curve_and_validation_metrics(tmp_path):
    data = tiny_config(tmp_path, data={"val_fraction": 0.25}, evaluation={"every_steps": 4, "segmentation": False,
                                                                          "token_interaction": False})
    data["tracking"]["enabled"] = False
    out = tmp_path / "out"
    proc = run_trainer(write_config(tmp_path, data), out)
    assert proc.returncode == 0, proc.stderr
    curve = [json.loads(line) for line in (out / PROGRESS_FILE).read_text().splitlines()]
    assert [point["step"] for point in curve] == [4, 8]  # the end (step 12) is the final evaluation
    for point in curve:
        assert set(point["metrics"]) == {"val/linear_top1_cls", "val/linear_top1_cls_patch", "val/knn_top1", "val/head_top1"}
        assert all(0.0 <= v <= 1.0 for v in point["metrics"].values())
    metrics = json.loads((out / RESULT_FILE).read_text())["metrics"]
    for name in ("linear_top1_cls", "knn_top1", "depth_rmse"):  # test split, and the same on validation
        assert name in metrics and f"val/{name}" in metrics


def test_yaml_on_and_off_are_compile_settings_not_booleans():
    import yaml

    cfg = parse_config(yaml.safe_load("runtime: {compile: on}"))
    assert cfg.runtime.compile == "on"
    assert parse_config(yaml.safe_load("runtime: {compile: off}")).runtime.compile == "off"
    with pytest.raises(ConfigError, match="runtime.compile"):
        parse_config({"runtime": {"compile": "sometimes"}})
