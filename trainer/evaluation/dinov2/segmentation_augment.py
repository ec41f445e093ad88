"""The training augmentation of DINOv2's linear segmentation protocol: mmseg's train pipeline
(Resize -> RandomCrop with cat_max_ratio -> RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad)
of dinov2_vit*14_ade20k_linear_config.py, on one (image, mask) sample, drawing from torch's global
RNG (the caller seeds it per sample). Sources: mmsegmentation 0.x mmseg/datasets/pipelines/transforms.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.evaluation.dinov2.sliding_window import normalize_image, rescaled_size, resize_image
from trainer.evaluation.metrics import IGNORE_INDEX

CROP_TRIES = 10  # mmseg RandomCrop: "Repeat 10 times", then the last draw is kept unchecked
# mmseg PhotoMetricDistortion defaults (the configs use `dict(type="PhotoMetricDistortion")`).
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18


def cat_max_ratio_crop(mask: Tensor, crop_size: int, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX,
                       ) -> tuple[int, int, int, int, bool]:
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`: (top, left, height, width, accepted).

    Offsets are uniform in [0, max(H - crop, 0)]; a window is accepted when it holds more than one
    non-ignored class and none covers `cat_max_ratio` or more of its non-ignored pixels. After
    CROP_TRIES rejections the next draw is kept unchecked (accepted False), as mmseg does. Draws from
    torch's global generator. A window is min(crop, H) x min(crop, W): smaller images are padded later.
    """
    height, width = mask.shape[-2:]

    def draw() -> tuple[int, int]:
        return (int(torch.randint(0, max(height - crop_size, 0) + 1, ())),
                int(torch.randint(0, max(width - crop_size, 0) + 1, ())))

    top, left = draw()
    accepted = cat_max_ratio >= 1
    if not accepted:
        for _ in range(CROP_TRIES):
            window = mask[..., top:top + crop_size, left:left + crop_size]
            counts = torch.bincount(window[window != ignore_index].reshape(-1).long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                accepted = True
                break
            top, left = draw()
    return top, left, min(crop_size, height), min(crop_size, width), accepted


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    value, _ = x.max(-3)
    delta = value - x.min(-3).values
    sat = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = delta.clamp_min(1e-12)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1, torch.zeros_like(hue))
    return torch.stack([hue, sat, value], -3)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack([torch.stack(c, 0) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return table.gather(1, i[None, None].expand(3, 1, *i.shape)).squeeze(1)


def photometric_distortion(image: Tensor) -> Tensor:
    """mmseg `PhotoMetricDistortion` on a uint8 3 x H x W image, drawing from torch's global RNG.

    Written by hand: torchvision's ColorJitter / RandomPhotometricDistort differ (multiplicative
    brightness, contrast and saturation blended with the grey image, hue +-0.05, channel swaps).
    Each op applies with p 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5) (before or after the
    HSV ops, p 0.5 each); saturation S x U(0.5, 1.5) in HSV; hue + randint(-18, 18) / 180 of a turn.
    Values clip to [0, 255] and truncate to integers after each op, as mmseg's uint8 round trips.
    Deviation: HSV stays in float (OpenCV quantizes H to 180 and S, V to 256 levels).
    """
    def coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def convert(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
        return (x * alpha + beta).clamp(0, 255).floor()

    x = image.float()
    if coin():
        x = convert(x, beta=uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_last = not coin()  # mmseg: mode = randint(2); mode 1 -> contrast first
    if not contrast_last and coin():
        x = convert(x, alpha=uniform(*CONTRAST_RANGE))
    if coin():
        hsv = _rgb_to_hsv(x / 255)
        hsv[1] = convert(hsv[1] * 255, alpha=uniform(*SATURATION_RANGE)) / 255
        x = (_hsv_to_rgb(hsv) * 255).round()
    if coin():
        shift = int(torch.randint(-HUE_DELTA, HUE_DELTA, ()))  # numpy randint: high excluded
        x = TF.adjust_hue(x.to(torch.uint8), shift / 180).float()
    if contrast_last and coin():
        x = convert(x, alpha=uniform(*CONTRAST_RANGE))
    return x.to(torch.uint8)


class TrainAugment:
    """mmseg's train pipeline of the DINOv2 linear config on one sample, drawing from torch's global
    RNG: Resize(img_scale=(99999999, short_side), ratio_range=scale_range) -> RandomCrop(crop_size,
    cat_max_ratio) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize -> Pad(crop_size, 0, 255).
    Returns (image float 3 x crop x crop, mask long crop x crop)."""

    def __init__(self, crop_size: int, short_side: int, scale_range: tuple[float, float], cat_max_ratio: float,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.crop_size, self.short_side, self.scale_range = crop_size, short_side, scale_range
        self.cat_max_ratio, self.ignore_index = cat_max_ratio, ignore_index
        self.flip = v2.RandomHorizontalFlip(0.5)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.scale_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        size = rescaled_size(*image.shape[-2:], int(self.short_side * ratio))
        image = tv_tensors.Image(resize_image(image, size))
        mask = tv_tensors.Mask(TF.resize(tv_tensors.Mask(mask), list(size)))  # Mask: NEAREST
        top, left, height, width, _ = cat_max_ratio_crop(mask.as_subclass(Tensor), self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, mask = TF.crop(image, top, left, height, width), TF.crop(mask, top, left, height, width)
        image, mask = self.flip(image, mask)  # one draw for both
        image = normalize_image(photometric_distortion(image.as_subclass(Tensor)))
        pad = [0, self.crop_size - width, 0, self.crop_size - height]  # mmcv impad: right / bottom
        image = F.pad(image.as_subclass(Tensor), pad, value=0.0)  # after Normalize, as mmseg
        mask = F.pad(mask.as_subclass(Tensor).long(), pad, value=self.ignore_index)
        return image, mask
