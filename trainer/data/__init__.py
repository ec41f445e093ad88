"""Data for training and evaluation: the built-in generated "scenes" or local dataset folders.

Every dataset yields *sample dicts* with one contract, so the transforms need not know the source:
    image         uint8 3xHxW RGB
    label         int, image-level class                    (scenes, ImageNet-style folders)
    segmentation  long HxW, 255 = ignore                    (scenes: 0 = background, 1..C)
    depth         float32 HxW, 0 = invalid                  (scenes: 1.0 = background)

Public entry points (used by the training loop and the evaluations):
    build_train_dataset(cfg)  -> augmented, resumable training set; batch it with `collate_fn=dataset.collate`
    collate_multicrop(items)  -> DINOv2 batches
    build_eval_datasets(cfg)  -> EvalData with (train, val) pairs per probe task
    num_classes(cfg), resolve_img_size(cfg), resolve_patch_size(cfg), resolve_local_crop_size(cfg)
"""

from trainer.data.batch_augment import BatchMultiCropTransform, BatchSupervisedTransform, BatchTrainDataset
from trainer.data.build import (
    EvalData,
    build_eval_datasets,
    build_train_dataset,
    num_classes,
    resolve_img_size,
    resolve_local_crop_size,
    resolve_patch_size,
)
from trainer.data.folders import (
    IGNORE_INDEX,
    DataLayoutError,
    DepthFolderDataset,
    ImageFolderDataset,
    SegmentationFolderDataset,
)
from trainer.data.scenes import ScenesDataset, derive_seed, dominant_category, scenes_split
from trainer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalDataset,
    EvalTransform,
    MultiCropTransform,
    SupervisedTransform,
    TrainDataset,
    collate_multicrop,
)

__all__ = [
    "BatchMultiCropTransform",
    "BatchSupervisedTransform",
    "BatchTrainDataset",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataLayoutError",
    "DepthFolderDataset",
    "EvalData",
    "EvalDataset",
    "EvalTransform",
    "ImageFolderDataset",
    "MultiCropTransform",
    "ScenesDataset",
    "SegmentationFolderDataset",
    "SupervisedTransform",
    "TrainDataset",
    "build_eval_datasets",
    "build_train_dataset",
    "collate_multicrop",
    "derive_seed",
    "dominant_category",
    "num_classes",
    "resolve_img_size",
    "resolve_local_crop_size",
    "resolve_patch_size",
    "scenes_split",
]
