"""The typed configuration of one trial: what `python -m trainer --config trial.yaml` reads.

Every section forbids unknown keys and takes scalars strictly (`true` is not 1, 10.5 is not 10), so
a typo fails before any work with the key's path and the allowed keys. Values are checked against
the model they build (block ranges vs depth, image vs patch size), and by `check_files` against the
files they name. The orchestrator validates sweep specs against this same schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from trainer.config_evaluation import EvaluationConfig
from trainer.config_errors import (  # noqa: F401 (re-exported: config.ConfigError, ...)
    TRIAL_CHECK, ConfigError, KeyPath, error_message, fail_at, format_problems, format_validation_error)
from trainer.config_types import Bool, Float, Int, Section
from trainer.recipes import RecipeName, recipe_conflict, with_recipe
from trainer.scales import SCALES
from trainer.path_checks import file_problem, folder_problem, tracking_uri_problem
from trainer.specialization import Specialization
from trainer.yaml_guard import YamlGuardError, safe_load

Scale = Literal["micro", "tiny", "small", "base", "large", "huge"]
Framework = Literal["supervised", "dinov2"]
class ModelConfig(Section):
    scale: Scale = "micro"
    # A preset name (`none`, `paper`, `norms`, ...) or a rule string such as
    # `norm1,norm2,final_norm,qkv@first_third`; stored in canonical form so equal sets hash equal.
    specialization: str = "none"
    registers_follow: Literal["cls", "patch"] = "cls"
    reg_tokens: Int = Field(0, ge=0)
    img_size: Int | None = Field(None, gt=0, description="default: the scale's (32 micro, 224 otherwise)")
    patch_size: Int | None = Field(None, gt=0, description="default: the scale's")
    drop_path_rate: Float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_uniform: Bool = Field(False, description=(
        "every block drops at drop_path_rate (DINOv2, DeiT-III); false: timm's ramp from 0 to it"))
    layer_scale_init: Float | None = Field(1e-4, description="LayerScale init value; null disables LayerScale")
    pretrained: Path | None = Field(None, description="vanilla timm checkpoint (.pth/.safetensors) to specialize")
    resample_pretrained: bool = Field(False, description=(
        "resample a checkpoint's patch embedding / position grid to the model's; off: a mismatch is refused "
        "(a resampled model no longer computes the checkpoint's function)"))
    no_embed_class: bool = Field(False, description=(
        "no position embedding on [CLS] (DeiT-III's layout, DINOv2 with registers as timm ports it)"))
    # Architecture overrides (default: the scale's). The parameter-matched control widens the MLP.
    embed_dim: Int | None = Field(None, gt=0)
    depth: Int | None = Field(None, gt=0)
    num_heads: Int | None = Field(None, gt=0)
    mlp_ratio: Float | None = Field(None, gt=0)
    match_params_of: str | None = Field(None, description=(
        "a specialization: widen this vanilla model's MLP to its parameter count (the paper's "
        "parameter-matched control; trainer/models/matching.py)"))

    @field_validator("specialization", "match_params_of")
    @classmethod
    def _canonical_specialization(cls, value: str | None) -> str | None:
        return None if value is None else Specialization.parse(value).canonical()

    @property
    def resolved_depth(self) -> int:
        return self.depth or int(SCALES[self.scale]["depth"])

    def architecture(self) -> dict[str, Any]:
        """The timm constructor's size arguments this config overrides (empty: the scale's own)."""
        keys = ("embed_dim", "depth", "num_heads", "mlp_ratio")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def resolved_img_size(self) -> int:
        return self.img_size or int(SCALES[self.scale]["img_size"])

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size or int(SCALES[self.scale]["patch_size"])

    @model_validator(mode="after")
    def _fits_the_model(self) -> "ModelConfig":
        problems = []
        depth = self.resolved_depth
        if found := Specialization.parse(self.specialization).depth_problems(depth):
            source = f"model.depth {depth}" if self.depth else f"model.scale {self.scale}"
            problems.append((("specialization",), f"{'; '.join(found)} ({source} has blocks 0 to "
                             f"{depth - 1}): use indices below {depth}, first:N or last:N with N <= "
                             f"{depth}, or a relative range (first_third, last_half, ...)", self.specialization))
        if self.match_params_of is not None:
            if not Specialization.parse(self.specialization).is_vanilla:
                problems.append((("match_params_of",), "the parameter-matched control is a vanilla model: set "
                                 "model.specialization: none, or drop model.match_params_of", self.match_params_of))
            if self.mlp_ratio is not None:
                problems.append((("mlp_ratio",), "model.match_params_of chooses the MLP ratio: drop model.mlp_ratio",
                                 self.mlp_ratio))
        width, heads = self.embed_dim or int(SCALES[self.scale]["embed_dim"]), self.num_heads or int(SCALES[self.scale]["num_heads"])
        if width % heads:
            problems.append((("embed_dim" if self.embed_dim else "num_heads",), f"embed_dim {width} is not divisible by "
                             f"num_heads {heads}: attention splits the width into equal heads; choose a multiple",
                             self.embed_dim or self.num_heads))
        img, patch = self.resolved_img_size, self.resolved_patch_size
        if img % patch:
            default = f"model.scale {self.scale}'s default"
            sizes = (f"image size {img} ({'model.img_size' if self.img_size else default}) is not a multiple of the "
                     f"patch size {patch} ({'model.patch_size' if self.patch_size else default})")
            problems.append((("img_size" if self.img_size else "patch_size",), f"{sizes}: {img % patch} pixel rows and "
                             f"columns would be dropped; use model.img_size {img - img % patch} or "
                             f"{img - img % patch + patch}, or a patch size that divides {img}", None))
        if problems:
            raise fail_at(problems)
        return self


class ScenesConfig(Section):
    """The built-in procedurally generated dataset (see trainer/data/scenes.py)."""

    num_classes: Int = Field(4, ge=2, description="object categories (segmentation has num_classes + 1 with background)")
    train_size: Int = Field(4096, gt=0)
    val_size: Int = Field(512, gt=0)
    seed: Int = 0


class DataConfig(Section):
    dataset: Literal["scenes", "folders"] = "scenes"
    scenes: ScenesConfig = ScenesConfig()
    # Local folders (dataset: folders). Each is optional; an evaluation whose data is missing is skipped.
    classification_root: Path | None = Field(None, description="ImageFolder root with train/ and val/")
    segmentation_root: Path | None = None
    segmentation_layout: Literal["ade20k", "voc"] = "ade20k"
    depth_root: Path | None = Field(None, description="NYU-style root with train/ and val/ image + depth pairs")
    num_workers: Int = Field(0, ge=0)
    repeated_augmentation: Int = Field(1, ge=1, description=(
        "copies of each training image per epoch, each augmented apart (DeiT-III's --repeated-aug: 3); 1: off"))
    eval_crop_ratio: Float = Field(0.875, gt=0, le=1, description=(
        "folders: evaluation resizes the short side to img_size / ratio, then centre-crops (DeiT-III: 1.0)"))
    # Hyperparameter search must never select on the test split (the dataset's val/): it reads
    # metrics on a validation split held out of train/ instead, which nothing trains on.
    val_fraction: Float = Field(0.0, ge=0.0, lt=0.5, description=(
        "fraction of each train split held out as the validation split (metrics val/<name>); "
        "the same images for every trial seed"))


class ScheduleConfig(Section):
    steps: Int = Field(300, ge=0, description="training steps; 0: evaluate the initial model (a control)")
    batch_size: Int = Field(64, gt=0, description="global batch size, split across processes")
    warmup_steps: Int = Field(30, ge=0)
    warmup_form: Literal["trainer", "dinov2"] = Field("trainer", description=(
        "trainer: the lr (and DINOv2's teacher temperature) reaches its peak at step warmup_steps; dinov2: at "
        "the warmup's last step, as numpy.linspace in DINOv2's CosineScheduler"))
    checkpoint_every: Int = Field(100, gt=0, description="steps between checkpoints")
    log_every: Int = Field(20, gt=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "ScheduleConfig":
        if self.steps == 0 and self.warmup_steps:
            raise fail_at([(("warmup_steps",), f"warmup_steps ({self.warmup_steps}) must be 0 with steps 0 (the "
                            "initial model is evaluated, nothing is trained): set schedule.warmup_steps: 0",
                            self.warmup_steps)])
        if self.warmup_steps >= self.steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "lamb"] = Field("adamw", description="adamw (torch) or lamb (timm's, DeiT-III's fusedlamb)")
    lr: Float = Field(2e-3, gt=0, description="peak learning rate for the global batch size (see lr_scaling)")
    lr_scaling: Literal["none", "sqrt_wrt_1024", "linear_wrt_512"] = Field("none", description=(
        "none: lr is the peak; sqrt_wrt_1024 (DINOv2): peak = lr * sqrt(batch_size / 1024); linear_wrt_512 "
        "(DeiT): peak = lr * batch_size / 512"))
    min_lr: Float = Field(1e-5, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    weight_decay_end: Float | None = Field(None, ge=0, description=(
        "cosine from weight_decay to this over the run (DINOv2: 0.04 -> 0.4); null: constant"))
    no_weight_decay: Literal["trainer", "dinov2"] = Field("trainer", description=(
        "trainer: no decay for ndim <= 1, positions and tokens; dinov2: for biases, norms and gammas"))
    layer_decay: Float = Field(1.0, gt=0, le=1, description="layer-wise lr decay (DINOv2 ImageNet-1k: 0.9)")
    patch_embed_lr_mult: Float = Field(1.0, gt=0, description="lr multiplier of the patch embedding (DINOv2: 0.2)")
    freeze_last_layer_steps: Int = Field(0, ge=0, description=(
        "steps the DINO / iBOT prototypes stay frozen (DINOv2: freeze_last_layer_epochs 1)"))
    betas: tuple[Float, Float] = (0.9, 0.999)
    grad_clip: Float | None = Field(1.0, gt=0)
    clip_per_module: Bool = Field(False, description=(
        "clip each trained module's gradient norm apart (DINOv2: backbone, DINO head, iBOT head); false: one global norm"))


class SupervisedConfig(Section):
    """DeiT-III: binary cross-entropy on (mixed) one-hot targets, 3-Augment."""

    loss: Literal["bce", "ce"] = "bce"
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    three_augment: Bool = True
    mixup_alpha: Float = Field(0.0, ge=0, description="timm Mixup's beta(alpha, alpha) mixing; 0: off (DeiT-III: 0.8)")
    cutmix_alpha: Float = Field(0.0, ge=0, description="timm Mixup's CutMix; 0: off (DeiT-III: 1.0)")
    binarize_targets: Bool = Field(True, description=(
        "with bce, every class a mixed sample contains is a target of 1 (DeiT-III's engine.py: targets.gt(0.0))"))

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class DINOv2Config(Section):
    out_dim: Int = Field(1024, gt=0, description="prototypes of the DINO and iBOT heads")
    head_hidden_dim: Int = Field(512, gt=0)
    head_bottleneck_dim: Int = Field(128, gt=0)
    centering: Literal["centering", "sinkhorn_knopp"] = "sinkhorn_knopp"
    student_temp: Float = Field(0.1, gt=0)
    teacher_temp: Float = Field(0.07, gt=0)
    warmup_teacher_temp: Float = Field(0.04, gt=0)
    teacher_momentum: Float = Field(0.992, ge=0, le=1, description="EMA momentum at the start, cosine to 1")
    separate_ibot_head: Bool = Field(True, description=(
        "an iBOT head of its own; false: the DINO head scores the masked patches too (DINOv2's ibot.separate_head)"))
    ibot_weight: Float = Field(1.0, ge=0)
    koleo_weight: Float = Field(0.1, ge=0)
    mask_ratio: tuple[Float, Float] = (0.1, 0.5)
    mask_probability: Float = Field(0.5, ge=0, le=1)
    local_crops: Int = Field(4, ge=0)
    local_crop_size: Int | None = Field(None, gt=0, description="default: img_size * 3/7 rounded to the patch size")
    global_crop_scale: tuple[Float, Float] = (0.32, 1.0)
    local_crop_scale: tuple[Float, Float] = (0.05, 0.32)


class TrackingConfig(Section):
    enabled: Bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite:///<repo>/mlflow.db")
    experiment: str = "trials"
    parent_run_id: str | None = None
    run_id: str | None = Field(None, description="continue this MLflow run instead of creating one")
    run_name: str | None = None
    tags: dict[str, str] = {}

    @field_validator("tracking_uri")
    @classmethod
    def _mlflow_store(cls, value: str | None) -> str | None:
        if value is not None and (problem := tracking_uri_problem(value)):
            raise ValueError(problem)
        return value


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # on: torch.compile; reduce-overhead: torch.compile with CUDA graphs (GPU; fixed shapes, so not
    # for DINOv2's multi-crop); auto: on for GPU, off for CPU.
    compile: Literal["auto", "on", "off", "reduce-overhead"] = "auto"
    threads: Int | None = Field(None, gt=0, description="torch intra-op threads; default: torch's")
    # Evaluation runs on rank 0 while the other ranks wait in a barrier: torch's default process
    # group timeout (10 min for NCCL, 30 for gloo) would fail a trial whose training finished.
    dist_timeout_min: Float = Field(180.0, gt=0, description=(
        "minutes a distributed collective may wait (init_process_group timeout); longer than the "
        "longest evaluation"))

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `on` / `off` as a boolean: take it as meant.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TrialConfig(Section):
    """One training run: model + framework + data + schedule + evaluation."""

    name: str = "trial"
    seed: Int = 0
    recipe: RecipeName = Field("none", description=(
        "defaults from an official recipe (trainer/recipes.py) for every key the config leaves out"))
    framework: Framework = "supervised"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    dinov2: DINOv2Config = DINOv2Config()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="before")
    @classmethod
    def _fill_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if conflict := recipe_conflict(data):
            raise fail_at([(("framework",), conflict, data.get("framework"))])
        return with_recipe(data)

    @model_validator(mode="after")
    def _sections_agree(self) -> "TrialConfig":
        steps = self.schedule.steps
        if self.evaluation.features == "pixels" and steps:
            raise fail_at([(("evaluation", "features"), f"evaluation.features pixels trains nothing: set "
                            f"schedule.steps: 0 (got {steps}), or evaluation.features: backbone", "pixels")])
        if self.evaluation.every_steps and not steps:
            raise fail_at([(("evaluation", "every_steps"), "evaluation.every_steps evaluates during training and "
                            "schedule.steps 0 trains nothing: set evaluation.every_steps: 0",
                            self.evaluation.every_steps)])
        if self.evaluation.every_steps and not self.data.val_fraction:
            raise ValueError("evaluation.every_steps measures on the validation split: "
                             "set data.val_fraction > 0 (e.g. 0.1), or evaluation.every_steps: 0")
        crop, patch = self.dinov2.local_crop_size, self.model.resolved_patch_size
        if self.framework == "dinov2" and crop is not None and crop % patch:
            fits = f"{max(patch, crop - crop % patch)} or {crop - crop % patch + patch}"
            raise fail_at([(("dinov2", "local_crop_size"), f"local_crop_size {crop} is not a multiple of the patch "
                            f"size {patch} (model.patch_size or the scale's): use {fits}", crop)])
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_config(data: dict[str, Any], source: str = "config") -> TrialConfig:
    """`data` as the TrialConfig of a trial to run here: valid, trainable, and the files it names exist."""
    try:
        cfg = TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, TrialConfig)) from None
    if problems := training_problems(cfg) + check_files(cfg):
        raise ConfigError(format_problems(source, problems))
    return cfg


def training_problems(cfg: TrialConfig) -> list[tuple[KeyPath, str]]:
    """What a valid config may leave out but a trial cannot train without, as (key path, message).
    (Evaluation alone may use such a config: build_eval_datasets skips the folders it lacks.)"""
    if cfg.data.dataset == "folders" and cfg.data.classification_root is None:
        return [(("data", "dataset"), "folders trains on an ImageFolder root: set data.classification_root (a folder "
                 "with train/ and val/), or data.dataset: scenes")]
    return []


def check_files(cfg: TrialConfig) -> list[tuple[KeyPath, str]]:
    """The folders and files `cfg` names that this machine lacks or cannot read, as (key path,
    message): a trial would fail on them only after its start-up. Relative paths are relative to
    the working directory, as the trainer reads them."""
    problems = []
    data = cfg.data
    if data.dataset == "folders":  # the scenes dataset reads no folder
        roots = {"classification_root": ("train", "val"), "segmentation_root": (), "depth_root": ("train", "val")}
        for key, parts in roots.items():
            root = getattr(data, key)
            if root is not None and (problem := folder_problem(Path(root), parts)):
                problems.append((("data", key), problem))
    if cfg.model.pretrained is not None and (problem := file_problem(Path(cfg.model.pretrained))):
        problems.append((("model", "pretrained"), problem))
    return problems


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a config file (before validation), with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = safe_load(path.read_text()) or {}
    except YamlGuardError as err:
        raise ConfigError(f"{path}: {err}" + (f" (line {err.line})" if err.line else "")) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data

