"""What DINOv2's evaluation heads read of a frozen backbone: the [CLS] token and the patch grid of
chosen blocks, each after the final norm.

Official: `DinoVisionTransformer.get_intermediate_layers(x, n, reshape=True, return_class_token=True,
norm=True)` in dinov2/models/vision_transformer.py, which the linear, segmentation and depth
evaluations all call. timm's `forward_intermediates(..., norm=True)` computes the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def last_blocks(depth: int, n: int) -> list[int]:
    """The last `n` block indices (DINOv2's `n_last_blocks`: "lin" 1, "+ms" and linear "4 blocks")."""
    if not 1 <= n <= depth:
        raise ValueError(f"cannot take the last {n} of {depth} blocks")
    return list(range(depth - n, depth))


# DINOv2's depth "lin. 4" blocks (dinov2/eval/depth configs, `out_indices` per backbone): they are
# not one formula (ViT-L starts at 4, not 5), so the official ones are listed.
OFFICIAL_FOUR_BLOCKS = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}


def spread_blocks(depth: int, n: int) -> list[int]:
    """`n` blocks spread over the depth, ending at the last: DINOv2's own choice for its backbones
    (n 4 at depths 12 / 24 / 40), else evenly spaced."""
    if not 1 <= n <= depth:
        raise ValueError(f"cannot spread {n} of {depth} blocks")
    if n == 4 and depth in OFFICIAL_FOUR_BLOCKS:
        return list(OFFICIAL_FOUR_BLOCKS[depth])
    return [round(depth * (i + 1) / n) - 1 for i in range(n)]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def intermediate_tokens(backbone: nn.Module, images: Tensor, blocks: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """[(cls B x C, patch grid B x C x h x w)] per entry of `blocks`, in fp32, without gradients.

    The backbone is frozen: call it in eval mode. Register tokens are left out, as in DINOv2.
    bf16 autocast on CUDA (DINOv2's evaluations run under autocast too).
    """
    with torch.inference_mode(), _autocast(images.device):
        outputs = backbone.forward_intermediates(
            images, indices=list(blocks), norm=True, output_fmt="NCHW", return_prefix_tokens=True,
            intermediates_only=True)
    # Cloned outside inference mode: a head's backward may save them.
    return [(prefix[:, 0].float().clone(), grid.float().clone()) for grid, prefix in outputs]
