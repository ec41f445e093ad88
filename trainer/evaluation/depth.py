"""Monocular depth from frozen patch tokens: a per-token linear regressor (1x1 conv), upsampled to
the label resolution, trained with MSE on valid pixels (depth > 0) only."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from trainer.evaluation.features import Standardizer, fit_probe
from trainer.evaluation.metrics import per_image_depth_errors
from trainer.evaluation.segmentation import dense_prediction


def _valid_mean_depth(depths: Tensor) -> float:
    valid = depths[depths > 0]
    return valid.double().mean().item() if valid.numel() else 1.0


def depth_probe(
    train_grid: Tensor,
    train_depth: Tensor,
    val_grid: Tensor,
    val_depth: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Trains on (train_grid N x C x h x w, train_depth N x H x W); returns `depth_rmse`, `depth_abs_rel`."""
    device = torch.device(device)
    standardize = Standardizer(train_grid)
    grid = standardize(train_grid).to(device)
    # The head predicts depth / (mean train depth): metres or millimetres, the same lr works.
    scale = _valid_mean_depth(train_depth)
    target = (train_depth.float() / scale).to(device)
    # Starts at the mean depth everywhere; skip_init: the global RNG is not drawn from.
    head = skip_init(nn.Conv2d, grid.shape[1], 1, kernel_size=1, device=device)
    nn.init.zeros_(head.weight)
    nn.init.ones_(head.bias)
    size = tuple(train_depth.shape[-2:])

    def batch_loss(indices: Tensor) -> Tensor:
        indices = indices.to(device)
        pred = dense_prediction(head, grid[indices], size)[:, 0]
        true = target[indices]
        valid = (true > 0).float()  # a mask product: cheaper than boolean indexing on CPU
        return ((pred - true).square() * valid).sum() / valid.sum().clamp_min(1)

    fit_probe(head, len(grid), batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)

    rmse, abs_rel = [], []
    size = tuple(val_depth.shape[-2:])
    with torch.no_grad():
        for g, d in zip(val_grid.split(batch_size), val_depth.split(batch_size)):
            pred = dense_prediction(head, standardize(g.to(device)), size)[:, 0].clamp_min(0) * scale
            r, a = per_image_depth_errors(pred.cpu(), d.float())
            rmse.append(r)
            abs_rel.append(a)
    rmse, abs_rel = torch.cat(rmse), torch.cat(abs_rel)
    nan = float("nan")
    return {
        "depth_rmse": rmse.mean().item() if rmse.numel() else nan,
        "depth_abs_rel": abs_rel.mean().item() if abs_rel.numel() else nan,
    }
