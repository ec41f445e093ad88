"""Augmentations for each framework, and the wrapper that makes them exactly reproducible.

Every transform takes a *sample dict* (see trainer/data/__init__.py: `image` uint8 3xHxW plus
optional `label`, `segmentation`, `depth`) and returns what the model consumes. They are built on
torchvision.transforms.v2, which moves label maps wrapped as `tv_tensors.Mask` through the same
geometric transforms as the image, with NEAREST interpolation, and leaves them out of photometric
ones and normalization.

All randomness comes from torch's global CPU generator; `TrainDataset` seeds it per sample from
(seed, epoch, index) inside `fork_rng`, so a resumed run sees identical batches. Training itself
uses the batch versions of `SupervisedTransform` and `MultiCropTransform` (batch_augment.py), which
draw each sample's parameters from those seeds and transform whole batches at once; these
per-sample versions stay as their reference (tests/test_batch_augment.py compares the
distributions, benchmarks/augment_overhead.py the cost).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from trainer.data.scenes import derive_seed, dominant_category

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = InterpolationMode.BICUBIC
SMALL_IMAGE = 128  # below this size, crops are gentler and blur kernels smaller


def normalize() -> v2.Compose:
    """uint8 image -> float in ImageNet-normalized units (label maps pass through untouched)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def blur_kernel_and_sigma(size: int) -> tuple[int, tuple[float, float]]:
    """DINOv2/DeiT blur (sigma 0.1-2, kernel 9 at 224 px), shrunk proportionally for small crops:
    (odd kernel size, sigma range)."""
    return max(3, int(round(9 * size / 224)) | 1), (0.1, max(1.0, 2.0 * size / 224))


def gaussian_blur(size: int, p: float) -> v2.Transform:
    kernel, sigma = blur_kernel_and_sigma(size)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=p)


def default_crop_scale(img_size: int) -> tuple[float, float]:
    """RandomResizedCrop scale: (0.08, 1) like DeiT at 224 px; small images keep more context."""
    return (0.08, 1.0) if img_size >= SMALL_IMAGE else (0.35, 1.0)


def _wrap(sample: dict[str, Any]) -> dict[str, Any]:
    """Tag the tensors so v2 knows which is the image and which are label maps."""
    out = dict(sample)
    out["image"] = tv_tensors.Image(sample["image"])
    for key in ("segmentation", "depth"):
        if key in sample:
            out[key] = tv_tensors.Mask(sample[key])
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


# ----------------------------------------------------------------------------------------------
# Supervised (DeiT III)
# ----------------------------------------------------------------------------------------------


