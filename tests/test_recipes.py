"""The DINOv2 recipe against the official values: parameter groups (dinov2/utils/param_groups.py),
schedules (dinov2/utils/utils.py CosineScheduler, dinov2/train/train.py build_schedulers), the lr
scaling rule (dinov2/utils/config.py), the config defaults (dinov2/configs/ssl_default_config.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import trainer.models as tm
from trainer.contract import CHECKPOINT_FILE
from trainer.config import ConfigError, OptimizerConfig, ScheduleConfig, TrialConfig, parse_config
from trainer.objectives import DINOv2MetaArch, build_meta_arch
from trainer.objectives.param_groups import GroupRules, backbone_parameters, parameter_groups
from trainer.loop import Trial
from trainer.objectives.schedules import (
    cosine_schedule, last_layer_learning_rate, learning_rate, peak_learning_rate, teacher_temperature, weight_decay)

DINOV2_RULES = GroupRules(layer_decay=0.9, patch_embed_lr_mult=0.2, no_weight_decay="dinov2")


def multipliers(named, rules):
    """name -> (lr multiplier, wd multiplier, is_last_layer) of every parameter."""
    by_id = {id(param): name for name, param, _ in named}
    return {by_id[id(param)]: (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
            for group in parameter_groups(named, rules) for param in group["params"]}


def meta_backbone(scale: str, specialization: str, **kwargs):
    with torch.device("meta"):  # names and shapes only: ViT-B without allocating it
        return timm.create_model(tm.MODEL_NAMES[scale], specialization=specialization, num_classes=0,
                                 init_values=1e-5, **kwargs)


# Hand-computed from get_vit_lr_decay_rate / get_params_groups_with_decay for a 12-block ViT, decay
# 0.9, patch-embed multiplier 0.2: layer 0 (pos / patch embed, [CLS]) -> 0.9 ** 13, block i ->
# 0.9 ** (12 - i), the rest -> 1; no decay for `.bias`, `norm`, `gamma` names (positions and tokens
# are decayed there).
PINNED = {
    "pos_embed": (0.9 ** 13, 1.0),
    "cls_token": (0.9 ** 13, 1.0),
    "patch_embed.proj.weight": (0.9 ** 13 * 0.2, 1.0),
    "patch_embed.proj.bias": (0.9 ** 13 * 0.2, 0.0),
    "blocks.0.attn.qkv.weight": (0.9 ** 12, 1.0),
    "blocks.0.attn.qkv.bias": (0.9 ** 12, 0.0),
    "blocks.5.mlp.fc1.weight": (0.9 ** 7, 1.0),
    "blocks.11.mlp.fc2.weight": (0.9, 1.0),
    "blocks.11.ls2.gamma": (0.9, 0.0),
    "norm.weight": (1.0, 0.0),
}
# The two-branch copies take the rules of the layer they split (paper: norms, QKV in blocks 0-3, LayerScale).
PINNED_PAPER = {
    "blocks.0.norm1.prefix.weight": (0.9 ** 12, 0.0),
    "blocks.0.norm1.patch.bias": (0.9 ** 12, 0.0),
    "blocks.3.attn.qkv.prefix.weight": (0.9 ** 9, 1.0),
    "blocks.3.attn.qkv.patch.weight": (0.9 ** 9, 1.0),
    "blocks.3.attn.qkv.prefix.bias": (0.9 ** 9, 0.0),
    "blocks.4.attn.qkv.weight": (0.9 ** 8, 1.0),
    "blocks.7.ls1.prefix.gamma": (0.9 ** 5, 0.0),
    "norm.prefix.weight": (1.0, 0.0),
}
PINNED_ALL = {
    "blocks.5.mlp.fc1.prefix.weight": (0.9 ** 7, 1.0),
    "blocks.11.mlp.fc2.patch.bias": (0.9, 0.0),
    "blocks.11.attn.proj.prefix.weight": (0.9, 1.0),
    "patch_embed.proj.weight": (0.9 ** 13 * 0.2, 1.0),
}


@pytest.mark.parametrize("scale", ["small", "base"])
@pytest.mark.parametrize("specialization", ["none", "paper", "all"])
def test_dinov2_parameter_multipliers_match_the_official_rules(scale, specialization):
    backbone = meta_backbone(scale, specialization)
    got = multipliers(backbone_parameters(backbone), DINOV2_RULES)
    assert set(got) == {name for name, _ in backbone.named_parameters()}
    pinned = {**PINNED, **PINNED_PAPER, **PINNED_ALL}
    present = {name: value for name, value in pinned.items() if name in got}
    expected = {"none": PINNED, "paper": PINNED_PAPER, "all": PINNED_ALL}[specialization]
    assert set(expected) <= set(present)
    for name, (lr_mult, wd_mult) in present.items():
        assert got[name][:2] == (pytest.approx(lr_mult, rel=1e-12), wd_mult), name
    for name, (lr_mult, wd_mult, _) in got.items():  # every parameter: its block's depth, the norm rule
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if block is not None:
            assert lr_mult == pytest.approx(0.9 ** (12 - block)), name
        assert wd_mult == (0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0), name


def test_register_tokens_sit_at_the_top_layer_as_in_dinov2():
    # DINOv2's layer-0 names are pos_embed, patch_embed, mask_token and cls_token: its register tokens
    # are not among them (nor is timm's reg_token), so they take the top layer's lr, and weight decay.
    got = multipliers(backbone_parameters(meta_backbone("small", "paper", reg_tokens=4)), DINOV2_RULES)
    assert got["reg_token"][:2] == (1.0, 1.0)


def test_trainer_rule_is_the_default_and_has_two_groups():
    backbone = meta_backbone("small", "paper")
    groups = parameter_groups(backbone_parameters(backbone))
    assert [(g["lr_multiplier"], g["wd_multiplier"]) for g in groups] == [(1.0, 0.0), (1.0, 1.0)]
    no_decay = {id(p) for p in groups[0]["params"]}
    names = {name for name, p in backbone.named_parameters() if id(p) in no_decay}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.prefix.weight", "blocks.0.ls1.prefix.gamma"} <= names
    assert "blocks.0.attn.qkv.prefix.weight" not in names


def tiny_vit():
    return timm.create_model(tm.MODEL_NAMES["micro"], specialization="paper", num_classes=0, dynamic_img_size=True,
                             init_values=1e-5)


def test_dinov2_meta_arch_groups_mask_token_heads_and_prototypes():
    cfg = TrialConfig(recipe="dinov2", dinov2=dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16))
    meta_arch = build_meta_arch(cfg, tiny_vit, 4, 10)
    assert meta_arch.student["ibot_head"] is meta_arch.student["dino_head"]  # ibot.separate_head: false
    groups = meta_arch.trainable_parameters_groups(GroupRules.of(cfg.optimizer))
    names = {id(p): n for n, p in meta_arch.named_parameters()}
    got = {names[id(p)]: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
           for g in groups for p in g["params"]}
    depth = len(meta_arch.backbone.blocks)
    assert got["mask_token"] == (pytest.approx(0.9 ** (depth + 1)), 1.0, False)  # inside the backbone in DINOv2
    assert got["student.dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert got["student.dino_head.mlp.0.bias"] == (1.0, 0.0, False)
    prototypes = [n for n in got if "last_layer" in n]
    assert prototypes and all(got[n][2] for n in prototypes)
    assert not any(n.startswith("teacher.") for n in got)  # the EMA teacher is not optimized
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in meta_arch.parameters())


def test_shared_ibot_head_trains_and_the_teacher_follows():
    cfg = TrialConfig(recipe="dinov2", dinov2=dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                                                   local_crops=2))
    torch.manual_seed(0)
    meta_arch = build_meta_arch(cfg, tiny_vit, 4, 10)
    assert isinstance(meta_arch, DINOv2MetaArch)
    separate = build_meta_arch(cfg.model_copy(update={"dinov2": cfg.dinov2.model_copy(
        update={"separate_ibot_head": True})}), tiny_vit, 4, 10)
    head_params = sum(p.numel() for p in meta_arch.student["dino_head"].parameters())
    count = lambda m: sum(p.numel() for p in m.student.parameters())  # noqa: E731
    assert count(separate) - count(meta_arch) == head_params
    g = torch.Generator().manual_seed(0)
    batch = dict(global_crops=torch.randn(4, 3, 32, 32, generator=g), local_crops=torch.randn(4, 3, 16, 16, generator=g),
                 batch_size=2)
    out = meta_arch(batch, 0)
    out["loss"].backward()
    assert meta_arch.student["dino_head"].mlp[0].weight.grad is not None
    before = meta_arch.teacher["dino_head"].mlp[0].weight.clone()
    with torch.no_grad():
        meta_arch.student["dino_head"].mlp[0].weight.add_(1.0)
    meta_arch.after_step(0)
    assert not torch.equal(before, meta_arch.teacher["dino_head"].mlp[0].weight)
    assert meta_arch.teacher["ibot_head"] is meta_arch.teacher["dino_head"]


# --- schedules -------------------------------------------------------------------------------------


def official_cosine(base, final, total, warmup=0, start=0.0):
    """CosineScheduler's schedule array, from its formula (numpy.linspace warmup, then cosine)."""
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.linspace(start, base, warmup), cosine))


