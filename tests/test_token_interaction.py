"""The [CLS]-patch token analysis: measures on constructed sequences, hooks on real models, the plot."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from matplotlib.image import imread

import trainer.models as tm
from trainer.metric_names import TOKEN_BLOCK_MEASURES, TOKEN_STAGE_MEASURES
from trainer.evaluation.token_interaction import (
    analyze_token_interaction,
    cls_patch_cosine,
    dimension_magnitudes,
    dominance_fractions,
    early_late_count,
    patch_patch_cosine,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MICRO = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=0, init_values=1e-4)


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**MICRO, **kwargs}).eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- measures on hand-built sequences ------------------------------------------------------------


def test_cls_equal_to_the_mean_of_aligned_patches_has_cosine_one():
    v = torch.tensor([1.0, 2.0, -1.0])
    patches = torch.stack([v, 2 * v, 3 * v])
    register = torch.tensor([[-5.0, 0.0, 9.0]])  # between [CLS] and the patches: must be ignored
    tokens = torch.cat([patches.mean(0, keepdim=True), register, patches])[None]
    assert cls_patch_cosine(tokens, num_prefix_tokens=2).item() == pytest.approx(1.0)


def test_orthogonal_cls_has_cosine_zero_and_opposite_minus_one():
    cls = torch.tensor([[1.0, 0.0, 0.0]])
    patches = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, -2.0]])
    assert cls_patch_cosine(torch.cat([cls, patches])[None], 1).item() == pytest.approx(0.0)
    assert cls_patch_cosine(torch.cat([cls, -cls, -2 * cls])[None], 1).item() == pytest.approx(-1.0)
    # Two images are measured separately: (1 + 0) / 2 for a mix.
    mixed = torch.cat([cls, cls, torch.tensor([[0.0, 1.0, 0.0]])])[None]
    assert cls_patch_cosine(mixed, 1).item() == pytest.approx(0.5)


def test_patch_patch_cosine_is_the_off_diagonal_mean():
    # Patches e0, e0, e1: ordered pairs (0,1)=(1,0)=1, the four others 0 -> 2/6.
    tokens = torch.tensor([[9.0, 9.0], [1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])[None]
    assert patch_patch_cosine(tokens, 1).item() == pytest.approx(1 / 3)
    assert math.isnan(patch_patch_cosine(tokens[:, :2], 1).item())  # a single patch has no pair


def test_dimension_magnitudes_and_dominance():
    tokens = torch.tensor([[[4.0, 1.0, 1.0, -2.0],     # [CLS]
                            [1.0, -3.0, 1.0, 2.0],     # patches: mean |.| = 1, 3, 1.5, 2
                            [-1.0, 3.0, 2.0, 2.0]]])
    cls_mag, patch_mag = dimension_magnitudes(tokens, 1)
    assert cls_mag[0].tolist() == [4.0, 1.0, 1.0, 2.0]
    assert patch_mag[0].tolist() == [1.0, 3.0, 1.5, 2.0]
    # Dim 0: [CLS] 4x the patches; dim 1: patches 3x; dims 2, 3: within 2x.
    assert dominance_fractions(cls_mag[0], patch_mag[0]) == (0.25, 0.25)


def test_early_and_late_thirds_round_like_the_specialization_rules():
    assert [early_late_count(d) for d in (1, 4, 6, 12, 24)] == [1, 1, 2, 4, 8]


# --- hooks on real models -------------------------------------------------------------------------


def _manual_norm_tokens(model, x):
    """(pre, post) tokens at every block's norm1 and norm2 and at the final norm, by running timm's
    forward step by step."""
    sites = {"norm1": [], "norm2": [], "final_norm": []}
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            sites["norm1"].append((h, blk.norm1(h)))
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            sites["norm2"].append((h, blk.norm2(h)))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        sites["final_norm"].append((h, model.norm(h)))
    return sites


def test_hooks_capture_every_norm_input_and_output():
    model = tiny_vit(reg_tokens=2, init_values=0.5)  # LayerScale large enough for the blocks to matter
    x = images()
    result = analyze_token_interaction(model, x, batch_size=4)  # two batches: accumulation
    assert result.depth == 4 and result.num_images == 6
    p = model.num_prefix_tokens
    for site, pairs in _manual_norm_tokens(model, x).items():
        curves = result.norms[site]
        assert len(curves) == len(pairs)
        for i, (pre, post) in enumerate(pairs):
            assert curves.cls_patch_cos_pre[i] == pytest.approx(cls_patch_cosine(pre, p).mean().item(), abs=1e-5)
            assert curves.cls_patch_cos_post[i] == pytest.approx(cls_patch_cosine(post, p).mean().item(), abs=1e-5)
            assert curves.patch_patch_cos_pre[i] == pytest.approx(patch_patch_cosine(pre, p).mean().item(), abs=1e-5)
            assert curves.patch_patch_cos_post[i] == pytest.approx(patch_patch_cosine(post, p).mean().item(),
                                                                    abs=1e-5)
            cls_mag, patch_mag = dimension_magnitudes(post, p)
            assert torch.allclose(curves.cls_magnitude[i], cls_mag.mean(0), atol=1e-5)
            assert torch.allclose(curves.patch_magnitude[i], patch_mag.mean(0), atol=1e-5)
            # The gain per dimension: mean |after| / mean |before| over each token type.
            cls_pre, patch_pre = dimension_magnitudes(pre, p)
            assert torch.allclose(curves.cls_gain[i], cls_mag.mean(0) / cls_pre.mean(0), rtol=1e-4)
            assert torch.allclose(curves.patch_gain[i], patch_mag.mean(0) / patch_pre.mean(0), rtol=1e-4)
    # The blocks change the tokens: norm2 of block 0 sees other tokens than norm1 of block 0.
    assert result.norms["norm2"].cls_patch_cos_pre[0] != pytest.approx(result.norm1.cls_patch_cos_pre[0], abs=1e-4)
    # Hooks are removed afterwards.
    assert all(not blk.norm1._forward_hooks and not blk.norm2._forward_hooks for blk in model.blocks)
    assert not model.norm._forward_hooks


def test_norm_gain_of_a_layernorm_follows_its_affine_weight_per_token_type():
    """A two-branch norm1 with [CLS] weight 2 and patch weight 0.5 on constant-scale inputs: the
    gains of the two token types differ by the weights' ratio, dimension by dimension."""
    torch.manual_seed(0)
    model = timm.create_model(tm.MODEL_NAMES["micro"], specialization="norm1", **MICRO).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.prefix.weight.fill_(2.0)
            blk.norm1.patch.weight.fill_(0.5)
            blk.norm1.prefix.bias.zero_()
            blk.norm1.patch.bias.zero_()
    x = images()
    result = analyze_token_interaction(model, x)
    pairs = _manual_norm_tokens(model, x)["norm1"]
    for i, (pre, _) in enumerate(pairs):
        # By hand: LayerNorm without affine, then the token type's weight.
        plain = torch.nn.functional.layer_norm(pre, pre.shape[-1:], eps=model.blocks[i].norm1.patch.eps)
        p = model.num_prefix_tokens
        cls_gain = 2.0 * plain[:, 0].abs().mean(0) / pre[:, 0].abs().mean(0)
        patch_gain = 0.5 * plain[:, p:].abs().mean((0, 1)) / pre[:, p:].abs().mean((0, 1))
        assert torch.allclose(result.norm1.cls_gain[i], cls_gain, rtol=1e-4)
        assert torch.allclose(result.norm1.patch_gain[i], patch_gain, rtol=1e-4)


