"""The paper's analysis of how [CLS] and patch tokens relate inside the backbone.

Forward hooks on every norm site (each block's `norm1` and `norm2`, and the final `norm`; two-branch
wrappers in a specialized model, plain LayerNorms otherwise: either way their input and output are
the full token sequence) capture the tokens before and after the norm. On a batch of images we
measure, per site:

- `cls_patch_cos_pre` / `_post`: mean cosine between [CLS] and each patch token, before and after
  the norm. The paper observes it clearly positive before norm1 and about 0 after.
- `patch_patch_cos_pre` / `_post`: mean cosine between distinct patch tokens (the paper: it stays
  positive through the norm, so the norm removes [CLS]-patch similarity only).
- per-dimension magnitudes after the norm, mean |[CLS]_d| and mean |patch_d|; a dimension is
  "dominated" by a token type when its magnitude exceeds the other's by more than `DOMINANCE_RATIO`.
- per-dimension gain of the norm for each token type: mean |after_d| / mean |before_d| over that
  type's tokens (the centring, the per-token 1/std and the affine weight together).

Register tokens (timm places them between [CLS] and the patches) are left out of every measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.metric_names import TOKEN_COSINES

DOMINANCE_RATIO = 2.0
SITES = ("norm1", "norm2", "final_norm")  # where the hooks sit
MEASURES = TOKEN_COSINES  # the names of the per-site cosines: trainer/metric_names.py owns them


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


def _gain(after: Tensor, before: Tensor) -> Tensor:
    return after / before.clamp_min(1e-12)


@dataclass
class NormCurves:
    """The measures at one norm site, one entry per position (block i, or the one final norm),
    averaged over the images."""

    cls_patch_cos_pre: list[float]
    cls_patch_cos_post: list[float]
    patch_patch_cos_pre: list[float]
    patch_patch_cos_post: list[float]
    cls_magnitude_pre: list[Tensor]  # C per position
    patch_magnitude_pre: list[Tensor]
    cls_magnitude: list[Tensor]  # C per position, after the norm
    patch_magnitude: list[Tensor]
    dominant_dims: list[tuple[float, float]] = field(init=False)  # (cls, patch) fractions per position

    def __post_init__(self) -> None:
        self.dominant_dims = [dominance_fractions(c, p) for c, p in zip(self.cls_magnitude, self.patch_magnitude)]

    def __len__(self) -> int:
        return len(self.cls_patch_cos_post)

    @property
    def cls_gain(self) -> list[Tensor]:
        return [_gain(a, b) for a, b in zip(self.cls_magnitude, self.cls_magnitude_pre)]

    @property
    def patch_gain(self) -> list[Tensor]:
        return [_gain(a, b) for a, b in zip(self.patch_magnitude, self.patch_magnitude_pre)]

    def summary(self, positions: slice) -> dict[str, float]:
        """The measures averaged over `positions` (the early or late third, or the single final norm)."""
        out = {m: _mean(getattr(self, m)[positions]) for m in MEASURES}
        out["type_specific_dims"] = _mean([c + p for c, p in self.dominant_dims][positions])
        return out

    def position(self, i: int) -> dict[str, float]:
        out = {m: getattr(self, m)[i] for m in MEASURES}
        out["cls_dominant_dims"], out["patch_dominant_dims"] = self.dominant_dims[i]
        return out

    def to_json(self) -> dict:
        return {**{m: getattr(self, m) for m in MEASURES},
                **{name: [t.tolist() for t in getattr(self, name)]
                   for name in ("cls_magnitude_pre", "patch_magnitude_pre", "cls_magnitude", "patch_magnitude",
                                "cls_gain", "patch_gain")},
                "dominant_dims": self.dominant_dims}


@dataclass
class TokenInteraction:
    """Per-site curves: `norms["norm1"][i]` and `norms["norm2"][i]` are `backbone.blocks[i]`'s,
    `norms["final_norm"]` has one position."""

    norms: dict[str, NormCurves]
    num_images: int

    @property
    def norm1(self) -> NormCurves:
        return self.norms["norm1"]

    @property
    def depth(self) -> int:
        return len(self.norm1)

    @property
    def metrics(self) -> dict[str, float]:
        """norm1 per block and per third (`tokens/block{i}/...`, `tokens/early_...`), norm2 per
        third (`tokens/norm2/early_...`), the final norm (`tokens/final_norm/...`)."""
        out: dict[str, float] = {}
        for i in range(self.depth):
            out.update({f"tokens/block{i}/{k}": v for k, v in self.norm1.position(i).items()})
        n = early_late_count(self.depth)
        for stage, blocks in (("early", slice(0, n)), ("late", slice(self.depth - n, self.depth))):
            out.update({f"tokens/{stage}_{k}": v for k, v in self.norm1.summary(blocks).items()})
            out.update({f"tokens/norm2/{stage}_{k}": v for k, v in self.norms["norm2"].summary(blocks).items()})
        out.update({f"tokens/final_norm/{k}": v for k, v in self.norms["final_norm"].summary(slice(0, 1)).items()})
        return out

    def to_json(self) -> dict:
        return {"num_images": self.num_images, "dominance_ratio": DOMINANCE_RATIO,
                **{site: curves.to_json() for site, curves in self.norms.items()}, "metrics": self.metrics}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class _NormAccumulator:
    """Forward hook on one norm: sums per-image measures over every batch it sees."""

    def __init__(self, num_prefix_tokens: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.images = 0
        self.sums: dict[str, float] = dict.fromkeys(MEASURES, 0.0)
        self.magnitudes: dict[str, Tensor | float] = dict.fromkeys(
            ("cls_magnitude_pre", "patch_magnitude_pre", "cls_magnitude", "patch_magnitude"), 0.0)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        pre, post, p = args[0], output, self.num_prefix_tokens
        self.images += pre.shape[0]
        for when, tokens in (("pre", pre), ("post", post)):
            self.sums[f"cls_patch_cos_{when}"] += cls_patch_cosine(tokens, p).sum().item()
            self.sums[f"patch_patch_cos_{when}"] += patch_patch_cosine(tokens, p).sum().item()
            cls_mag, patch_mag = dimension_magnitudes(tokens, p)
            suffix = "_pre" if when == "pre" else ""
            self.magnitudes["cls_magnitude" + suffix] = self.magnitudes["cls_magnitude" + suffix] + cls_mag.sum(0).cpu()
            self.magnitudes["patch_magnitude" + suffix] = (self.magnitudes["patch_magnitude" + suffix]
                                                           + patch_mag.sum(0).cpu())


def _curves(accumulators: list[_NormAccumulator], n: int) -> NormCurves:
    values = {m: [a.sums[m] / n for a in accumulators] for m in MEASURES}
    values.update({k: [a.magnitudes[k] / n for a in accumulators] for k in accumulators[0].magnitudes})
    return NormCurves(**values)


def analyze_token_interaction(
    backbone: nn.Module, images: Tensor, out_png: Path | None = None, batch_size: int = 64
) -> TokenInteraction:
    """Runs `images` (B x 3 x H x W) through the frozen backbone with hooks on every norm."""
    if len(images) == 0:
        raise ValueError("token interaction needs at least one image")
    num_prefix = backbone.num_prefix_tokens
    if num_prefix < 1:
        raise ValueError("token interaction needs a [CLS] token (num_prefix_tokens >= 1)")
    device = next(backbone.parameters()).device
    modules = {"norm1": [blk.norm1 for blk in backbone.blocks], "norm2": [blk.norm2 for blk in backbone.blocks],
               "final_norm": [backbone.norm]}
    accumulators = {site: [_NormAccumulator(num_prefix) for _ in mods] for site, mods in modules.items()}
    handles = [module.register_forward_hook(acc) for site in SITES
               for module, acc in zip(modules[site], accumulators[site])]
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
    result = TokenInteraction({site: _curves(accumulators[site], n) for site in SITES}, num_images=n)
    if out_png is not None:
        plot_token_interaction(result, Path(out_png))
    return result


# --- the figure (DIR/token_interaction.png) ------------------------------------------------------


def _cosines(ax, curves: NormCurves, site: str, final: NormCurves | None = None) -> None:
    blocks = list(range(len(curves)))
    ax.plot(blocks, curves.cls_patch_cos_pre, "o-", color="C0", label=f"[CLS]-patch, before {site}")
    ax.plot(blocks, curves.cls_patch_cos_post, "o-", color="C1", label=f"[CLS]-patch, after {site}")
    ax.plot(blocks, curves.patch_patch_cos_pre, "s--", color="C2", label=f"patch-patch, before {site}")
    ax.plot(blocks, curves.patch_patch_cos_post, "s--", color="C3", label=f"patch-patch, after {site}")
    if final is not None:  # the final norm, one position after the last block
        x = len(curves)
        for value, marker, color in ((final.cls_patch_cos_pre[0], "o", "C0"), (final.cls_patch_cos_post[0], "o", "C1"),
                                     (final.patch_patch_cos_pre[0], "s", "C2"),
                                     (final.patch_patch_cos_post[0], "s", "C3")):
            ax.plot([x], [value], marker, color=color, markerfacecolor="none", markersize=9)
        ax.set_xticks([*blocks, x], [*map(str, blocks), "final\nnorm"])
    else:
        ax.set_xticks(blocks)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="block", ylabel="mean cosine similarity")
    ax.legend(fontsize=7)


def _magnitudes(ax, curves: NormCurves, i: int, stage: str) -> None:
    cls_mag, patch_mag = curves.cls_magnitude[i], curves.patch_magnitude[i]
    order = torch.argsort(cls_mag / patch_mag.clamp_min(1e-12), descending=True)
    ax.plot(cls_mag[order].numpy(), label="|[CLS]|")
    ax.plot(patch_mag[order].numpy(), label="mean |patch|")
    ax.set_yscale("log")
    cls_frac, patch_frac = curves.dominant_dims[i]
    ax.set(xlabel="dimension (sorted by [CLS]/patch ratio)", ylabel="magnitude after norm1")
    ax.set_title(f"{stage}: block {i} ({cls_frac:.0%} [CLS]-, {patch_frac:.0%} patch-dominated dims)", fontsize=10)
    ax.legend(fontsize=8)


def _gains(ax, curves: NormCurves, i: int, title: str) -> None:
    cls_gain, patch_gain = curves.cls_gain[i], curves.patch_gain[i]
    order = torch.argsort(patch_gain, descending=True)
    ax.plot(cls_gain[order].numpy(), label="[CLS]")
    ax.plot(patch_gain[order].numpy(), label="patches")
    ax.set_yscale("log")
    ax.set(xlabel="dimension (sorted by the patches' gain)", ylabel="gain: mean |after| / mean |before|")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot_token_interaction(result: TokenInteraction, out_png: Path) -> Path:
    # A bare Figure (no pyplot): renders with Agg, leaves the global backend and figure list alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 8))
    axes = fig.subplots(2, 3)
    norms, last = result.norms, result.depth - 1
    _cosines(axes[0, 0], norms["norm1"], "norm1")
    axes[0, 0].set_title(f"token similarity at norm1 ({result.num_images} images)", fontsize=10)
    _cosines(axes[0, 1], norms["norm2"], "norm2", final=norms["final_norm"])
    axes[0, 1].set_title("at norm2, and the final norm", fontsize=10)
    _gains(axes[0, 2], norms["norm1"], 0, "norm1 gain per dimension, block 0")
    _magnitudes(axes[1, 0], norms["norm1"], 0, "early")
    _magnitudes(axes[1, 1], norms["norm1"], last, "late")
    _gains(axes[1, 2], norms["final_norm"], 0, "final norm gain per dimension")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def save_token_interaction_json(result: TokenInteraction, path: Path) -> Path:
    path.write_text(json.dumps(result.to_json()))
    return path
