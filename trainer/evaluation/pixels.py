"""Raw pixels as features: the control that shows what the probes reach without any network.

Each patch token is the patch's normalized pixels, flattened (3 x p x p, p the backbone's patch
size, in the order a patch embedding's convolution reads them: channel, row, column), and the
[CLS] slot is the mean of the patch tokens. `evaluate` runs the very same probes on them
(`evaluation.features: pixels`), so a trained backbone's number can be read against this floor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def patch_size_of(backbone: nn.Module) -> int:
    """The backbone's (square) patch size, as its patch embedding has it."""
    size = backbone.patch_embed.patch_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"pixel features need square patches, the backbone's are {height} x {width}")
    return int(height)


def pixel_tokens(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """([CLS] B x C, patch grid B x C x h x w) with C = 3 p²: `backbone_tokens`' shapes, from the
    pixels alone (the backbone gives only its patch size)."""
    p = patch_size_of(backbone)
    batch, _, height, width = images.shape
    # unfold lists the patches row by row, each as (channel, row, column): the grid's layout.
    patches = F.unfold(images.float(), kernel_size=p, stride=p)  # B x 3p² x (h·w)
    grid = patches.reshape(batch, patches.shape[1], height // p, width // p)
    return grid.mean(dim=(2, 3)), grid