def test_lr_weight_decay_and_teacher_temperature_match_dinov2_at_every_step():
    total, warmup = 100, 10
    opt = OptimizerConfig(lr=4e-3, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, lr_scaling="sqrt_wrt_1024")
    sched = ScheduleConfig(steps=total, warmup_steps=warmup, batch_size=1024, warmup_form="dinov2")
    lr = official_cosine(4e-3, 1e-6, total, warmup)
    wd = official_cosine(0.04, 0.4, total)
    temp = official_cosine(0.07, 0.07, 30, 30, start=0.04)  # warmup_teacher_temp_epochs 30 of 100
    for step in range(total):
        assert learning_rate(step, opt, sched) == pytest.approx(lr[step], rel=1e-12, abs=1e-15), step
        assert weight_decay(step, opt, sched) == pytest.approx(wd[step], rel=1e-12), step
        expected_temp = temp[step] if step < 30 else 0.07
        assert teacher_temperature(step, total, 0.04, 0.07, warmup_form="dinov2") == pytest.approx(expected_temp), step
    assert learning_rate(warmup - 1, opt, sched) == pytest.approx(4e-3)  # linspace ends on the peak
    assert weight_decay(total, opt, sched) == pytest.approx(0.4)
    constant = OptimizerConfig(weight_decay=0.05)
    assert {weight_decay(s, constant, sched) for s in (0, 50, 99)} == {0.05}


