"""The fused two-branch layers compute what the layers before issue 12 computed (the frozen copy in
tests/reference_layers.py): outputs and gradients, for every preset and a few custom specs, in the
eager formulation (the fused ops) and in the traced one (plain ops, what FX / TorchScript /
torch.compile run). Also: checkpoints saved with the reference layers load unchanged.
"""

from __future__ import annotations

import copy

import pytest
import reference_layers
import timm
import torch

import trainer.models as tm
from trainer.models import PRESETS, token_type_ops
from trainer.models.layers import TokenTypeLayerNorm, TokenTypeLayerScale, TokenTypeLinear, TokenTypeSplit

MICRO = dict(tm.SCALES["micro"], init_values=1e-4, num_classes=7)
CUSTOM = [("qkv@first:2,proj@last:2,fc1@[1,3]", {}), ("mlp@[0,3,5],norm2,ls1@first_half", {}),
          ("paper", dict(reg_tokens=2, registers_follow="cls")), ("all", dict(reg_tokens=2, registers_follow="patch"))]
CASES = [(spec, {}) for spec in sorted(PRESETS)] + CUSTOM
REFERENCE_CLASS = {TokenTypeLayerNorm: reference_layers.TokenTypeLayerNorm,
                   TokenTypeLayerScale: reference_layers.TokenTypeLayerScale,
                   TokenTypeLinear: reference_layers.TokenTypeLinear}
RTOL = 1e-6  # relative to each tensor's largest entry (fp32)
# The traced norm applies its affine after normalizing, one rounding more than aten's fused affine:
# ~3e-6 after six blocks of backward.
TRACED_RTOL = 1e-5


def build(spec: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(tm.MODEL_NAMES["micro"], specialization=spec, **{**MICRO, **kwargs})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor its own values: the two branches of a layer differ
        for name, p in model.named_parameters():
            if p.ndim == 1:
                centre = 1.0 if name.endswith(("weight", "gamma")) else 0.0  # norm weights, LayerScale gammas
                p.copy_(centre + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model and weights with each two-branch layer swapped for its pre-issue-12 version."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, TokenTypeSplit):
            old = REFERENCE_CLASS[type(module)](module.patch, module.num_prefix_tokens)
            old.prefix = module.prefix
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, leaf, old)
    assert ref.state_dict().keys() == model.state_dict().keys()
    return ref


def outputs_and_grads(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    x = images.clone().requires_grad_(True)
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    out = {"logits": logits.detach(), "input.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return out


def assert_equal_within(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        scale = want.abs().max().item()
        diff = (got[key] - want).abs().max().item()
        assert diff <= rtol * scale + 1e-30, f"{key}: max |diff| {diff:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec, kwargs", CASES, ids=[f"{s}{'-' + k['registers_follow'] if k else ''}" for s, k in CASES])
def test_fused_layers_equal_the_reference(spec, kwargs, images):
    model = build(spec, **kwargs)
    expected = outputs_and_grads(reference_copy(model), images)
    assert_equal_within(outputs_and_grads(model, images), expected)


@pytest.mark.parametrize("spec, kwargs", [("paper", {}), ("all", dict(reg_tokens=2, registers_follow="cls"))])
def test_traced_formulation_equals_the_reference(spec, kwargs, images):
    """torch.fx traces the plain-ops formulation: the same outputs and gradients."""
    model = build(spec, **kwargs)
    expected = outputs_and_grads(reference_copy(model), images)
    traced = torch.fx.symbolic_trace(model)
    assert "specialized_vit" not in str(traced.graph)  # plain ops, no fused op
    assert_equal_within(outputs_and_grads(traced, images), expected, TRACED_RTOL)


@pytest.mark.parametrize("num_prefix, bias", [(1, True), (3, False)])
def test_each_op_equals_its_traced_formulation(num_prefix, bias):
    """Layer by layer, including the backward, a prefix of several tokens and layers without bias."""
    g = torch.Generator().manual_seed(2)
    d, o = 24, 40
    x = torch.randn(2, 9, d, generator=g, requires_grad=True)
    w, b, pw, pb = (torch.randn(d, generator=g, requires_grad=True) for _ in range(4))
    lw, lb, lpw, lpb = (torch.randn(o, *s, generator=g, requires_grad=True) for s in ((d,), (), (d,), ()))
    b, pb, lb, lpb = (t if bias else None for t in (b, pb, lb, lpb))
    pairs = [
        (token_type_ops.layer_norm, token_type_ops.layer_norm_graph, (x, w, b, pw, pb, num_prefix, 1e-6)),
        (token_type_ops.scale, token_type_ops.scale_graph, (x, w, pw, num_prefix)),
        (token_type_ops.linear, token_type_ops.linear_graph, (x, lw, lb, lpw, lpb, num_prefix)),
    ]
    for fused, graph, args in pairs:
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        result = {}
        for name, fn in (("fused", fused), ("graph", graph)):
            out = fn(*args)
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out) * torch.linspace(0, 1, out.shape[-1]))
            result[name] = {"out": out.detach(), **{f"grad{i}": t for i, t in enumerate(grads)}}
        assert_equal_within(result["fused"], result["graph"], TRACED_RTOL)


def test_autocast_dtypes_match_the_shared_layers():
    """Under bf16 autocast: the norm computes in float32, the linear in bf16, as timm's layers do."""
    x = torch.randn(2, 5, 16)
    norm, linear = torch.nn.LayerNorm(8), torch.nn.Linear(16, 8)
    fused_norm, fused_linear = TokenTypeLayerNorm(norm, 1), TokenTypeLinear(linear, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = linear(x)
        assert fused_linear(x).dtype == hidden.dtype == torch.bfloat16
        assert fused_norm(hidden).dtype == norm(hidden).dtype
        expected = token_type_ops.linear_graph(x, linear.weight, linear.bias, fused_linear.prefix.weight,
                                               fused_linear.prefix.bias, 1)
        torch.testing.assert_close(fused_linear(x), expected, atol=1e-2, rtol=1.6e-2)  # bf16: within an ulp


def test_checkpoints_of_the_reference_layers_load(tmp_path, images):
    """The parameter layout is unchanged: a state_dict saved with the old layers loads as it is."""
    model = build("paper", reg_tokens=1)
    reference = reference_copy(model)
    path = tmp_path / "two_branch.pth"
    torch.save(reference.state_dict(), path)
    fresh = timm.create_model(tm.MODEL_NAMES["micro"], specialization="paper", **{**MICRO, "reg_tokens": 1})
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert_equal_within(outputs_and_grads(fresh.eval(), images), outputs_and_grads(reference.eval(), images))
