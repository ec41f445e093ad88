"""DINOv2 linear segmentation protocol (trainer/evaluation/dinov2/segmentation.py): sliding-window
inference, the cat_max_ratio crop, the warmup + poly schedule, end to end on a learnable synthetic
set, and 2 gloo processes against 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from trainer.evaluation.dinov2.segmentation import dinov2_segmentation, poly_schedule
from trainer.evaluation.dinov2.segmentation_augment import (
    CROP_TRIES,
    TrainAugment,
    cat_max_ratio_crop,
    photometric_distortion,
)
from trainer.evaluation.dinov2.sliding_window import slide_inference, tta_probabilities, window_grid

# Three classes, each a colour (red, green, blue) with noise: learnable from patch tokens.
COLOURS = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=torch.float32)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
        num_classes=0, init_values=1e-4, dynamic_img_size=True,
    ).eval()


class ColourScenes(Dataset):
    """Images of varying size split at a random point into four quadrants of random classes; a
    border of ignored pixels on some images."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(size):
            h, w = (int(v) for v in torch.randint(24, 44, (2,), generator=g))
            y, x = int(torch.randint(8, h - 8, (), generator=g)), int(torch.randint(8, w - 8, (), generator=g))
            classes = torch.randint(0, 3, (4,), generator=g)
            mask = torch.empty(h, w, dtype=torch.long)
            mask[:y, :x], mask[:y, x:], mask[y:, :x], mask[y:, x:] = classes
            noise = torch.randn(3, h, w, generator=g) * 12
            image = (COLOURS[mask].permute(2, 0, 1) + noise).clamp(0, 255).to(torch.uint8)
            if i % 3 == 0:
                mask[:2] = 255
            self.samples.append({"image": image, "segmentation": mask})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


PROTOCOL = dict(
    crop_size=32, short_side=32, stride=21, scale_range=(0.5, 2.0), cat_max_ratio=0.75, iterations=30,
    batch_size=8, lr=3e-2, weight_decay=1e-4, warmup_iterations=5, warmup_ratio=1e-6, poly_power=1.0,
    ms_scales=(1.0, 1.5), multi_scale=True,
)


def run_protocol(**overrides) -> tuple[dict[str, float], bool]:
    """The metrics, and whether the global RNG state was the same after the protocol as before."""
    backbone, train, val = tiny_vit(), ColourScenes(24, seed=1), ColourScenes(8, seed=2)
    state = torch.get_rng_state()
    metrics = dinov2_segmentation(backbone, train, val, 3, **{**PROTOCOL, **overrides})
    return metrics, torch.equal(state, torch.get_rng_state())


# --- sliding window ----------------------------------------------------------------------------

def test_window_grid_follows_mmseg():
    # h_grids = max(50 - 16 + 11 - 1, 0) // 11 + 1 = 5; the last window is pushed back inside.
    rows = sorted({(y1, y2) for y1, y2, _, _ in window_grid(50, 12, 16, 11)})
    assert rows == [(0, 16), (11, 27), (22, 38), (33, 49), (34, 50)]
    assert {(x1, x2) for _, _, x1, x2 in window_grid(50, 12, 16, 11)} == {(0, 12)}  # narrower than a crop


@pytest.mark.parametrize("size,stride", [((50, 37), 11), ((40, 12), 16), ((16, 16), 5)])
def test_slide_inference_equals_whole_image_for_a_per_pixel_model(size, stride):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(5, generator=g))
    image = torch.randn(2, 3, *size, generator=g)
    with torch.no_grad():
        whole = conv(image)
        slid = slide_inference(conv, image, 5, crop_size=16, stride=stride, window_batch=3)
    torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


