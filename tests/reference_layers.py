"""FROZEN copy of trainer/models/layers.py as it was before issue 12 (git show 67123b2:trainer/models/layers.py),
kept as the reference that the fused layers must equal (tests/test_layers_equivalence.py). Do not edit.

Two-branch layers: the first `num_prefix_tokens` tokens ([CLS], maybe registers) use `prefix`
weights, the remaining (patch) tokens use `patch` weights. Each token goes through exactly one
branch, so the FLOPs equal the shared layer's.

Each wrapper keeps two instances of the original timm/torch module as `prefix` and `patch`, so a
vanilla key `blocks.0.norm1.weight` becomes `blocks.0.norm1.prefix.weight` and
`blocks.0.norm1.patch.weight` (see `convert.py`).
"""

from __future__ import annotations

import copy

import torch
from timm.layers import LayerScale
from torch import nn


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
    """One normalization over all tokens with the patch affine (timm's fused kernel), then the few
    prefix rows get their own affine, written in place: the sequence is never split or copied.

    In place is safe for autograd: layer_norm's backward keeps its input, not its output.
    """

    def __init__(self, norm: nn.LayerNorm, num_prefix_tokens: int) -> None:
        if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine):
            raise TypeError(f"expected an affine nn.LayerNorm, got {type(norm).__name__}")
        super().__init__(norm, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        out = self.patch(x)
        out[:, :p] = self.prefix(x[:, :p])
        return out


class TokenTypeLayerScale(TokenTypeSplit):
    def __init__(self, layer_scale: LayerScale, num_prefix_tokens: int) -> None:
        super().__init__(layer_scale, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        out = x * self.patch.gamma  # a new tensor: mul keeps its inputs for backward, not its output
        out[:, :p] = x[:, :p] * self.prefix.gamma
        return out


class TokenTypeLinear(TokenTypeSplit):
    """Rows of the sequence split between two linear maps; the outputs are joined along tokens."""

    def __init__(self, linear: nn.Linear, num_prefix_tokens: int) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        super().__init__(linear, num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        return torch.cat((self.prefix(x[:, :p]), self.patch(x[:, p:])), dim=1)


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
