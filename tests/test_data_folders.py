"""Local dataset folders: layouts, label conventions, clear errors, and the builders on them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import TrialConfig
from trainer.data import (
    IGNORE_INDEX,
    DataLayoutError,
    DepthFolderDataset,
    ImageFolderDataset,
    SegmentationFolderDataset,
    build_eval_datasets,
    build_train_dataset,
    num_classes,
)


def _rgb(path: Path, size=(20, 14), value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _palette_png(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])  # colours != indices
    img.save(path)


@pytest.fixture
def imagenet(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    _rgb(root / "train" / "cat" / "a.jpg", value=10)
    _rgb(root / "train" / "cat" / "b.png", value=20)
    _rgb(root / "train" / "dog" / "c.JPEG", value=30)
    _rgb(root / "train" / "eel" / "d.jpg", value=40)
    _rgb(root / "val" / "eel" / "e.png", value=50)  # val lacks cat and dog: indices must not shift
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def ade20k(tmp_path) -> Path:
    root = tmp_path / "ade"
    labels = np.array([[0, 1, 5], [150, 0, 2]])
    for split in ("training", "validation"):
        _rgb(root / "images" / split / "ADE_1.jpg", size=(3, 2))
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "annotations" / split / "ADE_1.png")
    return root


@pytest.fixture
def voc(tmp_path) -> Path:
    root = tmp_path / "voc"
    for name, value in (("2007_000032", 0), ("2007_000033", 15)):
        _rgb(root / "JPEGImages" / f"{name}.jpg", size=(4, 3))
        indices = np.full((3, 4), value)
        indices[0, 0] = 255  # object boundary
        _palette_png(root / "SegmentationClass" / f"{name}.png", indices)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000033\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    return root


@pytest.fixture
def nyu(tmp_path) -> Path:
    root = tmp_path / "nyu"
    millimetres = np.array([[0, 1500], [65535, 250]], dtype=np.uint16)
    for split in ("train", "val"):
        _rgb(root / split / "0001.jpg", size=(2, 2))
        Image.fromarray(millimetres).save(root / split / "0001_depth.png")
        _rgb(root / split / "0002.png", size=(2, 2))
        np.save(root / split / "0002_depth.npy", np.array([[1.25, 0.0], [np.nan, 9.5]], dtype=np.float32))
    return root


def test_image_folder(imagenet):
    train = ImageFolderDataset(imagenet, "train")
    assert train.classes == ["cat", "dog", "eel"] and len(train) == 4
    labels = sorted(train[i]["label"] for i in range(4))
    assert labels == [0, 0, 1, 2]
    item = train[0]
    assert item["image"].shape == (3, 14, 20) and item["image"].dtype == torch.uint8
    val = ImageFolderDataset(imagenet, "val")
    assert len(val) == 1 and val[0]["label"] == 2  # "eel" keeps its train index


def test_ade20k_reduces_the_zero_label(ade20k):
    ds = SegmentationFolderDataset(ade20k, "val", layout="ade20k")
    assert ds.num_classes == 150 and len(ds) == 1
    item = ds[0]
    assert item["image"].shape == (3, 2, 3)
    assert item["segmentation"].dtype == torch.long
    assert item["segmentation"].tolist() == [[IGNORE_INDEX, 0, 4], [149, IGNORE_INDEX, 1]]


def test_voc_reads_palette_indices(voc):
    train = SegmentationFolderDataset(voc, "train", layout="voc")
    assert train.num_classes == 21 and len(train) == 2
    mask = train[1]["segmentation"]
    assert mask.shape == (3, 4) and mask[0, 0] == 255 and torch.all(mask.flatten()[1:] == 15)
    assert len(SegmentationFolderDataset(voc, "val", layout="voc")) == 1


def test_voc_rejects_colour_masks(voc):
    Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(voc / "SegmentationClass" / "2007_000033.png")
    with pytest.raises(ValueError, match="palette"):
        SegmentationFolderDataset(voc, "val", layout="voc")[0]


def test_nyu_depth_in_metres(nyu):
    ds = DepthFolderDataset(nyu, "train")
    assert len(ds) == 2
    png, npy = ds[0], ds[1]
    assert png["depth"].dtype == torch.float32 and png["image"].shape == (3, 2, 2)
    assert torch.allclose(png["depth"], torch.tensor([[0.0, 1.5], [65.535, 0.25]]))
    assert torch.allclose(npy["depth"], torch.tensor([[1.25, 0.0], [0.0, 9.5]]))  # NaN -> invalid (0)


def test_missing_paths_name_the_path_and_the_layout(tmp_path, imagenet, voc, nyu):
    cases = [
        (lambda: ImageFolderDataset(tmp_path / "nowhere", "train"), "nowhere/train", "ImageNet-style"),
        (lambda: SegmentationFolderDataset(tmp_path / "ade", "train"), "images/training", "ADE20K"),
        (lambda: DepthFolderDataset(tmp_path, "val"), "val", "NYU-style"),
    ]
    (voc / "SegmentationClass" / "2007_000032.png").unlink()
    cases.append((lambda: SegmentationFolderDataset(voc, "train", layout="voc"), "2007_000032.png", "Pascal VOC"))
    (nyu / "val" / "0002_depth.npy").unlink()
    cases.append((lambda: DepthFolderDataset(nyu, "val"), "0002_depth", "NYU-style"))
    for make, path, layout in cases:
        with pytest.raises(DataLayoutError) as err:
            make()
        assert path in str(err.value) and layout in str(err.value)
        assert isinstance(err.value, FileNotFoundError)


def _folders_cfg(**data) -> TrialConfig:
    return TrialConfig.model_validate({"data": {"dataset": "folders", **data}, "model": {"img_size": 16}})


def test_builders_on_folders(imagenet, ade20k, nyu):
    cfg = _folders_cfg(classification_root=str(imagenet), segmentation_root=str(ade20k), depth_root=str(nyu))
    assert num_classes(cfg) == 3
    image, label = build_train_dataset(cfg)[2]
    assert image.shape == (3, 16, 16) and label.dtype == torch.long
    data = build_eval_datasets(cfg)
    assert data.num_classes == 3 and data.segmentation_num_classes == 150 and data.max_depth == 10.0
    image, label = data.classification[1][0]
    assert image.shape == (3, 16, 16) and int(label) == 2
    image, mask = data.segmentation[0][0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert set(mask.unique().tolist()) <= {0, 1, 4, 149, IGNORE_INDEX}  # nearest: no blended labels
    _, depth = data.depth[1][0]
    assert depth.shape == (16, 16)
    assert set(depth.flatten().tolist()) <= set(torch.tensor([0.0, 1.5, 65.535, 0.25]).tolist())


def test_only_configured_folders_are_evaluated(imagenet):
    data = build_eval_datasets(_folders_cfg(classification_root=str(imagenet)))
    assert data.classification is not None and data.segmentation is None and data.depth is None
    nothing = _folders_cfg()
    assert build_eval_datasets(nothing).classification is None
    with pytest.raises(ValueError, match="classification_root"):
        build_train_dataset(nothing)


def test_eval_caps_draw_a_fixed_subset_across_classes(imagenet):
    cfg = TrialConfig.model_validate({"data": {"dataset": "folders", "classification_root": str(imagenet)},
                                      "model": {"img_size": 16}, "evaluation": {"max_train_samples": 2}})
    train, _ = build_eval_datasets(cfg).classification
    again, _ = build_eval_datasets(cfg).classification
    assert len(train) == 2
    assert [int(train[i][1]) for i in range(2)] == [int(again[i][1]) for i in range(2)]
