"""Builders: from a TrialConfig to the training dataset and the evaluation datasets.

The training loop and the evaluations only call these; which dataset (scenes or folders) and
which framework (supervised or DINOv2) is decided here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch.utils.data import Dataset, Subset

from trainer.data.batch_augment import (
    BatchMultiCropTransform,
    BatchSupervisedTransform,
    BatchTrainDataset,
    BatchTransform,
)
from trainer.data.folders import (
    IGNORE_INDEX,
    SEGMENTATION_CLASSES,
    DepthFolderDataset,
    ImageFolderDataset,
    SegmentationFolderDataset,
    classification_classes,
)
from trainer.data.scenes import BACKGROUND_DEPTH, ScenesDataset, derive_seed, scenes_split
from trainer.data.transforms import EvalDataset, EvalTransform
from trainer.scales import SCALES

if TYPE_CHECKING:
    from trainer.config import TrialConfig

NYU_MAX_DEPTH = 10.0  # metres; the usual NYU-v2 evaluation cap


def _scale_default(cfg: "TrialConfig", key: str) -> int:
    return int(SCALES[cfg.model.scale][key])


def resolve_img_size(cfg: "TrialConfig") -> int:
    """The training/eval image size: cfg.model.img_size, else the scale's (micro 32, others 224)."""
    return cfg.model.img_size or _scale_default(cfg, "img_size")


def resolve_patch_size(cfg: "TrialConfig") -> int:
    return cfg.model.patch_size or _scale_default(cfg, "patch_size")


def resolve_local_crop_size(cfg: "TrialConfig") -> int:
    """DINOv2 local crop size: cfg.dinov2.local_crop_size, else img_size * 3/7 rounded to a whole
    number of patches, at least one (224/16 -> 96 as in DINOv2, 32/4 -> 12)."""
    if cfg.dinov2.local_crop_size is not None:
        return cfg.dinov2.local_crop_size
    patch = resolve_patch_size(cfg)
    return max(patch, round(resolve_img_size(cfg) * 3 / 7 / patch) * patch)


@functools.lru_cache(maxsize=4)
def _cached_scenes(split: str, size: int, image_size: int, num_classes: int, seed: int) -> ScenesDataset:
    """One generated split per process, shared by the training set and the evaluations."""
    return scenes_split(split, size, image_size, num_classes, seed)


def scenes_for(cfg: "TrialConfig", split: str) -> ScenesDataset:
    s = cfg.data.scenes
    size = s.train_size if split == "train" else s.val_size
    return _cached_scenes(split, size, resolve_img_size(cfg), s.num_classes, s.seed)


