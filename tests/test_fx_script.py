"""The specialized models trace with torch.fx (torchvision's feature extraction, timm's FX features)
and script with TorchScript, as timm's vanilla ViT does: no in-place prefix-row writes to trip them."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import trainer.models as tm

MICRO = dict(tm.SCALES["micro"], init_values=1e-4, num_classes=7)


def micro(spec: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(tm.MODEL_NAMES["micro"], specialization=spec, **{**MICRO, **kwargs})


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec, kwargs", [("paper", {}), ("all", dict(reg_tokens=2))])
def test_feature_extractor_and_torchscript(spec, kwargs, images):
    model = micro(spec, **kwargs).eval()
    with torch.no_grad():
        expected_tokens = model.forward_features(images)
        expected = model(images)
        extractor = create_feature_extractor(model, return_nodes={"blocks.3": "block3", "norm": "tokens", "head": "logits"})
        features = extractor(images)
        torch.testing.assert_close(features["tokens"], expected_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features["logits"], expected, rtol=1e-5, atol=1e-5)
        assert features["block3"].shape == expected_tokens.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but still used downstream
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(images), expected, rtol=1e-5, atol=1e-5)

    # Both stay trainable: gradients reach the prefix branches.
    for module in (extractor, scripted):
        out = module(images)
        (out["logits"] if isinstance(out, dict) else out).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".prefix." in n)


def test_timm_fx_feature_wrapper(images):
    features = timm.create_model(tm.MODEL_NAMES["micro"], specialization="all", features_only=True,
                                 feature_cls="fx", out_indices=(1, 3), **{**MICRO, "num_classes": 0})
    assert [f.shape for f in features(images)] == [(2, 65, 64)] * 2


@pytest.mark.parametrize("scale", list(tm.SCALES))
def test_every_registered_model_traces(scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scales without LayerScale: ls1/ls2 absent
        model = timm.create_model(tm.MODEL_NAMES[scale], specialization="paper", device="meta")
    graph = torch.fx.symbolic_trace(model).graph
    assert "specialized_vit" not in str(graph)  # the traced formulation: plain ops
