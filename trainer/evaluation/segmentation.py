"""Semantic segmentation from frozen patch tokens: a per-token linear layer (1x1 conv) whose logits
are bilinearly upsampled to the label resolution (the DINOv2 "linear" protocol, without BN and
multi-layer concatenation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from trainer.evaluation.features import Standardizer, fit_probe
from trainer.evaluation.metrics import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy


def dense_prediction(head: nn.Module, grid: Tensor, size: tuple[int, int]) -> Tensor:
    """The head applied on the patch grid, bilinearly upsampled to the label size (B x K x H x W)."""
    return F.interpolate(head(grid), size=size, mode="bilinear", align_corners=False)


def train_segmentation_probe(
    train_grid: Tensor,
    train_masks: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> nn.Conv2d:
    """`train_grid` N x C x h x w (already standardized, on the training device); masks N x H x W."""
    # Zero init (the problem is convex): no default init, so the global RNG is not drawn from.
    head = skip_init(nn.Conv2d, train_grid.shape[1], num_classes, kernel_size=1, device=train_grid.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    size = tuple(train_masks.shape[-2:])

    def batch_loss(indices: Tensor) -> Tensor:
        indices = indices.to(train_grid.device)
        target = train_masks[indices].long()
        logits = dense_prediction(head, train_grid[indices], size)
        # Sum / count rather than the mean: a batch whose pixels are all ignored gives 0, not nan.
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        return loss / (target != ignore_index).sum().clamp_min(1)

    return fit_probe(head, len(train_grid), batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def segmentation_probe(
    train_grid: Tensor,
    train_masks: Tensor,
    val_grid: Tensor,
    val_masks: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, float]:
    """Trains on (train_grid, train_masks), returns `seg_miou` and `seg_pixel_acc` on the val set."""
    device = torch.device(device)
    standardize = Standardizer(train_grid)
    head = train_segmentation_probe(
        standardize(train_grid).to(device), train_masks.to(device), num_classes,
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, ignore_index=ignore_index,
    )
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    size = tuple(val_masks.shape[-2:])
    with torch.no_grad():
        for grid, masks in zip(val_grid.split(batch_size), val_masks.split(batch_size)):
            pred = dense_prediction(head, standardize(grid.to(device)), size).argmax(dim=1)
            confusion += confusion_matrix(pred.cpu(), masks, num_classes, ignore_index)
    return {"seg_miou": mean_iou(confusion), "seg_pixel_acc": pixel_accuracy(confusion)}


def infer_num_classes(*masks: Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Largest label that is not `ignore_index`, + 1: for datasets that do not declare their classes."""
    labels = torch.cat([m[m != ignore_index].reshape(-1).long() for m in masks])
    return int(labels.max().item()) + 1 if labels.numel() else 1
