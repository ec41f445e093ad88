"""A timm Vision Transformer whose selected layers hold separate [CLS]/patch weights.

Built by extending timm, not copying it: `SpecializedBlock` is timm's `Block` used as the model's
`block_fn`, with the chosen submodules (norm1, attn.qkv, ls1, ...) swapped for the two-branch
layers of `layers.py`; the final norm is swapped the same way. Attention itself stays shared, so
all tokens still attend to each other. With `specialization="none"` nothing is swapped and the
model is exactly timm's `VisionTransformer`.

    import trainer.models, timm
    model = timm.create_model("specialized_vit_base_patch16_224", specialization="paper")
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, _cfg, checkpoint_filter_fn
from torch import nn

from trainer.models.layers import specialize_module
from trainer.scales import MODEL_NAMES, SCALES
from trainer.specialization import BLOCK_COMPONENTS, Specialization


def _get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    module = root
    for p in parents:
        module = getattr(module, p)
    return module, leaf


class SpecializedBlock(Block):
    """timm's pre-norm `Block`, with the components planned for this block index made two-branch."""

    def __init__(self, *, depth: int, block_plan: list[tuple[str, ...]], num_prefix_tokens: int,
                 uniform_drop_path: float | None = None, **kwargs: Any):
        if uniform_drop_path is not None:  # in place of timm's per-depth ramp
            kwargs["drop_path"] = uniform_drop_path
        super().__init__(depth=depth, **kwargs)
        specialized, absent = [], []
        for component in block_plan[depth]:
            parent, leaf = _get_submodule_parent(self, BLOCK_COMPONENTS[component])
            replacement = specialize_module(getattr(parent, leaf), num_prefix_tokens)
            if replacement is None:  # e.g. LayerScale in a model built without init_values
                absent.append(component)
                continue
            setattr(parent, leaf, replacement)
            specialized.append(component)
        self.specialized = tuple(specialized)
        self.absent = tuple(absent)


class SpecializedVisionTransformer(VisionTransformer):
    """timm's `VisionTransformer` plus a `Specialization`.

    Args:
        specialization: a `Specialization` or its string form (`none`, `paper`, `norms,qkv@first:4`, ...).
        registers_follow: `cls` routes register tokens through the prefix weights, `patch` through
            the patch weights.
        drop_path_uniform: every block drops at `drop_path_rate` (DINOv2's `drop_path_uniform`,
            DeiT-III's models_v2.py) instead of timm's linear ramp from 0 to it.
        **kwargs: any `VisionTransformer` argument.
    """

    def __init__(
        self,
        specialization: str | Specialization = "none",
        registers_follow: str = "cls",
        drop_path_uniform: bool = False,
        **kwargs: Any,
    ) -> None:
        spec = Specialization.parse(specialization)
        if registers_follow not in ("cls", "patch"):
            raise ValueError(f"registers_follow must be 'cls' or 'patch', got {registers_follow!r}")
        if kwargs.get("block_fn", Block) is not Block:
            raise ValueError("SpecializedVisionTransformer supplies its own block_fn (timm's pre-norm Block)")
        depth = kwargs.get("depth", 12)
        reg_tokens = kwargs.get("reg_tokens", 0)
        if not spec.is_vanilla and not kwargs.get("class_token", True):
            raise ValueError("specialization separates [CLS] from patches: the model needs class_token=True")
        # Token layout in timm: [CLS], registers, patches. Registers may join either side.
        num_specialized_prefix = 1 + (reg_tokens if registers_follow == "cls" else 0)
        block_fn = partial(SpecializedBlock, block_plan=spec.block_plan(depth), num_prefix_tokens=num_specialized_prefix,
                           uniform_drop_path=kwargs.get("drop_path_rate", 0.0) if drop_path_uniform else None)
        super().__init__(block_fn=block_fn, **kwargs)

        self.specialization = spec
        absent = {c for blk in self.blocks for c in blk.absent}
        if spec.final_norm:
            # With avg/max pooling timm replaces the per-token final norm by `fc_norm`, which
            # normalizes one pooled vector of patch tokens: no [CLS] row goes through it, so there is
            # nothing to split. Absent, like a LayerScale the model was built without.
            replacement = specialize_module(self.norm, num_specialized_prefix)
            if replacement is None:
                absent.add("final_norm")
            else:
                self.norm = replacement
        if absent:
            why = [] if absent <= {"final_norm"} else ["LayerScale needs init_values"]
            if "final_norm" in absent:
                why.append("avg/max pooling has no per-token final norm, only fc_norm on the pooled patch tokens")
            warnings.warn(
                f"specialization {spec}: the model has no {', '.join(sorted(absent))} layers ({'; '.join(why)}), "
                "so those components stay absent, not specialized",
                stacklevel=2,
            )
        self.absent_components = tuple(sorted(absent))
        self.registers_follow = registers_follow
        self.num_specialized_prefix_tokens = num_specialized_prefix


def _create_specialized_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    if pretrained:
        raise ValueError(
            f"{variant} has no downloadable weights: specialize a local vanilla checkpoint with "
            "trainer.models.load_vanilla_checkpoint(model, path) (model.pretrained in a trial config)"
        )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        SpecializedVisionTransformer,
        variant,
        pretrained=False,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# timm's registry reads a module's `default_cfgs` when a model is registered. No weights to download.
default_cfgs = generate_default_cfgs({
    name: _cfg(input_size=(3, SCALES[scale]["img_size"], SCALES[scale]["img_size"]))
    for scale, name in MODEL_NAMES.items()
})


# One entry point per scale, as in timm's vision_transformer.py; the widths live in trainer/scales.py.
@register_model
def specialized_vit_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-micro/4 at 32 px (trains in seconds on a CPU) with [CLS]/patch specialization."""
    model_args = SCALES["micro"]
    return _create_specialized_vit("specialized_vit_micro_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def specialized_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-Ti/16 with [CLS]/patch specialization."""
    model_args = SCALES["tiny"]
    return _create_specialized_vit("specialized_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def specialized_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-S/16 with [CLS]/patch specialization."""
    model_args = SCALES["small"]
    return _create_specialized_vit("specialized_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def specialized_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-B/16 with [CLS]/patch specialization."""
    model_args = SCALES["base"]
    return _create_specialized_vit("specialized_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def specialized_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-L/16 with [CLS]/patch specialization."""
    model_args = SCALES["large"]
    return _create_specialized_vit("specialized_vit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def specialized_vit_huge_patch14_224(pretrained: bool = False, **kwargs: Any) -> SpecializedVisionTransformer:
    """ViT-H/14 with [CLS]/patch specialization."""
    model_args = SCALES["huge"]
    return _create_specialized_vit("specialized_vit_huge_patch14_224", pretrained=pretrained, **dict(model_args, **kwargs))


__all__ = ["SpecializedBlock", "SpecializedVisionTransformer"]
