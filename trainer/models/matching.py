"""The paper's parameter-matched control: a vanilla ViT as large as a specialized one.

Specializing adds parameters (`paper` +8% at ViT-B) at no extra FLOPs. To tell a gain from
specialization apart from a gain from capacity, the control arm is a vanilla ViT whose MLP is
widened until its parameter count is the specialized model's. The MLP hidden width is the knob:
it moves the count in steps of about 2 x embed_dim per block (fine enough to match within 0.1% at
every scale) and leaves depth, width, heads and the token layout alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import timm

from trainer.scales import MODEL_NAMES, SCALES


@dataclass(frozen=True)
class ParameterMatch:
    """The vanilla MLP width whose parameter count is closest to the target's."""

    mlp_ratio: float  # what to pass to the model (int(embed_dim * mlp_ratio) == hidden)
    hidden: int  # MLP hidden features per block
    params: int  # the matched vanilla model's parameters
    target: int  # the specialized model's parameters

    @property
    def residual(self) -> int:
        """params - target: what the match leaves over (negative: the control is smaller)."""
        return self.params - self.target


def count_parameters(scale: str, **kwargs: Any) -> int:
    """Parameters of a registered model, built on the meta device (no memory, any scale)."""
    model = timm.create_model(MODEL_NAMES[scale], device="meta", **kwargs)
    return sum(p.numel() for p in model.parameters())


def _ratio_for(hidden: int, embed_dim: int) -> float:
    # timm computes hidden = int(embed_dim * mlp_ratio): aim half a unit above so rounding in the
    # float product can never land one below.
    return (hidden + 0.5) / embed_dim


def match_vanilla_parameters(scale: str, specialization: str, **kwargs: Any) -> ParameterMatch:
    """The vanilla model of `scale` (and `kwargs`: img/patch size, registers, LayerScale, ...) with the
    MLP width that brings its parameters closest to `specialization`'s."""
    with warnings.catch_warnings():  # an absent component (LayerScale without init) warns; the count is the answer
        warnings.simplefilter("ignore")
        target = count_parameters(scale, specialization=specialization, **kwargs)
    embed_dim = int(kwargs.get("embed_dim") or SCALES[scale]["embed_dim"])
    base_hidden = int(embed_dim * float(kwargs.pop("mlp_ratio", 4.0)))  # timm's default ratio: 4
    at = {h: count_parameters(scale, specialization="none", **kwargs, mlp_ratio=_ratio_for(h, embed_dim))
          for h in (base_hidden, base_hidden + 1)}
    per_unit = at[base_hidden + 1] - at[base_hidden]  # the count is linear in the hidden width
    hidden = max(1, base_hidden + round((target - at[base_hidden]) / per_unit))
    params = at[base_hidden] + (hidden - base_hidden) * per_unit
    return ParameterMatch(mlp_ratio=_ratio_for(hidden, embed_dim), hidden=hidden, params=params, target=target)


__all__ = ["ParameterMatch", "count_parameters", "match_vanilla_parameters"]
