"""Training objectives: one meta-architecture per framework behind the `MetaArch` interface.

    meta_arch = build_meta_arch(cfg, backbone_factory, num_classes, total_steps)
    optimizer = torch.optim.AdamW(meta_arch.trainable_parameters_groups(GroupRules.of(cfg.optimizer)), ...)
    for step, batch in ...:
        apply_optimizer_schedule(optimizer, lr, weight_decay, last_layer_lr)
        out = meta_arch(batch, step); out["loss"].backward(); optimizer.step()
        meta_arch.after_step(step)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trainer.config import TrialConfig
from trainer.objectives.dinov2 import DINOv2MetaArch
from trainer.objectives.heads import DINOHead
from trainer.objectives.losses import ClassificationLoss, DINOLoss, iBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from trainer.objectives.meta_arch import MetaArch
from trainer.objectives.param_groups import GroupRules, parameter_groups
from trainer.objectives.schedules import apply_optimizer_schedule, cosine_schedule, learning_rate
from trainer.objectives.supervised import SupervisedMetaArch


def build_meta_arch(cfg: TrialConfig, backbone_factory: Callable[[], nn.Module], num_classes: int,
                    total_steps: int) -> MetaArch:
    """The trial's framework around fresh backbones from `backbone_factory` (built with num_classes=0).

    DINOv2 calls the factory twice (student, teacher) and ignores `num_classes`; `total_steps`
    sets its teacher momentum and temperature schedules.
    """
    if cfg.framework == "supervised":
        return SupervisedMetaArch(backbone_factory(), num_classes, cfg.supervised, seed=cfg.seed)
    if cfg.framework == "dinov2":
        return DINOv2MetaArch(backbone_factory(), backbone_factory(), cfg.dinov2, total_steps, seed=cfg.seed,
                              warmup_form=cfg.schedule.warmup_form)
    raise ValueError(f"unknown framework {cfg.framework!r}")


__all__ = [
    "ClassificationLoss", "DINOHead", "DINOLoss", "DINOv2MetaArch", "GroupRules", "KoLeoLoss", "MetaArch",
    "SupervisedMetaArch", "apply_optimizer_schedule", "build_meta_arch", "cosine_schedule", "iBOTPatchLoss",
    "learning_rate", "parameter_groups", "sinkhorn_knopp",
]
