"""Frozen-backbone features, extracted once per dataset, and the plumbing every probe shares.

One forward pass per image gives all we need: the [CLS] token and the patch grid after the final
norm (timm's `forward_intermediates` on the last block, with `norm=True`, equals `forward_features`).
Probes then train for many epochs over these cached tensors, never touching the backbone again.
A `FeatureCache` shared by the tasks of one evaluation runs each distinct image batch only once.

Under torch.distributed every process extracts every W-th image and the parts are all-gathered
back into dataset order, so W processes extract W times faster and end with the same features.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset


@dataclass
class Features:
    cls: Tensor  # N x C: [CLS] after the final norm
    mean_patch: Tensor  # N x C: mean of the patch tokens (registers excluded)
    patch_grid: Tensor | None  # N x C x h x w, only when extracted with dense=True
    targets: Tensor  # the dataset's second item, stacked: labels (N), masks or depths (N x H x W)

    def __len__(self) -> int:
        return self.cls.shape[0]


def subset_indices(size: int, max_samples: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset (not the first N: folder datasets are sorted by class)."""
    if max_samples is None or max_samples >= size:
        return list(range(size))
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:max_samples]
    return sorted(chosen.tolist())


def process_group() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(tensor: Tensor) -> torch.device:
    """Where a collective on `tensor` runs: NCCL only takes CUDA tensors, gloo takes any."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over the processes (a no-op without a process group), for tensors on any device: a CPU
    tensor under NCCL is summed on the GPU and comes back to the CPU. Returns the sum, on `tensor`'s
    device (in place when no copy was needed)."""
    if process_group()[1] == 1:
        return tensor
    buffer = tensor.to(_collective_device(tensor)).contiguous()
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def gather_strided(part: Tensor, total: int) -> Tensor:
    """Rows rank, rank + W, rank + 2W, ... on each process -> all `total` rows, in order, on every
    process. NCCL gathers on the GPU, gloo on the CPU; the result is on `part`'s device."""
    rank, world = process_group()
    if world == 1:
        return part
    rows = math.ceil(total / world)
    device = _collective_device(part)
    padded = part.new_zeros((rows, *part.shape[1:]), device=device)
    padded[:len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # Row j of rank r is row j * W + r: interleave, then drop the padding (it lands past `total`).
    return torch.stack(parts, dim=1).reshape(rows * world, *part.shape[1:])[:total].to(part.device)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compact(targets: Tensor) -> Tensor:
    """Store dense integer masks as uint8 when they fit (255 = ignore): 8x less memory than int64."""
    if targets.dim() > 1 and not targets.is_floating_point() and targets.numel():
        if targets.min() >= 0 and targets.max() <= 255:
            return targets.to(torch.uint8)
    return targets


# (backbone, images) -> ([CLS] B x C, patch grid B x C x h x w): what the probes read of an image batch.
TokenFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


def backbone_tokens(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """([CLS] B x C, patch grid B x C x h x w), both after the final norm."""
    last = len(backbone.blocks) - 1
    (grid, prefix), = backbone.forward_intermediates(
        images, indices=[last], norm=True, output_fmt="NCHW", return_prefix_tokens=True, intermediates_only=True
    )
    return prefix[:, 0], grid


def _batch_key(images: Tensor) -> bytes:
    digest = hashlib.blake2b(f"{tuple(images.shape)}{images.dtype}".encode(), digest_size=16)
    digest.update(images.contiguous().view(torch.uint8).numpy())
    return digest.digest()


class FeatureCache:
    """Finished feature sets, found again by the hash of each image batch (exact, not by dataset
    name): the built-in scenes data serve classification, segmentation and depth from the same
    images, so the backbone runs over them once. Holds the feature sets alive: one per evaluation."""

    def __init__(self) -> None:
        self._batches: dict[bytes, tuple[Features, int, int]] = {}
        self.gathered: dict[tuple[int, bool], tuple[Tensor, Tensor, Tensor | None]] = {}  # see extract_features

    def find(self, key: bytes, dense: bool) -> tuple[Features, int, int] | None:
        hit = self._batches.get(key)
        return hit if hit is not None and (hit[0].patch_grid is not None or not dense) else None

    def add(self, features: Features, batches: list[tuple[bytes, int, int]]) -> None:
        for key, start, stop in batches:
            self._batches[key] = (features, start, stop)


def _whole(hits: list[tuple[Features, int, int] | None]) -> Features | None:
    """The earlier feature set when the batches are exactly all of it, in order: shared, not copied."""
    if not hits or any(h is None for h in hits):
        return None
    source, position = hits[0][0], 0
    for features, start, stop in hits:
        if features is not source or start != position:
            return None
        position = stop
    return source if position == len(source) else None


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    device: torch.device | str,
    *,
    max_samples: int | None = None,
    dense: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    amp: bool = True,
    seed: int = 0,
    cache: FeatureCache | None = None,
    tokens: TokenFn = backbone_tokens,
) -> Features:
    """Runs the frozen backbone over (a fixed subset of) `dataset`; features land on the CPU in fp32.

    `amp` uses bf16 autocast on CUDA only. The caller puts the backbone in eval mode. `tokens`:
    what is read of each batch (default: the backbone's final tokens; the pixel control's patches).
    Under torch.distributed, call it on every process: each extracts its share, all get the whole.
    """
    indices = subset_indices(len(dataset), max_samples, seed)
    rank, world = process_group()
    if world == 1:
        return _extract(backbone, Subset(dataset, indices), device, dense, batch_size, num_workers, amp, seed, cache,
                        tokens)
    part = _extract(backbone, Subset(dataset, indices[rank::world]), device, dense, batch_size, num_workers, amp,
                    seed, cache, tokens)
    total = len(indices)
    # A task that reuses another's extraction reuses its gathered tokens too (one copy in memory).
    key = (id(part.cls), dense)
    gathered = cache.gathered.get(key) if cache is not None else None
    if gathered is None:
        gathered = (gather_strided(part.cls, total), gather_strided(part.mean_patch, total),
                    gather_strided(part.patch_grid, total) if dense else None)
        if cache is not None:
            cache.gathered[key] = gathered
    return Features(*gathered, targets=gather_strided(part.targets, total))


def _extract(backbone: nn.Module, dataset: Dataset, device: torch.device | str, dense: bool, batch_size: int,
             num_workers: int, amp: bool, seed: int, cache: FeatureCache | None, tokens: TokenFn) -> Features:
    device = torch.device(device)
    # Its own generator: even an unshuffled loader draws a worker base seed from the global RNG.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    cls_parts, mean_parts, grid_parts, target_parts = [], [], [], []
    hits, batches, position = [], [], 0
    for images, targets in loader:
        key = _batch_key(images) if cache is not None else b""
        hit = cache.find(key, dense) if cache is not None else None
        if hit is not None:
            source, start, stop = hit
            cls, mean = source.cls[start:stop], source.mean_patch[start:stop]
            grid = source.patch_grid[start:stop] if dense else None
        else:
            with torch.inference_mode(), _autocast(device, amp):
                cls, grid = tokens(backbone, images.to(device, non_blocking=True))
            # Cloned outside inference mode: inference tensors cannot be saved for a probe's backward.
            cls, mean = cls.float().cpu().clone(), grid.float().mean(dim=(2, 3)).cpu().clone()
            grid = grid.float().cpu().clone() if dense else None
        hits.append(hit)
        batches.append((key, position, position + len(images)))
        position += len(images)
        cls_parts.append(cls)
        mean_parts.append(mean)
        grid_parts.append(grid)
        target_parts.append(torch.as_tensor(targets))
    if not cls_parts:
        raise ValueError("cannot extract features from an empty dataset")
    targets = _compact(torch.cat(target_parts))
    if (same := _whole(hits)) is not None:
        return Features(same.cls, same.mean_patch, same.patch_grid if dense else None, targets)
    features = Features(
        cls=torch.cat(cls_parts),
        mean_patch=torch.cat(mean_parts),
        patch_grid=torch.cat(grid_parts) if dense else None,
        targets=targets,
    )
    if cache is not None:
        cache.add(features, batches)
    return features


class Standardizer:
    """Per-channel z-scoring with train statistics: a fixed BatchNorm in front of the linear probe,
    so one learning rate suits backbones whose output norms scale dimensions very differently."""

    def __init__(self, train: Tensor, channel_dim: int = 1, eps: float = 1e-6) -> None:
        reduce = [d for d in range(train.dim()) if d != channel_dim]
        shape = [1] * train.dim()
        shape[channel_dim] = train.shape[channel_dim]
        self.mean = train.mean(dim=reduce).reshape(shape)
        self.std = train.std(dim=reduce, correction=0).reshape(shape).clamp_min(eps)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def fit_probe(
    head: nn.Module,
    num_samples: int,
    batch_loss: Callable[[Tensor], Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """AdamW over shuffled minibatches with a per-step cosine decay from `lr` to 0.

    `batch_loss(indices)` returns the loss of the samples at `indices` (a CPU LongTensor). The
    shuffling uses its own seeded generator, so the global RNG is neither read nor advanced.
    """
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * math.ceil(num_samples / batch_size)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for indices in torch.randperm(num_samples, generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total_steps))
            loss = batch_loss(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    return head
