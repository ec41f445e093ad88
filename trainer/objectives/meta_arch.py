"""The interface every framework implements, so the training loop never branches on the framework.

    out = meta_arch(batch, step)       # {"loss": scalar, "loss_<term>": scalar, ...}
    out["loss"].backward(); optimizer.step()
    meta_arch.after_step(step)         # e.g. the DINOv2 teacher's EMA update
    evaluate(meta_arch.eval_backbone)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainer.objectives.param_groups import GroupRules, backbone_parameters, parameter_groups


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

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter, int | None]]:
        """(name, parameter, block count) for `parameter_groups`: the backbone's parameters named
        relative to it with its block count, everything else (heads) as a module without blocks."""
        backbone = backbone_parameters(self.backbone)
        ids = {id(param) for _, param, _ in backbone}
        return backbone + [(name, param, None) for name, param in self.named_parameters() if id(param) not in ids]

    def trainable_parameters_groups(self, rules: GroupRules = GroupRules()) -> list[dict[str, Any]]:
        return parameter_groups(self.named_trainable_parameters(), rules)

    def grad_clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter sets whose gradient norms `optimizer.clip_per_module` clips apart."""
        return [[p for p in self.parameters() if p.requires_grad]]

    def after_step(self, step: int) -> None:
        """Called after each optimizer step with that step's index."""
