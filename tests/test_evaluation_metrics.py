"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation.metrics import (
    confusion_matrix,
    depth_abs_rel,
    depth_rmse,
    iou_per_class,
    mean_iou,
    per_image_depth_errors,
    pixel_accuracy,
    top1_accuracy,
)


def test_top1_accepts_indices_or_scores():
    labels = torch.tensor([0, 1, 2, 1])
    assert top1_accuracy(torch.tensor([0, 1, 1, 1]), labels) == pytest.approx(0.75)
    scores = torch.tensor([[2.0, 0, 0], [0, 1, 0], [3, 0, 0], [5, 0, 0]])  # right, right, wrong, wrong
    assert top1_accuracy(scores, labels) == pytest.approx(0.5)


def test_confusion_matrix_and_iou_by_hand():
    # 4 classes; class 3 appears neither in target nor prediction; two pixels are ignored.
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 0, 1]])  # the ignored pixels' predictions must not count
    conf = confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[1, 1, 0, 0],   # true 0: one right, one predicted as 1
                             [0, 2, 0, 0],   # true 1: both right
                             [1, 0, 1, 0],   # true 2: one right, one predicted as 0
                             [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    # IoU_c = TP / (TP + FP + FN): class 0: 1/(1+1+1); class 1: 2/(2+1+0); class 2: 1/(1+0+1).
    iou = iou_per_class(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3].item())
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(conf) == pytest.approx(4 / 6)


def test_class_only_predicted_counts_with_iou_zero():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 1])  # class 1 never true but predicted once: IoU 0, and it counts
    conf = confusion_matrix(pred, target, num_classes=3)
    assert mean_iou(conf) == pytest.approx((3 / 4 + 0.0) / 2)


def test_confusion_matrix_accumulates_and_rejects_bad_labels():
    a = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    assert torch.equal(a + b, confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2))
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.tensor([0]), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="predicted labels"):
        confusion_matrix(torch.tensor([5]), torch.tensor([1]), 2)


def test_all_ignored_gives_nan_not_an_error():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 255]), 2)
    assert conf.sum() == 0
    assert math.isnan(mean_iou(conf)) and math.isnan(pixel_accuracy(conf))


def test_depth_errors_by_hand_per_image_then_averaged():
    # Image 1: valid targets 1, 2, 4 (one invalid pixel, whose prediction is wild); image 2: all 2.
    target = torch.tensor([[[1.0, 2.0], [4.0, 0.0]],
                           [[2.0, 2.0], [2.0, 2.0]]])
    pred = torch.tensor([[[2.0, 2.0], [2.0, 100.0]],
                         [[2.0, 2.0], [2.0, 2.0]]])
    rmse, abs_rel = per_image_depth_errors(pred, target)
    # Image 1: squared errors 1, 0, 4 -> sqrt(5/3); relative errors 1/1, 0/2, 2/4 -> 1.5/3.
    assert rmse.tolist() == pytest.approx([math.sqrt(5 / 3), 0.0])
    assert abs_rel.tolist() == pytest.approx([0.5, 0.0])
    assert depth_rmse(pred, target) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert depth_abs_rel(pred, target) == pytest.approx(0.25)


def test_depth_skips_images_without_valid_pixels():
    target = torch.stack([torch.zeros(2, 2), torch.full((2, 2), 2.0)])
    pred = torch.full((2, 2, 2), 3.0)
    rmse, abs_rel = per_image_depth_errors(pred, target)
    assert rmse.tolist() == pytest.approx([1.0]) and abs_rel.tolist() == pytest.approx([0.5])
    assert math.isnan(depth_rmse(pred[:1], target[:1]))
    # A single H x W image works too.
    assert depth_rmse(pred[1], target[1]) == pytest.approx(1.0)