def test_tta_probabilities_of_a_per_pixel_model_are_its_softmax():
    """Resized to short side = its own short side, flipped and back: the whole-image softmax."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)

    def predict(crops):
        return torch.einsum("kc,bchw->bkhw", weight, crops)

    image = torch.randint(0, 256, (3, 20, 30), generator=g, dtype=torch.uint8)
    probs = tta_probabilities(predict, image, 4, crop_size=16, stride=10, short_side=20, flip=True)
    from trainer.evaluation.dinov2.sliding_window import normalize_image
    expected = predict(normalize_image(image)[None])[0].softmax(0)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


# --- training augmentation ---------------------------------------------------------------------

def _max_ratio(window: torch.Tensor) -> tuple[int, float]:
    counts = torch.bincount(window[window != 255].reshape(-1))
    counts = counts[counts > 0]
    return len(counts), float(counts.max() / counts.sum())


def test_cat_max_ratio_crop_accepts_only_crops_under_the_ratio():
    # Left half class 0, right half class 1, a row ignored: a 16-wide crop is valid iff the split
    # lies 5..11 columns in (7 of 49 offsets); a random crop is rarely valid.
    mask = torch.zeros(16, 64, dtype=torch.long)
    mask[:, 32:] = 1
    mask[0] = 255
    accepted = 0
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, h, w, ok = cat_max_ratio_crop(mask, 16, 0.75)
        assert (h, w) == (16, 16) and top == 0 and 0 <= left <= 48
        classes, ratio = _max_ratio(mask[top:top + h, left:left + w])
        if ok:
            accepted += 1
            assert classes > 1 and ratio < 0.75
    # 10 checked draws (the 11th is kept unchecked): P(accepted) = 1 - (42/49) ** 10 = 0.79, against
    # 7/49 = 0.14 for one draw; 300 trials: standard deviation 0.024.
    assert 0.7 < accepted / 300 < 0.87


def test_cat_max_ratio_crop_keeps_the_eleventh_draw_when_no_crop_is_valid():
    mask = torch.zeros(20, 30, dtype=torch.long)  # one class: no crop has two classes
    torch.manual_seed(7)
    top, left, h, w, ok = cat_max_ratio_crop(mask, 8, 0.75)
    torch.manual_seed(7)
    draws = [(int(torch.randint(0, 13, ())), int(torch.randint(0, 23, ()))) for _ in range(CROP_TRIES + 1)]
    assert not ok and (top, left) == draws[-1] and (h, w) == (8, 8)
    torch.manual_seed(7)
    assert cat_max_ratio_crop(mask, 8, 1.0)[:2] == draws[0]  # ratio 1: the first draw, no check


def test_train_augment_pads_small_crops_with_ignore_and_keeps_label_values():
    torch.manual_seed(0)
    sample = ColourScenes(1, seed=3)[0]
    augment = TrainAugment(crop_size=64, short_side=24, scale_range=(0.5, 1.0), cat_max_ratio=0.75)
    image, mask = augment(sample["image"], sample["segmentation"])
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and mask.shape == (64, 64)
    assert (mask[-8:] == 255).all() and (image[:, -8:] == 0).all()  # short side <= 24 < 64
    assert set(mask.unique().tolist()) <= set(sample["segmentation"].unique().tolist()) | {255}


def test_photometric_distortion_changes_the_image_and_stays_uint8():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8)
    outs = [photometric_distortion(image) for _ in range(20)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    assert any(not torch.equal(o, image) for o in outs)


# --- schedule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("power", [1.0, 0.9])
def test_poly_schedule_with_linear_warmup_matches_mmcv(power):
    base, total, warmup, ratio = 1e-3, 100, 10, 1e-6
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = poly_schedule(optimizer, iterations=total, warmup_iterations=warmup, warmup_ratio=ratio,
                             poly_power=power)
    seen = {}
    for t in range(total):
        seen[t] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()

    def mmcv(t):  # PolyLrUpdaterHook.get_lr, then LrUpdaterHook.get_warmup_lr('linear') for t < warmup
        regular = (base - 0.0) * (1 - t / total) ** power + 0.0
        if t >= warmup:
            return regular
        k = (1 - t / warmup) * (1 - ratio)
        return regular * (1 - k)

    for t in (0, 1, 5, 9, 10, 11, 50, 99):
        assert math.isclose(seen[t], mmcv(t), rel_tol=1e-12), (t, seen[t], mmcv(t))
    assert math.isclose(seen[0], base * ratio, rel_tol=1e-9)


# --- end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_process_runs():
    return run_protocol(), run_protocol()


def test_end_to_end_learns_colour_classes_deterministically(single_process_runs):
    (first, rng_kept), (second, _) = single_process_runs
    assert set(first) == {"seg_miou", "seg_pixel_acc", "seg_miou_ms", "seg_pixel_acc_ms"}
    assert first["seg_miou"] > 0.85 and first["seg_miou_ms"] > 0.85, first
    assert all(0 <= v <= 1 for v in first.values())
    assert first == second  # same weights, data and seed: the same numbers
    assert rng_kept  # the global RNG is left as it was: no need for the caller to fork it


def test_seed_changes_the_run_and_lin_alone_has_no_ms_keys():
    metrics, _ = run_protocol(multi_scale=False, iterations=6)
    other, _ = run_protocol(multi_scale=False, iterations=6, seed=1)
    assert set(metrics) == {"seg_miou", "seg_pixel_acc"} and metrics != other


# --- distributed -------------------------------------------------------------------------------

# Per-sample features equal up to the last bits of a matmul over another batch split; BN sums in
# float64 and gradients summed over ranks in another order: the metrics agree to ~1e-6; one flipped
# pixel of the ~8k evaluated moves an IoU by ~1e-3.
TOLERANCE = 2e-3


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            run_protocol(batch_size=3, iterations=1)  # 3 crops over 2 processes
            raised = False
        except ValueError:
            raised = True
        metrics, _ = run_protocol()
        Path(out, f"metrics{rank}.json").write_text(json.dumps({"metrics": metrics, "raised": raised}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_metrics_of_one(tmp_path, single_process_runs):
    single = single_process_runs[0][0]
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert got["raised"], "batch_size not divisible by the world size must raise"
        assert set(got["metrics"]) == set(single)
        for name, value in single.items():
            assert math.isclose(got["metrics"][name], value, abs_tol=TOLERANCE), (name, got["metrics"][name], value)
