"""Named recipes: the official operating points of a framework as defaults under a trial config.

`recipe: dinov2` or `recipe: deit3` in a trial config (or a sweep's base) fills every key the recipe names that the
config leaves out; keys the config sets win. The resolved config (config.resolved.yaml, the trial
id) holds the filled-in values, so a trial never depends on this table changing later.

What a recipe cannot know is left to the config: lengths in steps (warmup, the prototypes'
freeze: DINOv2 counts them in epochs of 1,250 iterations) and per-scale values (drop path).
Torch-free: the orchestrator validates specs through the trial schema.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

RecipeName = Literal["none", "dinov2", "deit3"]

# DINOv2 (facebookresearch/dinov2): dinov2/configs/ssl_default_config.yaml, which the ImageNet-1k
# config (configs/train/vitl16_short.yaml: "this corresponds to the default config") keeps; schedules
# as dinov2/train/train.py builds them, parameter groups as dinov2/utils/param_groups.py.
DINOV2: dict[str, Any] = {
    "framework": "dinov2",
    "model": {
        "drop_path_uniform": True,        # student.drop_path_uniform: true
        "layer_scale_init": 1.0e-5,       # student.layerscale
    },
    "schedule": {"warmup_form": "dinov2"},  # CosineScheduler's numpy.linspace warmup
    "optimizer": {
        "lr": 4.0e-3,                     # optim.base_lr, for a batch of 1024 ...
        "lr_scaling": "sqrt_wrt_1024",    # ... scaled by optim.scaling_rule
        "min_lr": 1.0e-6,                 # optim.min_lr
        "weight_decay": 0.04,             # optim.weight_decay
        "weight_decay_end": 0.4,          # optim.weight_decay_end
        "no_weight_decay": "dinov2",      # biases, norms, gammas (param_groups.py)
        "layer_decay": 0.9,               # optim.layerwise_decay
        "patch_embed_lr_mult": 0.2,       # optim.patch_embed_lr_mult
        "grad_clip": 3.0,                 # optim.clip_grad, ...
        "clip_per_module": True,          # ... on each student module (train.py: v.clip_grad_norm_)
        "betas": [0.9, 0.999],            # optim.adamw_beta1, adamw_beta2
    },
    "dinov2": {
        "out_dim": 65536,                 # dino.head_n_prototypes (ibot's too)
        "head_hidden_dim": 2048,          # dino.head_hidden_dim
        "head_bottleneck_dim": 256,       # dino.head_bottleneck_dim
        "centering": "centering",         # train.centering
        "separate_ibot_head": False,      # ibot.separate_head: false
        "teacher_momentum": 0.992,        # teacher.momentum_teacher (cosine to final_momentum_teacher 1)
        "teacher_temp": 0.07,             # teacher.teacher_temp
        "warmup_teacher_temp": 0.04,      # teacher.warmup_teacher_temp (over 30 of 100 epochs)
        "ibot_weight": 1.0,               # ibot.loss_weight
        "koleo_weight": 0.1,              # dino.koleo_loss_weight
        "mask_ratio": [0.1, 0.5],         # ibot.mask_ratio_min_max
        "mask_probability": 0.5,          # ibot.mask_sample_probability
        "local_crops": 8,                 # crops.local_crops_number
        "global_crop_scale": [0.32, 1.0],  # crops.global_crops_scale
        "local_crop_scale": [0.05, 0.32],  # crops.local_crops_scale
    },
}

# DeiT-III (facebookresearch/deit): README_revenge.md's ImageNet-1k ViT-B command (`--opt fusedlamb
# --lr 3e-3 --unscale-lr --weight-decay 0.05 --smoothing 0.0 --mixup .8 --cutmix 1.0 --bce-loss
# --repeated-aug --ThreeAugment`), engine.py (targets.gt(0.0) after mixing), models_v2.py
# (uniform drop path, LayerScale init 1e-4), main.py (timm's Mixup; --min-lr 1e-5).
DEIT3: dict[str, Any] = {
    "framework": "supervised",
    "model": {
        "drop_path_uniform": True,        # models_v2.py: dpr = drop_path_rate in every block
        "layer_scale_init": 1.0e-4,       # models_v2.py: init_scale
    },
    "data": {
        "repeated_augmentation": 3,       # --repeated-aug (RASampler, num_repeats 3)
        "eval_crop_ratio": 1.0,           # the DeiT-III paper's test-time crop ratio
    },
    "optimizer": {
        "name": "lamb",                   # --opt fusedlamb (timm's lamb: its port)
        "lr": 3.0e-3,                     # --lr 3e-3 with --unscale-lr: the peak as given
        "lr_scaling": "none",
        "min_lr": 1.0e-5,                 # main.py --min-lr default
        "weight_decay": 0.05,             # --weight-decay 0.05
        "grad_clip": None,                # main.py --clip-grad default None (LAMB bounds its own update)
    },
    "supervised": {
        "loss": "bce",                    # --bce-loss
        "label_smoothing": 0.0,           # --smoothing 0.0
        "three_augment": True,            # --ThreeAugment
        "mixup_alpha": 0.8,               # --mixup .8
        "cutmix_alpha": 1.0,              # --cutmix 1.0
        "binarize_targets": True,         # engine.py: targets.gt(0.0) with --bce-loss
    },
}

RECIPES: dict[str, dict[str, Any]] = {"dinov2": DINOV2, "deit3": DEIT3}


def _fill(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _fill(value, out[key])
        elif key not in out:
            out[key] = copy.deepcopy(value)
    return out


def recipe_conflict(data: dict[str, Any]) -> str | None:
    """Why `data`'s recipe cannot apply (its framework differs), or None."""
    recipe = RECIPES.get(data.get("recipe"))  # type: ignore[arg-type]
    framework = data.get("framework")
    if recipe is not None and framework is not None and framework != recipe["framework"]:
        return (f"recipe {data['recipe']} trains framework {recipe['framework']}, the config sets framework "
                f"{framework}: remove one of them")
    return None


def with_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its recipe's defaults filled in (unchanged without a known recipe)."""
    recipe = RECIPES.get(data.get("recipe")) if isinstance(data.get("recipe"), str) else None
    return data if recipe is None else _fill(recipe, data)
