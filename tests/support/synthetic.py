"""A synthetic sweep for the report's benchmark and tests: a real spec file, result.json files and
a real (SQLite) MLflow store, with known effects plus seed noise, and nothing trained.

Numbers are deterministic per (cell, seed), so tests can recompute the expected statistics.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.mlflow_store import (
    CELL_TAG_PREFIX,
    CODE_VERSION_TAG,
    FAILURE_CLASS_TAG,
    PARENT_ROLE_TAG,
    PARENT_RUN_TAG,
    SEED_TAG,
    SPEC_HASH_TAG,
    SWEEP_HASH_TAG,
    SWEEP_NAME_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    config_params,
    final_metrics,
    prepare_sqlite_store,
)
from orchestrator.store import ProjectPaths
from trainer.contract import TrialResult, write_result

# value name -> specialization string the trainer's schema accepts
SPECIALIZATIONS: dict[str, str] = {
    "none": "none",
    "norms": "norms",
    "qkv_first_third": "qkv_first_third",
    "paper": "paper",
    "all": "all",
    "ls": "ls1,ls2",
    "proj": "proj",
    "mlp": "mlp",
    "qkv_all": "qkv",
    "qkv_last_third": "qkv@last_third",
}
# True effects over `none`, in logged units: (seg_miou, linear_top1_cls, knn_top1, depth_rmse).
EFFECTS: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "norms": (0.010, 0.000, 0.001, -0.010),
    "qkv_first_third": (0.008, 0.001, 0.000, -0.008),
    "paper": (0.021, -0.001, 0.002, -0.025),
    "all": (0.012, -0.012, -0.010, -0.015),
    "ls": (0.002, 0.000, 0.000, -0.001),
    "proj": (0.001, -0.002, -0.001, 0.000),
    "mlp": (0.004, -0.006, -0.004, -0.004),
    "qkv_all": (0.006, -0.003, -0.002, -0.006),
    "qkv_last_third": (0.000, 0.000, 0.000, 0.000),
}
DEPTH = {"micro": 6, "tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32}
PARAMS = {"micro": 0.3e6, "tiny": 5.7e6, "small": 22e6, "base": 86.6e6, "large": 304e6, "huge": 632e6}
FLOPS = {"micro": 0.02e9, "tiny": 1.26e9, "small": 4.6e9, "base": 17.6e9, "large": 61.6e9, "huge": 167e9}
SEED_NOISE = 0.004  # std of the per-seed noise on accuracy-like metrics


def write_spec(directory: Path, *, name: str = "synthetic_ablation", specializations: Sequence[str] = ("none", "paper"),
               frameworks: Sequence[str] = ("supervised",), scales: Sequence[str] = ("micro",),
               seeds: Sequence[int] = (0, 1, 2), compare: list | None = None, metrics: list[str] | None = None,
               tracking_uri: str | None = None, output_dir: str | None = None) -> Path:
    """A sweep spec YAML with axes specialization / framework / scale (single-valued axes omitted)."""
    axes: dict[str, Any] = {"specialization": {"key": "model.specialization",
                                               "values": {v: SPECIALIZATIONS[v] for v in specializations}}}
    if len(frameworks) > 1:
        axes["framework"] = {"key": "framework", "values": {f: f for f in frameworks}}
    if len(scales) > 1:
        axes["scale"] = {"key": "model.scale", "values": {s: s for s in scales}}
    spec: dict[str, Any] = {
        "name": name,
        "output_dir": output_dir or str(Path(directory) / "sweeps" / name),
        "base": {"framework": frameworks[0], "model": {"scale": scales[0]}},
        "axes": axes,
        "baseline": {"specialization": specializations[0]},
        "seeds": list(seeds),
    }
    if tracking_uri:
        spec["tracking"] = {"tracking_uri": tracking_uri}
    report: dict[str, Any] = {}
    if compare is not None:
        report["compare"] = compare
    if metrics is not None:
        report["metrics"] = metrics
    if report:
        spec["report"] = report
    path = Path(directory) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rng(cell: Mapping[str, str], seed: int) -> random.Random:
    key = "|".join(f"{k}={v}" for k, v in sorted(cell.items())) + f"|seed={seed}"
    return random.Random(zlib.crc32(key.encode()))


def synthetic_metrics(cell: Mapping[str, str], seed: int) -> dict[str, Any]:
    """result.json-shaped numbers: effect of the specialization + a shared per-seed offset + noise.

    The shared offset (same for every cell of a seed) is what paired deltas cancel.
    """
    variant = cell.get("specialization", "none")
    scale = cell.get("scale", "micro")
    framework = cell.get("framework", "supervised")
    miou_fx, top1_fx, knn_fx, rmse_fx = EFFECTS.get(variant, (0.0, 0.0, 0.0, 0.0))
    if framework == "supervised" and scale in ("large", "huge"):  # the paper: gains shrink for DeiT-III at L
        miou_fx, rmse_fx = miou_fx / 3, rmse_fx / 3
    shared = random.Random(seed * 7919).gauss(0.0, 2 * SEED_NOISE)
    rng = _rng(cell, seed)
    noise = lambda: rng.gauss(0.0, SEED_NOISE)  # noqa: E731
    depth = DEPTH.get(scale, 12)
    specialized = variant != "none"
    metrics: dict[str, float] = {
        "linear_top1_cls": 0.62 + top1_fx + shared + noise(),
        "linear_top1_cls_patch": 0.64 + top1_fx + shared + noise(),
        "knn_top1": 0.55 + knn_fx + shared + noise(),
        "seg_miou": 0.31 + miou_fx + shared + noise(),
        "seg_pixel_acc": 0.71 + miou_fx + shared + noise(),
        "depth_rmse": 0.52 + rmse_fx - shared + noise(),
        "depth_abs_rel": 0.16 + rmse_fx / 3 + noise() / 3,
    }
    for i in range(depth):
        pre = 0.55 + 0.3 * i / depth + rng.gauss(0, 0.01)
        post = (0.02 if specialized else 0.10) * (1 - i / depth) + rng.gauss(0, 0.005)
        metrics[f"tokens/block{i}/cls_patch_cos_pre"] = pre
        metrics[f"tokens/block{i}/cls_patch_cos_post"] = post
        metrics[f"tokens/block{i}/patch_patch_cos_pre"] = 0.45 + rng.gauss(0, 0.01)
        metrics[f"tokens/block{i}/patch_patch_cos_post"] = 0.4 + rng.gauss(0, 0.01)
        metrics[f"tokens/block{i}/cls_dominant_dims"] = 0.05 + 0.1 * i / depth
        metrics[f"tokens/block{i}/patch_dominant_dims"] = 0.04 + 0.1 * i / depth
    third = max(1, round(depth / 3))
    for stage, blocks in (("early", range(third)), ("late", range(depth - third, depth))):
        for measure in ("cls_patch_cos_pre", "cls_patch_cos_post", "patch_patch_cos_pre", "patch_patch_cos_post"):
            values = [metrics[f"tokens/block{i}/{measure}"] for i in blocks]
            metrics[f"tokens/{stage}_{measure}"] = sum(values) / len(values)
        metrics[f"tokens/{stage}_type_specific_dims"] = 0.1
    return metrics


def synthetic_result(cell: Mapping[str, str], seed: int, failure_class: str | None = None,
                     run_id: str | None = None) -> dict[str, Any]:
    if failure_class:
        return {"status": "failed", "failure_class": failure_class, "error": f"synthetic {failure_class}",
                "metrics": {}, "mlflow_run_id": run_id}
    scale = cell.get("scale", "micro")
    variant = cell.get("specialization", "none")
    vanilla = int(PARAMS.get(scale, 1e6))
    added = 0 if variant == "none" else int(vanilla * (0.0823 if "qkv" in SPECIALIZATIONS.get(variant, variant)
                                                        or variant in ("paper", "all") else 0.0004))
    rng = _rng(cell, seed + 10_000)
    return {
        "status": "done", "failure_class": None, "error": None,
        "metrics": synthetic_metrics(cell, seed),
        "params": {"params_total": vanilla + added, "params_vanilla": vanilla, "params_added": added,
                   "param_overhead": added / vanilla,
                   **{f"params_added/{c}": added // 4 for c in ("norm1", "norm2", "final_norm", "qkv")}},
        "flops": int(FLOPS.get(scale, 1e9)),
        "throughput_img_s": 900.0 * (0.97 if added else 1.0) + rng.gauss(0, 15),
        "wall_time_s": 120.0 + rng.gauss(0, 5),
        "peak_memory_mb": 812.0,
        "steps": 300,
        "mlflow_run_id": run_id,
    }


def write_results(paths: ProjectPaths, results: Mapping[str, Mapping[str, Any]]) -> None:
    """Each result as the trainer writes it: `result.json` in the trial's folder of the shared store."""
    for trial_id, result in results.items():
        write_result(paths.trial(trial_id).path, as_result(result))


