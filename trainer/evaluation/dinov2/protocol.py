"""`evaluation.protocol: dinov2`: DINOv2's frozen-feature protocols on a trial's raw evaluation data
(trainer/data/build.py `build_protocol_datasets`): the linear grid and k-NN for classification, the
"lin" (+ "+ms") segmentation head, the "lin. 1" (+ "lin. 4") depth head. The heads train on the fly
over augmented crops, so memory does not grow with the dataset: only a batch's features exist at a
time (k-NN holds one [CLS] vector per training image). Every process runs this; each protocol
splits its images over the processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.config_evaluation import EvaluationConfig
from trainer.evaluation.dinov2.classification import EvalImages, dinov2_knn, dinov2_linear
from trainer.evaluation.dinov2.depth import DepthAugmentation, dinov2_depth
from trainer.evaluation.dinov2.segmentation import dinov2_segmentation
from trainer.evaluation.features import all_reduce_sum, process_group
from trainer.evaluation.metrics import IGNORE_INDEX

EVAL_SEED = 0


def _pair(eval_data: Any, name: str) -> tuple[Dataset, Dataset] | None:
    pair = getattr(eval_data, name, None)
    if pair is None or any(part is None or len(part) == 0 for part in pair):
        return None
    return pair


def token_images(eval_data: Any, img_size: int, count: int) -> torch.Tensor | None:
    """The first `count` validation images at the model's size, for the token analysis."""
    pair = next((p for p in (_pair(eval_data, n) for n in ("classification", "segmentation", "depth")) if p), None)
    if pair is None:
        return None
    val = EvalImages(pair[1], img_size, img_size)
    return torch.stack([val[i][0] for i in range(min(count, len(val)))])


@torch.no_grad()
def _head_top1(backbone: nn.Module, test: Dataset, resize: int, crop: int, batch_size: int,
               device: torch.device, num_workers: int) -> float:
    """The trained classifier's own top-1 on DINOv2's eval transform, images split over the processes."""
    rank, world = process_group()
    indices = list(range(rank, len(test), world))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(EvalImages(test, resize, crop), indices), batch_size=batch_size,
                        num_workers=num_workers)
    counts = torch.zeros(2, dtype=torch.float64)
    for images, labels in loader:
        logits = backbone(images.to(device))
        counts += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)], dtype=torch.float64)
    counts = all_reduce_sum(counts)  # CPU counts: NCCL would refuse them as they are
    return (counts[0] / counts[1]).item()


def evaluate_dinov2(backbone: nn.Module, eval_data: Any, cfg: EvaluationConfig, device: torch.device,
                    num_workers: int = 0) -> dict[str, float]:
    """The enabled protocols whose data exists; the metric names are trainer/metric_names.py's."""
    d, out = cfg.dinov2, {}
    common = dict(seed=EVAL_SEED, device=device, num_workers=num_workers)
    if cfg.segmentation and (pair := _pair(eval_data, "segmentation")):
        s = d.segmentation
        out |= dinov2_segmentation(backbone, *pair, int(eval_data.segmentation_num_classes),
                                   ignore_index=getattr(eval_data, "ignore_index", IGNORE_INDEX),
                                   **s.model_dump(), **common)
    if cfg.depth and (pair := _pair(eval_data, "depth")):
        depth = d.depth.model_dump(exclude={"augmentation"})
        out |= dinov2_depth(backbone, *pair, augmentation=DepthAugmentation(**d.depth.augmentation.model_dump()),
                            **depth, **common)
    if (pair := _pair(eval_data, "classification")) is not None:
        train, test = pair
        num_classes = int(eval_data.num_classes)
        if cfg.linear:
            selection = getattr(eval_data, "classification_selection", None) or test
            out |= dinov2_linear(backbone, train, selection, test, num_classes, **d.linear.model_dump(), **common)
        if cfg.knn:
            out |= dinov2_knn(backbone, train, test, num_classes, **d.knn.model_dump(), device=device,
                              num_workers=num_workers)
        if cfg.head_top1 and getattr(backbone, "num_classes", 0):
            out["head_top1"] = _head_top1(backbone, test, d.linear.resize_size, d.linear.crop_size,
                                          d.knn.batch_size, device, num_workers)
    return out
