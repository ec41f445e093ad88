"""Augmentations: exact reproducibility, output contracts, label maps following the geometry."""

import random

import pytest
import torch
from torch.utils.data import DataLoader

from trainer.config import TrialConfig
from trainer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
    ScenesDataset,
    SupervisedTransform,
    TrainDataset,
    collate_multicrop,
    resolve_img_size,
    resolve_local_crop_size,
)

MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]


@pytest.fixture(scope="module")
def scenes() -> ScenesDataset:
    return ScenesDataset(16, image_size=32, seed=11)


def _equal(a, b) -> bool:
    """Deep equality of transform outputs (tensors, lists, tuples, dicts)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["supervised", "multicrop"])
def test_augmentation_is_a_pure_function_of_seed_epoch_index(scenes, kind):
    transform = SupervisedTransform(32) if kind == "supervised" else MultiCropTransform(32, 12, 2)
    ds, twin = TrainDataset(scenes, transform, seed=1), TrainDataset(scenes, transform, seed=1)
    first = ds[5]
    _ = [ds[i] for i in range(3)]  # other accesses in between change nothing
    assert _equal(ds[5], first)
    assert _equal(twin[5], first)
    ds.set_epoch(1)
    assert not _equal(ds[5], first)
    ds.set_epoch(0)
    assert _equal(ds[5], first)
    assert not _equal(TrainDataset(scenes, transform, seed=2)[5], first)
    assert not _equal(ds[6], first)


def test_global_random_state_is_neither_used_nor_disturbed(scenes):
    ds = TrainDataset(scenes, MultiCropTransform(32, 12, 2), seed=0)
    torch.manual_seed(123)
    random.seed(123)
    first = ds[2]
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(999)  # a different global state gives the same sample
    random.seed(999)
    assert _equal(ds[2], first)
    torch.manual_seed(123)
    random.seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    ds[2]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads  # augmentation runs single-threaded, then restores
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    if torch.cuda.is_available():  # the GPU generators are left alone too
        torch.cuda.manual_seed_all(7)
        cuda_state = torch.cuda.get_rng_state_all()
        ds[2]
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_state))


def test_dataloader_workers_give_the_same_batches(scenes):
    """What resuming relies on: batches depend on (seed, epoch, indices) only, not on the workers."""
    ds = TrainDataset(scenes, SupervisedTransform(32), seed=0)
    ds.set_epoch(3)
    order = [5, 1, 9, 2, 14, 0]

    def batches(workers: int) -> list:
        loader = DataLoader(ds, batch_size=3, sampler=order, num_workers=workers)
        return list(loader)

    assert _equal(batches(0), batches(2))


def test_supervised_outputs(scenes):
    image, label = SupervisedTransform(32, three_augment=True)(scenes[0])
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and type(image) is torch.Tensor
    assert label.dtype == torch.long and label.ndim == 0
    restored = image * STD + MEAN  # normalized with the ImageNet statistics
    assert restored.min() >= -1e-4 and restored.max() <= 1 + 1e-4
    plain, _ = SupervisedTransform(20, three_augment=False)(scenes[0])
    assert plain.shape == (3, 20, 20)


def test_supervised_relabels_from_the_crop():
    """On scenes the label is recomputed from the cropped segmentation, or kept if no object is left."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    everywhere_cat1 = dict(image=image, label=0, segmentation=torch.full((32, 32), 2))
    no_objects = dict(image=image, label=3, segmentation=torch.zeros(32, 32, dtype=torch.long))
    relabel = SupervisedTransform(32, relabel_from_segmentation=True)
    assert int(relabel(everywhere_cat1)[1]) == 1
    assert int(relabel(no_objects)[1]) == 3
    assert int(SupervisedTransform(32)(everywhere_cat1)[1]) == 0  # folders: labels are never touched
    # A full-image "crop" keeps the scene's own label.
    scenes = ScenesDataset(8, image_size=32, seed=2)
    full = SupervisedTransform(32, scale=(1.0, 1.0), relabel_from_segmentation=True)
    assert all(int(full(scenes[i])[1]) == scenes[i]["label"] for i in range(8))


