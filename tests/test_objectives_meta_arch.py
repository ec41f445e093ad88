"""Supervised and DINOv2 meta-architectures on a tiny timm ViT (CPU, 32px images)."""

from __future__ import annotations

import pytest
import timm
import torch

from trainer.config import TrialConfig
from trainer.objectives import DINOv2MetaArch, SupervisedMetaArch, apply_optimizer_schedule, build_meta_arch
from trainer.objectives.dinov2 import block_mask, sample_masks

B = 4
NUM_CLASSES = 3
TOTAL_STEPS = 100


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls gain nothing from threads, and on shared cores OpenMP spin-waiting slows them ~50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
        num_classes=0, init_values=1e-4, dynamic_img_size=True,
    )


def dinov2_config(**overrides) -> TrialConfig:
    dinov2 = dict(out_dim=128, head_hidden_dim=64, head_bottleneck_dim=32, local_crops=2, **overrides)
    return TrialConfig(framework="dinov2", seed=7, dinov2=dinov2)


def dinov2_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(global_crops=torch.randn(2 * B, 3, 32, 32, generator=g),
                local_crops=torch.randn(2 * B, 3, 16, 16, generator=g), batch_size=B)


def adamw(meta_arch, lr=1e-3):
    optimizer = torch.optim.AdamW(meta_arch.trainable_parameters_groups(), lr=lr)
    apply_optimizer_schedule(optimizer, lr, weight_decay=0.05)
    return optimizer


