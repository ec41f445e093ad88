"""How each metric is shown: display name, unit, scale, direction, and which columns it gets.

`report.metrics` in a spec lists metric names; the names below get nice labels, everything else
falls back to a generic spec whose direction is guessed from the name (rmse/loss/error: lower).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.metric_names import TOKEN_COSINES

QUALITY = "quality"  # the main table: value, paired delta, interval, verdict; bolded best
COST = "cost"  # the cost table: value and change to the reference (params, FLOPs, throughput)
DESCRIPTIVE = "descriptive"  # the token table: value only, no better/worse (token cosines)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the key in MLflow / result.json
    label: str
    unit: str = ""  # shown in the column header
    scale: float = 1.0  # display value = raw value * scale (fractions -> %)
    decimals: int = 2
    higher_is_better: bool | None = None  # None: neither (no bold, no "gain"/"drop" wording)
    kind: str = QUALITY
    delta_unit: str | None = None  # e.g. "pts" for differences of percentages

    @property
    def arrow(self) -> str:
        return {True: " ↑", False: " ↓"}.get(self.higher_is_better, "")

    @property
    def header(self) -> str:
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.label}{unit}{self.arrow}"

    @property
    def difference_unit(self) -> str:
        """The unit of a difference of two values (`pts` for percentages), else the value's unit."""
        return self.delta_unit if self.delta_unit is not None else self.unit

    @property
    def delta_header(self) -> str:
        unit = self.difference_unit
        return f"Δ {self.label}" + (f" ({unit})" if unit else "")

    def display(self, raw: float) -> float:
        return raw * self.scale


def _pct(name: str, label: str) -> MetricSpec:
    return MetricSpec(name, label, unit="%", scale=100.0, decimals=2, higher_is_better=True, delta_unit="pts")


TOKEN_STAGES = ("early", "late")
_TOKEN_PAIRS = {"cls_patch": "[CLS]-patch", "patch_patch": "patch-patch"}


def _token_header(measure: str) -> str:
    """`cls_patch_cos_pre` -> `[CLS]-patch before` (trainer/metric_names.py owns the names)."""
    pair, when = measure.rsplit("_cos_", 1)
    return f"{_TOKEN_PAIRS[pair]} {'before' if when == 'pre' else 'after'}"


KNOWN_METRICS: dict[str, MetricSpec] = {m.name: m for m in [
    _pct("linear_top1_cls", "Linear top-1 [CLS]"),
    _pct("linear_top1_cls_patch", "Linear top-1 [CLS]+patch"),
    _pct("knn_top1", "k-NN top-1"),
    _pct("head_top1", "Head top-1"),  # the trained classifier itself (supervised), as DeiT-III reports
    _pct("seg_miou", "Seg. mIoU"),
    _pct("seg_pixel_acc", "Seg. pixel acc."),
    MetricSpec("depth_rmse", "Depth RMSE", decimals=4, higher_is_better=False),
    MetricSpec("depth_abs_rel", "Depth AbsRel", decimals=4, higher_is_better=False),
    MetricSpec("params_total", "Params", unit="M", scale=1e-6, decimals=2, higher_is_better=False, kind=COST),
    MetricSpec("params_added", "Added params", unit="M", scale=1e-6, decimals=3, higher_is_better=False, kind=COST),
    MetricSpec("param_overhead", "Param overhead", unit="%", scale=100.0, decimals=2, higher_is_better=False, kind=COST),
    MetricSpec("flops", "FLOPs", unit="G", scale=1e-9, decimals=2, higher_is_better=False, kind=COST),
    # "indicative": trials that share a machine's cores measure each other's load as much as the model.
    MetricSpec("throughput_img_s", "Train throughput, indicative", unit="img/s", decimals=0, higher_is_better=True,
               kind=COST),
    MetricSpec("wall_time_s", "Wall time", unit="s", decimals=0, higher_is_better=False, kind=COST),
    MetricSpec("peak_memory_mb", "Peak memory", unit="MB", decimals=0, higher_is_better=False, kind=COST),
    # Short headers (the legend spells them out): the paper sees the [CLS]-patch cosine clearly
    # positive before norm1 and about 0 after it, the patch-patch cosine positive on both sides;
    # showing only "after" would hide a trivial 0.
    *(MetricSpec(f"tokens/{stage}_{measure}", f"{stage}, {_token_header(measure)}", decimals=3, kind=DESCRIPTIVE)
      for stage in TOKEN_STAGES for measure in TOKEN_COSINES),
]}

# Always shown around the spec's quality metrics: what specialization costs, and what it does to
# token interaction (the paper's mechanism), so every table answers "at which price, and why".
COST_COLUMNS = ("params_total", "flops", "throughput_img_s")
DEFAULT_REPORT_METRICS = ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse")  # when a spec names none
TOKEN_COLUMNS = tuple(f"tokens/{stage}_{measure}" for stage in TOKEN_STAGES for measure in TOKEN_COSINES)
LOWER_IS_BETTER_HINTS = ("rmse", "abs_rel", "loss", "error", "err", "_mae", "mse", "latency", "time", "memory")
HIGHER_IS_BETTER_HINTS = ("top1", "top5", "acc", "miou", "iou", "map", "f1", "auc", "throughput")


def guess_direction(name: str) -> bool | None:
    lowered = name.lower()
    if any(h in lowered for h in LOWER_IS_BETTER_HINTS):
        return False
    if any(h in lowered for h in HIGHER_IS_BETTER_HINTS):
        return True
    return None


def metric_spec(name: str) -> MetricSpec:
    if name in KNOWN_METRICS:
        return KNOWN_METRICS[name]
    return MetricSpec(name, name, decimals=4, higher_is_better=guess_direction(name))


def table_metrics(report_metrics: list[str] | tuple[str, ...]) -> list[MetricSpec]:
    """Cost columns, then the spec's metrics (as quality columns, in its order), then token columns."""
    report_metrics = list(report_metrics) or list(DEFAULT_REPORT_METRICS)
    chosen: list[MetricSpec] = [metric_spec(n) for n in COST_COLUMNS if n not in report_metrics]
    chosen += [metric_spec(name) for name in report_metrics]
    chosen += [metric_spec(n) for n in TOKEN_COLUMNS if n not in report_metrics]
    return chosen
