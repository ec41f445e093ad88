"""DINOv2's linear monocular-depth protocol ("lin. 1" and "lin. 4"), trained on the fly over augmented
crops of a frozen backbone: no dense features are cached, each batch is encoded as it comes.

    metrics = dinov2_depth(backbone, train, val, n_bins=256, min_depth=1e-3, max_depth=10.0, ...)

Official sources (facebookresearch/dinov2 unless noted):
- head: BNHead in dinov2/eval/depth/models/decode_heads/linear_head.py, built as in
  dinov2/hub/depthers.py `_make_dinov2_linear_depth_head`: for each chosen block, the patch grid
  concatenated with the [CLS] token broadcast to every patch (2 x dim channels, patch first);
  "resize_concat" to `upsample` (4) x the grid, blocks concatenated (lin. 4: 4 x 2 x dim); ONE 1x1
  conv to n_bins (256) logits; `bins_to_depth` (UD bins, linear norm). The BatchNorm the class is
  named after is commented out there (`# self.bn = nn.SyncBatchNorm(...)`, `# feats = self.bn(x)`),
  and the config has norm_cfg=None: there is none here either. Blocks: tokens.py (lin. 1 the last,
  lin. 4 `spread_blocks(depth, 4)`, the `out_index` of depthers.py), after the final norm
  (config `final_norm=True`).
  Since a 1x1 conv commutes with bilinear upsampling (its weights sum to one), the conv runs on the
  patch grid and its logits are upsampled: the same numbers, n_bins instead of 2 x dim x blocks channels.
- training and evaluation settings: the released head config
  https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_nyu_linear_config.py (the file
  notebooks/depth_estimation.ipynb loads), its data pipeline from zhyever/Monocular-Depth-Estimation-
  Toolbox (depth/datasets/pipelines/transforms.py, depth/datasets/nyu.py, depth/core/evaluation/
  metrics.py) and mmcv's schedule hooks. See the `dinov2_depth` docstring for each value.
- evaluation: DepthEncoderDecoder.encode_decode (dinov2/eval/depth/models/depther/encoder_decoder.py):
  prediction clamped to [min_depth, max_depth], resized (bilinear) to the image size; test-time
  horizontal flip averaged (`MultiScaleFlipAug(flip=True)` + `aug_test`). Input zero-padded (after
  normalization) to a multiple of the patch size, centred (CenterPadding in depthers.py); the
  prediction of the padded image is resized to the unpadded size, as the official code does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from trainer.data.scenes import derive_seed
from trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from trainer.evaluation.dinov2.depth_losses import SigLoss, bins_to_depth, depth_bins
from trainer.evaluation.dinov2.tokens import intermediate_tokens, spread_blocks
from trainer.evaluation.features import all_reduce_sum, process_group
from trainer.evaluation.metrics import per_image_depth_errors

__all__ = ["DepthAugmentation", "SigLoss", "bins_to_depth", "depth_bins", "dinov2_depth", "head_input"]


@dataclass(frozen=True)
class DepthAugmentation:
    """The training pipeline's random steps (official NYU values from the config's train_pipeline;
    the steps' code in the Toolbox's transforms.py):
    border_crop (top, bottom, left, right) NYUCrop: (45, 472, 43, 608), None for other data;
    rotate_prob 0.5, rotate_degrees 2.5 (RandomRotate: image bilinear, depth nearest, both padded 0);
    flip_prob 0.5 (RandomFlip, horizontal); then RandomCrop(crop_size); then ColorAug with
    color_prob 0.5, gamma_range (0.9, 1.1), brightness_range (0.75, 1.25), color_range (0.9, 1.1),
    applied as officially on 0..255 values: clip(img ** gamma * brightness * colour, 0, 255)."""

    border_crop: tuple[int, int, int, int] | None
    rotate_prob: float
    rotate_degrees: float
    flip_prob: float
    color_prob: float
    gamma_range: tuple[float, float]
    brightness_range: tuple[float, float]
    color_range: tuple[float, float]


def _uniform(bounds: Sequence[float], size: tuple[int, ...] = ()) -> Tensor:
    low, high = min(bounds), max(bounds)
    return low + (high - low) * torch.rand(size)


def _normalize(image: Tensor) -> Tensor:
    """0..255 (uint8 or float) 3 x H x W -> ImageNet-normalized float."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (image.float() - mean) / std


