"""Image classification from frozen global features: a linear probe and a weighted k-NN (as DINO),
and the trained classifier's own top-1 (`head_top1`, the number DeiT-III reports)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from trainer.evaluation.features import Features, Standardizer, fit_probe
from trainer.evaluation.metrics import top1_accuracy

KNN_TEMPERATURE = 0.07  # DINO's temperature for the exp(sim / T) vote weights


@torch.no_grad()
def _predict(head: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    return torch.cat([head(chunk).argmax(dim=1) for chunk in x.split(batch_size)])


def linear_probe_top1(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 of a linear classifier (cross-entropy, zero init) trained on standardized features."""
    device = torch.device(device)
    standardize = Standardizer(train_x)
    train_x, val_x = standardize(train_x).to(device), standardize(val_x).to(device)
    train_y = train_y.long().to(device)
    # Zero init (the problem is convex): no default init, so the global RNG is not drawn from.
    head = skip_init(nn.Linear, train_x.shape[1], num_classes, device=device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def batch_loss(indices: Tensor) -> Tensor:
        indices = indices.to(device)
        return F.cross_entropy(head(train_x[indices]), train_y[indices])

    fit_probe(head, len(train_x), batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return top1_accuracy(_predict(head, val_x).cpu(), val_y.long())


@torch.no_grad()
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    num_classes: int,
    k: int,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> Tensor:
    """Class of each query: cosine k nearest training samples, votes weighted by exp(sim / T)."""
    train_x = F.normalize(train_x.float(), dim=1)
    query_x = F.normalize(query_x.float(), dim=1)
    train_y = train_y.long().to(train_x.device)
    k = min(k, len(train_x))
    predictions = []
    for chunk in query_x.split(chunk_size):
        similarity, neighbours = (chunk @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_y[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int, k: int,
             device: torch.device | str = "cpu") -> float:
    device = torch.device(device)
    predictions = knn_predict(train_x.to(device), train_y, val_x.to(device), num_classes, k)
    return top1_accuracy(predictions.cpu(), val_y.long())


@torch.no_grad()
def head_top1(backbone: nn.Module, features: Features, device: torch.device | str = "cpu") -> float | None:
    """The backbone's own classifier on cached final tokens, as timm's `forward_head`: the [CLS]
    token (global_pool token) or the patch mean (avg), then fc_norm and head. None without a
    classifier (num_classes 0) or for another pooling."""
    pool = getattr(backbone, "global_pool", None)
    if not getattr(backbone, "num_classes", 0) or pool not in ("token", "avg"):
        return None
    pooled = features.cls if pool == "token" else features.mean_patch
    head = nn.Sequential(backbone.fc_norm, backbone.head)
    return top1_accuracy(_predict(head, pooled.to(device)).cpu(), features.targets)