def holdout_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of a train split of n items: a fixed random draw of round(n * fraction)
    items, sorted. It depends on n and the fraction only, so every trial (any seed, any sweep) holds
    out the same images and their validation metrics compare."""
    n_out = round(n * fraction)
    if fraction and not 0 < n_out < n:
        raise ValueError(f"data.val_fraction {fraction} of {n} training items leaves no validation or no "
                         "training items; change data.val_fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("validation-holdout", n)))
    return order[n_out:].sort().values.tolist(), order[:n_out].sort().values.tolist()


def split_train(dataset: Dataset, fraction: float) -> tuple[Dataset, Dataset | None]:
    """(what trains, the validation split) of a train split; the whole split and None for fraction 0."""
    if not fraction:
        return dataset, None
    kept, held_out = holdout_indices(len(dataset), fraction)  # type: ignore[arg-type]
    return Subset(dataset, kept), Subset(dataset, held_out)


def _require_root(cfg: "TrialConfig", key: str) -> Path:
    root = getattr(cfg.data, key)
    if root is None:
        raise ValueError(f"data.{key} must be set to train or evaluate with data.dataset: folders")
    return Path(root)


def num_classes(cfg: "TrialConfig") -> int:
    """Classification classes of the training data."""
    if cfg.data.dataset == "scenes":
        return cfg.data.scenes.num_classes
    return len(classification_classes(_require_root(cfg, "classification_root")))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def build_train_dataset(cfg: "TrialConfig") -> BatchTrainDataset:
    """The augmented training set for cfg.framework, augmented batch by batch (`BatchTrainDataset`):
    build its DataLoader with `collate_fn=dataset.collate` and `(epoch, index)` keys.

    supervised batches: (images float [B, 3, S, S] normalized, labels long [B]);
    dinov2 batches: dict(global_crops [2B, ...], local_crops [L*B, ...] or None, batch_size B).
    dataset[key] is one item as the per-sample transforms give it. Augmentations are seeded from
    (cfg.seed, epoch, index); the scenes content from cfg.data.scenes.seed, so changing the trial
    seed never changes the data itself.
    """
    img_size = resolve_img_size(cfg)
    scenes = cfg.data.dataset == "scenes"
    if scenes:
        base: Dataset = scenes_for(cfg, "train").materialize()  # before any DataLoader worker forks
    else:
        base = ImageFolderDataset(_require_root(cfg, "classification_root"), "train")
    base, _ = split_train(base, cfg.data.val_fraction)  # the validation images are never trained on

    if cfg.framework == "supervised":
        transform: BatchTransform = BatchSupervisedTransform(img_size, three_augment=cfg.supervised.three_augment,
                                                             relabel_from_segmentation=scenes)
    elif cfg.framework == "dinov2":
        d = cfg.dinov2
        transform = BatchMultiCropTransform(img_size, resolve_local_crop_size(cfg), d.local_crops,
                                            global_scale=d.global_crop_scale, local_scale=d.local_crop_scale)
    else:
        raise ValueError(f"unknown framework {cfg.framework!r}")
    return BatchTrainDataset(base, transform, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Datasets for the probes; each task is a (train, val) pair or None when it has no data.

    classification items: (image, label long); segmentation: (image, mask long HxW, 255 = ignore);
    depth: (image, depth float HxW, 0 = invalid). Images are float, normalized, S x S.
    """

    classification: tuple[Dataset, Dataset] | None = None
    segmentation: tuple[Dataset, Dataset] | None = None
    depth: tuple[Dataset, Dataset] | None = None
    num_classes: int | None = None  # classification classes
    segmentation_num_classes: int | None = None  # including background for scenes
    ignore_index: int = IGNORE_INDEX
    max_depth: float | None = None  # the largest valid depth, for metrics/binning
    classification_selection: Dataset | None = None  # protocol dinov2: where the linear grid picks


def _cap(dataset: Dataset, limit: int | None, shuffle_seed: int | None = None) -> Dataset:
    """At most `limit` items: the first ones, or (when the dataset is ordered, e.g. by class) a
    fixed random subset drawn with `shuffle_seed`."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    if shuffle_seed is None:
        return Subset(dataset, range(limit))
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))[:limit].sort().values
    return Subset(dataset, indices.tolist())


EvalSplit = Literal["test", "validation"]


def _parts(cfg: "TrialConfig", make: Callable[[str], Dataset], shuffle: bool,
           split: EvalSplit = "test") -> tuple[Dataset, Dataset, Dataset | None]:
    """(probe train, scored, hold-out) raw datasets from `make(split)`, capped to the evaluation
    sample limits. The probes always fit on the train split minus the validation hold-out; they are
    scored on the dataset's val split (`test`) or on the hold-out (`validation`)."""
    probe_train, held_out = split_train(make("train"), cfg.data.val_fraction)
    scored = make("val") if split == "test" else held_out
    if scored is None:
        raise ValueError("validation metrics need data.val_fraction > 0")
    ev = cfg.evaluation
    cap = lambda name, part, limit: _cap(part, limit, derive_seed("eval-subset", name) if shuffle else None)  # noqa: E731
    return (cap("train", probe_train, ev.max_train_samples), cap("val", scored, ev.max_val_samples),
            None if held_out is None else cap("val", held_out, ev.max_val_samples))


