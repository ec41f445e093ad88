"""The optimizer and its parameter groups: each parameter's learning-rate and weight-decay multipliers.

Two rules for which parameters are decayed (`optimizer.no_weight_decay`):
- `trainer` (this project's default): every parameter with ndim <= 1 (biases, norm affines,
  LayerScale) and the position embedding and the [CLS] / register / mask tokens.
- `dinov2`: as DINOv2's `get_params_groups_with_decay` (dinov2/utils/param_groups.py): names
  ending in `.bias` or containing `norm` or `gamma`. Positions and tokens *are* decayed there.

Layer-wise lr decay (`optimizer.layer_decay`) and the patch-embed multiplier follow DINOv2's
`get_vit_lr_decay_rate` (same file): position / patch embedding, [CLS] and mask token sit at layer
0, block i at layer i + 1, everything else (final norm, heads) at the top, L + 1; a parameter's lr
is multiplied by decay ** (L + 1 - layer). The two-branch copies of a layer inherit its rules from
their names: `blocks.3.attn.qkv.prefix.weight` sits at block 3, `norm1.prefix.weight` is a norm.

As DINOv2's `fuse_params_groups`, parameters with equal multipliers share one optimizer group,
and each group carries `lr_multiplier`, `wd_multiplier` and `is_last_layer` (the DINO / iBOT
heads' prototypes, frozen for the first steps): `schedules.apply_optimizer_schedule` sets each
step's values from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.optim import create_optimizer_v2
from torch import nn

WeightDecayRule = Literal["trainer", "dinov2"]
# The trainer rule's names that are offsets, scales or tokens rather than weight matrices:
# decaying them only pulls embeddings / LayerScale towards zero.
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "gamma")
# DINOv2's layer-0 names (get_vit_lr_decay_rate). Its register tokens are not among them, so
# they sit at the top layer there; timm's `reg_token` is the same parameter and does the same.
LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token")


def wants_weight_decay(name: str, ndim: int, rule: WeightDecayRule = "trainer") -> bool:
    if rule == "dinov2":
        return not (name.endswith(".bias") or "norm" in name or "gamma" in name)
    return ndim > 1 and not any(key in name for key in NO_WEIGHT_DECAY_NAMES)


def layer_id(name: str, num_blocks: int) -> int:
    """DINOv2's layer index of a backbone parameter (its name relative to the backbone)."""
    if any(key in name for key in LAYER0_NAMES):
        return 0
    if "blocks." in name:
        return int(name[name.find("blocks."):].split(".")[1]) + 1
    return num_blocks + 1


@dataclass(frozen=True)
class GroupRules:
    """How a set of parameters is grouped: from the trial's `optimizer` section."""

    layer_decay: float = 1.0
    patch_embed_lr_mult: float = 1.0
    no_weight_decay: WeightDecayRule = "trainer"

    @classmethod
    def of(cls, optimizer: Any) -> "GroupRules":
        return cls(optimizer.layer_decay, optimizer.patch_embed_lr_mult, optimizer.no_weight_decay)


def parameter_multipliers(name: str, ndim: int, rules: GroupRules, num_blocks: int | None) -> dict[str, Any]:
    """One parameter's multipliers. `num_blocks` None: not a backbone parameter (a head), at
    multiplier 1 as DINOv2 gives a submodule without blocks."""
    lr_multiplier = 1.0
    if num_blocks is not None:
        lr_multiplier = rules.layer_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
        if "patch_embed" in name:
            lr_multiplier *= rules.patch_embed_lr_mult
    return dict(lr_multiplier=lr_multiplier, wd_multiplier=float(wants_weight_decay(name, ndim, rules.no_weight_decay)),
                is_last_layer="last_layer" in name)


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter, int | None]],
                     rules: GroupRules = GroupRules()) -> list[dict[str, Any]]:
    """Optimizer groups from (name, parameter, num_blocks of its backbone or None) triples, fused by
    equal multipliers in first-seen order; frozen parameters are left out."""
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param, num_blocks in named_parameters:
        if not param.requires_grad:
            continue
        multipliers = parameter_multipliers(name, param.ndim, rules, num_blocks)
        key = tuple(multipliers.values())
        if key not in groups:
            label = "decay" if multipliers["wd_multiplier"] else "no_decay"
            groups[key] = dict(params=[], name=f"{label}@lr*{multipliers['lr_multiplier']:.4g}", **multipliers)
        groups[key]["params"].append(param)
    return list(groups.values())


def backbone_parameters(backbone: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter, int | None]]:
    """A backbone's parameters with names relative to it and its block count, for `parameter_groups`."""
    num_blocks = len(backbone.blocks) if hasattr(backbone, "blocks") else None
    return [(prefix + name, param, num_blocks) for name, param in backbone.named_parameters()]


def head_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter, int | None]]:
    return [(name, param, None) for name, param in module.named_parameters()]


def build_optimizer(groups: list[dict[str, Any]], optimizer: Any, device: torch.device) -> torch.optim.Optimizer:
    """`optimizer.name` over `groups`: torch's AdamW (fused on GPU: one kernel for all parameters),
    or LAMB from timm's optimizer factory (DeiT-III's `--opt fusedlamb`; timm's `lamb` is its
    port of NVIDIA's FusedLAMB). Each step's lr and weight decay come from `apply_optimizer_schedule`."""
    if optimizer.name == "lamb":
        return create_optimizer_v2(groups, opt="lamb", lr=optimizer.lr, weight_decay=0.0, betas=optimizer.betas)
    return torch.optim.AdamW(groups, lr=optimizer.lr, betas=optimizer.betas, fused=device.type == "cuda" or None)
