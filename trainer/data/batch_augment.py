"""Training augmentations on whole batches, each sample's randomness a pure function of its seed.

The per-sample transforms (transforms.py) augment one image at a time through torchvision v2
under a reseeded global generator: at 32 px that Python work cost about a third of a supervised
training step. Here each sample's parameters (crop boxes, flips, which photometric operations and
their factors, orders, sigmas) are a few dozen numbers drawn from `torch.Generator(seed)`, the seed
derived from (trial seed, epoch, index) by the dataset, and the pixels are then transformed for
the whole batch at once (batch_ops.py). Nothing about one sample depends on the others in its
batch, so its output is the same whatever the batch composition, the DataLoader workers, or a
resume mid-epoch.

The distributions are those of the per-sample transforms, which follow DeiT-III's augment.py
(`new_data_aug_generator`) and DINOv2's augmentations.py (`DataAugmentationDINO`); see each class.
Pixels differ slightly from the uint8 torchvision path (here they stay float in [0, 1] until
normalization), and the draws differ, so the numbers of a run change, not what it samples from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from trainer.data.batch_ops import (
    Geometry,
    blur_where,
    color_jitter,
    grayscale_where,
    jitter_orders,
    random_resized_crop_and_flip,
    scaled,
    solarize_where,
    uniforms,
)
from trainer.data.scenes import dominant_category
from trainer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainDataset,
    blur_kernel_and_sigma,
    default_crop_scale,
    single_threaded,
)

Samples = Sequence[dict[str, Any]]


def _order_index(u: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Uniforms [B] -> a uniformly chosen row of `orders` per sample."""
    return orders[torch.floor(u * len(orders)).long()]


# ----------------------------------------------------------------------------------------------
# Supervised (DeiT III)
# ----------------------------------------------------------------------------------------------


class SupervisedDraws:
    """A sample's columns after the crop and flip (`Geometry`)."""

    CHOICE, SIGMA, ORDER = range(Geometry.END, Geometry.END + 3)
    JITTER = slice(Geometry.END + 3, Geometry.END + 6)
    COUNT = Geometry.END + 6