class _TrainTransform:
    """sample -> (normalized image 3 x h x w, depth h x w); randomness from the global RNG, which the
    caller seeds per sample."""

    def __init__(self, aug: DepthAugmentation, crop_size: tuple[int, int]):
        self.aug, self.crop_size = aug, crop_size
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: 0}  # depth 0 = invalid
        self.geometric = v2.Compose([
            # v2 rotates a Mask with NEAREST whatever `interpolation` says, as RandomRotate the depth.
            v2.RandomApply([v2.RandomRotation(aug.rotate_degrees, InterpolationMode.BILINEAR, fill=fill)],
                           p=aug.rotate_prob),
            v2.RandomHorizontalFlip(p=aug.flip_prob),
        ])

    def __call__(self, sample: dict) -> tuple[Tensor, Tensor]:
        image, depth = sample["image"], torch.as_tensor(sample["depth"], dtype=torch.float32)
        if self.aug.border_crop is not None:
            top, bottom, left, right = self.aug.border_crop
            image, depth = image[:, top:bottom, left:right], depth[top:bottom, left:right]
        image, depth = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(depth[None]))
        image, depth = image.as_subclass(Tensor), depth.as_subclass(Tensor)[0]
        # RandomCrop: a smaller image is kept whole, as the Toolbox's (margin 0).
        (height, width), (crop_h, crop_w) = image.shape[-2:], self.crop_size
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        image = image[:, top:top + crop_h, left:left + crop_w]
        depth = depth[top:top + crop_h, left:left + crop_w]
        image = image.float()
        if torch.rand(()) < self.aug.color_prob:
            gamma, brightness = _uniform(self.aug.gamma_range), _uniform(self.aug.brightness_range)
            colour = _uniform(self.aug.color_range, (3,)).view(3, 1, 1)
            image = (image.pow(gamma) * brightness * colour).clamp(0, 255)
        return _normalize(image), depth.contiguous()


class _Seeded(Dataset):
    """dataset[(index, seed)] -> transform(sample) with the global RNG seeded by `seed` (and restored)."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(self.dataset[index])

    def __len__(self) -> int:
        return len(self.dataset)


def _val_transform(sample: dict) -> tuple[Tensor, Tensor]:
    return _normalize(sample["image"]), torch.as_tensor(sample["depth"], dtype=torch.float32)


def head_input(tokens: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """[(cls B x C, grid B x C x h x w)] -> B x (2 C x blocks) x h x w: per block the patch grid then its
    [CLS] token at every patch (BNHead._forward_feature), blocks concatenated (resize_concat)."""
    size = tokens[0][1].shape[-2:]
    parts = []
    for cls, grid in tokens:
        if grid.shape[-2:] != size:
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        parts += [grid, cls[:, :, None, None].expand_as(grid)]
    return torch.cat(parts, dim=1)


class _Head(nn.Module):
    """One linear depth head: the blocks it reads, its 1x1 conv to the bins, and the depth decoding."""

    def __init__(self, blocks: list[int], dim: int, n_bins: int, bins: Tensor, norm: str, upsample: int,
                 seed: int, device: torch.device):
        super().__init__()
        self.blocks, self.norm, self.upsample = blocks, norm, upsample
        self.conv = skip_init(nn.Conv2d, 2 * dim * len(blocks), n_bins, kernel_size=1, device=device)
        # PyTorch's default Conv2d init (U(+-1/sqrt(fan_in)) for weight and bias), from a private generator.
        generator = torch.Generator().manual_seed(derive_seed("dinov2_depth/head", seed, len(blocks)))
        bound = 1 / math.sqrt(self.conv.in_channels)
        with torch.no_grad():
            for p in (self.conv.weight, self.conv.bias):
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
        self.register_buffer("bins", bins.to(device), persistent=False)

    def forward(self, tokens: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        """Depth B x 1 x (upsample h) x (upsample w)."""
        logits = self.conv(head_input([tokens[b] for b in self.blocks]))
        size = [s * self.upsample for s in logits.shape[-2:]]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return bins_to_depth(logits, self.bins, self.norm)


def _pad_to_patches(images: Tensor, patch: tuple[int, int]) -> Tensor:
    """Zero padding to a multiple of the patch size, split evenly (CenterPadding in dinov2/hub/utils.py)."""
    pads = []
    for size, multiple in ((images.shape[-1], patch[1]), (images.shape[-2], patch[0])):
        extra = -size % multiple
        pads += [extra // 2, extra - extra // 2]
    return F.pad(images, pads) if any(pads) else images


def _annealing_cos(start: float, end: float, factor: float) -> float:
    """mmcv's annealing_cos: start at factor 0, end at 1."""
    return end + 0.5 * (start - end) * (math.cos(math.pi * factor) + 1)


