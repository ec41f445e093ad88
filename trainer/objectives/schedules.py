"""Step-indexed schedules as pure functions, so resuming at step k gives exactly the value of step k.

Shared by the training loop (learning rate) and DINOv2 (teacher momentum, teacher temperature).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainer.config import OptimizerConfig, ScheduleConfig


def cosine_schedule(
    step: int,
    total: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> float:
    """Linear warmup from `start_warmup_value` to `base` over `warmup_steps`, then cosine to `final`.

    Values: step 0 -> start_warmup_value (base if there is no warmup); step warmup_steps -> base;
    step >= total -> final. `base == final` gives a warmup followed by a constant.
    """
    if step < warmup_steps:
        return start_warmup_value + (base - start_warmup_value) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, total: int, warmup_temp: float, temp: float, warmup_fraction: float = 0.3) -> float:
    """DINO teacher temperature: linear from `warmup_temp` to `temp` over the first 30% of steps, then constant."""
    return cosine_schedule(step, total, temp, temp, int(warmup_fraction * total), warmup_temp)


def teacher_momentum(step: int, total: int, base_momentum: float) -> float:
    """EMA momentum of the DINO teacher: cosine from `base_momentum` to 1 over the whole run."""
    return cosine_schedule(step, total, base_momentum, 1.0)


def learning_rate(step: int, optimizer: OptimizerConfig, schedule: ScheduleConfig) -> float:
    """The trial's learning rate at `step`: warmup from 0 to `optimizer.lr`, cosine to `optimizer.min_lr`."""
    return cosine_schedule(step, schedule.steps, optimizer.lr, optimizer.min_lr, schedule.warmup_steps)


def set_optimizer_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Write this step's lr into every param group, and weight decay into the groups that decay.

    Groups from `MetaArch.trainable_parameters_groups` carry `apply_weight_decay`, so a weight
    decay schedule never touches the no-decay group (biases, norms, tokens).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None and group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay
