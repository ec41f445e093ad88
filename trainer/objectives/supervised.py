"""Supervised training (DeiT-III recipe): the backbone's own classifier head, BCE or CE."""

from __future__ import annotations

from torch import Tensor, nn

from trainer.config import SupervisedConfig
from trainer.objectives.losses import ClassificationLoss
from trainer.objectives.meta_arch import MetaArch


class SupervisedMetaArch(MetaArch):
    """batch = (images B x 3 x H x W, labels: B class indices or B x K soft targets)."""

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: SupervisedConfig = SupervisedConfig()) -> None:
        super().__init__()
        backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.criterion = ClassificationLoss(num_classes, cfg.loss, cfg.label_smoothing)

    def forward(self, batch: tuple[Tensor, Tensor], step: int) -> dict[str, Tensor]:
        images, labels = batch
        loss = self.criterion(self.backbone(images), labels)
        return {"loss": loss, f"loss_{self.criterion.kind}": loss.detach()}