def test_trainer_warmup_form_is_unchanged():
    assert cosine_schedule(5, 100, 1.0, 0.0, 10) == 0.5
    assert cosine_schedule(10, 100, 1.0, 0.0, 10) == 1.0
    assert cosine_schedule(5, 100, 1.0, 0.0, 10, warmup_form="dinov2") == pytest.approx(5 / 9)


def test_prototypes_are_frozen_for_the_first_steps():
    opt = OptimizerConfig(freeze_last_layer_steps=5)
    assert [last_layer_learning_rate(s, 0.1, opt) for s in (0, 4, 5, 6)] == [0.0, 0.0, 0.1, 0.1]


@pytest.mark.parametrize("rule,lr,batch,peak", [
    ("sqrt_wrt_1024", 4e-3, 1024, 4e-3), ("sqrt_wrt_1024", 4e-3, 256, 2e-3),
    ("sqrt_wrt_1024", 4e-3, 2048, 4e-3 * math.sqrt(2)), ("linear_wrt_512", 5e-4, 2048, 2e-3),
    ("none", 2e-3, 64, 2e-3)])
def test_lr_scaling_rules(rule, lr, batch, peak):
    assert peak_learning_rate(OptimizerConfig(lr=lr, lr_scaling=rule), batch) == pytest.approx(peak)


# --- the preset ------------------------------------------------------------------------------------


