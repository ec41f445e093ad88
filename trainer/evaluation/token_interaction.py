"""The paper's analysis of how [CLS] and patch tokens relate inside the backbone.

For every block, forward hooks on `blk.norm1` (the pre-attention norm, or its two-branch wrapper in
a specialized model: either way its input and output are the full token sequence) capture the tokens
before and after the norm, and we measure on a batch of images:

- `cls_patch_cos_pre` / `cls_patch_cos_post`: mean cosine similarity between [CLS] and each patch
  token, before and after norm1. The paper observes it falling to about 0 after the norm.
- `patch_patch_cos`: mean cosine between distinct patch tokens after norm1 (stays positive).
- per-dimension magnitudes after norm1: mean |[CLS]_d| and mean |patch_d|; a dimension is "dominated"
  by a token type when its magnitude exceeds the other's by more than `DOMINANCE_RATIO`.

Register tokens (timm places them between [CLS] and the patches) are left out of every measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOMINANCE_RATIO = 2.0


def cls_patch_cosine(tokens: Tensor, num_prefix_tokens: int) -> Tensor:
    """B x N x C -> B: mean over patches of cos([CLS], patch)."""
    cls = F.normalize(tokens[:, 0].float(), dim=-1)
    patches = F.normalize(tokens[:, num_prefix_tokens:].float(), dim=-1)
    return torch.einsum("bc,bmc->bm", cls, patches).mean(dim=1)


def patch_patch_cosine(tokens: Tensor, num_prefix_tokens: int) -> Tensor:
    """B x N x C -> B: mean cosine over ordered pairs of distinct patches (the off-diagonal mean)."""
    patches = F.normalize(tokens[:, num_prefix_tokens:].float(), dim=-1)
    m = patches.shape[1]
    if m < 2:
        return torch.full((tokens.shape[0],), float("nan"))
    # sum_{i,j} <p_i, p_j> = |sum_i p_i|^2, so no M x M Gram matrix is needed.
    all_pairs = patches.sum(dim=1).pow(2).sum(dim=-1)
    diagonal = patches.pow(2).sum(dim=(1, 2))
    return (all_pairs - diagonal) / (m * (m - 1))


def dimension_magnitudes(tokens: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """B x N x C -> (|[CLS]| per dim, mean |patch| per dim), each B x C."""
    tokens = tokens.float().abs()
    return tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)


def dominance_fractions(
    cls_magnitude: Tensor, patch_magnitude: Tensor, ratio: float = DOMINANCE_RATIO
) -> tuple[float, float]:
    """Fractions of dimensions where [CLS] (resp. the patches) exceeds the other by more than `ratio`x."""
    cls_dominant = (cls_magnitude > ratio * patch_magnitude).float().mean().item()
    patch_dominant = (patch_magnitude > ratio * cls_magnitude).float().mean().item()
    return cls_dominant, patch_dominant


def early_late_count(depth: int) -> int:
    """Blocks in "the first third" / "the last third", rounded as `Specialization`'s first_third."""
    return max(1, round(depth / 3))


