"""Real datasets read from local folders, returned as the same sample dicts as the scenes.

Items are dicts with `image` (uint8 3xHxW RGB) plus `label` (int), `segmentation` (long HxW, 255 =
ignore) or `depth` (float32 HxW metres, 0 = invalid). Nothing is ever downloaded: a missing folder
or file raises `DataLayoutError` naming the path and the layout that was expected.

Supported layouts:
- classification, ImageNet-style:   root/{train,val}/<class>/<image>.{jpg,png,...}
- segmentation, ADE20K:             root/images/{training,validation}/<name>.jpg
                                    root/annotations/{training,validation}/<name>.png
                                    (label 0 = "other" -> 255, k -> k - 1: 150 classes)
- segmentation, Pascal VOC:         root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png
                                    (palette PNG of class indices, 255 = boundary/ignore),
                                    root/ImageSets/Segmentation/{train,val}.txt: 21 classes
- depth, NYU-style:                 root/{train,val}/<name>.{jpg,png} with <name>_depth.png
                                    (16-bit millimetres) or <name>_depth.npy (float metres)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

IGNORE_INDEX = 255
SPLITS = ("train", "val")
SEGMENTATION_CLASSES = {"ade20k": 150, "voc": 21}

CLASSIFICATION_LAYOUT = "root/train/<class>/<image>.jpg and root/val/<class>/<image>.jpg (ImageNet-style)"
ADE20K_LAYOUT = ("root/images/{training,validation}/<name>.jpg and "
                 "root/annotations/{training,validation}/<name>.png (ADE20K)")
VOC_LAYOUT = ("root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png (palette) and "
              "root/ImageSets/Segmentation/{train,val}.txt (Pascal VOC)")
DEPTH_LAYOUT = ("root/{train,val}/<name>.jpg|png with root/{train,val}/<name>_depth.png "
                "(16-bit, millimetres) or <name>_depth.npy (float, metres) (NYU-style)")


class DataLayoutError(FileNotFoundError):
    """A dataset folder or file is missing; the message names it and the expected layout."""


def _require(path: Path, layout: str, what: str = "directory") -> Path:
    exists = path.is_dir() if what == "directory" else path.is_file()
    if not exists:
        raise DataLayoutError(f"{path}: {what} not found; expected layout: {layout}")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def load_rgb(path: Path) -> torch.Tensor:
    """An image file as a uint8 RGB tensor 3xHxW."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_index_png(path: Path) -> np.ndarray:
    """Class indices of a label PNG: palette ('P') or greyscale ('L') values, not colours."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: label PNG has mode {img.mode!r}; expected a palette ('P') or greyscale ('L') "
                             "image whose pixel values are class indices")
        return np.array(img)


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def classification_classes(root: Path) -> list[str]:
    """Class names: the sorted sub-folders of root/train (the same index order as ImageFolder)."""
    train = _require(Path(root) / "train", CLASSIFICATION_LAYOUT)
    classes, _ = find_classes(str(train))
    return classes


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-style folder; class indices always come from the train split,
    so a val split missing some classes still uses the same index for each class name."""

    def __init__(self, root: Path, split: str):
        _check_split(split)
        self.root = Path(root)
        self.classes = classification_classes(self.root)
        directory = _require(self.root / split, CLASSIFICATION_LAYOUT)
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise DataLayoutError(f"{directory}: no images found; expected layout: {CLASSIFICATION_LAYOUT}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return dict(image=load_rgb(Path(path)), label=label)


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------


class SegmentationFolderDataset(Dataset):
    """ADE20K or Pascal VOC semantic segmentation; masks use 255 for pixels to ignore."""

    def __init__(self, root: Path, split: str, layout: str = "ade20k"):
        _check_split(split)
        self.root, self.layout = Path(root), layout
        if layout not in SEGMENTATION_CLASSES:
            raise ValueError(f"unknown segmentation layout {layout!r}; expected one of {sorted(SEGMENTATION_CLASSES)}")
        self.num_classes = SEGMENTATION_CLASSES[layout]
        self.pairs = self._ade20k_pairs(split) if layout == "ade20k" else self._voc_pairs(split)

    def _ade20k_pairs(self, split: str) -> list[tuple[Path, Path]]:
        name = {"train": "training", "val": "validation"}[split]
        images = _require(self.root / "images" / name, ADE20K_LAYOUT)
        annotations = _require(self.root / "annotations" / name, ADE20K_LAYOUT)
        pairs = [(image, annotations / f"{image.stem}.png") for image in sorted(images.glob("*.jpg"))]
        if not pairs:
            raise DataLayoutError(f"{images}: no .jpg images found; expected layout: {ADE20K_LAYOUT}")
        for _, annotation in pairs:
            _require(annotation, ADE20K_LAYOUT, what="annotation file")
        return pairs

    def _voc_pairs(self, split: str) -> list[tuple[Path, Path]]:
        listing = _require(self.root / "ImageSets" / "Segmentation" / f"{split}.txt", VOC_LAYOUT, what="split list")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataLayoutError(f"{listing}: split list is empty; expected layout: {VOC_LAYOUT}")
        pairs = [(self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png") for i in ids]
        for image, mask in pairs:
            _require(image, VOC_LAYOUT, what="image file")
            _require(mask, VOC_LAYOUT, what="mask file")
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        mask = torch.from_numpy(load_index_png(mask_path).astype(np.int64))
        if self.layout == "ade20k":  # reduce_zero_label: 0 ("other") -> ignore, k -> k - 1
            mask = torch.where(mask == 0, IGNORE_INDEX, mask - 1)
        return dict(image=load_rgb(image_path), segmentation=mask)


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------


def _depth_file(image: Path) -> Path:
    for suffix in (".png", ".npy"):
        candidate = image.with_name(f"{image.stem}_depth{suffix}")
        if candidate.is_file():
            return candidate
    raise DataLayoutError(f"{image}: no depth map {image.stem}_depth.png or {image.stem}_depth.npy next to it; "
                          f"expected layout: {DEPTH_LAYOUT}")


def load_depth(path: Path) -> torch.Tensor:
    """Depth in metres (float32 HxW, 0 = invalid) from a 16-bit millimetre PNG or a float .npy."""
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        with Image.open(path) as img:
            depth = np.array(img).astype(np.float32) / 1000.0
    depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.from_numpy(np.ascontiguousarray(depth))


class DepthFolderDataset(Dataset):
    """NYU-style image + depth pairs in root/train and root/val."""

    def __init__(self, root: Path, split: str):
        _check_split(split)
        directory = _require(Path(root) / split, DEPTH_LAYOUT)
        images = sorted(p for p in directory.iterdir()
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not p.stem.endswith("_depth"))
        if not images:
            raise DataLayoutError(f"{directory}: no images found; expected layout: {DEPTH_LAYOUT}")
        self.pairs = [(image, _depth_file(image)) for image in images]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, depth_path = self.pairs[index]
        return dict(image=load_rgb(image_path), depth=load_depth(depth_path))
