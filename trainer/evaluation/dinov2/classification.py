"""DINOv2's linear classification protocol and its k-NN, on a frozen backbone.

Linear (dinov2/eval/linear.py): every (lr, n_last_blocks, avgpool) classifier of the grid trains at
once on the same augmented batches (`AllClassifiers`; one backbone pass per batch); the input is the
[CLS] tokens of the last n blocks, concatenated, plus the average-pooled patch tokens of the last
block with avgpool (`create_linear_input`); `LinearClassifier` starts at N(0, 0.01) weights and zero
bias; SGD, momentum 0.9, no weight decay, lr x global batch / 256, cosine annealing to 0 per
iteration; the setting with the best top-1 on the selection split is reported on the test split.
(DINOv2 selects on ImageNet val and reports val: we select on the training hold-out when there is
one, so the reported number is not the one the choice was made on.)

k-NN (dinov2/eval/knn.py): L2-normalized [CLS] of the final norm, the k nearest training images
voting with exp(cos / T), T 0.07, k in (10, 20, 100, 200); `knn_top1` is k 20.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2

from trainer.data.scenes import derive_seed
from trainer.data.transforms import normalize
from trainer.evaluation.classification import knn_predict
from trainer.evaluation.dinov2.tokens import intermediate_tokens, last_blocks
from trainer.evaluation.features import all_reduce_sum, gather_strided, process_group

KNN_HEADLINE_K = 20  # the k DINOv2's paper reports


def linear_input(tokens: list[tuple[Tensor, Tensor]], n_blocks: int, avgpool: bool) -> Tensor:
    """`create_linear_input`: [CLS] of the last `n_blocks` entries of `tokens` ((cls, grid) per block,
    oldest first), concatenated, + the last block's mean patch token when `avgpool`."""
    chosen = tokens[-n_blocks:]
    out = torch.cat([cls for cls, _ in chosen], dim=-1)
    if avgpool:
        out = torch.cat([out, chosen[-1][1].flatten(2).mean(dim=2)], dim=-1)
    return out


def scaled_lr(lr: float, global_batch: int) -> float:
    """linear.py: `lr * (batch_size * world_size) / 256`; our batch size is already the global one."""
    return lr * global_batch / 256.0


def grid(learning_rates: Sequence[float], n_last_blocks: Sequence[int], avgpool: Sequence[bool]):
    """(name, lr, n_blocks, avgpool) for every setting, in DINOv2's order (blocks, pool, lr)."""
    return [(f"blocks{n}_avgpool{int(a)}_lr{lr:g}".replace(".", "_"), lr, n, a)
            for n in n_last_blocks for a in avgpool for lr in learning_rates]


class _Augmented(Dataset):
    """(global position -> dataset index) pairs -> (augmented image, label): each sample's
    RandomResizedCrop + flip (make_classification_train_transform) drawn from its own seed, so the
    batches are the same for any number of processes."""

    def __init__(self, base: Dataset, crop: int, picks: list[tuple[int, int]], seed: int):
        self.base, self.picks, self.seed = base, picks, seed
        self.transform = v2.Compose([v2.RandomResizedCrop(crop, interpolation=InterpolationMode.BICUBIC,
                                                          antialias=True),
                                     v2.RandomHorizontalFlip(0.5), normalize()])

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: int):
        position, index = self.picks[i]
        sample = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("dinov2-linear", self.seed, position))
            return self.transform(sample["image"]), torch.as_tensor(sample["label"])


class EvalImages(Dataset):
    """Raw samples -> (image, label): dinov2/data/transforms.py make_classification_eval_transform
    (resize the short side, bicubic; centre crop; normalize). Samples without a label get 0."""

    def __init__(self, base: Dataset, resize: int, crop: int):
        self.base = base
        self.transform = v2.Compose([v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                     v2.CenterCrop(crop), normalize()])

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        sample = self.base[i]
        return self.transform(sample["image"]), torch.as_tensor(sample.get("label", 0))