def test_multicrop_outputs_and_collate(scenes):
    transform = MultiCropTransform(32, 12, 3)
    items = [TrainDataset(scenes, transform, seed=0)[i] for i in range(4)]
    assert [t.shape for t in items[0]["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in items[0]["local_crops"]] == [(3, 12, 12)] * 3
    batch = collate_multicrop(items)
    assert batch["batch_size"] == 4
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (12, 3, 12, 12)
    # Crop-major order: all first global crops, then all second ones; locals likewise.
    assert torch.equal(batch["global_crops"][1], items[1]["global_crops"][0])
    assert torch.equal(batch["global_crops"][4 + 2], items[2]["global_crops"][1])
    assert torch.equal(batch["local_crops"][2 * 4 + 3], items[3]["local_crops"][2])
    no_locals = collate_multicrop([MultiCropTransform(32, 12, 0)(scenes[0])])
    assert no_locals["local_crops"] is None and no_locals["global_crops"].shape == (2, 3, 32, 32)


def test_eval_identity_geometry_only_normalizes(scenes):
    sample = scenes[4]
    image, mask = EvalTransform("segmentation")(sample)
    assert torch.allclose(image, (sample["image"].float() / 255 - MEAN) / STD, atol=1e-5)
    assert torch.equal(mask, sample["segmentation"]) and mask.dtype == torch.long
    _, depth = EvalTransform("depth")(sample)
    assert torch.equal(depth, sample["depth"]) and depth.dtype == torch.float32
    _, label = EvalTransform("label")(sample)
    assert int(label) == sample["label"]


def test_eval_resize_moves_label_maps_with_nearest_interpolation():
    """Label maps are resized/cropped like the image but never blended nor normalized."""
    h, w = 30, 50
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[:, 25:] = 7
    mask[0, 0] = 255
    depth = torch.linspace(0.5, 4.0, w).expand(h, w).clone()
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, :, 25:] = 255
    sample = dict(image=image, segmentation=mask, depth=depth)
    out_image, out_mask = EvalTransform("segmentation", img_size=16)(sample)
    _, out_depth = EvalTransform("depth", img_size=16)(sample)
    assert out_image.shape == (3, 16, 16) and out_mask.shape == out_depth.shape == (16, 16)
    assert set(out_mask.unique().tolist()) <= {0, 7, 255}
    assert set(out_depth.flatten().tolist()) <= set(depth[0].tolist())
    # Center crop of the 16x26 resize keeps the two halves where they were: left 0, right 7.
    assert torch.all(out_mask[:, :5] == 0) and torch.all(out_mask[:, -5:] == 7)
    assert torch.all(out_depth[:, 1:] >= out_depth[:, :-1])


def test_crop_sizes_from_the_config():
    assert resolve_img_size(TrialConfig()) == 32
    assert resolve_img_size(TrialConfig(model={"scale": "tiny"})) == 224
    assert resolve_img_size(TrialConfig(model={"img_size": 64})) == 64
    assert resolve_local_crop_size(TrialConfig()) == 12  # 32 * 3/7 = 13.7 -> 3 patches of 4
    assert resolve_local_crop_size(TrialConfig(model={"scale": "small"})) == 96  # DINOv2's 224/16 setting
    assert resolve_local_crop_size(TrialConfig(model={"scale": "huge"})) == 98  # patch 14
    assert resolve_local_crop_size(TrialConfig(model={"img_size": 8, "patch_size": 8})) == 8  # at least one patch
    assert resolve_local_crop_size(TrialConfig(dinov2={"local_crop_size": 20})) == 20


@pytest.mark.parametrize("target", ["label", "segmentation", "depth"])
def test_batched_eval_fetch_equals_the_per_sample_transform(target):
    from trainer.data import EvalDataset, EvalTransform, scenes_split

    dataset = EvalDataset(scenes_split("val", 24, 32, 4, 0), EvalTransform(target))
    batched = dataset.__getitems__(list(range(5, 17)))
    for index, (image, value) in zip(range(5, 17), batched):
        expected_image, expected_value = dataset[index]
        assert torch.equal(image, expected_image)
        assert torch.equal(value, expected_value) and value.dtype == expected_value.dtype
