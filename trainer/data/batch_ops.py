"""Per-sample random parameters and the batched pixel operations of batch_augment.py.

Parameters: each sample's generator, seeded by the dataset from (trial seed, epoch, index), draws
one fixed-layout row of uniforms; every parameter is a function of its own columns, so nothing
about one sample depends on another. Pixels: float images in [0, 1], [B, 3, H, W], transformed
for the whole batch with one parameter per sample.

Written by hand where torchvision's functional ops take one parameter per call (brightness,
contrast, saturation, hue factors, blur sigma): the same formulas as torchvision's `_blend`,
`adjust_hue` and `_get_gaussian_kernel1d`, broadcast over the batch; tests/test_batch_augment.py
checks each against torchvision sample by sample.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# The RGB <-> HSV conversions of torchvision's adjust_hue, which takes one hue factor per call.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as in DeiT and DINOv2
CROP_ATTEMPTS = 10  # torchvision's rejection-sampling attempts before the centre-crop fallback
MATMUL_RESIZE_MAX = 128  # above this image size, torch's resize per sample is faster than resized_crops
SOLARIZE_THRESHOLD = 128 / 255  # PIL's / torchvision's 128 on uint8
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's adjustments (factor columns, order ids)


def jitter_orders(adjustments: int) -> torch.Tensor:
    """All orders of the first `adjustments` of (brightness, contrast, saturation, hue): ColorJitter
    applies them in a uniformly random order (a disabled adjustment just drops out of its order)."""
    return torch.tensor(list(itertools.permutations(range(adjustments))))


class Geometry:
    """The first columns of every crop's draws: crop box and flip. Transforms add their own after END."""

    AREA = slice(0, CROP_ATTEMPTS)
    LOG_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
    TOP, LEFT, FLIP = range(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 3)
    END = 2 * CROP_ATTEMPTS + 3


