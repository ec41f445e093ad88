"""The names of the final metrics a trial reports (result.json and its MLflow run), and for each the
setting it takes. Torch-free, so a sweep spec's `report.metrics` is checked before anything runs;
trainer/evaluation and trainer/loop produce them (tests/test_metric_names.py keeps the two in step).
"""

from __future__ import annotations

from trainer.config import TrialConfig
from trainer.contract import VALIDATION_PREFIX
from trainer.specialization import COMPONENT_ORDER, Specialization

# Written for every finished trial: parameter counts (trainer.models.accounting) and cost.
COST_METRICS = ("params_total", "params_vanilla", "params_added", "param_overhead", "flops", "throughput_img_s",
                "wall_time_s", "peak_memory_mb")
# evaluation.<flag> -> the data task it reads and its metrics.
EVALUATION_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear": ("classification", ("linear_top1_cls", "linear_top1_cls_patch")),
    "knn": ("classification", ("knn_top1",)),
    "head_top1": ("classification", ("head_top1",)),
    "segmentation": ("segmentation", ("seg_miou", "seg_pixel_acc")),
    "depth": ("depth", ("depth_rmse", "depth_abs_rel")),
}
# The folder each task reads with data.dataset: folders (classification_root is required there).
TASK_ROOTS = {"classification": "classification_root", "segmentation": "segmentation_root", "depth": "depth_root"}
# evaluation.token_interaction (trainer/evaluation/token_interaction.py): means over the early and
# late blocks, and each block's own values.
TOKEN_STAGE_MEASURES = ("cls_patch_cos_pre", "cls_patch_cos_post", "patch_patch_cos", "type_specific_dims")
TOKEN_BLOCK_MEASURES = ("cls_patch_cos_pre", "cls_patch_cos_post", "patch_patch_cos", "cls_dominant_dims",
                        "patch_dominant_dims")
_LAYER_SCALE = ("ls1", "ls2")
WARMUP_STEPS_UNTIMED = 2  # trainer/loop.py leaves the first steps (allocation, compilation) out of img/s


def metric_table(cfg: TrialConfig) -> dict[str, str | None]:
    """Every final metric name a trial of `cfg` could report -> None when it reports it, else the
    setting that would make it (e.g. `evaluation.segmentation is false: set it to true`)."""
    out: dict[str, str | None] = dict.fromkeys(COST_METRICS)
    if cfg.schedule.steps <= WARMUP_STEPS_UNTIMED:
        out["throughput_img_s"] = f"timed after the first {WARMUP_STEPS_UNTIMED} steps: set schedule.steps above it"
    specialized = {name for name, _ in Specialization.parse(cfg.model.specialization).rules}
    if cfg.model.layer_scale_init is None:
        specialized -= set(_LAYER_SCALE)  # no LayerScale in the model: nothing to specialize
    for component in COMPONENT_ORDER:
        out[f"params_added/{component}"] = None if component in specialized else (
            f"counted only for specialized components: add {component} to model.specialization"
            + (" and set model.layer_scale_init" if component in _LAYER_SCALE and cfg.model.layer_scale_init is None
               else ""))
    measured: dict[str, str | None] = {}
    for flag, (task, names) in EVALUATION_METRICS.items():
        why = None if getattr(cfg.evaluation, flag) else f"evaluation.{flag} is false: set it to true"
        root = TASK_ROOTS[task]
        if why is None and cfg.data.dataset == "folders" and getattr(cfg.data, root) is None:
            why = f"data.dataset folders has no {task} data: set data.{root}"
        if why is None and flag == "head_top1" and (cfg.framework != "supervised" or cfg.evaluation.features != "backbone"):
            why = "the trained classifier's own top-1: only framework supervised (with evaluation.features backbone) has one"
        measured.update(dict.fromkeys(names, why))
    out.update(measured)
    no_split = "measured on the validation split: set data.val_fraction > 0 (e.g. 0.1)"
    out.update({VALIDATION_PREFIX + name: (why or (None if cfg.data.val_fraction else no_split))
                for name, why in measured.items()})
    tokens = None if cfg.evaluation.token_interaction else "evaluation.token_interaction is false: set it to true"
    out.update({f"tokens/{stage}_{m}": tokens for stage in ("early", "late") for m in TOKEN_STAGE_MEASURES})
    out.update({f"tokens/block{i}/{m}": tokens for i in range(cfg.model.resolved_depth) for m in TOKEN_BLOCK_MEASURES})
    return out