@torch.no_grad()
def _accuracies(backbone: nn.Module, heads: nn.ModuleDict, settings, data: Dataset, blocks: list[int],
                batch_size: int, device: torch.device, num_workers: int) -> dict[str, float]:
    rank, world = process_group()
    loader = DataLoader(Subset(data, range(rank, len(data), world)), batch_size=batch_size, num_workers=num_workers)
    correct = torch.zeros(len(settings), dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    for images, labels in loader:
        tokens = intermediate_tokens(backbone, images.to(device), blocks)
        for j, (name, _, n, a) in enumerate(settings):
            correct[j] += (heads[name](linear_input(tokens, n, a)).argmax(1).cpu() == labels).sum().item()
        count += len(labels)
    correct, count = all_reduce_sum(correct), all_reduce_sum(count)
    return {name: (correct[j] / count).item() for j, (name, *_) in enumerate(settings)}


def dinov2_linear(backbone: nn.Module, train: Dataset, val: Dataset, test: Dataset, num_classes: int, *,
                  learning_rates: Sequence[float], n_last_blocks: Sequence[int], avgpool: Sequence[bool],
                  epochs: int, iterations_per_epoch: int, batch_size: int, crop_size: int, resize_size: int,
                  seed: int = 0, device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """Trains the grid on `train`, picks on `val`, reports on `test` (raw samples: `image`, `label`).
    Official values (linear.py's defaults): the 13 learning rates 1e-5 .. 0.1, n_last_blocks (1, 4),
    avgpool (False, True), 10 epochs x 1250 iterations, batch 128 per GPU, crop 224, resize 256."""
    device = torch.device(device)
    rank, world = process_group()
    if batch_size % world:
        raise ValueError(f"dinov2 linear: batch_size {batch_size} does not split over {world} processes; "
                         f"set evaluation.dinov2.linear.batch_size to a multiple of {world}")
    depth = len(backbone.blocks)
    blocks = last_blocks(depth, max(n_last_blocks))
    settings = grid(learning_rates, n_last_blocks, avgpool)
    dim = backbone.embed_dim
    generator = torch.Generator().manual_seed(derive_seed("dinov2-linear-init", seed))
    heads = nn.ModuleDict()
    for name, _, n, a in settings:
        head = nn.Linear(dim * (n + int(a)), num_classes, device=device)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
            head.bias.zero_()
        heads[name] = head
    optimizer = torch.optim.SGD([{"params": heads[name].parameters(), "lr": scaled_lr(lr, batch_size)}
                                 for name, lr, _, _ in settings], momentum=0.9, weight_decay=0.0)
    total = epochs * iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=0)
    # One global stream of shuffled epochs (an InfiniteSampler); rank r takes every W-th position.
    order = torch.Generator().manual_seed(derive_seed("dinov2-linear-order", seed))
    needed, stream = total * batch_size, []
    while len(stream) < needed:
        stream += torch.randperm(len(train), generator=order).tolist()  # type: ignore[arg-type]
    picks = [(p, stream[p]) for p in range(needed) if p % world == rank]
    loader = DataLoader(_Augmented(train, crop_size, picks, seed), batch_size=batch_size // world,
                        num_workers=num_workers)
    heads.train()
    for images, labels in loader:
        tokens = intermediate_tokens(backbone, images.to(device), blocks)
        labels = labels.to(device)
        # Sum over this rank's images / the global batch, gradients summed over ranks: the mean
        # cross entropy of the whole global batch, summed over the classifiers (AllClassifiers).
        loss = sum(F.cross_entropy(heads[name](linear_input(tokens, n, a)), labels, reduction="sum")
                   for name, _, n, a in settings) / batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in heads.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()
        scheduler.step()
    heads.eval()
    evaluate = lambda data, chosen: _accuracies(  # noqa: E731
        backbone, heads, chosen, EvalImages(data, resize_size, crop_size), blocks, batch_size, device, num_workers)
    on_val = evaluate(val, settings)
    best = max(settings, key=lambda s: on_val[s[0]])  # the first of equals, in grid order
    name, lr, n, a = best
    return {"linear_top1_cls": evaluate(test, [best])[name], "linear_top1_cls_val": on_val[name],
            "linear_best_lr": lr, "linear_best_blocks": float(n), "linear_best_avgpool": float(a)}


@torch.no_grad()
def _final_cls(backbone: nn.Module, data: Dataset, batch_size: int, device: torch.device,
               num_workers: int) -> tuple[Tensor, Tensor]:
    """[CLS] after the final norm and the labels of every image, extracted over the processes."""
    rank, world = process_group()
    loader = DataLoader(Subset(data, range(rank, len(data), world)), batch_size=batch_size, num_workers=num_workers)
    feats, labels, last = [], [], [len(backbone.blocks) - 1]
    for images, y in loader:
        feats.append(intermediate_tokens(backbone, images.to(device), last)[0][0].cpu())
        labels.append(y)
    dim = backbone.embed_dim
    part = torch.cat(feats) if feats else torch.zeros(0, dim)
    targets = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return gather_strided(part, len(data)), gather_strided(targets, len(data))  # type: ignore[arg-type]


def dinov2_knn(backbone: nn.Module, train: Dataset, test: Dataset, num_classes: int, *, ks: Sequence[int],
               temperature: float, resize_size: int, crop_size: int, batch_size: int,
               device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """`knn_top1_k{k}` for every k, and `knn_top1` (k 20, or the first k when 20 is not asked for)."""
    device = torch.device(device)
    train_x, train_y = _final_cls(backbone, EvalImages(train, resize_size, crop_size), batch_size, device, num_workers)
    test_x, test_y = _final_cls(backbone, EvalImages(test, resize_size, crop_size), batch_size, device, num_workers)
    out = {}
    for k in ks:
        predictions = knn_predict(train_x.to(device), train_y, test_x.to(device), num_classes, k, temperature)
        out[f"knn_top1_k{k}"] = (predictions.cpu() == test_y).float().mean().item()
    out["knn_top1"] = out[f"knn_top1_k{KNN_HEADLINE_K if KNN_HEADLINE_K in ks else ks[0]}"]
    return out
