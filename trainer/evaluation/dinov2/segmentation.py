"""DINOv2's linear semantic segmentation protocol ("lin" and "+ms"), trained on the fly over
augmented crops of a frozen backbone (dense features of a dataset never exist at once).

    metrics = dinov2_segmentation(backbone, train, val, num_classes, crop_size=512, ...)

"lin": BNHead (SyncBN then a 1x1 conv) on the patch tokens of the last block; "+ms": its own head on
the last 4 blocks concatenated (`resize_concat`), evaluated with multi-scale + flip TTA. Neither
head sees the [CLS] token: DINOv2's configs feed `get_intermediate_layers(n=out_indices,
reshape=True)` (no class token) and the heads' widths are C (lin) and 4C (+ms) — e.g. the ViT-S/14
`conv_seg` of the notebook is 1536 -> K. Published ADE20K mIoU ("lin"): ViT-S/14 44.3, ViT-B/14 47.3.

Official sources (the constants are the caller's; each argument's official value is noted where
used): dinov2_vit{s,b}14_ade20k_linear_config.py (dl.fbaipublicfiles.com/dinov2, mirrored e.g. in
BrianPulfer/robustness-tokens configs/eval/segmentation/original_confs), the *_ms_config.py and
notebooks/semantic_segmentation.ipynb of facebookresearch/dinov2,
dinov2/eval/segmentation/models/decode_heads/linear_head.py (BNHead), mmsegmentation 0.x
mmseg/models/losses/cross_entropy_loss.py and mmcv/runner/hooks/lr_updater.py (PolyLrUpdaterHook);
the training augmentation's in segmentation_augment.py.

Determinism: the result depends only on the weights, the data and `seed`: every training sample's
augmentation is drawn under its own seed, derived from (seed, iteration, position in the global
batch), inside `fork_rng`, so the caller's global RNG is left as it was; the heads' init uses its
own generator. Distributed (torch.distributed initialized, world W): each rank takes its slice of
each global batch, BN statistics and gradients are summed over ranks, validation images are split
over ranks and the confusion matrices summed: metrics do not depend on W (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.data.scenes import derive_seed
from trainer.data.transforms import single_threaded
from trainer.evaluation.dinov2.segmentation_augment import TrainAugment
from trainer.evaluation.dinov2.sliding_window import tta_probabilities
from trainer.evaluation.dinov2.tokens import intermediate_tokens, last_blocks
from trainer.evaluation.features import all_reduce_sum, process_group
from trainer.evaluation.metrics import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy

ADAMW_BETAS = (0.9, 0.999)  # linear_config.py: optimizer AdamW, betas (0.9, 0.999)
HEAD_INIT_STD = 0.01  # mmseg BaseDecodeHead init_cfg: Normal(std=0.01) on conv_seg, bias 0


# --- schedule ----------------------------------------------------------------------------------

def lr_factor(iteration: int, *, iterations: int, warmup_iterations: int, warmup_ratio: float,
              poly_power: float) -> float:
    """mmcv PolyLrUpdaterHook (min_lr 0, by_epoch False) with linear warmup, at 0-based `iteration`:
    poly = (1 - t / T) ** power; for t < warmup: poly * (1 - (1 - t / warmup) * (1 - warmup_ratio))."""
    factor = (1 - iteration / iterations) ** poly_power
    if iteration < warmup_iterations:
        factor *= 1 - (1 - iteration / warmup_iterations) * (1 - warmup_ratio)
    return factor


def poly_schedule(optimizer: torch.optim.Optimizer, *, iterations: int, warmup_iterations: int,
                  warmup_ratio: float, poly_power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a LambdaLR: step it after each optimizer step (iteration t trains at factor(t))."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(
        t, iterations=iterations, warmup_iterations=warmup_iterations, warmup_ratio=warmup_ratio,
        poly_power=poly_power))


# --- training stream -------------------------------------------------------------------------

class _TrainCrops(Dataset):
    """Position p of the global sample stream -> its augmented crop. The stream is every epoch's
    seeded permutation of the dataset, one after another; position p is element p % B of global
    batch p // B, and its augmentation seed is derived from (seed, p // B, p % B)."""

    def __init__(self, base: Dataset, augment: TrainAugment, batch_size: int, seed: int) -> None:
        self.base, self.augment, self.batch_size, self.seed = base, augment, batch_size, seed
        self._order: tuple[int, Tensor] | None = None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.base))  # type: ignore[arg-type]
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed("dinov2-seg-order", self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.base), generator=generator))  # type: ignore[arg-type]
        return int(self._order[1][offset])

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        sample = self.base[self.index(position)]
        iteration, slot = divmod(position, self.batch_size)
        with single_threaded(), torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed("dinov2-seg-augment", self.seed, iteration, slot))
            return self.augment(sample["image"], sample["segmentation"])


