"""The specialized ViT: parsing, timm integration, equivalence with vanilla timm, conversion, cost."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import trainer.models as tm
from trainer import scales
from trainer.models import (
    PRESETS,
    Specialization,
    SpecializationError,
    count_flops,
    load_vanilla_checkpoint,
    parameter_report,
    specialized_vit,
)
from trainer.models.layers import TokenTypeSplit

MICRO = dict(tm.SCALES["micro"], init_values=1e-4, num_classes=7)
CUSTOM_SPECS = ["qkv@first:2,proj@last:2", "mlp@[0,3,5],norm2", "ls1,ls2@first_half", "fc1@last_third,final_norm"]


def micro(specialization: str = "none", **kwargs) -> tm.SpecializedVisionTransformer:
    return timm.create_model(tm.MODEL_NAMES["micro"], specialization=specialization, **{**MICRO, **kwargs})


def vanilla_micro(**kwargs) -> timm.models.VisionTransformer:
    return timm.create_model("vit_tiny_patch16_224", **{**MICRO, **kwargs})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- Specialization --------------------------------------------------------------------------


def test_paper_preset_expands_to_norms_layerscale_and_early_qkv():
    spec = Specialization.parse("paper")
    assert spec.canonical() == Specialization.parse("ls1,ls2,norms,qkv@first_third").canonical()
    assert spec.blocks_for("qkv", 12) == frozenset({0, 1, 2, 3})
    assert spec.blocks_for("qkv", 24) == frozenset(range(8))
    assert spec.blocks_for("norm1", 12) == frozenset(range(12))
    assert spec.final_norm and not spec.is_vanilla
    assert Specialization.parse("none").is_vanilla and Specialization.parse("").canonical() == "none"


@pytest.mark.parametrize(
    "text, component, depth, expected",
    [
        ("qkv@first:3", "qkv", 12, {0, 1, 2}),
        ("qkv@last:2", "qkv", 12, {10, 11}),
        ("proj@[0,5,7]", "proj", 12, {0, 5, 7}),
        ("mlp@first_half", "fc2", 6, {0, 1, 2}),
        ("norm2@last_third", "norm2", 6, {4, 5}),
        ("qkv@first_third", "qkv", 32, set(range(11))),
    ],
)
def test_block_ranges_resolve_against_depth(text, component, depth, expected):
    assert Specialization.parse(text).blocks_for(component, depth) == frozenset(expected)


@pytest.mark.parametrize(
    "text, message",
    [
        ("qvk", "unknown component or preset 'qvk'"),
        ("qkv@first_quarter", "unknown block range 'first_quarter'"),
        ("final_norm@first:2", "final_norm is not per block"),
        ("qkv@[0,1", "unbalanced brackets"),
        ("qkv@first:0", "N must be >= 1"),
    ],
)
def test_bad_specializations_name_the_problem(text, message):
    with pytest.raises(SpecializationError, match=message.replace("[", r"\[")):
        Specialization.parse(text)


def test_ranges_beyond_the_depth_fail_when_the_model_is_built():
    with pytest.raises(SpecializationError, match="exceeds the model's depth 6"):
        micro("qkv@first:8")
    with pytest.raises(SpecializationError, match=r"\[9\] do not exist"):
        micro("qkv@[1,9]")


# --- timm integration ------------------------------------------------------------------------


def test_every_scale_is_registered_with_timms_widths_and_depths():
    assert set(timm.list_models("specialized_vit_*")) == set(tm.MODEL_NAMES.values())
    for scale, name in tm.MODEL_NAMES.items():
        model = timm.create_model(name, specialization="paper", init_values=1e-5, num_classes=0, device="meta")
        expected = tm.SCALES[scale]
        assert model.embed_dim == expected["embed_dim"] and len(model.blocks) == expected["depth"]
        assert model.blocks[0].attn.num_heads == expected["num_heads"]
        if scale != "micro":
            reference_name, _ = tm.vanilla_counterpart(scale)
            reference = timm.create_model(reference_name, init_values=1e-5, num_classes=0, device="meta")
            assert parameter_report(model).vanilla == sum(p.numel() for p in reference.parameters())


def test_each_scale_has_its_own_entry_point_function():
    """timm style: one `def specialized_vit_<scale>_...` per model, so a grep finds its definition."""
    source = inspect.getsource(specialized_vit)
    for name in tm.MODEL_NAMES.values():
        assert source.count(f"\ndef {name}(") == 1, name
        assert getattr(specialized_vit, name).__name__ == name


def test_scales_are_readable_without_torch():
    code = "import sys, trainer.scales as s; assert s.SCALES and s.MODEL_NAMES; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert tm.SCALES is scales.SCALES  # one table, re-exported


def test_specialized_blocks_follow_the_plan():
    model = micro("paper")
    assert [("qkv" in b.specialized) for b in model.blocks] == [True, True, False, False, False, False]
    assert all({"norm1", "norm2", "ls1", "ls2"} <= set(b.specialized) for b in model.blocks)
    assert isinstance(model.norm, TokenTypeSplit)
    assert not isinstance(model.blocks[0].attn.proj, TokenTypeSplit)


def test_timm_feature_api(images):
    model = micro("paper").eval()
    tokens = model.forward_features(images)
    assert tokens.shape == (3, 1 + 64, 64)
    assert model.forward_head(tokens).shape == (3, 7)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, 64)
    maps = model.forward_intermediates(images, indices=[0, 5], intermediates_only=True)
    assert [m.shape for m in maps] == [(3, 64, 8, 8)] * 2
    final, inter = model.forward_intermediates(images, indices=2, norm=True, return_prefix_tokens=True)
    assert len(inter) == 2 and inter[0][0].shape == (3, 64, 8, 8) and inter[0][1].shape == (3, 1, 64)
    model.reset_classifier(3)
    assert model(images).shape == (3, 3)
    features = timm.create_model(tm.MODEL_NAMES["micro"], specialization="paper", features_only=True,
                                 out_indices=(1, 3), init_values=1e-4)
    assert [f.shape for f in features(images)] == [(3, 64, 8, 8)] * 2


def test_fused_and_reference_attention_agree(images):
    model = micro("paper").eval()
    assert all(b.attn.fused_attn for b in model.blocks) == timm.layers.use_fused_attn()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.fused_attn = True
        fused = model(images)
        for b in model.blocks:
            b.attn.fused_attn = False
        reference = model(images)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_attention_still_mixes_token_types(images):
    """Patch outputs depend on the [CLS] token: specialization must not cut attention."""
    model = micro("all", init_values=1.0).eval()  # LayerScale at 1e-4 would hide the effect
    with torch.no_grad():
        before = model.forward_features(images)[:, 1:]
        model.cls_token.add_(torch.randn_like(model.cls_token))  # a constant shift would vanish in LayerNorm
        after = model.forward_features(images)[:, 1:]
    assert (before - after).abs().max() > 1e-4


@pytest.mark.slow
def test_torch_compile_matches_eager(images):
    model = micro("paper").eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), atol=1e-5, rtol=1e-5)


# --- none == vanilla timm --------------------------------------------------------------------


def test_none_is_exactly_timms_vanilla_vit(images):
    vanilla = vanilla_micro().eval()
    ours = micro("none").eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in vanilla.state_dict().items()}
    ours.load_state_dict(vanilla.state_dict())
    with torch.no_grad():
        assert (ours(images) - vanilla(images)).abs().max().item() == 0.0
        assert (ours.forward_features(images) - vanilla.forward_features(images)).abs().max().item() == 0.0


# --- conversion from vanilla checkpoints -----------------------------------------------------


def _randomize_affines(model: torch.nn.Module) -> None:
    """Give norms/LayerScale non-trivial values so a wrong branch copy would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "weight" in name or "gamma" in name else 0.0))


