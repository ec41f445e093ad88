"""The training losses: DINO [CLS], iBOT masked-patch, KoLeo (DINOv2) and DeiT-III classification.

Losses compute in float32 whatever the autocast dtype: softmax temperatures of 0.04 make bf16
logits too coarse. Under torch.distributed, the teacher statistics (center, Sinkhorn-Knopp
marginals) are summed over processes, as in DINOv2, so every process sees the same targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Centering = Literal["centering", "sinkhorn_knopp"]


def _all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Teacher probabilities (N x K, rows sum to 1) whose prototype marginals are pushed to uniform.

    Alternately normalizes prototypes (columns of `logits`) to total mass 1/K and samples (rows)
    to 1/N; the last step is the row one, so each returned row is exactly a distribution.
    """
    # exp of logits shifted by their max over all processes: one shared constant cancels in the
    # first normalization, and keeps exp() finite when logits/temp is large.
    logits = logits.float()
    shift = _all_reduce(logits.max() if logits.numel() else logits.new_tensor(float("-inf")), op="max")
    q = torch.exp((logits - shift) / temp).t()  # K x N
    num_prototypes = q.shape[0]
    num_samples = _all_reduce(torch.tensor(q.shape[1], device=q.device, dtype=q.dtype))
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    return (q * num_samples).t()


class TeacherTargets(nn.Module):
    """Turns teacher logits into target probabilities, by centering or Sinkhorn-Knopp.

    `centering`: softmax((logits - center) / temp), then the center moves towards this batch's
    mean logit (EMA, `center_momentum`): subtracting a running mean keeps one prototype from
    winning every sample (collapse), the low temperature keeps targets sharp.
    `sinkhorn_knopp`: equalizes prototype usage within the batch instead (DINOv2's default).
    """

    def __init__(self, out_dim: int, method: Centering = "sinkhorn_knopp", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if method not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"unknown teacher centering {method!r}")
        self.method = method
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        # A buffer, so it is checkpointed with the model and resuming keeps the running center.
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: Tensor, temp: float) -> Tensor:
        if self.method == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, temp, self.sinkhorn_iterations)
        probs = F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
        self.update_center(teacher_logits)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        logits = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        total = _all_reduce(logits.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
        if count > 0:  # a step with no masked patch leaves the iBOT center alone
            self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


def _cross_entropy(teacher_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Per-row H(teacher, student)."""
    return -(teacher_probs * student_log_probs).sum(dim=-1)


class _DistillationLoss(nn.Module):
    """Shared by the DINO and iBOT losses: a student temperature and the teacher's target maker
    (centering or Sinkhorn-Knopp), whose state (the center) is saved in checkpoints."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: Centering = "sinkhorn_knopp",
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.teacher_targets = TeacherTargets(out_dim, centering, center_momentum)

    def teacher_probabilities(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """Teacher logits (all global crops' [CLS] for DINO, the masked patches for iBOT) to targets;
        centering / SK sees the whole batch at once."""
        return self.teacher_targets(teacher_logits, temp)


class DINOLoss(_DistillationLoss):
    """DINO's self-distillation loss on the [CLS] prototype scores.

    Every student crop is matched to every teacher (global) crop of another view; the result is
    the mean over those (student crop, teacher crop) pairs of the batch-mean cross-entropy.
    """

    def forward(self, student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> Tensor:
        """student_logits: one B x K tensor per crop, global crops first in the teacher's order;
        teacher_probs: one B x K tensor per global crop. Student crop i < len(teacher_probs) is
        the same view as teacher crop i, and that pair is skipped."""
        total, pairs = 0.0, 0
        for i, student in enumerate(student_logits):
            log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
            for j, teacher in enumerate(teacher_probs):
                if i == j:
                    continue
                total = total + _cross_entropy(teacher, log_probs).mean()
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO loss needs at least one pair of different views")
        return total / pairs


class iBOTPatchLoss(_DistillationLoss):  # noqa: N801 - the method's own spelling
    """iBOT's masked-image-modeling loss: the student predicts, at each masked patch, the teacher's
    prototype distribution for the unmasked patch.

    Averaged per image over its masked patches, then over all images as DINOv2 does: the divisor
    counts every image, so an image without masks contributes zero.
    """

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """student_logits, teacher_probs: M x K, the masked patches in `masks[masks]` order;
        masks: images x patches, bool."""
        per_patch = _cross_entropy(teacher_probs, F.log_softmax(student_logits.float() / self.student_temp, dim=-1))
        masked_per_image = masks.sum(dim=1).clamp(min=1)
        image_of_patch = torch.arange(masks.shape[0], device=masks.device).unsqueeze(1).expand_as(masks)[masks]
        weights = 1.0 / masked_per_image[image_of_patch]
        return (per_patch * weights).sum() / masks.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator: -mean_i log(distance from x_i to its nearest neighbour)
    over L2-normalized features. Minimizing it spreads the batch's features over the sphere."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        if x.shape[0] < 2:
            return x.sum() * 0.0  # no neighbour to measure; keeps the graph connected
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(float("-inf"))
            nearest = similarity.argmax(dim=1)  # largest cosine = smallest distance on the sphere
        distances = (x - x[nearest]).norm(dim=-1)
        return -torch.log(distances + self.eps).mean()


class ClassificationLoss(nn.Module):
    """DeiT-III's binary cross-entropy on one-hot targets (`bce`), or softmax cross-entropy (`ce`).

    Smoothing follows timm: off-targets get smoothing/K, the true class 1 - smoothing + smoothing/K.
    `labels` are class indices (B,) or already-soft targets (B x K, e.g. from mixup).
    """

    def __init__(self, num_classes: int, kind: Literal["bce", "ce"] = "bce", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in ("bce", "ce"):
            raise ValueError(f"unknown classification loss {kind!r}")
        self.num_classes = num_classes
        self.kind = kind
        self.label_smoothing = label_smoothing

    def targets(self, labels: Tensor) -> Tensor:
        if labels.ndim == 2:
            return labels.float()
        off = self.label_smoothing / self.num_classes
        one_hot = F.one_hot(labels, self.num_classes).float()
        return one_hot * (1.0 - self.label_smoothing) + off

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = logits.float()
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, self.targets(labels))
        if labels.ndim == 2:
            return _cross_entropy(labels.float(), F.log_softmax(logits, dim=-1)).mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
