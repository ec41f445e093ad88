"""`evaluation:` of a trial config: which frozen-feature evaluations run, and with which protocol.

`protocol: quick` (the default) is the cached-feature probes the CPU sweeps use. `protocol: dinov2`
is DINOv2's own evaluation protocols (trainer/evaluation/dinov2/); `evaluation.dinov2` holds their
settings, whose defaults are the official values, each with the file it comes from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config_types import Bool, Float, Int, Section

Protocol = Literal["quick", "dinov2"]


class Dinov2Segmentation(Section):
    """ADE20K linear segmentation ("lin"; "+ms" with `multi_scale`). Sources: the released
    dinov2_vit*14_ade20k_linear_config.py and ..._ms_config.py (mmseg configs linked from
    dinov2/eval/segmentation and notebooks/semantic_segmentation.ipynb), mmseg's pipelines."""

    crop_size: Int = Field(512, gt=0, description="training crop and sliding window (crop_size)")
    short_side: Int = Field(512, gt=0, description="images resized to this short side (img_scale (2048, 512))")
    stride: Int = Field(341, gt=0, description="sliding-window stride (test_cfg stride)")
    scale_range: tuple[Float, Float] = Field((0.5, 2.0), description="training resize ratio_range")
    cat_max_ratio: Float = Field(0.75, gt=0, le=1, description="RandomCrop: largest share of one class in a crop")
    iterations: Int = Field(40_000, gt=0)
    batch_size: Int = Field(16, gt=0, description="global: 2 per GPU x 8 GPUs")
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(1e-4, ge=0)
    warmup_iterations: Int = Field(1500, ge=0)
    warmup_ratio: Float = Field(1e-6, gt=0)
    poly_power: Float = Field(1.0, gt=0)
    ms_scales: tuple[Float, ...] = Field((1.0, 1.32, 1.73, 2.28, 3.0), description=(
        "+ms test scales, each with a flip (*_ms_config.py MultiScaleFlipAug img_ratios)"))
    multi_scale: Bool = Field(True, description="also the +ms head: last 4 blocks, multi-scale + flip at test")


class Dinov2DepthAugmentation(Section):
    """The NYU training pipeline's random steps (dinov2_vitb14_nyu_linear_config.py train_pipeline;
    their code: Monocular-Depth-Estimation-Toolbox transforms.py). `border_crop` (top, bottom, left,
    right) is NYUCrop's box, for 480 x 640 NYU images only: null for other data."""

    border_crop: tuple[Int, Int, Int, Int] | None = (45, 472, 43, 608)
    rotate_prob: Float = Field(0.5, ge=0, le=1)
    rotate_degrees: Float = Field(2.5, ge=0)
    flip_prob: Float = Field(0.5, ge=0, le=1)
    color_prob: Float = Field(0.5, ge=0, le=1)
    gamma_range: tuple[Float, Float] = (0.9, 1.1)
    brightness_range: tuple[Float, Float] = (0.75, 1.25)
    color_range: tuple[Float, Float] = (0.9, 1.1)