# --- supervised --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_supervised_fits_a_fixed_batch(loss):
    torch.manual_seed(0)
    cfg = TrialConfig(framework="supervised", supervised=dict(loss=loss))
    meta_arch = build_meta_arch(cfg, tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    assert isinstance(meta_arch, SupervisedMetaArch)
    assert meta_arch.eval_backbone is meta_arch.backbone
    images, labels = torch.randn(B, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    optimizer = adamw(meta_arch)
    losses = []
    for step in range(25):
        out = meta_arch((images, labels), step)
        assert set(out) == {"loss", f"loss_{loss}"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        meta_arch.after_step(step)
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_parameter_groups_exclude_norms_biases_and_tokens_from_weight_decay():
    meta_arch = build_meta_arch(TrialConfig(), tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    groups = meta_arch.trainable_parameters_groups()
    assert len(groups) == 2 and {g["lr_multiplier"] for g in groups} == {1.0}
    names = {id(p): n for n, p in meta_arch.named_parameters()}
    by_decay = {g["wd_multiplier"]: {names[id(p)] for p in g["params"]} for g in groups}
    decayed, not_decayed = by_decay[1.0], by_decay[0.0]
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight", "backbone.head.weight",
            "backbone.patch_embed.proj.weight"} <= decayed
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight",
            "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma", "backbone.norm.bias",
            "backbone.head.bias"} <= not_decayed
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed


# --- DINOv2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dinov2() -> DINOv2MetaArch:
    torch.manual_seed(0)
    meta_arch = build_meta_arch(dinov2_config(), tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    assert isinstance(meta_arch, DINOv2MetaArch)
    return meta_arch


def test_dinov2_teacher_starts_as_a_frozen_copy_of_the_student(dinov2):
    assert dinov2.eval_backbone is dinov2.teacher["backbone"] and dinov2.backbone is dinov2.student["backbone"]
    for name, param in dinov2.teacher.named_parameters():
        assert not param.requires_grad, name
    fresh = build_meta_arch(dinov2_config(), tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    for t, s in zip(fresh.teacher.parameters(), fresh.student.parameters()):
        assert torch.equal(t, s)
    dinov2.train()
    assert dinov2.student.training and not dinov2.teacher.training


def test_dinov2_forward_backward_and_ema_update(dinov2):
    optimizer = adamw(dinov2, lr=1e-3)
    out = dinov2(dinov2_batch(), step=3)
    assert set(out) == {"loss", "loss_dino", "loss_ibot", "loss_koleo"}
    assert all(torch.isfinite(v) for v in out.values())
    cfg = dinov2.cfg
    combined = out["loss_dino"] + cfg.ibot_weight * out["loss_ibot"] + cfg.koleo_weight * out["loss_koleo"]
    assert torch.allclose(out["loss"], combined)
    optimizer.zero_grad()
    out["loss"].backward()

    assert all(p.grad is None for p in dinov2.teacher.parameters())  # the teacher learns only by EMA
    for part in ("backbone", "dino_head", "ibot_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dinov2.student[part].parameters()), part
    assert dinov2.mask_token.grad is not None and dinov2.mask_token.grad.abs().sum() > 0

    teacher_before = [p.clone() for p in dinov2.teacher.parameters()]
    optimizer.step()
    teacher_after_optimizer = list(dinov2.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher_after_optimizer))

    dinov2.after_step(3)
    m = dinov2.momentum(3)
    assert cfg.teacher_momentum < m < 1
    changed = 0
    for before, teacher, student in zip(teacher_before, dinov2.teacher.parameters(), dinov2.student.parameters()):
        assert torch.allclose(teacher, m * before + (1 - m) * student, atol=1e-7)
        changed += not torch.equal(teacher, before)
    assert changed > 0


def test_dinov2_without_local_crops_and_with_centering():
    torch.manual_seed(0)
    meta_arch = build_meta_arch(dinov2_config(centering="centering"), tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    batch = dinov2_batch()
    batch["local_crops"] = None
    out = meta_arch(batch, step=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert meta_arch.dino_loss.teacher_targets.center.abs().sum() > 0  # the EMA center moved


def test_dinov2_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    meta_arch = build_meta_arch(dinov2_config(), tiny_vit, NUM_CLASSES, TOTAL_STEPS)
    optimizer = adamw(meta_arch, lr=2e-3)
    batch = dinov2_batch()
    losses = []
    for step in range(15):
        out = meta_arch(batch, step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        meta_arch.after_step(step)
        losses.append(out["loss"].item())
    assert min(losses[-3:]) < losses[0]


def test_masked_forward_without_masks_equals_forward_features(dinov2):
    images = torch.randn(2, 3, 32, 32)
    no_masks = torch.zeros(2, 64, dtype=torch.bool)
    dinov2.eval()
    with torch.no_grad():
        assert torch.allclose(dinov2.masked_features(images, no_masks), dinov2.backbone.forward_features(images),
                              atol=1e-6)
        masked = no_masks.clone()
        masked[0, :10] = True
        changed = dinov2.masked_features(images, masked) != dinov2.backbone.forward_features(images)
    dinov2.train()
    assert changed[0].any() and not changed[1].any()  # images are processed independently


def test_masks_are_deterministic_per_step(dinov2):
    first = dinov2.masks(step=5, num_images=2 * B, image_size=(32, 32))
    assert torch.equal(first, dinov2.masks(step=5, num_images=2 * B, image_size=(32, 32)))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, dinov2.masks(step=5, num_images=2 * B, image_size=(32, 32)))
    assert not torch.equal(first, dinov2.masks(step=6, num_images=2 * B, image_size=(32, 32)))
    other_seed = build_meta_arch(dinov2_config().model_copy(update=dict(seed=8)), tiny_vit, NUM_CLASSES, 10)
    assert not torch.equal(first, other_seed.masks(step=5, num_images=2 * B, image_size=(32, 32)))

    assert first.shape == (2 * B, 64)
    masked_per_image = first.sum(dim=1)
    assert (masked_per_image > 0).sum() == int(2 * B * dinov2.cfg.mask_probability)
    assert masked_per_image.max() <= 0.5 * 64  # mask_ratio upper bound


def test_mask_sampling_follows_ratio_strata():
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(16, (16, 16), (0.1, 0.5), 1.0, g)
    counts = masks.sum(dim=1).float() / 256
    assert (counts <= 0.5).all() and (counts > 0.03).all()
    assert counts.max() > 0.3  # the upper strata are reached
    single = block_mask(16, 16, 40, torch.Generator().manual_seed(1))
    assert 0 < single.sum() <= 40
