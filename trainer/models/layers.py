"""Two-branch layers: the first `num_prefix_tokens` tokens ([CLS], maybe registers) use `prefix`
weights, the remaining (patch) tokens use `patch` weights. Each token goes through exactly one
branch, so the FLOPs equal the shared layer's.

Each wrapper keeps two instances of the original timm/torch module as `prefix` and `patch`, so a
vanilla key `blocks.0.norm1.weight` becomes `blocks.0.norm1.prefix.weight` and
`blocks.0.norm1.patch.weight` (see `convert.py`). The forward passes both branches' tensors to one
fused op (`token_type_ops.py`): the sequence is never split, copied or written in place, and a
layer costs one dispatched op forward and one backward, as the shared layer does.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import LayerScale
from torch import nn

from trainer.models import token_type_ops


class TokenTypeSplit(nn.Module):
    """Base: holds a `prefix` and a `patch` copy of one module."""

    def __init__(self, module: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        if num_prefix_tokens < 1:
            raise ValueError("token-type specialization needs at least one prefix ([CLS]) token")
        self.num_prefix_tokens = num_prefix_tokens
        self.prefix = copy.deepcopy(module)
        self.patch = module

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class TokenTypeLayerNorm(TokenTypeSplit):
    """One normalization of every token, each row then scaled and shifted by its own branch's affine."""

    def __init__(self, norm: nn.LayerNorm, num_prefix_tokens: int) -> None:
        if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine):
            raise TypeError(f"expected an affine nn.LayerNorm, got {type(norm).__name__}")
        if len(norm.normalized_shape) != 1:
            raise TypeError(f"expected a LayerNorm over the last dimension, got shape {norm.normalized_shape}")
        super().__init__(norm, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_type_ops.layer_norm(x, self.patch.weight, self.patch.bias, self.prefix.weight, self.prefix.bias,
                                         self.num_prefix_tokens, self.patch.eps)


class TokenTypeLayerScale(TokenTypeSplit):
    """One multiply by a per-token gamma (the prefix rows' gamma or the patch rows')."""

    def __init__(self, layer_scale: LayerScale, num_prefix_tokens: int) -> None:
        super().__init__(layer_scale, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_type_ops.scale(x, self.patch.gamma, self.prefix.gamma, self.num_prefix_tokens)


class TokenTypeLinear(TokenTypeSplit):
    """Each row through its own branch's linear map: FLOPs exactly the shared layer's."""

    def __init__(self, linear: nn.Linear, num_prefix_tokens: int) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        super().__init__(linear, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_type_ops.linear(x, self.patch.weight, self.patch.bias, self.prefix.weight, self.prefix.bias,
                                     self.num_prefix_tokens)


def specialize_module(module: nn.Module, num_prefix_tokens: int) -> nn.Module | None:
    """The two-branch version of `module`, or None where there is nothing to specialize (Identity)."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm):
        return TokenTypeLayerNorm(module, num_prefix_tokens)
    if isinstance(module, LayerScale):
        return TokenTypeLayerScale(module, num_prefix_tokens)
    if isinstance(module, nn.Linear):
        return TokenTypeLinear(module, num_prefix_tokens)
    raise TypeError(f"don't know how to specialize a {type(module).__name__}")
