"""DINOv2's depth classification-regression output and its SigLoss, as in the official code.

Sources (facebookresearch/dinov2):
- `depth_bins`, `bins_to_depth`: DepthBaseDecodeHead.depth_pred in
  dinov2/eval/depth/models/decode_heads/decode_head.py (same in dinov2/hub/depth/decode_heads.py):
  bins_strategy "UD" = torch.linspace(min_depth, max_depth, n_bins); norm_strategy "linear" =
  relu(logit) + 0.1, divided by its sum over the bins; depth = sum_k p_k * bins_k.
- `SigLoss`: dinov2/eval/depth/models/losses/sigloss.py (after AdaBins): g = log(pred + 1e-3) -
  log(gt + 1e-3) over the valid pixels (gt > 0, and gt <= max_depth when set), loss =
  loss_weight * sqrt(Var(g) + 0.15 * mean(g)^2), Var unbiased (torch.var); its warm-up variant
  returns sqrt(0.15 * mean(g)^2) for the first `warm_iter` calls (default 100).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LINEAR_NORM_EPS = 0.1  # decode_head.py, norm_strategy == "linear"
SIGLOSS_EPS = 1e-3  # sigloss.py, "avoid grad explode"
VARIANCE_FOCUS = 0.15  # sigloss.py: Dg = var(g) + 0.15 * mean(g)^2


def depth_bins(min_depth: float, max_depth: float, n_bins: int) -> Tensor:
    """Bin centres, uniformly spaced from `min_depth` to `max_depth` inclusive (DINOv2's "UD")."""
    if n_bins < 2 or not 0 <= min_depth < max_depth:
        raise ValueError(f"need n_bins >= 2 and 0 <= min_depth < max_depth, got {n_bins}, {min_depth}, {max_depth}")
    return torch.linspace(min_depth, max_depth, n_bins)


def bins_to_depth(logits: Tensor, bins: Tensor, norm: str = "linear") -> Tensor:
    """B x n_bins x H x W logits -> B x 1 x H x W depth: the expectation of the bin centres under the
    normalized scores ("linear" as DINOv2 and AdaBins; "softmax" and "sigmoid" as the official options)."""
    if norm == "linear":
        scores = torch.relu(logits) + LINEAR_NORM_EPS
        prob = scores / scores.sum(dim=1, keepdim=True)
    elif norm == "softmax":
        prob = torch.softmax(logits, dim=1)
    elif norm == "sigmoid":
        scores = torch.sigmoid(logits)
        prob = scores / scores.sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown norm strategy {norm!r} (linear, softmax, sigmoid)")
    return torch.einsum("bkhw,k->bhw", prob, bins.to(prob)).unsqueeze(1)


class SigLoss(nn.Module):
    """DINOv2's (AdaBins') scale-invariant log loss, with the official constructor options.

    The loss is not a mean over pixels: Var(g) spans all valid pixels of the batch it is given. It is
    computed here from per-image sufficient statistics (sum g, sum g^2, count), which sum over images
    and over processes, so a batch split over processes gives the loss of the whole batch.
    """

    def __init__(self, valid_mask: bool = True, loss_weight: float = 1.0, max_depth: float | None = None,
                 warm_up: bool = False, warm_iter: int = 100, loss_name: str = "sigloss"):
        super().__init__()
        self.valid_mask = valid_mask
        self.loss_weight = loss_weight
        self.max_depth = max_depth
        self.warm_up = warm_up
        self.warm_iter = warm_iter
        self.loss_name = loss_name
        self.eps = SIGLOSS_EPS
        self.warm_up_counter = 0  # official: counts forward calls

    def sample_statistics(self, depth_pred: Tensor, depth_gt: Tensor) -> Tensor:
        """B x 3 float64 (sum g, sum g^2, valid count) per image; differentiable in `depth_pred`."""
        pred = depth_pred.reshape(depth_pred.shape[0], -1)
        gt = depth_gt.reshape(depth_gt.shape[0], -1).to(pred)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(depth_pred.shape)} and target {tuple(depth_gt.shape)} differ")
        if self.valid_mask:
            valid = gt > 0
            if self.max_depth is not None:
                valid = valid & (gt <= self.max_depth)
        else:
            valid = torch.ones_like(gt, dtype=torch.bool)
        g = torch.log(pred + self.eps) - torch.log(gt.clamp_min(0) + self.eps)
        g = torch.where(valid, g, torch.zeros_like(g)).double()
        return torch.stack([g.sum(1), g.square().sum(1), valid.sum(1).double()], dim=1)

    def loss_from_statistics(self, stats: Tensor, warm: bool) -> Tensor:
        """(..., 3) summed statistics -> loss (...). `warm`: the warm-up branch."""
        total, squares, count = stats.unbind(-1)
        mean = total / count
        if warm:
            return self.loss_weight * torch.sqrt(VARIANCE_FOCUS * mean.square())
        variance = (squares - total * mean) / (count - 1)  # unbiased, as torch.var
        return self.loss_weight * torch.sqrt((variance + VARIANCE_FOCUS * mean.square()).clamp_min(0))

    def warming(self) -> bool:
        return self.warm_up and self.warm_up_counter < self.warm_iter

    def forward(self, depth_pred: Tensor, depth_gt: Tensor) -> Tensor:
        warm = self.warming()
        if warm:
            self.warm_up_counter += 1
        stats = self.sample_statistics(depth_pred, depth_gt).sum(0)
        return self.loss_from_statistics(stats, warm).to(depth_pred.dtype)