def uniforms(seeds: Sequence[int], draws: int) -> torch.Tensor:
    """[B, draws] float64 uniforms in [0, 1), row b drawn from a generator seeded with seeds[b]."""
    return torch.stack([torch.rand(draws, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds])


def scaled(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniforms in [0, 1) -> U(low, high)."""
    return low + (high - low) * u


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast one value (or mask entry) per sample over its image."""
    return values[:, None, None, None]


def crop_boxes(u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
               ratio: Sequence[float] = CROP_RATIO) -> torch.Tensor:
    """torchvision's `RandomResizedCrop.get_params`, vectorized over the batch: up to 10 attempts of
    (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first that fits the image wins, at
    a uniform position; else the centre crop at the nearest allowed aspect.

    u: [B, >= Geometry.END] draws. Returns long [B, 4]: (top, left, height, width) in pixels."""
    heights, widths = heights.to(torch.float64)[:, None], widths.to(torch.float64)[:, None]
    area = heights * widths * scaled(u[:, Geometry.AREA], *scale)
    aspect = torch.exp(scaled(u[:, Geometry.LOG_RATIO], math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = fits.any(dim=1)
    heights, widths = heights[:, 0], widths[:, 0]

    in_ratio = widths / heights  # the fallback: the largest centred crop with an allowed aspect
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    # torch.randint(0, n + 1) is uniform on {0..n}: floor(u * (n + 1)); the fallback is centred.
    top = torch.where(found, torch.floor(u[:, Geometry.TOP] * (heights - h + 1)), torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(u[:, Geometry.LEFT] * (widths - w + 1)), torch.floor((widths - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


# ----------------------------------------------------------------------------------------------
# Geometry on pixels
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def resize_matrix(length: int, size: int) -> torch.Tensor:
    """[size, length] float32: torch's antialiased bicubic resize of one axis as a linear map.

    Taken from torch itself (resizing an identity), so it is exactly what `F.interpolate` and
    torchvision's resize do along that axis; the 2-D resize is separable. (The identity has width
    2: interpolate treats a width-1 image differently.)"""
    eye = torch.eye(length, dtype=torch.float64)[None, :, :, None].expand(1, length, length, 2)
    out = F.interpolate(eye, size=(size, 2), mode="bicubic", antialias=True, align_corners=False)
    return out[0, :, :, 0].T.to(torch.float32).contiguous()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Every sample's box cropped and resized to size x size (bicubic, antialiased), as two batched
    matrix products: out[b] = rows[b] @ images[b] @ cols[b].T, where rows[b] / cols[b] are the
    resize matrices of the box's height / width, placed at its top / left.

    Equals torchvision's `resized_crop` per sample (up to float rounding) for one batch-wide image
    size. Costs O(size * H * W) per channel: meant for small images (see MATMUL_RESIZE_MAX)."""
    b, _, height, width = images.shape
    rows = images.new_zeros(b, size, height)
    cols = images.new_zeros(b, size, width)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        rows[i, :, top:top + h] = resize_matrix(h, size)
        cols[i, :, left:left + w] = resize_matrix(w, size)
    return rows[:, None] @ images @ cols[:, None].transpose(-1, -2)


def crop_and_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images of any sizes and their boxes -> float [B, C, size, size] in [0, 1].

    Small images go through `resized_crops`, one batched product per image size; large ones
    (folders' photos) through torchvision's resize one by one, whose antialias matters when a photo
    is cropped down to 224 px. The choice depends on the sample's own size only, so its pixels never
    depend on its batch."""
    crops = torch.empty(len(images), images[0].shape[0], size, size)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for shape, members in by_shape.items():
        if max(shape[-2:]) <= MATMUL_RESIZE_MAX:
            group = TF.to_dtype(torch.stack([images[i] for i in members]), torch.float32, scale=True)
            crops[members] = resized_crops(group, boxes[members], size)
            continue
        for i in members:
            top, left, h, w = boxes[i].tolist()
            crops[i] = TF.resized_crop(TF.to_dtype(images[i], torch.float32, scale=True), top, left, h, w,
                                       [size, size], TF.InterpolationMode.BICUBIC, antialias=True)
    return crops.clamp_(0, 1)  # bicubic overshoots; uint8 would have clamped


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the samples where `flip` [B] is true (a new tensor)."""
    return torch.where(per_sample(flip), images.flip(-1), images)


def random_resized_crop_and_flip(images: Sequence[torch.Tensor], u: torch.Tensor, size: int,
                                 scale: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop (bicubic, antialiased) + RandomHorizontalFlip(0.5) from each sample's draws:
    (float crops [B, C, size, size] in [0, 1], boxes long [B, 4] as `crop_boxes`)."""
    heights = torch.tensor([image.shape[-2] for image in images])
    widths = torch.tensor([image.shape[-1] for image in images])
    boxes = crop_boxes(u, heights, widths, scale)
    return flip_where(crop_and_resize(images, boxes, size), u[:, Geometry.FLIP] < 0.5), boxes


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` with one factor per sample."""
    f = per_sample(factor.to(images.dtype))
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_hue` with one hue shift (in [-0.5, 0.5]) per sample."""
    h, s, v = _rgb_to_hsv(images).unbind(dim=-3)
    h = (h + per_sample(factors.to(images.dtype))[:, 0]).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def color_jitter(images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors [B, 3 or 4] (brightness, contrast, saturation[, hue]),
    applied in each sample's order (orders [B, 3 or 4], ids BRIGHTNESS..HUE).

    Brightness, contrast and saturation blend towards black, the mean gray level and the grayscale
    image, as torchvision's adjust_* functions do; hue rotates in HSV."""
    images = images.clone()
    for position in range(orders.shape[1]):
        op = orders[:, position]
        hue = op == HUE
        if hue.any():
            images[hue] = adjust_hue(images[hue], factors[hue, HUE])
        blend = ~hue
        if blend.any():
            x, op_b = images[blend], op[blend]
            gray = TF.rgb_to_grayscale(x)
            target = torch.where(per_sample(op_b == CONTRAST), gray.mean(dim=(-3, -2, -1), keepdim=True), gray)
            target = torch.where(per_sample(op_b == BRIGHTNESS), torch.zeros_like(gray), target)
            images[blend] = _blend(x, target, factors[blend].gather(1, op_b[:, None])[:, 0])
    return images


def grayscale_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torchvision's 3-channel grayscale of the masked samples (in place)."""
    images[mask] = TF.rgb_to_grayscale(images[mask], num_output_channels=3)
    return images


def solarize_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Solarize (invert pixels >= 128/255) the masked samples (in place)."""
    chosen = images[mask]
    images[mask] = torch.where(chosen >= SOLARIZE_THRESHOLD, 1 - chosen, chosen)
    return images


def gaussian_blur(images: torch.Tensor, kernel: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (same in x and y), reflect padding: the
    kernel of torchvision's `_get_gaussian_kernel1d`, as one grouped convolution over the batch."""
    b, c, h, w = images.shape
    x = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel)
    pdf = torch.exp(-0.5 * (x[None, :] / sigmas.to(torch.float32)[:, None]) ** 2)
    weights = (pdf / pdf.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    flat = F.pad(images.reshape(1, b * c, h, w), [kernel // 2] * 4, mode="reflect")
    flat = F.conv2d(flat, weights[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, weights[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def blur_where(images: torch.Tensor, mask: torch.Tensor, kernel: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur the masked samples (in place), sigmas [B] (those of unmasked samples are unused)."""
    if mask.any():
        images[mask] = gaussian_blur(images[mask], kernel, sigmas[mask])
    return images