def test_dinov2_recipe_fills_the_official_defaults_and_the_config_wins():
    cfg = TrialConfig.model_validate({"recipe": "dinov2", "optimizer": {"lr": 1e-3}, "model": {"drop_path_rate": 0.1}})
    assert cfg.framework == "dinov2" and cfg.recipe == "dinov2"
    assert cfg.optimizer.lr == 1e-3  # set by the config
    assert (cfg.optimizer.layer_decay, cfg.optimizer.patch_embed_lr_mult, cfg.optimizer.weight_decay,
            cfg.optimizer.weight_decay_end, cfg.optimizer.min_lr, cfg.optimizer.grad_clip) == (0.9, 0.2, 0.04, 0.4, 1e-6, 3.0)
    assert cfg.optimizer.lr_scaling == "sqrt_wrt_1024" and cfg.optimizer.no_weight_decay == "dinov2"
    assert cfg.model.drop_path_uniform and cfg.model.drop_path_rate == 0.1 and cfg.model.layer_scale_init == 1e-5
    assert (cfg.dinov2.out_dim, cfg.dinov2.head_bottleneck_dim, cfg.dinov2.head_hidden_dim) == (65536, 256, 2048)
    assert not cfg.dinov2.separate_ibot_head and cfg.dinov2.local_crops == 8 and cfg.dinov2.centering == "centering"
    assert cfg.schedule.warmup_form == "dinov2"
    assert TrialConfig.model_validate(cfg.to_dict()) == cfg  # the resolved config is stable
    assert TrialConfig().recipe == "none" and TrialConfig().optimizer.layer_decay == 1.0


def test_recipe_with_another_framework_is_refused_naming_both():
    with pytest.raises(ConfigError, match="recipe dinov2 trains framework dinov2.*framework supervised"):
        parse_config({"recipe": "dinov2", "framework": "supervised"})
    with pytest.raises(ConfigError, match="recipe: Input should be 'none', 'dinov2' or 'deit3'"):
        parse_config({"recipe": "dino"})


def test_uniform_drop_path_gives_every_block_the_rate():
    model = timm.create_model(tm.MODEL_NAMES["micro"], drop_path_rate=0.2, drop_path_uniform=True)
    assert {(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks} == {(0.2, 0.2)}
    ramp = timm.create_model(tm.MODEL_NAMES["micro"], drop_path_rate=0.2)
    assert ramp.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2) and not hasattr(ramp.blocks[0].drop_path1, "drop_prob")


def test_a_dinov2_recipe_trial_applies_each_groups_schedule(tmp_path: Path):
    """Through the training loop: after the last step every group's lr is its multiplier times the
    step's lr, its weight decay the cosine value times its multiplier, the prototypes still frozen."""
    steps = 6
    cfg = parse_config({
        "recipe": "dinov2", "seed": 3,
        "model": {"specialization": "paper", "drop_path_rate": 0.1},
        "data": {"scenes": {"train_size": 64, "val_size": 32}},
        "schedule": {"steps": steps, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": steps, "log_every": 3},
        "optimizer": {"freeze_last_layer_steps": steps},
        "dinov2": {"out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 2},
        "evaluation": {"linear": False, "knn": False, "segmentation": False, "depth": False,
                       "token_interaction": False},
        "tracking": {"enabled": False}, "runtime": {"threads": 1}})
    result = Trial(cfg, tmp_path / "out", log=lambda m: None).run()
    assert result.status == "done", result
    groups = torch.load(tmp_path / "out" / CHECKPOINT_FILE, weights_only=False)["optimizer"]["param_groups"]
    lr = learning_rate(steps - 1, cfg.optimizer, cfg.schedule)
    wd = weight_decay(steps - 1, cfg.optimizer, cfg.schedule)
    assert lr == pytest.approx(cfg.optimizer.lr * math.sqrt(16 / 1024) * (0.5 + 0.5 * math.cos(math.pi * 3 / 4))
                               + 1e-6 * (0.5 - 0.5 * math.cos(math.pi * 3 / 4)))
    assert len({g["lr_multiplier"] for g in groups}) > 3  # the layer-wise decay made groups per depth
    for group in groups:
        expected_lr = 0.0 if group["is_last_layer"] else lr * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr) and group["weight_decay"] == pytest.approx(wd * group["wd_multiplier"])
    assert any(g["is_last_layer"] for g in groups)


def test_dinov2_clips_each_student_module_apart():
    cfg = TrialConfig(recipe="dinov2", dinov2=dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                                                   separate_ibot_head=True))
    meta_arch = build_meta_arch(cfg, tiny_vit, 4, 10)
    groups = meta_arch.grad_clip_groups()
    assert len(groups) == 3 and meta_arch.mask_token in groups[0]
    trainable = [p for p in meta_arch.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for group in groups for p in group)
    for group, scale in zip(groups, (10.0, 0.01, 1.0)):
        for p in group:
            p.grad = torch.full_like(p, scale)
    norms = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in g])).item() for g in groups]
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, 3.0)
    after = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in g])).item() for g in groups]
    assert after[0] == pytest.approx(3.0, rel=1e-4) and after[1] == pytest.approx(norms[1])  # small heads untouched
    shared = build_meta_arch(TrialConfig(recipe="dinov2", dinov2=dict(out_dim=64, head_hidden_dim=32,
                                                                       head_bottleneck_dim=16)), tiny_vit, 4, 10)
    assert len(shared.grad_clip_groups()) == 2  # one head for DINO and iBOT


