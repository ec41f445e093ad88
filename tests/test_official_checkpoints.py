"""Official checkpoint key layouts (DeiT-III, DINOv2 with and without registers, timm) load into the
specialized ViT and are function-preserving; a patch-size or grid mismatch is refused by name.

The checkpoints are small (micro width) but use the official key names and shapes:
- DeiT-III, facebookresearch/deit `models_v2.py` (`vit_models`): LayerScale as `blocks.N.gamma_1` /
  `gamma_2`, `pos_embed` without a [CLS] position (patch tokens only), saved by `main.py` as
  `{"model": state_dict, "optimizer": ..., "epoch": ...}`.
- DINOv2, facebookresearch/dinov2 `dinov2/models/vision_transformer.py` (`DinoVisionTransformer`):
  `ls1.gamma`, `mask_token`, `pos_embed` with a [CLS] position, and `register_tokens` [1, R, D] in
  the register variants; released as flat state dicts.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

import trainer.models as tm
from trainer.models.convert import CheckpointMismatch

SIZES = dict(embed_dim=64, depth=6, num_heads=4, num_classes=0)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _vanilla(patch: int = 16, img: int = 64, **kwargs) -> torch.nn.Module:
    return _randomize(timm.create_model("vit_tiny_patch16_224", img_size=img, patch_size=patch, init_values=1e-4,
                                        **SIZES, **kwargs))


def _specialized(spec: str, patch: int = 16, img: int = 64, **kwargs) -> torch.nn.Module:
    return timm.create_model(tm.MODEL_NAMES["micro"], specialization=spec, img_size=img, patch_size=patch,
                             init_values=1e-4, **SIZES, **kwargs)


def deit3_layout(vanilla: torch.nn.Module) -> dict:
    state = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v.clone() for k, v in vanilla.state_dict().items()}
    assert state["pos_embed"].shape[1] == vanilla.patch_embed.num_patches  # no [CLS] position
    return {"model": state, "optimizer": {}, "epoch": 399}


def dinov2_layout(vanilla: torch.nn.Module, registers: int = 0) -> dict:
    """A DINOv2 state dict with the same function as `vanilla` (a timm model built the way timm ports
    DINOv2: no_embed_class when there are registers)."""
    state = {k: v.clone() for k, v in vanilla.state_dict().items()}
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if registers:  # DINOv2 keeps a [CLS] position; timm folds it into cls_token: undo that here
        state["register_tokens"] = state.pop("reg_token")
        cls_position = torch.randn(1, 1, state["cls_token"].shape[-1])
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    return state


IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _assert_same_function(model, reference):
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["none", "paper", "all"])
def test_deit3_checkpoint_with_gammas_and_no_cls_position(tmp_path, spec):
    vanilla = _vanilla(no_embed_class=True)
    path = tmp_path / "deit_3_micro.pth"
    torch.save(deit3_layout(vanilla), path)
    model = _specialized(spec, no_embed_class=True)
    report = tm.load_vanilla_checkpoint(model, path)
    assert report.missing == [] and report.unused == []
    _assert_same_function(model, vanilla)


@pytest.mark.parametrize("spec", ["none", "paper", "all"])
def test_dinov2_checkpoint_without_registers(tmp_path, spec):
    vanilla = _vanilla(patch=8)
    path = tmp_path / "dinov2_micro8.pth"
    torch.save(dinov2_layout(vanilla), path)
    model = _specialized(spec, patch=8)
    tm.load_vanilla_checkpoint(model, path)
    _assert_same_function(model, vanilla)


@pytest.mark.parametrize("spec", ["none", "paper", "all"])
def test_dinov2_checkpoint_with_registers(tmp_path, spec):
    vanilla = _vanilla(patch=8, reg_tokens=4, no_embed_class=True)
    state = dinov2_layout(vanilla, registers=4)
    reference = _vanilla(patch=8, reg_tokens=4, no_embed_class=True)
    reference.load_state_dict(checkpoint_filter_fn(dict(state), reference))  # timm's own port of DINOv2-reg
    _assert_same_function(reference, vanilla)
    path = tmp_path / "dinov2_micro8_reg4.pth"
    torch.save(state, path)
    model = _specialized(spec, patch=8, reg_tokens=4, no_embed_class=True)
    tm.load_vanilla_checkpoint(model, path)
    _assert_same_function(model, vanilla)


def test_a_patch_size_mismatch_is_refused_naming_both_sizes_and_the_keys():
    state = _vanilla(patch=8).state_dict()
    model = _specialized("paper", patch=16)
    with pytest.raises(CheckpointMismatch, match=r"patch size 8x8 != model patch size 16x16.*model\.patch_size: 8"
                                                 r".*model\.resample_pretrained: true"):
        tm.load_vanilla_checkpoint(model, state)
    tm.load_vanilla_checkpoint(model, state, resample=True)  # asked for: resampled


def test_a_grid_mismatch_is_refused_unless_resampling_is_asked_for():
    state = _vanilla(img=64).state_dict()
    model = _specialized("paper", img=32)
    with pytest.raises(CheckpointMismatch, match=r"grid 4x4 != model grid 2x2.*model\.img_size: 64"):
        tm.load_vanilla_checkpoint(model, state)
    tm.load_vanilla_checkpoint(model, state, resample=True)


def test_layout_mismatches_name_the_key_that_fixes_them():
    with pytest.raises(CheckpointMismatch, match=r"no \[CLS\] position.*model\.no_embed_class: true"):
        tm.load_vanilla_checkpoint(_specialized("paper"), deit3_layout(_vanilla(no_embed_class=True))["model"])
    registers = dinov2_layout(_vanilla(patch=8, reg_tokens=4, no_embed_class=True), registers=4)
    with pytest.raises(CheckpointMismatch, match=r"4 register tokens, the model 0: set model\.reg_tokens: 4"):
        tm.load_vanilla_checkpoint(_specialized("paper", patch=8), registers)
    with pytest.raises(CheckpointMismatch, match=r"has registers.*model\.no_embed_class: true"):
        tm.load_vanilla_checkpoint(_specialized("paper", patch=8, reg_tokens=4), registers)


def _trial_backbone(tmp_path, **model):
    from trainer.config import TrialConfig
    from trainer.loop import backbone_factory

    cfg = TrialConfig.model_validate({"model": {"scale": "micro", "img_size": 64, "patch_size": 16, **model},
                                      "tracking": {"enabled": False}})
    return backbone_factory(cfg)()


@pytest.mark.parametrize("spec", ["none", "paper", "all"])
def test_a_deit3_checkpoint_loads_from_a_trial_config(tmp_path, spec):
    vanilla = _vanilla(no_embed_class=True)
    path = tmp_path / "deit_3_micro.pth"
    torch.save(deit3_layout(vanilla), path)
    model = _trial_backbone(tmp_path, specialization=spec, pretrained=str(path), no_embed_class=True)
    _assert_same_function(model, vanilla)


def test_a_trial_config_mismatch_names_the_trial_keys(tmp_path):
    path = tmp_path / "dinov2_micro8_reg4.pth"
    torch.save(dinov2_layout(_vanilla(patch=8, reg_tokens=4, no_embed_class=True), registers=4), path)
    with pytest.raises(CheckpointMismatch, match=r"patch size 8x8 != model patch size 16x16.*model\.patch_size: 8"):
        _trial_backbone(tmp_path, specialization="paper", pretrained=str(path), reg_tokens=4, no_embed_class=True)
    model = _trial_backbone(tmp_path, specialization="paper", pretrained=str(path), reg_tokens=4,
                            no_embed_class=True, patch_size=8)
    _assert_same_function(model, _vanilla(patch=8, reg_tokens=4, no_embed_class=True))


def test_the_calibration_path_evaluates_a_dinov2_checkpoint_as_it_is(tmp_path):
    """sweeps/paper/calibration.yaml at micro size: `schedule.steps: 0` loads the DINOv2 layout and
    the dinov2 protocol evaluates those very weights (its k-NN equals k-NN on the vanilla model)."""
    from orchestrator.mlflow_store import final_metrics
    from trainer.config import parse_config
    from trainer.data import build_eval_datasets
    from trainer.evaluation.dinov2.classification import dinov2_knn
    from trainer.loop import Trial

    from support.protocols import DINOV2_SMALL

    vanilla = _vanilla(patch=4, img=32)  # the micro scale's width, depth and heads (SIZES)
    path = tmp_path / "dinov2_micro_pretrain.pth"
    torch.save(dinov2_layout(vanilla), path)
    cfg = parse_config({
        "framework": "dinov2",
        "model": {"scale": "micro", "specialization": "none", "pretrained": str(path), "layer_scale_init": 1e-4},
        "data": {"scenes": {"train_size": 96, "val_size": 48}},
        "schedule": {"steps": 0, "warmup_steps": 0, "batch_size": 16},
        "evaluation": {"protocol": "dinov2", "dinov2": DINOV2_SMALL, "segmentation": False, "depth": False,
                       "linear": False, "token_interaction": False},
        "tracking": {"enabled": False}, "runtime": {"threads": 1, "compile": "off"}})
    result = Trial(cfg, tmp_path / "out", log=lambda message: None).run()
    assert result is not None and result.done
    data = build_eval_datasets(cfg)
    direct = dinov2_knn(vanilla, *data.classification, data.num_classes, **cfg.evaluation.dinov2.knn.model_dump())
    measured = {k: v for k, v in final_metrics(result).items() if k.startswith("knn_top1")}
    assert measured == pytest.approx(direct, abs=1e-9) and set(measured) == {"knn_top1", "knn_top1_k5", "knn_top1_k20"}
