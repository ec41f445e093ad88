"""Pure metric functions: tensors in, numbers out. No models, no training.

Conventions (every rate is a fraction in [0, 1], not a percentage):
- segmentation: `confusion_matrix` rows are ground-truth classes, columns predicted classes; pixels
  whose target is `ignore_index` are dropped. IoU of class c = TP / (TP + FP + FN); `mean_iou` is
  the nan-mean over classes with TP + FP + FN > 0, i.e. classes that occur in the target or in the
  prediction of the evaluated set (a class absent from both is not counted as 0 or 1).
- depth: a pixel is valid when its target depth is > 0. RMSE and AbsRel are computed per image over
  its valid pixels, then averaged over images (the NYUv2 / Monodepth convention); images without a
  valid pixel are skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = 255


def top1_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """`predictions`: class indices (N) or scores (N x K)."""
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    if labels.numel() == 0:
        return float("nan")
    return (predictions == labels).float().mean().item()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """K x K int64 counts; entry [t, p] = pixels of true class t predicted as p."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU per class (float64); nan for classes that appear neither in target nor prediction."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: Tensor) -> float:
    return iou_per_class(confusion).nanmean().item()


def pixel_accuracy(confusion: Tensor) -> float:
    total = confusion.sum()
    return (confusion.diagonal().sum().double() / total).item() if total > 0 else float("nan")


def per_image_depth_errors(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """RMSE and AbsRel of each image (B x H x W, or H x W) that has at least one valid pixel."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.double().flatten(-2), target.double().flatten(-2)
    if pred.dim() == 1:
        pred, target = pred[None], target[None]
    valid = target > 0
    count = valid.sum(-1)
    safe_target = torch.where(valid, target, torch.ones_like(target))
    squared = torch.where(valid, (pred - target) ** 2, torch.zeros_like(pred)).sum(-1)
    relative = torch.where(valid, (pred - target).abs() / safe_target, torch.zeros_like(pred)).sum(-1)
    has_valid = count > 0
    n = count[has_valid]
    return (squared[has_valid] / n).sqrt(), relative[has_valid] / n


def depth_rmse(pred: Tensor, target: Tensor) -> float:
    rmse, _ = per_image_depth_errors(pred, target)
    return rmse.mean().item() if rmse.numel() else float("nan")


def depth_abs_rel(pred: Tensor, target: Tensor) -> float:
    _, abs_rel = per_image_depth_errors(pred, target)
    return abs_rel.mean().item() if abs_rel.numel() else float("nan")
