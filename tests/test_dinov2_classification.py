"""DINOv2's linear grid and k-NN (trainer/evaluation/dinov2/classification.py) on constructed data
with known answers; the 2-process equality runs in tests/test_evaluation_sharded.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from trainer.evaluation.dinov2.classification import dinov2_knn, dinov2_linear, grid, linear_input, scaled_lr

DIM = 3  # the stand-in backbone's width: its [CLS] is the image's mean colour


class ColourBackbone(nn.Module):
    """A frozen stand-in with timm's `forward_intermediates`: every block's [CLS] is the mean colour
    of the image (minus 0.5), except the last block's, which is constant, as are all patch tokens.
    So only settings that read earlier blocks (n_last_blocks 4) can classify."""

    def __init__(self, depth: int = 4, last_block_blind: bool = True):
        super().__init__()
        self.last_block_blind = last_block_blind
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.embed_dim = DIM
        self.anchor = nn.Parameter(torch.zeros(1))  # a device to be on

    def forward_intermediates(self, images, indices, norm, output_fmt, return_prefix_tokens, intermediates_only):
        colour = images.mean(dim=(2, 3))
        grid = torch.ones(len(images), DIM, 2, 2)
        blind = len(self.blocks) - 1 if self.last_block_blind else None
        return [(grid, (torch.ones_like(colour) if i == blind else colour)[:, None]) for i in indices]


class Colours(Dataset):
    """Class c: an image of colour COLOURS[c] with a little noise; `shuffle_labels` breaks the link."""

    COLOURS = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230]], dtype=torch.float32)

    def __init__(self, n: int, seed: int, shuffle_labels: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        noise = torch.randint(-15, 16, (n, 3, 8, 8), generator=g).float()
        self.images = (self.COLOURS[self.labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
        if shuffle_labels:
            self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


SMALL = dict(epochs=3, iterations_per_epoch=10, batch_size=16, crop_size=8, resize_size=8)


def test_linear_input_widths_and_values_follow_create_linear_input():
    g = torch.Generator().manual_seed(0)
    tokens = [(torch.randn(2, 5, generator=g), torch.randn(2, 5, 3, 3, generator=g)) for _ in range(4)]
    assert linear_input(tokens, 1, False).shape[1] == 5
    assert linear_input(tokens, 4, False).shape[1] == 20
    assert linear_input(tokens, 1, True).shape[1] == 10
    assert linear_input(tokens, 4, True).shape[1] == 25
    # By hand: the [CLS] of blocks -4..-1 in order, then the mean over the last block's patch grid.
    by_hand = torch.cat([tokens[0][0], tokens[1][0], tokens[2][0], tokens[3][0], tokens[3][1].mean(dim=(2, 3))], 1)
    assert torch.equal(linear_input(tokens, 4, True), by_hand)


def test_lr_scaling_and_grid_order_match_linear_py():
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)  # lr * (128 per GPU * 8 GPUs) / 256
    settings = grid([1e-3, 1e-2], [1, 4], [False, True])
    assert len(settings) == 8 and all("." not in name for name, *_ in settings)
    assert [(n, a) for _, _, n, a in settings[:2]] == [(1, False), (1, False)]


def test_the_cosine_schedule_reaches_zero_at_the_last_iteration():
    """CosineAnnealingLR(T_max = epochs x iterations, eta_min 0) as linear.py sets it, per iteration."""
    head = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, eta_min=0)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_the_grid_picks_on_the_selection_split_and_reports_the_test_split():
    backbone = ColourBackbone().eval()
    train, val = Colours(96, 0), Colours(48, 1)
    test = Colours(300, 2, shuffle_labels=True)  # no link between image and label: chance
    out = dinov2_linear(backbone, train, val, test, 3, learning_rates=[1e-6, 0.5], n_last_blocks=[1, 4],
                        avgpool=[False, True], **SMALL)
    # Only the last 4 blocks carry the colour, and lr 1e-6 barely moves from the N(0, 0.01) start.
    assert out["linear_best_blocks"] == 4 and out["linear_best_lr"] == 0.5
    assert out["linear_top1_cls_val"] == 1.0
    assert abs(out["linear_top1_cls"] - 1 / 3) < 0.1  # the test split's number, not the selection's
    again = dinov2_linear(backbone, train, val, test, 3, learning_rates=[1e-6, 0.5], n_last_blocks=[1, 4],
                          avgpool=[False, True], **SMALL)
    assert again == out


def test_knn_votes_with_exp_cosine_over_temperature():
    backbone = ColourBackbone(last_block_blind=False).eval()  # k-NN reads the last block's [CLS]
    train, test = Colours(30, 3), Colours(12, 4)
    out = dinov2_knn(backbone, train, test, 3, ks=[1, 5, 20], temperature=0.07, resize_size=8, crop_size=8,
                     batch_size=8)
    assert set(out) == {"knn_top1_k1", "knn_top1_k5", "knn_top1_k20", "knn_top1"}
    assert out["knn_top1"] == out["knn_top1_k20"]

    # By hand: normalized mean colours (the backbone's [CLS], after the eval transform's normalization).
    from trainer.data.transforms import normalize

    def feats(data):
        return torch.nn.functional.normalize(
            torch.stack([normalize()(data[i]["image"]).mean(dim=(1, 2)) for i in range(len(data))]), dim=1)

    tx, qx = feats(train), feats(test)
    for k in (1, 5, 20):
        sims, nn_idx = (qx @ tx.T).topk(k, dim=1)
        votes = torch.zeros(len(qx), 3).scatter_add_(1, train.labels[nn_idx], (sims / 0.07).exp())
        assert out[f"knn_top1_k{k}"] == pytest.approx((votes.argmax(1) == test.labels).float().mean().item())


def test_a_batch_that_does_not_split_over_the_processes_is_refused_by_name(monkeypatch):
    import trainer.evaluation.dinov2.classification as module

    monkeypatch.setattr(module, "process_group", lambda: (0, 3))
    with pytest.raises(ValueError, match="evaluation.dinov2.linear.batch_size"):
        dinov2_linear(ColourBackbone(), Colours(8, 0), Colours(8, 1), Colours(8, 2), 3, learning_rates=[0.1],
                      n_last_blocks=[1], avgpool=[False], **SMALL)