def as_result(result: Mapping[str, Any]) -> TrialResult:
    parsed = TrialResult.from_dict(result)
    assert parsed is not None, f"not a result: {result}"
    return parsed


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a child run carries (the tracker's rule)."""
    return final_metrics(as_result(result))


def populate_mlflow(tracking_uri: str, experiment: str, sweep: str, plans: Iterable,
                    results: Mapping[str, Mapping[str, Any]], *, spec_hash: str = "", code_version: str = "",
                    code_version_of: Mapping[str, str] | None = None) -> dict[str, str]:
    """A parent run and one child per trial that has a result (FINISHED or FAILED), as the runner
    logs them; returns trial_id -> run_id. Slow-ish (one SQLite transaction per call): not timed."""
    from mlflow.entities import Metric, Param  # heavy: only the tests that need a store pay for it
    from mlflow.tracking import MlflowClient

    prepare_sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    parent = client.create_run(experiment_id, run_name=sweep, tags={PARENT_ROLE_TAG: "parent", SWEEP_NAME_TAG: sweep,
                                                                     SWEEP_HASH_TAG: spec_hash})
    run_ids: dict[str, str] = {}
    now = int(time.time() * 1000)
    for plan in plans:
        result = results.get(plan.trial_id)
        if result is None:
            continue
        version = (code_version_of or {}).get(plan.trial_id, code_version)
        tags = {TRIAL_ID_TAG: plan.trial_id, SPEC_HASH_TAG: spec_hash, CODE_VERSION_TAG: version, SWEEP_TAG: sweep,
                SEED_TAG: str(plan.seed), PARENT_RUN_TAG: parent.info.run_id,
                **{f"{CELL_TAG_PREFIX}{axis}": value for axis, value in plan.cell.items()}}
        if result["status"] == "failed":
            tags.update({"status": "failed", FAILURE_CLASS_TAG: result.get("failure_class") or "error"})
        run = client.create_run(experiment_id, run_name=plan.label, tags=tags)
        run_id = run.info.run_id
        metrics = [Metric(k, v, now, 300) for k, v in flat_metrics(result).items()]
        # Formatted like the trainer's own log_params.
        params = [Param(k, v) for k, v in config_params(plan.config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run_id, status="FINISHED" if result["status"] == "done" else "FAILED")
        run_ids[plan.trial_id] = run_id
    client.set_terminated(parent.info.run_id, status="FINISHED")
    return run_ids