@dataclass
class TokenInteraction:
    """Per-block measures (index i = `backbone.blocks[i]`), averaged over `num_images` images."""

    cls_patch_cos_pre: list[float]
    cls_patch_cos_post: list[float]
    patch_patch_cos: list[float]
    cls_magnitude: list[Tensor]  # C per block, after norm1
    patch_magnitude: list[Tensor]  # C per block, after norm1
    num_images: int
    dominant_dims: list[tuple[float, float]] = field(init=False)  # (cls, patch) fractions per block

    def __post_init__(self) -> None:
        self.dominant_dims = [dominance_fractions(c, p) for c, p in zip(self.cls_magnitude, self.patch_magnitude)]

    @property
    def depth(self) -> int:
        return len(self.cls_patch_cos_post)

    @property
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(self.depth):
            out[f"tokens/block{i}/cls_patch_cos_pre"] = self.cls_patch_cos_pre[i]
            out[f"tokens/block{i}/cls_patch_cos_post"] = self.cls_patch_cos_post[i]
            out[f"tokens/block{i}/patch_patch_cos"] = self.patch_patch_cos[i]
            out[f"tokens/block{i}/cls_dominant_dims"] = self.dominant_dims[i][0]
            out[f"tokens/block{i}/patch_dominant_dims"] = self.dominant_dims[i][1]
        n = early_late_count(self.depth)
        specific = [c + p for c, p in self.dominant_dims]
        for stage, blocks in (("early", slice(0, n)), ("late", slice(self.depth - n, self.depth))):
            out[f"tokens/{stage}_cls_patch_cos_pre"] = _mean(self.cls_patch_cos_pre[blocks])
            out[f"tokens/{stage}_cls_patch_cos_post"] = _mean(self.cls_patch_cos_post[blocks])
            out[f"tokens/{stage}_patch_patch_cos"] = _mean(self.patch_patch_cos[blocks])
            out[f"tokens/{stage}_type_specific_dims"] = _mean(specific[blocks])
        return out

    def to_json(self) -> dict:
        return {
            "num_images": self.num_images,
            "cls_patch_cos_pre": self.cls_patch_cos_pre,
            "cls_patch_cos_post": self.cls_patch_cos_post,
            "patch_patch_cos": self.patch_patch_cos,
            "cls_magnitude": [m.tolist() for m in self.cls_magnitude],
            "patch_magnitude": [m.tolist() for m in self.patch_magnitude],
            "dominance_ratio": DOMINANCE_RATIO,
            "metrics": self.metrics,
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class _BlockAccumulator:
    """Forward hook on one norm1: sums per-image measures over every batch it sees."""

    def __init__(self, num_prefix_tokens: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.images = 0
        self.cos_pre = self.cos_post = self.patch_patch = 0.0
        self.cls_magnitude: Tensor | float = 0.0
        self.patch_magnitude: Tensor | float = 0.0

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        pre, post, p = args[0], output, self.num_prefix_tokens
        self.images += pre.shape[0]
        self.cos_pre += cls_patch_cosine(pre, p).sum().item()
        self.cos_post += cls_patch_cosine(post, p).sum().item()
        self.patch_patch += patch_patch_cosine(post, p).sum().item()
        cls_mag, patch_mag = dimension_magnitudes(post, p)
        self.cls_magnitude = self.cls_magnitude + cls_mag.sum(dim=0).cpu()
        self.patch_magnitude = self.patch_magnitude + patch_mag.sum(dim=0).cpu()


def analyze_token_interaction(
    backbone: nn.Module, images: Tensor, out_png: Path | None = None, batch_size: int = 64
) -> TokenInteraction:
    """Runs `images` (B x 3 x H x W) through the frozen backbone with hooks on every `blk.norm1`."""
    if len(images) == 0:
        raise ValueError("token interaction needs at least one image")
    num_prefix = backbone.num_prefix_tokens
    if num_prefix < 1:
        raise ValueError("token interaction needs a [CLS] token (num_prefix_tokens >= 1)")
    device = next(backbone.parameters()).device
    accumulators = [_BlockAccumulator(num_prefix) for _ in backbone.blocks]
    handles = [blk.norm1.register_forward_hook(acc) for blk, acc in zip(backbone.blocks, accumulators)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            for batch in images.split(batch_size):
                backbone.forward_features(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    n = len(images)
    result = TokenInteraction(
        cls_patch_cos_pre=[a.cos_pre / n for a in accumulators],
        cls_patch_cos_post=[a.cos_post / n for a in accumulators],
        patch_patch_cos=[a.patch_patch / n for a in accumulators],
        cls_magnitude=[a.cls_magnitude / n for a in accumulators],
        patch_magnitude=[a.patch_magnitude / n for a in accumulators],
        num_images=n,
    )
    if out_png is not None:
        plot_token_interaction(result, Path(out_png))
    return result


def plot_token_interaction(result: TokenInteraction, out_png: Path) -> Path:
    """Left: cosines per block. Middle/right: per-dimension magnitudes of the first and last block,
    dimensions sorted by their [CLS]/patch ratio so type-specific ones gather at the two ends."""
    # A bare Figure (no pyplot): renders with Agg, leaves the global backend and figure list alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    blocks = list(range(result.depth))
    ax = axes[0]
    ax.plot(blocks, result.cls_patch_cos_pre, "o-", label="[CLS]-patch, before norm1")
    ax.plot(blocks, result.cls_patch_cos_post, "o-", label="[CLS]-patch, after norm1")
    ax.plot(blocks, result.patch_patch_cos, "s--", label="patch-patch, after norm1")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="block", ylabel="mean cosine similarity", title=f"token similarity ({result.num_images} images)")
    ax.legend(fontsize=8)
    for ax, i, stage in ((axes[1], 0, "early"), (axes[2], result.depth - 1, "late")):
        cls_mag, patch_mag = result.cls_magnitude[i], result.patch_magnitude[i]
        order = torch.argsort(cls_mag / patch_mag.clamp_min(1e-12), descending=True)
        ax.plot(cls_mag[order].numpy(), label="|[CLS]|")
        ax.plot(patch_mag[order].numpy(), label="mean |patch|")
        ax.set_yscale("log")
        cls_frac, patch_frac = result.dominant_dims[i]
        ax.set(xlabel="dimension (sorted by [CLS]/patch ratio)", ylabel="magnitude after norm1")
        ax.set_title(f"{stage}: block {i} ({cls_frac:.0%} [CLS]-, {patch_frac:.0%} patch-dominated dims)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def save_token_interaction_json(result: TokenInteraction, path: Path) -> Path:
    path.write_text(json.dumps(result.to_json()))
    return path
