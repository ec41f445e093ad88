"""Frozen-feature evaluation of a trained backbone: linear / k-NN classification, linear
segmentation and depth probes, and the paper's [CLS]-patch token analysis.

    metrics = evaluate(backbone, eval_data, cfg.evaluation, device, out_dir)

`eval_data` is any object with optional attributes `classification`, `segmentation`, `depth` (each
None or a `(train, val)` pair of Datasets), `num_classes`, `segmentation_num_classes` (or
`segmentation_classes`) and `ignore_index` (default 255). A task whose data is missing or empty, or
that `cfg` disables, is skipped; undeclared class counts are inferred from the labels. Every rate is
a fraction in [0, 1].

The result depends only on the weights and the data: probes start from zeros, shuffle with a fixed
seed, and the global RNG is forked, so evaluating the same weights twice (say at the end of a resumed
run) gives the same numbers on CPU. On CUDA, bf16 extraction and kernels such as bilinear
upsampling's backward are not bitwise deterministic: expect agreement to a few decimals.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from trainer.config import EvaluationConfig
from trainer.evaluation.classification import head_top1, knn_top1, linear_probe_top1
from trainer.evaluation.depth import depth_probe
from trainer.evaluation.dinov2.protocol import evaluate_dinov2, token_images
from trainer.evaluation.features import (
    FeatureCache,
    Features,
    TokenFn,
    backbone_tokens,
    extract_features,
    process_group,
)
from trainer.evaluation.metrics import IGNORE_INDEX
from trainer.evaluation.pixels import pixel_tokens
from trainer.evaluation.segmentation import infer_num_classes, segmentation_probe
from trainer.evaluation.token_interaction import (
    TokenInteraction,
    analyze_token_interaction,
    save_token_interaction_json,
)

__all__ = ["EVAL_SEED", "TOKEN_IMAGES", "TokenInteraction", "analyze_token_interaction", "evaluate"]

log = logging.getLogger(__name__)

EVAL_SEED = 0  # fixes the probe-training subsets and shuffling
TOKEN_IMAGES = 64  # images for the token-interaction analysis (the first of a validation set)


def evaluate(
    backbone: nn.Module,
    eval_data: Any,
    cfg: EvaluationConfig,
    device: torch.device | str,
    out_dir: Path,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    amp: bool = True,
) -> dict[str, float]:
    """Runs every enabled evaluation whose data exists; returns the flat metrics.

    Writes `out_dir/token_interaction.png` (and `.json`: the raw per-block curves and magnitudes)
    when the token analysis runs. `cfg.features` pixels probes the raw pixel patches instead of the
    backbone's tokens (the backbone gives only its patch size) and skips the token analysis.
    `batch_size`/`num_workers`: feature extraction's loader. `amp`: bf16 autocast for extraction on
    CUDA. Pass the bare backbone (not a DDP wrapper); its train/eval mode is restored on return.
    Under torch.distributed, call it on every process: the work is split over them, every process
    gets the same metrics except the token analysis (rank 0's alone).
    """
    device = torch.device(device)
    tokens = pixel_tokens if cfg.features == "pixels" else backbone_tokens
    run = _Run(backbone, eval_data, cfg, device, Path(out_dir), batch_size, num_workers, amp, FeatureCache(), tokens)
    was_training = backbone.training
    backbone.eval()
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    metrics: dict[str, float] = {}
    try:
        # Forked: random augmentations in a dataset neither vary the result nor move the training
        # run's RNG streams.
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(EVAL_SEED)
            if cfg.protocol == "dinov2":
                metrics.update(evaluate_dinov2(backbone, eval_data, cfg, device, num_workers))
                metrics.update(run.token_interaction())
            else:
                # Dense tasks first: their cached patch grids also give classification its features.
                for task in (run.segmentation, run.depth, run.classification, run.token_interaction):
                    metrics.update(task())
    finally:
        backbone.train(was_training)
    return metrics


def _split_pair(eval_data: Any, name: str) -> tuple[Dataset, Dataset] | None:
    pair = getattr(eval_data, name, None)
    if pair is None:
        return None
    train, val = pair
    if train is None or val is None or len(train) == 0 or len(val) == 0:
        return None
    return train, val


@contextmanager
def _timed(task: str):
    start = time.perf_counter()
    yield
    log.info("evaluation: %s took %.1f s", task, time.perf_counter() - start)


@dataclass
class _Run:
    """One evaluation: the settings every task shares, and one method per task."""

    backbone: nn.Module
    eval_data: Any
    cfg: EvaluationConfig
    device: torch.device
    out_dir: Path
    batch_size: int
    num_workers: int
    amp: bool
    cache: FeatureCache  # one for all tasks: when they share images (scenes), the backbone runs once
    tokens: TokenFn  # what the probes read of an image batch: the backbone's tokens or the raw pixels

    @property
    def probe_args(self) -> dict[str, Any]:
        return dict(epochs=self.cfg.probe_epochs, lr=self.cfg.probe_lr, seed=EVAL_SEED, device=self.device)

    def features(self, pair: tuple[Dataset, Dataset], dense: bool) -> tuple[Features, Features]:
        args = dict(device=self.device, dense=dense, batch_size=self.batch_size, num_workers=self.num_workers,
                    amp=self.amp, seed=EVAL_SEED, cache=self.cache, tokens=self.tokens)
        return (extract_features(self.backbone, pair[0], max_samples=self.cfg.max_train_samples, **args),
                extract_features(self.backbone, pair[1], max_samples=self.cfg.max_val_samples, **args))

    def classification(self) -> dict[str, float]:
        pair = _split_pair(self.eval_data, "classification")
        head = self.cfg.head_top1 and self.cfg.features == "backbone"
        if pair is None or not (self.cfg.linear or self.cfg.knn or head):
            return {}
        with _timed("classification features"):
            train, val = self.features(pair, dense=False)
        declared = getattr(self.eval_data, "num_classes", None)
        num_classes = int(declared) if declared else int(max(train.targets.max(), val.targets.max())) + 1
        out: dict[str, float] = {}
        if self.cfg.linear:
            with _timed("linear probes"):
                out["linear_top1_cls"] = linear_probe_top1(
                    train.cls, train.targets, val.cls, val.targets, num_classes, **self.probe_args)
                out["linear_top1_cls_patch"] = linear_probe_top1(
                    torch.cat([train.cls, train.mean_patch], dim=1), train.targets,
                    torch.cat([val.cls, val.mean_patch], dim=1), val.targets, num_classes, **self.probe_args)
        if head and (top1 := head_top1(self.backbone, val, self.device)) is not None:
            out["head_top1"] = top1
        if self.cfg.knn:
            with _timed("k-NN"):
                out["knn_top1"] = knn_top1(
                    train.cls, train.targets, val.cls, val.targets, num_classes, self.cfg.knn_k, device=self.device)
        return out

    def segmentation(self) -> dict[str, float]:
        pair = _split_pair(self.eval_data, "segmentation")
        if pair is None or not self.cfg.segmentation:
            return {}
        with _timed("segmentation features"):
            train, val = self.features(pair, dense=True)
        ignore_index = getattr(self.eval_data, "ignore_index", IGNORE_INDEX)
        declared = (getattr(self.eval_data, "segmentation_num_classes", None)
                    or getattr(self.eval_data, "segmentation_classes", None))
        num_classes = int(declared) if declared else infer_num_classes(
            train.targets, val.targets, ignore_index=ignore_index)
        with _timed("segmentation probe"):
            return segmentation_probe(train.patch_grid, train.targets, val.patch_grid, val.targets, num_classes,
                                      ignore_index=ignore_index, **self.probe_args)

    def depth(self) -> dict[str, float]:
        pair = _split_pair(self.eval_data, "depth")
        if pair is None or not self.cfg.depth:
            return {}
        with _timed("depth features"):
            train, val = self.features(pair, dense=True)
        with _timed("depth probe"):
            return depth_probe(train.patch_grid, train.targets, val.patch_grid, val.targets, **self.probe_args)

    def token_interaction(self) -> dict[str, float]:
        if not self.cfg.token_interaction or self.cfg.features == "pixels":  # pixels have no blocks to analyse
            return {}
        if process_group()[0] != 0:  # 64 images: rank 0 alone, it writes the plot
            return {}
        if self.cfg.protocol == "dinov2":  # raw samples: brought to the model's size first
            images = token_images(self.eval_data, self.backbone.patch_embed.img_size[0], TOKEN_IMAGES)
        else:
            pairs = [_split_pair(self.eval_data, name) for name in ("classification", "segmentation", "depth")]
            val = next((pair[1] for pair in pairs if pair is not None), None)
            images = None if val is None else torch.stack(
                [torch.as_tensor(val[i][0]) for i in range(min(TOKEN_IMAGES, len(val)))])
        if images is None:
            return {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with _timed("token interaction"):
            result = analyze_token_interaction(self.backbone, images.to(self.device),
                                               self.out_dir / "token_interaction.png")
        save_token_interaction_json(result, self.out_dir / "token_interaction.json")
        return result.metrics