# --- DeiT-III ----------------------------------------------------------------------------------------


def test_deit3_recipe_fills_readme_revenge_values():
    cfg = TrialConfig(recipe="deit3")
    assert cfg.framework == "supervised"
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.lr_scaling, cfg.optimizer.weight_decay,
            cfg.optimizer.min_lr, cfg.optimizer.grad_clip) == ("lamb", 3e-3, "none", 0.05, 1e-5, None)
    sup = cfg.supervised
    assert (sup.loss, sup.label_smoothing, sup.mixup_alpha, sup.cutmix_alpha, sup.binarize_targets, sup.three_augment) == (
        "bce", 0.0, 0.8, 1.0, True, True)
    assert cfg.data.repeated_augmentation == 3 and cfg.data.eval_crop_ratio == 1.0
    assert cfg.model.drop_path_uniform and cfg.model.layer_scale_init == 1e-4
    assert TrialConfig.model_validate(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="recipe deit3 trains framework supervised"):
        parse_config({"recipe": "deit3", "framework": "dinov2"})


def test_lamb_comes_from_timms_optimizer_factory():
    from timm.optim import Lamb

    from trainer.objectives.param_groups import build_optimizer

    w = torch.nn.Parameter(torch.ones(4, 4))
    groups = [dict(params=[w], lr_multiplier=1.0, wd_multiplier=1.0, is_last_layer=False)]
    assert isinstance(build_optimizer(groups, TrialConfig(recipe="deit3").optimizer, torch.device("cpu")), Lamb)
    assert isinstance(build_optimizer(groups, OptimizerConfig(), torch.device("cpu")), torch.optim.AdamW)


def test_mixed_targets_are_binarized_as_deit3_and_the_draws_are_a_function_of_the_step():
    from timm.data import Mixup

    from trainer.data.scenes import derive_seed
    from trainer.objectives.supervised import BatchMixing

    sup = TrialConfig(recipe="deit3").supervised
    mixing = BatchMixing(sup, num_classes=5, seed=7)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    np.random.seed(123)
    outside = np.random.get_state()[1].copy()
    mixed, targets = mixing(images.clone(), labels, step=4)
    assert np.array_equal(np.random.get_state()[1], outside)  # numpy's global stream is left as it was
    # DeiT-III: timm's Mixup, then targets.gt(0.0) with the BCE loss.
    np.random.seed(derive_seed("mixup", 7, 4, 0) % 2**32)
    ref_images, ref_soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=5)(
        images.clone(), labels)
    assert torch.equal(mixed, ref_images) and torch.equal(targets, ref_soft.gt(0.0).float())
    assert set(targets.unique().tolist()) <= {0.0, 1.0} and (targets.sum(1) >= 1).all()
    again = mixing(images.clone(), labels, step=4)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    assert not torch.equal(mixing(images.clone(), labels, step=5)[0], mixed)
    with pytest.raises(ValueError, match="must be even"):
        mixing(images[:7], labels[:7], step=0)