def _pair(cfg: "TrialConfig", make: Callable[[str], Dataset], transform: EvalTransform, shuffle: bool,
          num_classes: int | None = None, split: EvalSplit = "test") -> tuple[Dataset, Dataset]:
    """(probe train, probe eval) datasets seen through the quick protocol's eval transform."""
    train, val, _ = _parts(cfg, make, shuffle, split)
    return EvalDataset(train, transform, num_classes=num_classes), EvalDataset(val, transform, num_classes=num_classes)


def build_protocol_datasets(cfg: "TrialConfig", split: EvalSplit = "test") -> EvalData:
    """evaluation.protocol dinov2: the raw samples (uint8 images at their own size, full-resolution
    targets); the protocols crop and augment them themselves. Classification also gets the
    hold-out (`classification_selection`), on which DINOv2's linear grid picks its setting."""
    parts = functools.partial(_parts, cfg, split=split)
    data, out = cfg.data, EvalData()
    if data.dataset == "scenes":
        make = lambda split: scenes_for(cfg, split)  # noqa: E731
        c = data.scenes.num_classes
        train, scored, held_out = parts(make, False)
        return EvalData(classification=(train, scored), segmentation=(train, scored), depth=(train, scored),
                        classification_selection=held_out, num_classes=c, segmentation_num_classes=c + 1,
                        max_depth=BACKGROUND_DEPTH)
    if data.classification_root is not None:
        out.num_classes = num_classes(cfg)
        train, scored, out.classification_selection = parts(
            lambda part: ImageFolderDataset(data.classification_root, part), True)
        out.classification = (train, scored)
    if data.segmentation_root is not None:
        out.segmentation_num_classes = SEGMENTATION_CLASSES[data.segmentation_layout]
        out.segmentation = parts(
            lambda part: SegmentationFolderDataset(data.segmentation_root, part, data.segmentation_layout), True)[:2]
    if data.depth_root is not None:
        out.depth = parts(lambda part: DepthFolderDataset(data.depth_root, part), True)[:2]
        out.max_depth = NYU_MAX_DEPTH
    return out


def build_eval_datasets(cfg: "TrialConfig", split: EvalSplit = "test") -> EvalData:
    """The probe datasets. Scenes: all three tasks from the same generated images, eval transform =
    normalize only. Folders: each task present only if its root is set in cfg.data.

    split: `test` scores on the dataset's val split (the reported metrics); `validation` on the
    hold-out of data.val_fraction (what a hyperparameter search selects on). evaluation.protocol
    dinov2 gets the raw samples instead (`build_protocol_datasets`)."""
    if cfg.evaluation.protocol == "dinov2":
        return build_protocol_datasets(cfg, split)
    pair = functools.partial(_pair, cfg, split=split)
    if cfg.data.dataset == "scenes":
        c = cfg.data.scenes.num_classes
        make = lambda split: scenes_for(cfg, split)  # noqa: E731
        return EvalData(
            classification=pair(make, EvalTransform("label"), False, c),
            segmentation=pair(make, EvalTransform("segmentation"), False, c + 1),
            depth=pair(make, EvalTransform("depth"), False),
            num_classes=c,
            segmentation_num_classes=c + 1,
            max_depth=BACKGROUND_DEPTH,
        )

    img_size, data, out = resolve_img_size(cfg), cfg.data, EvalData()
    if data.classification_root is not None:
        out.num_classes = num_classes(cfg)
        out.classification = pair(lambda part: ImageFolderDataset(data.classification_root, part),
                                   EvalTransform("label", img_size, 1 / data.eval_crop_ratio), True, out.num_classes)
    if data.segmentation_root is not None:
        out.segmentation_num_classes = SEGMENTATION_CLASSES[data.segmentation_layout]
        out.segmentation = pair(
            lambda part: SegmentationFolderDataset(data.segmentation_root, part, data.segmentation_layout),
            EvalTransform("segmentation", img_size), True, out.segmentation_num_classes)
    if data.depth_root is not None:
        out.depth = pair(lambda part: DepthFolderDataset(data.depth_root, part),
                          EvalTransform("depth", img_size), True)
        out.max_depth = NYU_MAX_DEPTH
    return out
