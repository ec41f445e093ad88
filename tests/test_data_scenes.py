"""The generated scenes: determinism, the sample contract, label semantics, builders."""

import time

import pytest
import torch

from trainer.config import TrialConfig
from trainer.data import (
    ScenesDataset,
    build_eval_datasets,
    build_train_dataset,
    dominant_category,
    num_classes,
    scenes_split,
)
from trainer.data.scenes import BACKGROUND_DEPTH, CHUNK, generate_scenes


@pytest.fixture(scope="module")
def scenes() -> ScenesDataset:
    return ScenesDataset(300, image_size=32, num_classes=4, seed=3).materialize()


def _same(a: dict, b: dict) -> bool:
    return a["label"] == b["label"] and all(torch.equal(a[k], b[k]) for k in ("image", "segmentation", "depth"))


def test_sample_contract(scenes):
    item = scenes[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["segmentation"].shape == (32, 32) and item["segmentation"].dtype == torch.long
    assert item["depth"].shape == (32, 32) and item["depth"].dtype == torch.float32
    assert isinstance(item["label"], int) and 0 <= item["label"] < 4
    for i in range(len(scenes)):
        seg, depth = scenes[i]["segmentation"], scenes[i]["depth"]
        assert 0 <= seg.min() and seg.max() <= 4
        assert (seg > 0).any(), "every scene shows at least one object"
        assert torch.all(depth[seg == 0] == BACKGROUND_DEPTH)
        assert torch.all((depth[seg > 0] >= 0.2) & (depth[seg > 0] < BACKGROUND_DEPTH))


def test_label_is_the_category_with_the_largest_visible_area(scenes):
    for i in range(len(scenes)):
        item = scenes[i]
        area = torch.bincount(item["segmentation"].flatten(), minlength=5)[1:]
        assert item["label"] == int(area.argmax()) == dominant_category(item["segmentation"])
        assert area[item["label"]] == area.max()
    # Balanced enough to learn: every category wins in a fair share of the scenes.
    counts = torch.bincount(torch.tensor([scenes[i]["label"] for i in range(len(scenes))]), minlength=4)
    assert counts.min() > 0.12 * len(scenes), counts


def test_label_needs_the_whole_image():
    """Neither the centre of the image nor the largest single object decides the label: the areas
    of all instances of each category must be summed over the whole image."""
    n = 400
    out = generate_scenes(n, 32, 4, torch.Generator().manual_seed(0))
    segmentation = out["category"].gather(1, out["instance"].view(n, -1).long()).view(n, 32, 32)
    centre = segmentation[:, 12:20, 12:20].reshape(n, -1).mode(dim=1).values - 1
    assert (centre != out["label"]).float().mean() > 0.5
    instance_area = torch.zeros(n, out["category"].shape[1]).scatter_add_(
        1, out["instance"].view(n, -1).long(), torch.ones(n, 32 * 32))
    largest = instance_area[:, 1:].argmax(dim=1) + 1
    largest_category = out["category"].gather(1, largest[:, None])[:, 0] - 1
    assert (largest_category != out["label"]).float().mean() > 0.08


def test_ties_go_to_the_lowest_category():
    seg = torch.tensor([[0, 2, 2], [3, 3, 0]])
    assert dominant_category(seg) == 1
    assert dominant_category(torch.zeros(4, 4, dtype=torch.long)) == -1


def test_objects_are_layered_far_to_near_and_occlude():
    out = generate_scenes(64, 32, 4, torch.Generator().manual_seed(0))
    depth = out["depth"][:, 1:]  # instance id k = k-th drawn object
    active = out["category"][:, 1:] > 0
    for row, used in zip(depth, active):
        d = row[used]
        assert torch.all(d[1:] <= d[:-1]), "later (drawn on top) objects must be nearer"
    # Unused slots come first, so the nearest object is always the last instance id, and it is
    # never occluded: all of its pixels are visible.
    nearest = active.shape[1]
    assert all((inst == nearest).any() for inst in out["instance"])


def test_deterministic_and_independent_of_access_order(scenes):
    fresh = ScenesDataset(300, image_size=32, num_classes=4, seed=3)
    for i in (299, 0, CHUNK, 123):  # random order, across the chunk boundary
        assert _same(fresh[i], scenes[i])
    other = ScenesDataset(300, image_size=32, num_classes=4, seed=4)
    assert not torch.equal(other[0]["image"], scenes[0]["image"])
    with pytest.raises(IndexError):
        scenes[300]


def test_train_and_val_splits_do_not_overlap():
    train = scenes_split("train", 64, 32, 4, seed=0)
    val = scenes_split("val", 64, 32, 4, seed=0)
    train_images = {bytes(train[i]["image"].numpy()) for i in range(64)}
    assert not any(bytes(val[i]["image"].numpy()) in train_images for i in range(64))


@pytest.mark.parametrize("classes", [2, 10])
def test_other_category_counts(classes):
    ds = ScenesDataset(40, image_size=32, num_classes=classes, seed=1)
    segs = torch.stack([ds[i]["segmentation"] for i in range(40)])
    assert segs.max() <= classes and all(0 <= ds[i]["label"] < classes for i in range(40))


def test_large_images():
    item = ScenesDataset(2, image_size=224)[1]
    assert item["image"].shape == (3, 224, 224) and item["segmentation"].shape == (224, 224)
    assert item["label"] == dominant_category(item["segmentation"])


def test_generation_is_fast():
    """CPU time on one thread, so that other processes sharing the machine do not make it flaky."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        ScenesDataset(1024, image_size=32).materialize()
        assert time.process_time() - start < 3.0  # ~0.15 s on an idle core
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Builders on scenes
# ------------------------------------------------------------------------------------------------


def _cfg(**overrides) -> TrialConfig:
    data = {"scenes": {"train_size": 96, "val_size": 40, "seed": 5}}
    return TrialConfig.model_validate({"data": data, **overrides})


def test_supervised_train_dataset():
    cfg = _cfg()
    ds = build_train_dataset(cfg)
    assert len(ds) == 96 and num_classes(cfg) == 4
    image, label = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.long and label.ndim == 0 and 0 <= int(label) < 4
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], image)


def test_dinov2_train_dataset_and_collate():
    from trainer.data import collate_multicrop

    cfg = _cfg(framework="dinov2", dinov2={"local_crops": 3})
    ds = build_train_dataset(cfg)
    batch = collate_multicrop([ds[i] for i in range(5)])
    assert batch["global_crops"].shape == (10, 3, 32, 32)
    assert batch["local_crops"].shape == (15, 3, 12, 12)
    assert batch["batch_size"] == 5


def test_eval_datasets_share_the_scenes():
    cfg = _cfg(evaluation={"max_train_samples": 50, "max_val_samples": 1000})
    data = build_eval_datasets(cfg)
    assert data.num_classes == 4 and data.segmentation_num_classes == 5
    assert [len(d) for d in data.classification] == [50, 40]
    assert data.segmentation[0].num_classes == 5
    (image, label), (image2, mask), (image3, depth) = (data.classification[1][2], data.segmentation[1][2],
                                                       data.depth[1][2])
    assert torch.equal(image, image2) and torch.equal(image, image3)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.dtype == torch.long and depth.dtype == torch.float32 and mask.shape == depth.shape == (32, 32)
    assert int(label) == dominant_category(mask)
    assert torch.all((depth == BACKGROUND_DEPTH) == (mask == 0))
    # The eval train images are the training scenes (before augmentation).
    raw = build_train_dataset(cfg).base[0]["image"]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    restored = data.classification[0][0][0] * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(restored * 255, raw.float(), atol=1e-3)
