"""What a specialization costs: parameters per component, FLOPs (which it should not change), and
the aten ops one training step dispatches (a CPU proxy for a GPU's kernel launches)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import token_type_ops
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


_aten = torch.ops.aten
# Ops that launch no kernel: allocation and aliasing (views are found by their schema; profiler
# markers by their namespace).
_NO_KERNEL = {
    _aten.detach.default, _aten.alias.default, _aten.lift_fresh.default, _aten._unsafe_view.default,
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default, _aten.new_empty.default,
    _aten.new_empty_strided.default,
}


class KernelOpCounter(TorchDispatchMode):
    """Counts dispatched ops that launch a kernel. A fused two-branch op counts once, or, with
    `inside_fused`, as the aten ops of its composition (what a device without its kernel runs)."""

    def __init__(self, inside_fused: bool = False) -> None:
        super().__init__()
        self.inside_fused = inside_fused
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside_fused and func in token_type_ops.COMPOSITIONS:
            with self:
                return token_type_ops.COMPOSITIONS[func](*args, **kwargs)
        if not (func.is_view or func in _NO_KERNEL or func.namespace == "profiler"):
            self.counts[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **kwargs)


def count_kernel_ops(model: nn.Module, img_size: int, batch_size: int = 2, inside_fused: bool = False,
                     in_chans: int = 3) -> Counter[str]:
    """Kernel-launching ops of one training step: forward, cross-entropy, backward, fused AdamW.

    One uncounted step first, so the optimizer's state exists (as in every step but the first);
    both steps update the model's weights.
    """
    device = next(model.parameters()).device
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[-1]
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    was_training = model.training
    model.train()
    try:
        step()
        with KernelOpCounter(inside_fused) as counter:
            step()
    finally:
        model.train(was_training)
    return counter.counts
