"""The names of the final metrics a trial reports (result.json and its MLflow run), and for each the
setting it takes. Torch-free, so a sweep spec's `report.metrics` is checked before anything runs;
trainer/evaluation and trainer/loop produce them (tests/test_metric_names.py keeps the two in step).
"""

from __future__ import annotations

from trainer.config import TrialConfig
from trainer.config_evaluation import EvaluationConfig, validation_evaluation
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
# evaluation.token_interaction (trainer/evaluation/token_interaction.py): at norm1, means over the
# early and late blocks and each block's own values; at norm2, the means; at the final norm, its values.
TOKEN_COSINES = ("cls_patch_cos_pre", "cls_patch_cos_post", "patch_patch_cos_pre", "patch_patch_cos_post")
TOKEN_STAGE_MEASURES = (*TOKEN_COSINES, "type_specific_dims")
TOKEN_BLOCK_MEASURES = (*TOKEN_COSINES, "cls_dominant_dims", "patch_dominant_dims")
_LAYER_SCALE = ("ls1", "ls2")
WARMUP_STEPS_UNTIMED = 2  # trainer/loop.py leaves the first steps (allocation, compilation) out of img/s


def protocol_metrics(ev: EvaluationConfig) -> dict[str, tuple[str, ...]]:
    """evaluation.<flag> -> the metrics it gives under `ev.protocol` (dinov2: trainer/evaluation/dinov2/)."""
    if ev.protocol == "quick":
        return {flag: names for flag, (_, names) in EVALUATION_METRICS.items()}
    d = ev.dinov2
    return {
        "linear": ("linear_top1_cls", "linear_top1_cls_val", "linear_best_lr", "linear_best_blocks",
                   "linear_best_avgpool"),
        "knn": ("knn_top1", *(f"knn_top1_k{k}" for k in d.knn.ks)),
        "head_top1": ("head_top1",),
        "segmentation": ("seg_miou", "seg_pixel_acc", *(("seg_miou_ms", "seg_pixel_acc_ms")
                                                        if d.segmentation.multi_scale else ())),
        "depth": ("depth_rmse", "depth_abs_rel", "depth_delta1", *(("depth_rmse_lin4", "depth_abs_rel_lin4",
                                                                    "depth_delta1_lin4") if d.depth.four_blocks else ())),
    }


def _evaluation_metrics(cfg: TrialConfig, ev: EvaluationConfig) -> dict[str, str | None]:
    """Each evaluation metric of `ev` -> None when a trial of `cfg` reports it, else why not."""
    measured: dict[str, str | None] = {}
    for flag, names in protocol_metrics(ev).items():
        task = EVALUATION_METRICS[flag][0]
        # Validation turns off the dense probes a dinov2 trial has on (validation_evaluation); the
        # reason a user can act on is the trial's own flag.
        off = not getattr(cfg.evaluation, flag)
        why = f"evaluation.{flag} is false: set it to true" if off else (
            None if getattr(ev, flag) else "not measured on the validation split")
        root = TASK_ROOTS[task]
        if why is None and cfg.data.dataset == "folders" and getattr(cfg.data, root) is None:
            why = f"data.dataset folders has no {task} data: set data.{root}"
        if why is None and flag == "head_top1" and (cfg.framework != "supervised" or ev.features != "backbone"):
            why = "the trained classifier's own top-1: only framework supervised (with evaluation.features backbone) has one"
        measured.update(dict.fromkeys(names, why))
    return measured


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
    measured = _evaluation_metrics(cfg, cfg.evaluation)
    out.update(measured)
    no_split = "measured on the validation split: set data.val_fraction > 0 (e.g. 0.1)"
    out.update({VALIDATION_PREFIX + name: (why or (None if cfg.data.val_fraction else no_split))
                for name, why in _evaluation_metrics(cfg, validation_evaluation(cfg.evaluation)).items()})
    tokens = None if cfg.evaluation.token_interaction else "evaluation.token_interaction is false: set it to true"
    for prefix in ("tokens/", "tokens/norm2/"):
        out.update({f"{prefix}{stage}_{m}": tokens for stage in ("early", "late") for m in TOKEN_STAGE_MEASURES})
    out.update({f"tokens/final_norm/{m}": tokens for m in TOKEN_STAGE_MEASURES})
    out.update({f"tokens/block{i}/{m}": tokens for i in range(cfg.model.resolved_depth) for m in TOKEN_BLOCK_MEASURES})
    return out