class _RankPositions(Sampler[int]):
    """This rank's slice [r * B / W, (r + 1) * B / W) of every global batch, for `iterations` batches."""

    def __init__(self, iterations: int, batch_size: int, rank: int, world: int) -> None:
        self.iterations, self.batch_size, self.local = iterations, batch_size, batch_size // world
        self.first = rank * self.local

    def __len__(self) -> int:
        return self.iterations * self.local

    def __iter__(self):
        for iteration in range(self.iterations):
            start = iteration * self.batch_size + self.first
            yield from range(start, start + self.local)


# --- head --------------------------------------------------------------------------------------

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch (every rank): SyncBatchNorm
    for inputs that need no gradient (frozen features), on any device (torch's SyncBatchNorm refuses
    CPU tensors). Sums in float64; running variance unbiased, as torch's."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if x.requires_grad:
            raise ValueError("GlobalBatchNorm2d does not propagate gradients to its input")
        with torch.no_grad():
            x64 = x.double()
            stats = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)),
                               x64.new_tensor([x.numel() // x.shape[1]])])
            stats = all_reduce_sum(stats)
            channels = x.shape[1]
            count = stats[-1]
            mean = stats[:channels] / count
            var = (stats[channels:2 * channels] / count - mean * mean).clamp_min(0)
            self.running_mean.lerp_(mean.to(self.running_mean), self.momentum)
            self.running_var.lerp_((var * count / (count - 1).clamp_min(1)).to(self.running_var), self.momentum)
            self.num_batches_tracked += 1
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)


class BNHead(nn.Module):
    """DINOv2's BNHead: `resize_concat` of the chosen grids -> (Sync)BN -> 1x1 conv (`conv_seg`)."""

    def __init__(self, channels: int, num_classes: int, generator: torch.Generator, device=None) -> None:
        super().__init__()
        self.bn = GlobalBatchNorm2d(channels, device=device)
        self.conv_seg = skip_init(nn.Conv2d, channels, num_classes, kernel_size=1, device=device)
        with torch.no_grad():  # Normal(0.01) from its own generator: the global RNG is not drawn from
            self.conv_seg.weight.copy_(torch.randn(self.conv_seg.weight.shape, generator=generator) * HEAD_INIT_STD)
            self.conv_seg.bias.zero_()

    def forward(self, grids: Sequence[Tensor]) -> Tensor:
        size = grids[0].shape[-2:]
        x = torch.cat([g if g.shape[-2:] == size else
                       F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids], dim=1)
        return self.conv_seg(self.bn(x))


def _center_pad(images: Tensor, multiple: int) -> Tensor:
    """The DINOv2 notebook's CenterPadding: zero-pad each side to a multiple of the patch size."""
    pads = []
    for size in (images.shape[-1], images.shape[-2]):
        extra = math.ceil(size / multiple) * multiple - size
        pads += [extra // 2, extra - extra // 2]
    return F.pad(images, pads) if any(pads) else images


def _patch_size(backbone: nn.Module) -> int:
    size = getattr(getattr(backbone, "patch_embed", None), "patch_size", None) or getattr(backbone, "patch_size")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _grids(backbone: nn.Module, images: Tensor, blocks: Sequence[int], patch: int) -> list[Tensor]:
    return [grid for _, grid in intermediate_tokens(backbone, _center_pad(images, patch), blocks)]


# --- protocol ----------------------------------------------------------------------------------

def dinov2_segmentation(backbone: nn.Module, train: Dataset, val: Dataset, num_classes: int, *,
                        crop_size: int, short_side: int, stride: int, scale_range: tuple[float, float],
                        cat_max_ratio: float, iterations: int, batch_size: int, lr: float, weight_decay: float,
                        warmup_iterations: int, warmup_ratio: float, poly_power: float,
                        ms_scales: Sequence[float], multi_scale: bool, ignore_index: int = IGNORE_INDEX,
                        seed: int = 0, device="cpu", num_workers: int = 0) -> dict[str, float]:
    """Trains the "lin" head (and the "+ms" head when `multi_scale`) on the frozen `backbone` (already
    on `device`); returns `seg_miou`, `seg_pixel_acc` (and `seg_miou_ms`, `seg_pixel_acc_ms`).

    Official values (dinov2_vit*14_ade20k_linear_config.py unless noted): crop_size 512
    (RandomCrop, Pad, test_cfg crop), short_side 512 (Resize img_scale (99999999, 512)), stride 341
    (test_cfg), scale_range (0.5, 2.0), cat_max_ratio 0.75, iterations 40000 (IterBasedRunner),
    batch_size 16 (8 GPUs x samples_per_gpu 2), lr 1e-3, weight_decay 1e-4 (AdamW), warmup_iterations
    1500, warmup_ratio 1e-6, poly_power 1.0 (lr_config, min_lr 0), ms_scales (1.0, 1.32, 1.73, 2.28,
    3.0) with flip (*_ms_config.py MultiScaleFlipAug img_ratios; the notebook keeps the first
    HEAD_SCALE_COUNT, printing [1.0, 1.32, 1.73] for 3), ignore_index 255.
    """
    device = torch.device(device)
    rank, world = process_group()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise ValueError("dinov2_segmentation needs non-empty train and val sets")
    depth, patch = len(backbone.blocks), _patch_size(backbone)
    blocks = last_blocks(depth, 4 if multi_scale else 1)
    channels = backbone.embed_dim
    generator = torch.Generator().manual_seed(derive_seed("dinov2-seg-head", seed))
    heads = {"": BNHead(channels, num_classes, generator, device)}
    if multi_scale:
        heads["_ms"] = BNHead(channels * len(blocks), num_classes, generator, device)
    params = [p for head in heads.values() for p in head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAMW_BETAS, weight_decay=weight_decay)
    schedule = poly_schedule(optimizer, iterations=iterations, warmup_iterations=warmup_iterations,
                             warmup_ratio=warmup_ratio, poly_power=poly_power)

    augment = TrainAugment(crop_size, short_side, scale_range, cat_max_ratio, ignore_index)
    crops = _TrainCrops(train, augment, batch_size, seed)
    loader = DataLoader(crops, batch_size=batch_size // world, sampler=_RankPositions(iterations, batch_size, rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        # Its own generator: iterating a DataLoader draws a base seed from it.
                        generator=torch.Generator().manual_seed(derive_seed("dinov2-seg-loader", seed)))
    # mmseg CrossEntropyLoss(avg_non_ignore=False), the 0.x default DINOv2 keeps: the mean over every
    # pixel of the batch, ignored ones counting 0. Each rank divides by the global pixel count and
    # the gradients are summed over ranks, which is the single-process step over the global batch.
    pixels = batch_size * crop_size * crop_size
    was_training = backbone.training
    backbone.eval()
    try:
        for head in heads.values():
            head.train()
        for images, masks in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            grids = _grids(backbone, images, blocks, patch)
            for key, head in heads.items():
                logits = head(grids if key else grids[-1:])
                logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum") / pixels
                loss.backward()
            if world > 1:
                flat = all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in params]))
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            schedule.step()
        for head in heads.values():
            head.eval()
        return _evaluate(backbone, heads, val, num_classes, blocks, patch, device, rank, world,
                         crop_size=crop_size, stride=stride, short_side=short_side, ms_scales=ms_scales,
                         ignore_index=ignore_index)
    finally:
        backbone.train(was_training)


