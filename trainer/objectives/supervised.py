"""Supervised training (DeiT-III recipe): the backbone's own classifier head, BCE or CE, and
optionally timm's Mixup / CutMix on the batch."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from timm.data import Mixup
from torch import Tensor, nn

from trainer.config import SupervisedConfig
from trainer.data.scenes import derive_seed
from trainer.objectives.losses import ClassificationLoss
from trainer.objectives.meta_arch import MetaArch


class BatchMixing:
    """timm's `Mixup` (Mixup or CutMix per batch, DeiT-III's 0.8 / 1.0) with its draws a pure
    function of (seed, step, rank): timm draws from numpy's global generator, so each call runs
    under a seeded, then restored, numpy state, and a resumed run mixes step k as before."""

    def __init__(self, cfg: SupervisedConfig, num_classes: int, seed: int) -> None:
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                           label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        # DeiT-III's engine.py: with the BCE loss, targets.gt(0.0) after mixing.
        self.binarize = cfg.binarize_targets and cfg.loss == "bce"
        self.seed = seed

    def __call__(self, images: Tensor, labels: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if len(images) % 2:
            raise ValueError(f"Mixup / CutMix pair each sample with another: the batch per process ({len(images)}) "
                             "must be even (schedule.batch_size / processes)")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = np.random.get_state()
        np.random.seed(derive_seed("mixup", self.seed, step, rank) % 2**32)
        try:
            images, targets = self.mixup(images, labels)
        finally:
            np.random.set_state(state)
        return images, targets.gt(0.0).to(targets.dtype) if self.binarize else targets


class SupervisedMetaArch(MetaArch):
    """batch = (images B x 3 x H x W, labels: B class indices or B x K soft targets)."""

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: SupervisedConfig = SupervisedConfig(),
                 seed: int = 0) -> None:
        super().__init__()
        backbone.reset_classifier(num_classes)
        self.backbone = backbone
        # Label smoothing moves into Mixup's targets when it mixes (as timm and DeiT do).
        self.criterion = ClassificationLoss(num_classes, cfg.loss, 0.0 if cfg.mixes else cfg.label_smoothing)
        self.mixing = BatchMixing(cfg, num_classes, seed) if cfg.mixes else None

    def forward(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        images, labels = batch
        if self.mixing is not None and self.training:
            images, labels = self.mixing(images, labels, step)
        loss = self.criterion(self.backbone(images), labels)
        return {"loss": loss, f"loss_{self.criterion.kind}": loss.detach()}
