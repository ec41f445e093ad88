"""The interface every framework implements, so the training loop never branches on the framework.

    out = meta_arch(batch, step)       # {"loss": scalar, "loss_<term>": scalar, ...}
    out["loss"].backward(); optimizer.step()
    meta_arch.after_step(step)         # e.g. the DINOv2 teacher's EMA update
    evaluate(meta_arch.eval_backbone)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

# Parameters that are offsets, scales or tokens rather than weight matrices: decaying them only
# pulls embeddings/LayerScale towards zero. Anything with ndim <= 1 (biases, norm affines) too.
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "gamma")


def wants_weight_decay(name: str, param: Tensor) -> bool:
    leaf = name.split(".")[-1]
    return param.ndim > 1 and not any(key in leaf or key in name for key in NO_WEIGHT_DECAY_NAMES)


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: one with `weight_decay`, one without; frozen parameters are left out.

    Each group carries `apply_weight_decay` so a weight decay schedule knows which to update
    (see schedules.set_optimizer_values). Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (decay if wants_weight_decay(name, param) else no_decay).append(param)
    groups = [
        dict(params=decay, weight_decay=weight_decay, apply_weight_decay=True, name="decay"),
        dict(params=no_decay, weight_decay=0.0, apply_weight_decay=False, name="no_decay"),
    ]
    return [g for g in groups if g["params"]]


class MetaArch(nn.Module):
    """A backbone plus whatever a framework trains around it (heads, teacher, losses).

    Subclasses provide `backbone` (attribute or property): the backbone receiving gradients.
    """

    backbone: nn.Module

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated after training."""
        return self.backbone

    def forward(self, batch: Any, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def trainable_parameters_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return parameter_groups(self.named_parameters(), weight_decay)

    def after_step(self, step: int) -> None:
        """Called after each optimizer step with that step's index."""