@torch.no_grad()
def _evaluate(backbone: nn.Module, heads: dict[str, BNHead], val: Dataset, num_classes: int, blocks: list[int],
              patch: int, device: torch.device, rank: int, world: int, *, crop_size: int, stride: int,
              short_side: int, ms_scales: Sequence[float], ignore_index: int) -> dict[str, float]:
    """Rank r evaluates images r, r + W, ... one at a time (mmseg tests at 1 image per GPU)."""
    confusions = {key: torch.zeros(num_classes, num_classes, dtype=torch.long) for key in heads}

    def predictor(head: BNHead, head_blocks: list[int]):
        def predict(crops: Tensor) -> Tensor:
            logits = head(_grids(backbone, crops, head_blocks, patch))
            return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        return predict

    settings = {"": ([blocks[-1]], (1.0,), False), "_ms": (blocks, tuple(ms_scales), True)}
    for index in range(rank, len(val), world):  # type: ignore[arg-type]
        sample = val[index]
        image, target = sample["image"].to(device), sample["segmentation"].long()
        for key, head in heads.items():
            head_blocks, scales, flip = settings[key]
            probs = tta_probabilities(predictor(head, head_blocks), image, num_classes, crop_size=crop_size,
                                      stride=stride, short_side=short_side, scales=scales, flip=flip)
            confusions[key] += confusion_matrix(probs.argmax(0).cpu(), target, num_classes, ignore_index)
    metrics = {}
    for key, confusion in confusions.items():
        confusion = all_reduce_sum(confusion)
        metrics[f"seg_miou{key}"] = mean_iou(confusion)
        metrics[f"seg_pixel_acc{key}"] = pixel_accuracy(confusion)
    return metrics