def _lr_factor(step: int, total: int, warmup: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """mmcv CosineAnnealingLrUpdaterHook(min_lr_ratio, warmup="linear", by_epoch=False) / base lr."""
    factor = _annealing_cos(1.0, min_lr_ratio, step / total)
    if step < warmup:
        factor *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return factor


def _beta1(step: int, total: int, cycle: tuple[float, float, float]) -> float:
    """mmcv OneCycleMomentumUpdaterHook (two phases, cos): max -> base over pct_start, then back."""
    base, top, pct_start = cycle
    end1 = pct_start * total - 1
    if step <= end1:
        return _annealing_cos(top, base, step / end1 if end1 > 0 else 1.0)
    span = total - 1 - end1
    return _annealing_cos(base, top, (step - end1) / span if span > 0 else 1.0)


def _global_order(n: int, seed: int) -> Iterator[int]:
    """The sampling order of every process: a fresh permutation of the dataset each epoch."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(derive_seed("dinov2_depth/order", seed, epoch))
        yield from torch.randperm(n, generator=generator).tolist()
        epoch += 1


def _train_batches(n: int, iterations: int, batch_size: int, rank: int, local: int, seed: int):
    """Per iteration, this process's slice of the global batch as (index, augmentation seed) keys."""
    order = _global_order(n, seed)
    for step in range(iterations):
        batch = [next(order) for _ in range(batch_size)]
        yield [(batch[p], derive_seed("dinov2_depth/aug", seed, step, p))
               for p in range(rank * local, (rank + 1) * local)]


def _group_loss(sigloss: SigLoss, stats: Tensor, group: int, warm: bool) -> Tensor:
    """Mean SigLoss over consecutive groups of `group` images of the global batch (groups with
    fewer than 2 valid pixels are left out)."""
    groups = stats.reshape(-1, group, 3).sum(1)
    ok = groups[:, 2] >= 2
    safe = torch.where(ok[:, None], groups, groups.new_tensor([0.0, 0.0, 2.0]))
    losses = torch.where(ok, sigloss.loss_from_statistics(safe, warm), torch.zeros_like(ok, dtype=groups.dtype))
    return losses.sum() / ok.sum().clamp_min(1)


def dinov2_depth(
    backbone: nn.Module,
    train: Dataset,
    val: Dataset,
    *,
    n_bins: int,
    min_depth: float,
    max_depth: float,
    crop_size: tuple[int, int],
    upsample: int,
    iterations: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_iterations: int,
    four_blocks: bool,
    eval_crop: tuple[int, int, int, int] | None,
    augmentation: DepthAugmentation,
    norm_strategy: str,
    betas: tuple[float, float],
    momentum_cycle: tuple[float, float, float] | None,
    warmup_ratio: float,
    min_lr_ratio: float,
    grad_clip: float | None,
    sigloss_warmup_iterations: int,
    loss_group_size: int | None,
    flip_tta: bool,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Trains the lin. 1 head (and, with `four_blocks`, the lin. 4 head, on the same batches) and
    returns depth_rmse, depth_abs_rel, depth_delta1 (+ *_lin4): per-image metrics averaged over the
    validation images, on pixels with min_depth < gt < max_depth inside `eval_crop`.

    Official NYU values (dinov2_vitb14_nyu_linear_config.py unless noted): n_bins 256, min_depth 1e-3,
    max_depth 10, crop_size (416, 544), upsample 4, norm_strategy "linear"; iterations 38400 (runner
    max_iters); batch_size 2 per GPU (samples_per_gpu; the GPU count is not in the config); AdamW lr
    5e-3, betas (0.9, 0.999), weight_decay 0.01 (every head parameter: no custom key matches them);
    CosineAnnealing warmup "linear", warmup_iterations 12800, warmup_ratio 1e-3, min_lr_ratio 1e-8;
    momentum_cycle (0.85, 0.95, 0.3) = momentum_config OneCycle's defaults (beta1 cycled); grad_clip
    35 (L2); SigLoss(valid_mask, loss_weight 1, warm_up=True) -> sigloss_warmup_iterations 100 (its
    default warm_iter); loss_group_size 2 = the per-GPU batch the official loss is computed over
    (None: the whole global batch); eval_crop (45, 471, 41, 601) (Toolbox nyu.py eval_mask,
    eigen_crop=True); flip_tta True; `augmentation`: see DepthAugmentation.
    The config's GradientLoss (weight 0.5) is left out: on the B x 1 x H x W tensors it receives it
    slices the batch and channel axes, and with 2 images per GPU both slices are empty, so it is
    exactly 0 in the official runs.

    Distributed: every process draws the same global batches and takes its slice (batch_size must be
    divisible by the world size); the loss is computed from all-reduced SigLoss statistics and
    gradients are summed, so a step equals the one-process step over the global batch. Validation
    images are split over the processes and the per-image metric sums all-reduced.
    """
    rank, world = process_group()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
    group = loss_group_size or batch_size
    if batch_size % group:
        raise ValueError(f"batch_size {batch_size} is not divisible by loss_group_size {group}")
    if len(train) == 0 or len(val) == 0:
        raise ValueError("dinov2_depth needs non-empty train and val datasets")
    device = torch.device(device)
    local = batch_size // world
    backbone.eval()
    depth = len(backbone.blocks)
    patch = tuple(backbone.patch_embed.patch_size)
    dim = backbone.embed_dim
    bins = depth_bins(min_depth, max_depth, n_bins)
    heads = {"": _Head([depth - 1], dim, n_bins, bins, norm_strategy, upsample, seed, device)}
    if four_blocks:
        heads["_lin4"] = _Head(spread_blocks(depth, 4), dim, n_bins, bins, norm_strategy, upsample, seed, device)
    blocks = sorted({b for head in heads.values() for b in head.blocks})
    optimizers = {k: torch.optim.AdamW(h.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
                  for k, h in heads.items()}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda step: _lr_factor(
        step, iterations, warmup_iterations, warmup_ratio, min_lr_ratio)) for k, o in optimizers.items()}
    sigloss = SigLoss(valid_mask=True, loss_weight=1.0, warm_up=sigloss_warmup_iterations > 0,
                      warm_iter=sigloss_warmup_iterations)

    def encode(images: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        return dict(zip(blocks, intermediate_tokens(backbone, _pad_to_patches(images.to(device), patch), blocks)))

    loader = DataLoader(_Seeded(train, _TrainTransform(augmentation, crop_size)), num_workers=num_workers,
                        batch_sampler=_train_batches(len(train), iterations, batch_size, rank, local, seed))
    for step, (images, target) in enumerate(loader):
        tokens, target = encode(images), target.to(device)
        warm = sigloss.warming()
        sigloss.warm_up_counter += 1
        for key, head in heads.items():
            optimizer = optimizers[key]
            if momentum_cycle is not None:
                for param_group in optimizer.param_groups:
                    param_group["betas"] = (_beta1(step, iterations, momentum_cycle), param_group["betas"][1])
            head.train()
            pred = F.interpolate(head(tokens), size=target.shape[-2:], mode="bilinear", align_corners=False)
            stats = sigloss.sample_statistics(pred, target)  # local x 3, with grad
            # The global batch's statistics on every process; the loss's gradient w.r.t. them, then
            # back through this process's images only. Summing parameter gradients over processes
            # gives the gradient of the global-batch loss (the statistics are sums over images).
            everything = stats.new_zeros(batch_size, 3)
            everything[rank * local:(rank + 1) * local] = stats.detach()
            everything = all_reduce_sum(everything).requires_grad_()
            (slope,) = torch.autograd.grad(_group_loss(sigloss, everything, group, warm), everything)
            optimizer.zero_grad(set_to_none=False)
            (slope[rank * local:(rank + 1) * local] * stats).sum().backward()
            params = list(head.parameters())
            if world > 1:
                flat = all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in params]))
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, max_norm=grad_clip, norm_type=2)
            optimizer.step()
            schedulers[key].step()

    # Evaluation: rank r takes images r, r + W, ...; per-image sums are all-reduced.
    sums = {key: torch.zeros(4, dtype=torch.float64) for key in heads}  # rmse, abs_rel, delta1, images
    indices = list(range(rank, len(val), world))
    val_loader = DataLoader(_Seeded(val, _val_transform), num_workers=num_workers,
                            batch_sampler=[[(i, 0) for i in indices[s:s + local]] for s in range(0, len(indices), local)])
    with torch.no_grad():
        for images, target in val_loader:
            flips = [False, True] if flip_tta else [False]
            views = {flip: encode(images.flip(-1) if flip else images) for flip in flips}
            valid = (target > min_depth) & (target < max_depth)
            if eval_crop is not None:
                top, bottom, left, right = eval_crop
                box = torch.zeros_like(valid)
                box[:, top:bottom, left:right] = True
                valid &= box
            truth = torch.where(valid, target, torch.zeros_like(target)).double()
            has_valid = valid.flatten(1).any(1)
            for key, head in heads.items():
                head.eval()
                pred = 0
                for flip, tokens in views.items():
                    out = head(tokens).clamp(min_depth, max_depth)
                    out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
                    pred = pred + (out.flip(-1) if flip else out)
                pred = (pred / len(views))[:, 0].cpu().double()
                rmse, abs_rel = per_image_depth_errors(pred, truth)
                ratio = torch.maximum(truth / pred, pred / truth.clamp_min(min_depth))
                delta1 = ((ratio < 1.25) & valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
                sums[key] += torch.stack([rmse.sum(), abs_rel.sum(), delta1[has_valid].sum(),
                                          has_valid.sum().double()])
    metrics = {}
    for key, total in sums.items():
        total = all_reduce_sum(total)
        count = total[3].item()
        for i, name in enumerate(("depth_rmse", "depth_abs_rel", "depth_delta1")):
            metrics[name + key] = total[i].item() / count if count else float("nan")
    return metrics