class BatchSupervisedTransform:
    """DeiT-III "3-Augment" for a batch: (samples, seeds) -> (images [B, 3, S, S] normalized, labels [B]).

    RandomResizedCrop (ratio 3/4-4/3, scale `default_crop_scale`), flip p 0.5, one of {grayscale,
    solarize at 128, Gaussian blur} chosen uniformly, ColorJitter 0.3/0.3/0.3 in a random order,
    ImageNet normalization, as `SupervisedTransform`. Samples are sample dicts (uint8 `image`,
    `label`, optional `segmentation`) of any sizes. With `relabel_from_segmentation` (the scenes)
    the label becomes the dominant category of the segmentation inside the crop box, or stays the
    scene's label when no object is in the crop.
    """

    JITTER = 0.3  # brightness, contrast and saturation factors in U(0.7, 1.3); no hue
    GRAYSCALE, SOLARIZE, BLUR = range(3)

    def __init__(self, img_size: int, three_augment: bool = True, scale: tuple[float, float] | None = None,
                 relabel_from_segmentation: bool = False):
        self.img_size, self.three_augment, self.relabel = img_size, three_augment, relabel_from_segmentation
        self.scale = scale or default_crop_scale(img_size)
        self.blur_kernel, self.blur_sigma = blur_kernel_and_sigma(img_size)
        self.orders = jitter_orders(3)

    def __call__(self, samples: Samples, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        u = uniforms(seeds, SupervisedDraws.COUNT)
        images, boxes = random_resized_crop_and_flip([s["image"] for s in samples], u, self.img_size, self.scale)
        labels = torch.tensor([self._label(s, box) for s, box in zip(samples, boxes.tolist())], dtype=torch.long)
        if self.three_augment:
            choice = torch.floor(u[:, SupervisedDraws.CHOICE] * 3).long()
            grayscale_where(images, choice == self.GRAYSCALE)
            solarize_where(images, choice == self.SOLARIZE)
            sigmas = scaled(u[:, SupervisedDraws.SIGMA], *self.blur_sigma)
            blur_where(images, choice == self.BLUR, self.blur_kernel, sigmas)
            factors = scaled(u[:, SupervisedDraws.JITTER], 1 - self.JITTER, 1 + self.JITTER)
            images = color_jitter(images, factors, _order_index(u[:, SupervisedDraws.ORDER], self.orders))
        return TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD), labels

    def _label(self, sample: dict[str, Any], box: list[int]) -> int:
        if not (self.relabel and "segmentation" in sample):
            return int(sample["label"])
        top, left, h, w = box
        cropped = dominant_category(sample["segmentation"][top:top + h, left:left + w])
        return cropped if cropped >= 0 else int(sample["label"])  # no object in the crop: the scene's label

    @staticmethod
    def item(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The one item of a batch of one, as `SupervisedTransform` gives it: (image, label)."""
        return batch[0][0], batch[1][0]


# ----------------------------------------------------------------------------------------------
# DINOv2 multi-crop
# ----------------------------------------------------------------------------------------------


class MultiCropDraws:
    """One crop's columns after the crop and flip (`Geometry`)."""

    JITTER_APPLIED, ORDER, GRAYSCALE, BLUR, SIGMA, SOLARIZE = range(Geometry.END, Geometry.END + 6)
    JITTER = slice(Geometry.END + 6, Geometry.END + 10)
    COUNT = Geometry.END + 10


@dataclass(frozen=True)
class CropKind:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


class BatchMultiCropTransform:
    """DINOv2's DataAugmentationDINO for a batch: (samples, seeds) -> the dict `collate_multicrop`
    gives, dict(global_crops [2B, 3, S, S], local_crops [L*B, 3, s, s] or None, batch_size B),
    crop-major.

    As `MultiCropTransform`: every crop gets its own RandomResizedCrop + flip, ColorJitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8 in a random order, grayscale p 0.2; global crop 1 is always
    blurred, crop 2 blurred with p 0.1 and solarized with p 0.2, local crops blurred with p 0.5.
    """

    JITTER_P, GRAYSCALE_P = 0.8, 0.2
    JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # brightness, contrast, saturation, hue

    def __init__(self, img_size: int, local_size: int, local_crops: int,
                 global_scale: Sequence[float] = (0.32, 1.0), local_scale: Sequence[float] = (0.05, 0.32)):
        global_scale, local_scale = tuple(global_scale), tuple(local_scale)
        self.local_crops = local_crops
        self.kinds = [CropKind(img_size, global_scale, blur_p=1.0), CropKind(img_size, global_scale, 0.1, 0.2)]
        self.kinds += [CropKind(local_size, local_scale, blur_p=0.5)] * local_crops
        self.orders = jitter_orders(4)

    def __call__(self, samples: Samples, seeds: Sequence[int]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        u = uniforms(seeds, len(self.kinds) * MultiCropDraws.COUNT).view(len(samples), len(self.kinds), -1)
        crops = [self._crop(images, u[:, k], kind) for k, kind in enumerate(self.kinds)]
        return dict(global_crops=torch.cat(crops[:2]), local_crops=torch.cat(crops[2:]) if crops[2:] else None,
                    batch_size=len(samples))

    def _crop(self, images: Sequence[torch.Tensor], u: torch.Tensor, kind: CropKind) -> torch.Tensor:
        crops, _ = random_resized_crop_and_flip(images, u, kind.size, kind.scale)
        jittered = u[:, MultiCropDraws.JITTER_APPLIED] < self.JITTER_P
        if jittered.any():
            low, high = torch.tensor(self.JITTER_RANGES, dtype=torch.float64).T
            factors = scaled(u[:, MultiCropDraws.JITTER], low, high)
            orders = _order_index(u[:, MultiCropDraws.ORDER], self.orders)
            crops[jittered] = color_jitter(crops[jittered], factors[jittered], orders[jittered])
        grayscale_where(crops, u[:, MultiCropDraws.GRAYSCALE] < self.GRAYSCALE_P)
        kernel, sigma = blur_kernel_and_sigma(kind.size)
        blur_where(crops, u[:, MultiCropDraws.BLUR] < kind.blur_p, kernel, scaled(u[:, MultiCropDraws.SIGMA], *sigma))
        solarize_where(crops, u[:, MultiCropDraws.SOLARIZE] < kind.solarize_p)
        return TF.normalize(crops, IMAGENET_MEAN, IMAGENET_STD)

    def item(self, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """The one item of a batch of one, as `MultiCropTransform` gives it."""
        local = batch["local_crops"]
        return dict(global_crops=list(batch["global_crops"]), local_crops=[] if local is None else list(local))


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingSample:
    """A training sample not yet augmented, with its augmentation seed: what the DataLoader's
    workers fetch for `BatchTrainDataset.collate` (torch's default collate rejects it, so a loader
    built without `collate_fn=dataset.collate` fails at once instead of training on raw images)."""

    sample: dict[str, Any]
    seed: int


BatchTransform = BatchSupervisedTransform | BatchMultiCropTransform


class BatchTrainDataset(TrainDataset):
    """A training set augmented batch by batch: build the DataLoader with `collate_fn=dataset.collate`.

    Keys are those of `TrainDataset` (an index, or an `(epoch, index)` pair). The DataLoader fetches
    a batch's keys through `__getitems__` (torch's batched-fetch hook) as `PendingSample`s, and
    `collate` augments them together. `dataset[key]` is one augmented item in the per-sample
    transform's format: the same tensors that sample gets in any batch.
    """

    def __init__(self, base: Dataset, transform: BatchTransform, seed: int):
        super().__init__(base, transform, seed)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[PendingSample]:
        pending = []
        for key in keys:
            index, seed = self.sample_seed(key)
            pending.append(PendingSample(self.base[index], seed))
        return pending

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        return self.transform.item(self.collate(self.__getitems__([key])))  # type: ignore[attr-defined]

    def collate(self, pending: Sequence[PendingSample]) -> Any:
        """The DataLoader's `collate_fn`: the augmented batch."""
        with single_threaded():  # the same floats in the main process (any threads) and in workers (1)
            return self.transform([p.sample for p in pending], [p.seed for p in pending])