def test_repeated_augmentation_order_is_one_function_of_the_step_for_any_process_count():
    from trainer.data.transforms import augment_seed
    from trainer.loop import RunBatches, epoch_batches
    from trainer.runtime import Runtime

    def runtime(rank=0, world_size=1):
        return Runtime(torch.device("cpu"), bf16=False, compile=False, rank=rank, world_size=world_size)

    one = runtime()
    batches = epoch_batches(24, 6, seed=1, epoch=0, runtime=one, repeats=3)
    keys = [key for batch in batches for key in batch]
    assert len(keys) == 24 and [copy for _, copy in keys] == [0, 1, 2] * 8  # each image 3 times in a row
    assert all(len({keys[3 * i + c][0] for c in range(3)}) == 1 for i in range(8))
    assert len({index for index, _ in keys}) == 8  # an epoch shows num_samples / repeats images
    # Under 2 processes, each step covers the same keys as one process, the copies on neighbouring ranks.
    ranks = [epoch_batches(24, 6, 1, 0, runtime(r, 2), repeats=3) for r in range(2)]
    for step, batch in enumerate(batches):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
        assert ranks[0][step][0][0] == ranks[1][step][0][0]  # copies 0 and 1 of one image on ranks 0 and 1
    full = list(RunBatches(24, 6, 1, one, 0, 10, repeats=3))
    assert list(RunBatches(24, 6, 1, one, 7, 10, repeats=3)) == full[7:]  # a resume at step 7
    assert len({augment_seed(1, 0, 5, copy) for copy in range(3)}) == 3  # each copy augmented apart
    assert augment_seed(1, 0, 5) == augment_seed(1, 0, 5, 0)  # without repeats: the seeds as before
    plain = epoch_batches(24, 6, 1, 0, one)
    assert [[i for i, _ in b] for b in plain] == [torch.randperm(24, generator=torch.Generator().manual_seed(100_003))
                                                   .tolist()[k:k + 6] for k in range(0, 24, 6)]


def test_a_deit3_recipe_trial_trains_and_reports_the_heads_top1(tmp_path: Path):
    cfg = parse_config({
        "recipe": "deit3", "seed": 1,
        "model": {"specialization": "paper", "drop_path_rate": 0.05},
        "data": {"scenes": {"train_size": 64, "val_size": 32}},
        "schedule": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 6, "log_every": 3},
        "evaluation": {"probe_epochs": 2, "segmentation": False, "depth": False, "token_interaction": False},
        "tracking": {"enabled": False}, "runtime": {"threads": 1}})
    trial = Trial(cfg, tmp_path / "out", log=lambda m: None)
    result = trial.run()
    assert result.status == "done", result
    assert 0.0 <= result.metrics["head_top1"] <= 1.0 and "linear_top1_cls" in result.metrics
    ckpt = torch.load(tmp_path / "out" / CHECKPOINT_FILE, weights_only=False)
    assert {"trust_clip", "max_grad_norm"} <= set(ckpt["optimizer"]["param_groups"][0])  # timm's Lamb

    # head_top1 is the trained classifier's accuracy on the test split, image by image.
    from trainer.data import build_eval_datasets
    from trainer.loop import backbone_factory

    model = backbone_factory(cfg)()
    model.reset_classifier(4)
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["model"].items()
                           if k.startswith("backbone.")})
    model.eval()
    val = build_eval_datasets(cfg).classification[1]
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([int(val[i][1]) for i in range(len(val))])
    with torch.no_grad():
        direct = (model(images).argmax(1) == labels).float().mean().item()
    assert result.metrics["head_top1"] == pytest.approx(direct, abs=1e-6)


def test_eval_crop_ratio_sets_the_resize_before_the_centre_crop(tmp_path: Path):
    from PIL import Image

    from trainer.data import build_eval_datasets

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / split / "a" / "x.png")
        Image.new("RGB", (40, 20), (10, 200, 10)).save(tmp_path / split / "a" / "y.png")
    for ratio, resize in ((0.875, 18), (1.0, 16)):
        cfg = TrialConfig.model_validate({"data": {"dataset": "folders", "classification_root": str(tmp_path),
                                                   "eval_crop_ratio": ratio}, "model": {"img_size": 16}})
        transform = build_eval_datasets(cfg).classification[1].transform
        assert transform.transform.transforms[0].size == [resize]  # int(round(16 / ratio))