class Dinov2Depth(Section):
    """NYUv2 linear depth ("lin. 1"; "lin. 4" with `four_blocks`). Sources: the released
    dinov2_vit*14_nyu_linear_config.py (loaded by notebooks/depth_estimation.ipynb), dinov2/hub/depthers.py,
    dinov2/eval/depth/models/ (linear_head.py, decode_head.py, losses/sigloss.py); the Eigen crop
    and metrics of the Monocular-Depth-Estimation-Toolbox (nyu.py, metrics.py)."""

    n_bins: Int = Field(256, gt=1)
    min_depth: Float = Field(1e-3, gt=0)
    max_depth: Float = Field(10.0, gt=0, description="metres (NYU); the built-in scenes' depths lie in (0, 1]")
    norm_strategy: Literal["linear", "softmax", "sigmoid"] = "linear"
    crop_size: tuple[Int, Int] = (416, 544)
    upsample: Int = Field(4, gt=0)
    iterations: Int = Field(38_400, gt=0)
    batch_size: Int = Field(16, gt=0, description="global: samples_per_gpu 2 x 8 GPUs")
    loss_group_size: Int | None = Field(2, gt=0, description=(
        "images per SigLoss (DINOv2 computes it per GPU: 2); null: one loss over the global batch"))
    lr: Float = Field(5e-3, gt=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    weight_decay: Float = Field(0.01, ge=0)
    momentum_cycle: tuple[Float, Float, Float] | None = Field((0.85, 0.95, 0.3), description=(
        "mmcv OneCycle momentum: Adam beta1 cycled between these (low, high, fraction rising)"))
    warmup_iterations: Int = Field(12_800, ge=0)
    warmup_ratio: Float = Field(1e-3, gt=0)
    min_lr_ratio: Float = Field(1e-8, ge=0)
    grad_clip: Float | None = Field(35.0, gt=0)
    sigloss_warmup_iterations: Int = Field(100, ge=0)
    four_blocks: Bool = Field(True, description="also the lin. 4 head (blocks [2, 5, 8, 11] at depth 12)")
    eval_crop: tuple[Int, Int, Int, Int] | None = Field((45, 471, 41, 601), description=(
        "the Eigen crop (top, bottom, left, right) of 480 x 640 NYU images; null: the whole image"))
    flip_tta: Bool = True
    augmentation: Dinov2DepthAugmentation = Dinov2DepthAugmentation()


class Dinov2Linear(Section):
    """ImageNet linear classification with DINOv2's grid. Source: dinov2/eval/linear.py (its
    argument defaults and `setup_linear_classifiers`), dinov2/data/transforms.py."""

    learning_rates: tuple[Float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
    n_last_blocks: tuple[Int, ...] = (1, 4)
    avgpool: tuple[Bool, ...] = (False, True)
    epochs: Int = Field(10, gt=0)
    iterations_per_epoch: Int = Field(1250, gt=0)
    batch_size: Int = Field(128, gt=0)
    crop_size: Int = Field(224, gt=0)
    resize_size: Int = Field(256, gt=0)


class Dinov2Knn(Section):
    """Weighted k-NN on [CLS]. Source: dinov2/eval/knn.py (nb_knn, temperature)."""

    ks: tuple[Int, ...] = (10, 20, 100, 200)
    temperature: Float = Field(0.07, gt=0)
    resize_size: Int = Field(256, gt=0)
    crop_size: Int = Field(224, gt=0)
    batch_size: Int = Field(256, gt=0)


class Dinov2Protocols(Section):
    segmentation: Dinov2Segmentation = Dinov2Segmentation()
    depth: Dinov2Depth = Dinov2Depth()
    linear: Dinov2Linear = Dinov2Linear()
    knn: Dinov2Knn = Dinov2Knn()


class EvaluationConfig(Section):
    protocol: Protocol = Field("quick", description=(
        "quick: cached-feature probes (the CPU sweeps); dinov2: DINOv2's protocols, settings in evaluation.dinov2"))
    linear: Bool = True
    knn: Bool = True
    head_top1: Bool = Field(True, description="the trained classifier's own top-1 on the test split (supervised)")
    knn_k: Int = Field(20, gt=0)
    segmentation: Bool = True
    depth: Bool = True
    token_interaction: Bool = True
    probe_epochs: Int = Field(30, gt=0, description="epochs of the linear probes over cached features")
    probe_lr: Float = Field(1e-2, gt=0)
    max_train_samples: Int | None = Field(2048, gt=0, description="cap on probe training images")
    max_val_samples: Int | None = Field(512, gt=0)
    every_steps: Int = Field(0, ge=0, description=(
        "steps between intermediate evaluations (linear + k-NN on the validation split, written to "
        "DIR/progress.jsonl; what a search prunes on); 0: none"))
    # pixels: the probes read the raw normalized pixel patches (the model's patch size) instead of
    # the backbone's tokens: the floor a trained backbone must clear (trainer/evaluation/pixels.py).
    features: Literal["backbone", "pixels"] = "backbone"
    dinov2: Dinov2Protocols = Dinov2Protocols()


def validation_evaluation(ev: EvaluationConfig, intermediate: bool = False) -> EvaluationConfig:
    """What is measured on the validation hold-out (the `val/` metrics a search selects on): the
    quick protocol, without the token analysis. Intermediate evaluations (the learning curve a
    search prunes on) and any trial of the dinov2 protocol leave the dense probes out: cached dense
    features do not scale to its datasets, and its own dense heads train for thousands of steps."""
    dense = not intermediate and ev.protocol == "quick"
    return ev.model_copy(update={"protocol": "quick", "token_interaction": False,
                                 "segmentation": ev.segmentation and dense, "depth": ev.depth and dense})