def test_specialized_norm1_that_separates_token_types_gives_zero_cosine():
    """A two-branch norm1 whose [CLS] affine keeps only dim 0 and whose patch affine drops it: after
    the norm [CLS] and patches are orthogonal, and every dimension belongs to one token type."""
    torch.manual_seed(0)
    model = timm.create_model(tm.MODEL_NAMES["micro"], specialization="norm1", **MICRO).eval()
    dim = MICRO["embed_dim"]
    only_first = torch.zeros(dim)
    only_first[0] = 1.0
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.prefix.weight.copy_(only_first)
            blk.norm1.patch.weight.copy_(1.0 - only_first)
            blk.norm1.prefix.bias.zero_()
            blk.norm1.patch.bias.zero_()
    result = analyze_token_interaction(model, images())
    assert result.norm1.cls_patch_cos_post == pytest.approx([0.0] * 4, abs=1e-6)
    assert all(abs(c) > 1e-3 for c in result.norm1.cls_patch_cos_pre)  # before the norm they were not
    assert result.norm1.dominant_dims == [(1 / dim, (dim - 1) / dim)] * 4
    metrics = result.metrics
    assert metrics["tokens/early_cls_patch_cos_post"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["tokens/early_type_specific_dims"] == pytest.approx(1.0)


def test_metrics_keys_and_thirds(tmp_path):
    model = tiny_vit()
    result = analyze_token_interaction(model, images(4), out_png=tmp_path / "plots" / "tokens.png")
    m = result.metrics
    for i in range(4):
        for key in TOKEN_BLOCK_MEASURES:
            assert f"tokens/block{i}/{key}" in m
    for key in TOKEN_STAGE_MEASURES:  # norm2 by thirds, the final norm as it is
        assert {f"tokens/norm2/early_{key}", f"tokens/norm2/late_{key}", f"tokens/final_norm/{key}"} <= set(m)
    # Depth 4: the first and last third are one block each.
    assert m["tokens/early_cls_patch_cos_post"] == m["tokens/block0/cls_patch_cos_post"]
    assert m["tokens/late_cls_patch_cos_post"] == m["tokens/block3/cls_patch_cos_post"]
    assert all(-1.0 <= v <= 1.0 for k, v in m.items() if "cos" in k)

    png = tmp_path / "plots" / "tokens.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300 and pixels.std() > 0  # decodes, not blank
