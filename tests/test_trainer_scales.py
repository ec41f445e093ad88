"""Both frameworks train the specialized ViT at every scale.

Real training at ViT-L/H does not fit a 2-core CPU, so modules and inputs live on PyTorch's meta
device: every shape, view and autograd edge is exercised (forward + backward through the real
code), nothing is computed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx.experimental._config as fx_config

import trainer.models as tm
from trainer.config import parse_config
from trainer.data import resolve_img_size, resolve_local_crop_size
from trainer.loop import backbone_factory
from trainer.models.layers import TokenTypeSplit
from trainer.objectives import build_meta_arch


@pytest.fixture(autouse=True)
def _meta_boolean_masks():
    # iBOT selects masked patches by boolean indexing: its output size depends on data, which meta
    # tensors do not have. Assume every mask entry selected; shapes stay consistent.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


@pytest.mark.parametrize("framework", ["supervised", "dinov2"])
@pytest.mark.parametrize("scale", list(tm.SCALES))
def test_framework_trains_every_scale(scale, framework):
    cfg = parse_config({"framework": framework, "model": {"scale": scale, "specialization": "paper", "reg_tokens": 2}})
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        meta_arch = build_meta_arch(cfg, backbone_factory(cfg), 10, 100)
    size = resolve_img_size(cfg)
    meta = dict(device="meta")
    if framework == "supervised":
        batch = (torch.randn(2, 3, size, size, **meta), torch.randint(0, 10, (2,), **meta))
    else:
        local = resolve_local_crop_size(cfg)
        batch = {"global_crops": torch.randn(4, 3, size, size, **meta),
                 "local_crops": torch.randn(4, 3, local, local, **meta), "batch_size": 2}
    losses = meta_arch(batch, 0)
    losses["loss"].backward()

    backbone = meta_arch.backbone
    assert len(backbone.blocks) == tm.SCALES[scale]["depth"]
    split = [m for m in backbone.modules() if isinstance(m, TokenTypeSplit)]
    assert split and all(p.grad is not None for m in split for p in m.prefix.parameters())
    missing = [n for n, p in meta_arch.named_parameters() if p.requires_grad and p.grad is None]
    allowed = {"mask_token"} if framework == "supervised" else set()
    assert not [n for n in missing if n.split(".")[0] not in allowed], missing[:5]
