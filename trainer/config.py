"""The typed configuration of one trial: what `python -m trainer --config trial.yaml` reads.

Every section forbids unknown keys, so a typo fails before any work with the key's path and the
allowed keys. The orchestrator validates sweep specs against this same schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.specialization import Specialization
from trainer.yaml_guard import YamlGuardError, safe_load

Scale = Literal["micro", "tiny", "small", "base", "large", "huge"]
Framework = Literal["supervised", "dinov2"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    scale: Scale = "micro"
    # A preset name (`none`, `paper`, `norms`, ...) or a rule string such as
    # `norm1,norm2,final_norm,qkv@first_third`; stored in canonical form so equal sets hash equal.
    specialization: str = "none"
    registers_follow: Literal["cls", "patch"] = "cls"
    reg_tokens: int = Field(0, ge=0)
    img_size: int | None = Field(None, gt=0, description="default: the scale's (32 micro, 224 otherwise)")
    patch_size: int | None = Field(None, gt=0, description="default: the scale's")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    layer_scale_init: float | None = Field(1e-4, description="LayerScale init value; null disables LayerScale")
    pretrained: Path | None = Field(None, description="vanilla timm checkpoint (.pth/.safetensors) to specialize")

    @field_validator("specialization")
    @classmethod
    def _canonical_specialization(cls, value: str) -> str:
        return Specialization.parse(value).canonical()


class ScenesConfig(Section):
    """The built-in procedurally generated dataset (see trainer/data/scenes.py)."""

    num_classes: int = Field(4, ge=2, description="object categories (segmentation has num_classes + 1 with background)")
    train_size: int = Field(4096, gt=0)
    val_size: int = Field(512, gt=0)
    seed: int = 0


class DataConfig(Section):
    dataset: Literal["scenes", "folders"] = "scenes"
    scenes: ScenesConfig = ScenesConfig()
    # Local folders (dataset: folders). Each is optional; an evaluation whose data is missing is skipped.
    classification_root: Path | None = Field(None, description="ImageFolder root with train/ and val/")
    segmentation_root: Path | None = None
    segmentation_layout: Literal["ade20k", "voc"] = "ade20k"
    depth_root: Path | None = Field(None, description="NYU-style root with train/ and val/ image + depth pairs")
    num_workers: int = Field(0, ge=0)
    # Hyperparameter search must never select on the test split (the dataset's val/): it reads
    # metrics on a validation split held out of train/ instead, which nothing trains on.
    val_fraction: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "fraction of each train split held out as the validation split (metrics val/<name>); "
        "the same images for every trial seed"))


class ScheduleConfig(Section):
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0, description="global batch size, split across processes")
    warmup_steps: int = Field(30, ge=0)
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints")
    log_every: int = Field(20, gt=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> "ScheduleConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class OptimizerConfig(Section):
    lr: float = Field(2e-3, gt=0, description="peak learning rate for the global batch size")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)


class SupervisedConfig(Section):
    """DeiT-III: binary cross-entropy on (mixed) one-hot targets, 3-Augment."""

    loss: Literal["bce", "ce"] = "bce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    three_augment: bool = True


class DINOv2Config(Section):
    out_dim: int = Field(1024, gt=0, description="prototypes of the DINO and iBOT heads")
    head_hidden_dim: int = Field(512, gt=0)
    head_bottleneck_dim: int = Field(128, gt=0)
    centering: Literal["centering", "sinkhorn_knopp"] = "sinkhorn_knopp"
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_momentum: float = Field(0.992, ge=0, le=1, description="EMA momentum at the start, cosine to 1")
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1)
    local_crops: int = Field(4, ge=0)
    local_crop_size: int | None = Field(None, gt=0, description="default: img_size * 3/7 rounded to the patch size")
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)


class EvaluationConfig(Section):
    linear: bool = True
    knn: bool = True
    knn_k: int = Field(20, gt=0)
    segmentation: bool = True
    depth: bool = True
    token_interaction: bool = True
    probe_epochs: int = Field(30, gt=0, description="epochs of the linear probes over cached features")
    probe_lr: float = Field(1e-2, gt=0)
    max_train_samples: int | None = Field(2048, gt=0, description="cap on probe training images")
    max_val_samples: int | None = Field(512, gt=0)
    every_steps: int = Field(0, ge=0, description=(
        "steps between intermediate evaluations (linear + k-NN on the validation split, written to "
        "DIR/progress.jsonl; what a search prunes on); 0: none"))


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite:///<repo>/mlflow.db")
    experiment: str = "trials"
    parent_run_id: str | None = None
    run_id: str | None = Field(None, description="continue this MLflow run instead of creating one")
    run_name: str | None = None
    tags: dict[str, str] = {}


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # on: torch.compile; reduce-overhead: torch.compile with CUDA graphs (GPU; fixed shapes, so not
    # for DINOv2's multi-crop); auto: on for GPU, off for CPU.
    compile: Literal["auto", "on", "off", "reduce-overhead"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: torch's")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `on` / `off` as a boolean: take it as meant.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TrialConfig(Section):
    """One training run: model + framework + data + schedule + evaluation."""

    name: str = "trial"
    seed: int = 0
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

    @model_validator(mode="after")
    def _intermediate_needs_validation(self) -> "TrialConfig":
        if self.evaluation.every_steps and not self.data.val_fraction:
            raise ValueError("evaluation.every_steps measures on the validation split: "
                             "set data.val_fraction > 0 (e.g. 0.1), or evaluation.every_steps: 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ConfigError(ValueError):
    """A config that fails validation; the message names each bad key and what is allowed."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed here: {', '.join(_allowed_keys(e['loc'][:-1]))}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  - {path}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = TrialConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_config(data: dict[str, Any], source: str = "config") -> TrialConfig:
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


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