@pytest.mark.parametrize("spec", sorted(PRESETS) + CUSTOM_SPECS[:2])
def test_converted_model_equals_vanilla_then_branches_diverge(spec, images):
    vanilla = vanilla_micro(reg_tokens=2).eval()
    _randomize_affines(vanilla)
    model = micro(spec, reg_tokens=2)
    report = load_vanilla_checkpoint(model, vanilla.state_dict())
    assert report.missing == [] and report.unused == []
    model.eval()
    with torch.no_grad():
        diff = (model(images) - vanilla(images)).abs().max().item()
    assert diff <= 1e-6

    if spec == "none":
        return
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images).logsumexp(-1).mean().backward()
    optimizer.step()
    split = [m for m in model.modules() if isinstance(m, TokenTypeSplit)]
    assert split
    for module in split:
        moved = [not torch.equal(a, b) for a, b in zip(module.prefix.parameters(), module.patch.parameters())]
        assert any(moved), f"{module} branches still equal after a step"


@pytest.mark.parametrize("suffix, wrap", [(".pth", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
                                          (".safetensors", lambda sd: sd)])
def test_converts_local_checkpoint_files(tmp_path, suffix, wrap, images):
    vanilla = vanilla_micro().eval()
    _randomize_affines(vanilla)
    path = tmp_path / f"vanilla{suffix}"
    if suffix == ".pth":
        torch.save(wrap(vanilla.state_dict()), path)
    else:
        save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    model = micro("paper", num_classes=3)  # a new head: kept at init, reported as missing
    report = load_vanilla_checkpoint(model, path)
    assert report.missing == ["head.weight", "head.bias"]
    assert "blocks.0.attn.qkv.weight" in report.cloned and "blocks.3.attn.qkv.weight" not in report.cloned
    model.eval()
    with torch.no_grad():
        # Features reach |x| ~ 5: float32 rounding of the unfused norm affine is ~1e-6 there.
        torch.testing.assert_close(model.forward_features(images), vanilla.forward_features(images), atol=1e-6, rtol=1e-5)


def test_conversion_rejects_a_checkpoint_of_another_architecture(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", **{**MICRO, "embed_dim": 32})
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match="shape"):
        load_vanilla_checkpoint(micro("paper"), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vanilla_checkpoint(micro("paper"), tmp_path / "missing.pth")


# --- registers -------------------------------------------------------------------------------


@pytest.mark.parametrize("registers_follow, registers_use_prefix_weights", [("cls", True), ("patch", False)])
def test_registers_follow_the_chosen_token_type(registers_follow, registers_use_prefix_weights, images):
    model = micro("norm2", reg_tokens=4, registers_follow=registers_follow).eval()
    assert model.num_specialized_prefix_tokens == (5 if registers_use_prefix_weights else 1)
    with torch.no_grad():
        before = model.forward_features(images)
        # norm2 feeds the per-token MLP: touching its prefix branch changes exactly the prefix tokens.
        model.blocks[-1].norm2.prefix.weight.mul_(3.0)
        after = model.forward_features(images)
    changed = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert changed[0]  # [CLS]
    assert bool(changed[1:5].all()) == registers_use_prefix_weights
    assert not changed[5:].any()


# --- cost: FLOPs and parameters --------------------------------------------------------------


@pytest.mark.parametrize("spec", sorted(PRESETS) + CUSTOM_SPECS)
def test_specialization_adds_no_flops(spec):
    vanilla_flops = count_flops(vanilla_micro(reg_tokens=1), 32)
    flops = count_flops(micro(spec, reg_tokens=1), 32)
    assert abs(flops - vanilla_flops) / vanilla_flops <= 1e-3
    assert flops == vanilla_flops  # each token through exactly one branch: exactly equal in fact


def test_parameter_accounting_for_base_paper_matches_the_hand_count():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ViT-B has no LayerScale: ls1/ls2 are absent
        model = timm.create_model(tm.MODEL_NAMES["base"], specialization="paper", device="meta")
    report = parameter_report(model)
    d = 768
    qkv = 4 * (3 * d * d + 3 * d)  # QKV weight + bias in the first 4 of 12 blocks
    norms = 12 * 2 * (2 * d) + 2 * d  # norm1 + norm2 (weight + bias) in 12 blocks, + final norm
    assert report.added_by_component == {"norm1": 12 * 2 * d, "norm2": 12 * 2 * d, "final_norm": 2 * d, "qkv": qkv}
    assert report.added == qkv + norms == 7_125_504
    assert report.vanilla == 86_567_656
    assert norms / report.vanilla < 0.001
    assert report.overhead == pytest.approx(0.0823, abs=5e-4)
    assert model.absent_components == ("ls1", "ls2")


def test_layerscale_specialization_counts_when_present():
    report = parameter_report(micro("ls1,ls2"))
    assert report.added_by_component == {"ls1": 6 * 64, "ls2": 6 * 64}


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("spec", ["paper", "all"])
def test_pooling_without_a_per_token_final_norm_leaves_final_norm_absent(spec, pool):
    # timm's avg/max pooling swaps the per-token final norm for fc_norm on the pooled patch tokens:
    # no [CLS] row passes it, so final_norm is absent (a warning, like LayerScale without init_values).
    with pytest.warns(UserWarning, match="final_norm"):
        model = micro(spec, num_classes=0, global_pool=pool)
    assert "final_norm" in model.absent_components
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert "final_norm" not in parameter_report(model).added_by_component
    vanilla = vanilla_micro(num_classes=0, global_pool=pool)
    load_vanilla_checkpoint(model, vanilla.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), vanilla.eval()(x), rtol=1e-5, atol=1e-6)