class SupervisedTransform:
    """DeiT-III "3-Augment": crop + flip, one of {grayscale, solarize, blur}, colour jitter 0.3.

    sample -> (image float 3xSxS normalized, label long scalar). With `relabel_from_segmentation`
    (the scenes dataset), the crop is applied to the segmentation as well and the label recomputed
    as the dominant category of the crop, so cropping never makes the label wrong.
    """

    def __init__(self, img_size: int, three_augment: bool = True, scale: tuple[float, float] | None = None,
                 relabel_from_segmentation: bool = False):
        self.relabel = relabel_from_segmentation
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(img_size, scale=scale or default_crop_scale(img_size), interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if three_augment:
            steps += [
                v2.RandomChoice([
                    v2.Grayscale(num_output_channels=3),
                    v2.RandomSolarize(threshold=128, p=1.0),
                    gaussian_blur(img_size, p=1.0),
                ]),
                v2.ColorJitter(0.3, 0.3, 0.3),
            ]
        self.transform = v2.Compose([*steps, normalize()])

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = {"image": sample["image"]}
        if self.relabel and "segmentation" in sample:
            keep["segmentation"] = sample["segmentation"]
        out = self.transform(_wrap(keep))
        label = sample["label"]
        if "segmentation" in out:
            cropped = dominant_category(out["segmentation"])
            label = cropped if cropped >= 0 else label  # no object in the crop: keep the scene's label
        return _plain(out["image"]), torch.tensor(label, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# DINOv2 multi-crop
# ----------------------------------------------------------------------------------------------


class MultiCropTransform:
    """DINOv2's DataAugmentationDINO: 2 global + n local crops of one image.

    sample -> dict(global_crops=[t1, t2], local_crops=[t, ...]), float normalized tensors.
    Global crop 1 is always blurred; crop 2 rarely blurred and sometimes solarized; local crops
    blurred half the time. All get flips, colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale 0.2.
    """

    def __init__(self, img_size: int, local_size: int, local_crops: int,
                 global_scale: Sequence[float] = (0.32, 1.0), local_scale: Sequence[float] = (0.05, 0.32)):
        self.local_crops = local_crops

        def geometric(size: int, scale: Sequence[float]) -> list[v2.Transform]:
            return [v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=BICUBIC, antialias=True),
                    v2.RandomHorizontalFlip()]

        colour = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        self.global1 = v2.Compose([*geometric(img_size, global_scale), *colour, gaussian_blur(img_size, 1.0), normalize()])
        self.global2 = v2.Compose([*geometric(img_size, global_scale), *colour, gaussian_blur(img_size, 0.1),
                                   v2.RandomSolarize(threshold=128, p=0.2), normalize()])
        self.local = v2.Compose([*geometric(local_size, local_scale), *colour, gaussian_blur(local_size, 0.5), normalize()])

    def __call__(self, sample: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        image = tv_tensors.Image(sample["image"])
        return dict(
            global_crops=[_plain(self.global1(image)), _plain(self.global2(image))],
            local_crops=[_plain(self.local(image)) for _ in range(self.local_crops)],
        )


def collate_multicrop(items: Sequence[dict[str, list[torch.Tensor]]]) -> dict[str, Any]:
    """Batch multi-crop items crop-major, as DINOv2 does: all first crops, then all second crops.

    Returns dict(global_crops [2B, 3, H, W], local_crops [L*B, 3, h, w] or None, batch_size B).
    """
    n_global, n_local = len(items[0]["global_crops"]), len(items[0]["local_crops"])
    global_crops = torch.stack([item["global_crops"][c] for c in range(n_global) for item in items])
    local_crops = None
    if n_local:
        local_crops = torch.stack([item["local_crops"][c] for c in range(n_local) for item in items])
    return dict(global_crops=global_crops, local_crops=local_crops, batch_size=len(items))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class EvalTransform:
    """Deterministic eval preprocessing: sample -> (image float normalized, target).

    `target` picks the sample's `label` (long scalar), `segmentation` (long HxW) or `depth`
    (float HxW). With `img_size`, the image is resized (shorter side) and center-cropped; label
    maps follow with NEAREST interpolation. `resize_ratio` > 1 resizes a bit larger before the crop
    (the classic 256/224 for classification). Without `img_size` the geometry is left alone.
    """

    def __init__(self, target: str, img_size: int | None = None, resize_ratio: float = 1.0):
        if target not in ("label", "segmentation", "depth"):
            raise ValueError(f"unknown eval target {target!r}")
        self.target = target
        steps: list[v2.Transform] = []
        if img_size is not None:
            steps = [v2.Resize(int(round(img_size * resize_ratio)), interpolation=BICUBIC, antialias=True),
                     v2.CenterCrop(img_size)]
        self.transform = v2.Compose([*steps, normalize()])
        self.geometric = bool(steps)

    def batch(self, samples: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The items of `samples`, as `__call__` gives them. Without geometry (the scenes), the same
        normalization runs once on the stacked images: per sample, torchvision's dispatch cost more
        than the arithmetic (about 2 s of a default-sweep trial's 9 s of evaluation)."""
        sizes = {tuple(s["image"].shape) for s in samples}
        if self.geometric or len(sizes) != 1:
            return [self(s) for s in samples]
        images = self.transform(tv_tensors.Image(torch.stack([s["image"] for s in samples])))
        return [(image, target) for image, target in zip(_plain(images), map(self._target, samples))]

    def _target(self, sample: dict[str, Any], label_map: torch.Tensor | None = None) -> torch.Tensor:
        """The sample's target; `label_map`: its segmentation/depth after the geometry, if any."""
        if self.target == "label":
            return torch.tensor(sample["label"], dtype=torch.long)
        value = sample[self.target] if label_map is None else _plain(label_map)
        return value.to(torch.long if self.target == "segmentation" else torch.float32)

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = {"image": sample["image"]}
        if self.target != "label":
            keep[self.target] = sample[self.target]
        out = self.transform(_wrap(keep))
        return _plain(out["image"]), self._target(sample, out.get(self.target))


# ----------------------------------------------------------------------------------------------
# Datasets applying a transform
# ----------------------------------------------------------------------------------------------


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the caller's setting.

    One sample's tensors are far too small to split across threads: with the default threads,
    OpenMP synchronization dominates, and on 2 busy cores multi-crop augmentation measured >10x
    slower (150 ms vs 12 ms per sample). DataLoader workers already use one thread each.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def augment_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The seed of one training sample's augmentation: a pure function of (trial seed, epoch, index),
    and of the copy's number when repeated augmentation shows a sample several times in an epoch."""
    if repeat:
        return derive_seed("augment", int(seed), int(epoch), int(index), int(repeat))
    return derive_seed("augment", int(seed), int(epoch), int(index))


class TrainDataset(Dataset):
    """Applies a random transform whose randomness is a pure function of (seed, epoch, index).

    `__getitem__` seeds torch's CPU generator from that triple inside `fork_rng`, so it neither
    depends on nor disturbs the caller's random state, and a run resumed mid-epoch reproduces the
    same samples. A key is an index (at the epoch `set_epoch` chose) or an `(epoch, index)` pair
    (`(epoch, index, repeat)` for the copies of repeated augmentation):
    the pairs let one DataLoader, and its workers, serve every epoch of a run (workers hold a copy
    of the dataset, so they would never see a later `set_epoch`). Batch items with `collate`
    (`collate_multicrop` for multi-crop items, else torch's default).
    """

    def __init__(self, base: Dataset, transform: Callable[[dict], Any], seed: int,
                 collate: Callable[[Sequence[Any]], Any] = default_collate):
        self.base, self.transform, self.seed, self._collate = base, transform, seed, collate
        self.epoch = 0

    def collate(self, items: Sequence[Any]) -> Any:
        """The DataLoader's `collate_fn`: a batch from a list of items."""
        return self._collate(items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def sample_seed(self, key: int | tuple[int, ...]) -> tuple[int, int]:
        """(index, augmentation seed) of a key: an index, (epoch, index) or (epoch, index, repeat)."""
        epoch, index, *repeat = key if isinstance(key, tuple) else (self.epoch, key)
        return int(index), augment_seed(self.seed, epoch, index, *repeat)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, seed = self.sample_seed(key)
        sample = self.base[index]
        with single_threaded(), torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed (and so disturb) CUDA's.
            torch.default_generator.manual_seed(seed)
            return self.transform(sample)


class EvalDataset(Dataset):
    """A base dataset seen through a deterministic eval transform; `num_classes` when it has classes."""

    def __init__(self, base: Dataset, transform: Callable[[dict], Any], num_classes: int | None = None):
        self.base, self.transform, self.num_classes = base, transform, num_classes

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        with single_threaded():
            return self.transform(sample)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A DataLoader's batched fetch: one normalization for the batch where the transform can."""
        if not isinstance(self.transform, EvalTransform):
            return [self[i] for i in indices]
        samples = [self.base[i] for i in indices]
        with single_threaded():
            return self.transform.batch(samples)
