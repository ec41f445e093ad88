"""What a specialization costs: parameters per component, and FLOPs (which it should not change)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.layers import TokenTypeSplit
from trainer.specialization import BLOCK_COMPONENTS

_PATH_TO_COMPONENT = {path: name for name, path in BLOCK_COMPONENTS.items()}


@dataclass
class ParameterReport:
    total: int
    vanilla: int  # the same architecture with every layer shared
    added_by_component: dict[str, int] = field(default_factory=dict)

    @property
    def added(self) -> int:
        return self.total - self.vanilla

    @property
    def overhead(self) -> float:
        return self.added / self.vanilla

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"params_total": self.total, "params_vanilla": self.vanilla,
                                 "params_added": self.added, "param_overhead": self.overhead}
        out.update({f"params_added/{k}": v for k, v in self.added_by_component.items()})
        return out


def _component_of(module_path: str) -> str:
    if module_path == "norm":
        return "final_norm"
    # blocks.<i>.<path inside the block>
    inside = module_path.split(".", 2)[2] if module_path.startswith("blocks.") else module_path
    return _PATH_TO_COMPONENT.get(inside, inside)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Counts every parameter; a specialized layer's extra branch is what specialization adds."""
    total = sum(p.numel() for p in model.parameters())
    added: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, TokenTypeSplit):
            n = sum(p.numel() for p in module.prefix.parameters())
            component = _component_of(path)
            added[component] = added.get(component, 0) + n
    return ParameterReport(total=total, vanilla=total - sum(added.values()), added_by_component=added)


def count_flops(model: nn.Module, img_size: int, batch_size: int = 1, in_chans: int = 3) -> int:
    """Forward FLOPs for one batch, as counted by torch's FlopCounterMode (matmuls and attention)."""
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, in_chans, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
