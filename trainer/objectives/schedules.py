"""Step-indexed schedules as pure functions, so resuming at step k gives exactly the value of step k.

Shared by the training loop (learning rate, weight decay) and DINOv2 (teacher momentum, teacher temperature).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from trainer.config import OptimizerConfig, ScheduleConfig

WarmupForm = Literal["trainer", "dinov2"]


def cosine_schedule(
    step: int,
    total: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    warmup_form: WarmupForm = "trainer",
) -> float:
    """Linear warmup from `start_warmup_value` to `base` over `warmup_steps`, then cosine to `final`.

    Values: step 0 -> start_warmup_value (base if there is no warmup); step >= total -> final.
    `warmup_form` trainer: the warmup reaches `base` at step `warmup_steps`; dinov2: at its last
    step, `warmup_steps - 1`, as `numpy.linspace(start, base, warmup_steps)` in DINOv2's
    `CosineScheduler` (dinov2/utils/utils.py). `base == final` gives a warmup followed by a constant.
    """
    if step < warmup_steps:
        span = warmup_steps - 1 if warmup_form == "dinov2" else warmup_steps
        return start_warmup_value + (base - start_warmup_value) * step / span if span else start_warmup_value
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, total: int, warmup_temp: float, temp: float, warmup_fraction: float = 0.3,
                        warmup_form: WarmupForm = "trainer") -> float:
    """DINO teacher temperature: linear from `warmup_temp` to `temp` over the first 30% of steps, then constant
    (DINOv2: `warmup_teacher_temp_epochs` 30 of 100)."""
    return cosine_schedule(step, total, temp, temp, int(warmup_fraction * total), warmup_temp, warmup_form)


def teacher_momentum(step: int, total: int, base_momentum: float) -> float:
    """EMA momentum of the DINO teacher: cosine from `base_momentum` to 1 over the whole run."""
    return cosine_schedule(step, total, base_momentum, 1.0)


def peak_learning_rate(optimizer: OptimizerConfig, batch_size: int) -> float:
    """`optimizer.lr` scaled to the global batch by `optimizer.lr_scaling`: sqrt_wrt_1024 as DINOv2's
    `apply_scaling_rules_to_cfg` (dinov2/utils/config.py), linear_wrt_512 as DeiT's main.py."""
    if optimizer.lr_scaling == "sqrt_wrt_1024":
        return optimizer.lr * math.sqrt(batch_size / 1024.0)
    if optimizer.lr_scaling == "linear_wrt_512":
        return optimizer.lr * batch_size / 512.0
    return optimizer.lr


def learning_rate(step: int, optimizer: OptimizerConfig, schedule: ScheduleConfig) -> float:
    """The trial's learning rate at `step`: warmup from 0 to the peak, cosine to `optimizer.min_lr`."""
    return cosine_schedule(step, schedule.steps, peak_learning_rate(optimizer, schedule.batch_size), optimizer.min_lr,
                           schedule.warmup_steps, warmup_form=schedule.warmup_form)


def weight_decay(step: int, optimizer: OptimizerConfig, schedule: ScheduleConfig) -> float:
    """`optimizer.weight_decay`, or a cosine from it to `optimizer.weight_decay_end` over the run
    (DINOv2's `wd_schedule`, 0.04 -> 0.4, no warmup: dinov2/train/train.py)."""
    if optimizer.weight_decay_end is None:
        return optimizer.weight_decay
    return cosine_schedule(step, schedule.steps, optimizer.weight_decay, optimizer.weight_decay_end)


def last_layer_learning_rate(step: int, lr: float, optimizer: OptimizerConfig) -> float:
    """The DINO / iBOT prototypes' lr: 0 for the first `freeze_last_layer_steps` (DINOv2's
    `last_layer_lr_schedule`, `freeze_last_layer_epochs` 1), then the lr."""
    return 0.0 if step < optimizer.freeze_last_layer_steps else lr


def apply_optimizer_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                             last_layer_lr: float | None = None) -> None:
    """This step's values into every group, through its multipliers (param_groups.parameter_groups),
    as DINOv2's `apply_optim_scheduler` (dinov2/train/train.py)."""
    last_layer_lr = lr if last_layer_lr is None else last_layer_lr
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group.get("is_last_layer") else lr) * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_multiplier", 1.0)
