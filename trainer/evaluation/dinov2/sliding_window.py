"""Inference of the DINOv2 linear segmentation protocol: mmseg's sliding-window inference and its
test-time augmentation (single scale for "lin", multi-scale + flip for "+ms").

Official (mmsegmentation 0.x, which DINOv2's configs target):
- `EncoderDecoder.slide_inference` (mmseg/models/segmentors/encoder_decoder.py): a grid of
  `crop_size` windows every `stride` pixels, the last window of a row/column pushed back inside the
  image; each window's logits at its own resolution are summed into the image and divided by the
  count of windows covering each pixel; then resized bilinearly to the original image (label) size.
- `EncoderDecoder.inference` / `aug_test`: the softmax of those logits; with TTA the softmaxes of
  every (scale, flip) are averaged (flipped outputs flipped back), and the argmax is the prediction.
- `MultiScaleFlipAug(img_scale=(99999999, short), img_ratios=..., flip=...)` + `Resize(keep_ratio)`
  (mmseg/datasets/pipelines/test_time_aug.py, mmcv `imrescale`): scale r resizes the image so that
  its short side is `int(short * r)` (the long-side bound 99999999 never binds), rounding each side
  with `int(x * factor + 0.5)`, bilinear (cv2, no antialiasing) before normalization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD

Predict = Callable[[Tensor], Tensor]  # crops B x 3 x h x w -> logits B x K x h x w


def window_grid(height: int, width: int, crop_size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, in mmseg's order (rows, then columns)."""
    def starts(size: int) -> list[tuple[int, int]]:
        grids = max(size - crop_size + stride - 1, 0) // stride + 1
        spans = []
        for i in range(grids):
            end = min(i * stride + crop_size, size)
            spans.append((max(end - crop_size, 0), end))
        return spans
    return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


def slide_inference(predict: Predict, image: Tensor, num_classes: int, crop_size: int, stride: int,
                    *, window_batch: int = 8) -> Tensor:
    """Averaged window logits (B x K x H x W) of `image` (B x 3 x H x W, normalized).

    mmseg runs one window at a time; here up to `window_batch` windows of an image are predicted
    together (every window has the same shape: min(crop, H) x min(crop, W)).
    """
    if stride <= 0 or crop_size <= 0:
        raise ValueError(f"crop_size ({crop_size}) and stride ({stride}) must be positive")
    batch, _, height, width = image.shape
    windows = window_grid(height, width, crop_size, stride)
    logits = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start:start + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = predict(crops).float()
        if out.shape[1:] != (num_classes, *crops.shape[-2:]):
            raise ValueError(f"predict gave {tuple(out.shape)}, expected B x {num_classes} x crop size")
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * batch:(k + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def rescaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """mmcv `imrescale` to (99999999, short_side): the short side becomes `short_side`."""
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def normalize_image(image: Tensor) -> Tensor:
    """uint8 (B x) 3 x H x W -> float, ImageNet-normalized (mmseg `Normalize` with to_rgb)."""
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear without antialiasing, as cv2's INTER_LINEAR in mmcv."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)


@torch.no_grad()
def tta_probabilities(predict: Predict, image: Tensor, num_classes: int, *, crop_size: int, stride: int,
                      short_side: int, scales: Sequence[float] = (1.0,), flip: bool = False,
                      window_batch: int = 8) -> Tensor:
    """Class probabilities K x H x W of one uint8 image (3 x H x W) at its own resolution: the mean
    over `scales` (x `flip`) of the softmax of the slide-inference logits resized to H x W."""
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = rescaled_size(height, width, int(short_side * scale))
        scaled = normalize_image(resize_image(image, size))[None]
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            logits = slide_inference(predict, view, num_classes, crop_size, stride, window_batch=window_batch)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)[0]
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
