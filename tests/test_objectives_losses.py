"""Losses, head and schedules of trainer.objectives checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives.heads import DINOHead
from trainer.objectives.losses import (
    ClassificationLoss,
    DINOLoss,
    KoLeoLoss,
    TeacherTargets,
    iBOTPatchLoss,
    sinkhorn_knopp,
)
from trainer.objectives.schedules import apply_optimizer_schedule, cosine_schedule, teacher_momentum, teacher_temperature

LN2, LN3 = math.log(2), math.log(3)


# --- schedules ---------------------------------------------------------------------------------

def test_cosine_schedule_warmup_peak_and_end():
    args = dict(total=110, base=1.0, final=0.1, warmup_steps=10, start_warmup_value=0.0)
    assert cosine_schedule(0, **args) == 0.0
    assert cosine_schedule(5, **args) == pytest.approx(0.5)  # linear warmup
    assert cosine_schedule(10, **args) == pytest.approx(1.0)  # warmup end = peak
    assert cosine_schedule(60, **args) == pytest.approx(0.55)  # halfway through the cosine
    assert cosine_schedule(110, **args) == pytest.approx(0.1)
    assert cosine_schedule(500, **args) == pytest.approx(0.1)  # past the end stays final


def test_cosine_schedule_without_warmup_starts_at_base():
    assert cosine_schedule(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert cosine_schedule(100, 100, 0.992, 1.0) == pytest.approx(1.0)


def test_teacher_temperature_and_momentum():
    assert teacher_temperature(0, 100, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(15, 100, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(30, 100, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(99, 100, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert teacher_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert teacher_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_apply_optimizer_schedule_scales_each_group_by_its_multipliers():
    w, b, proto = (torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2)),
                   torch.nn.Parameter(torch.ones(2, 2)))
    opt = torch.optim.AdamW([
        dict(params=[w], lr_multiplier=0.9, wd_multiplier=1.0, is_last_layer=False),
        dict(params=[b], lr_multiplier=1.0, wd_multiplier=0.0, is_last_layer=False),
        dict(params=[proto], lr_multiplier=1.0, wd_multiplier=1.0, is_last_layer=True),
    ])
    apply_optimizer_schedule(opt, lr=0.5, weight_decay=0.2, last_layer_lr=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.45, 0.5, 0.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0, 0.2]
    apply_optimizer_schedule(opt, lr=0.5, weight_decay=0.2)  # no freeze: the prototypes follow the lr
    assert opt.param_groups[2]["lr"] == 0.5


# --- teacher targets ---------------------------------------------------------------------------

def test_sinkhorn_knopp_rows_sum_to_one_and_prototypes_balance():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    logits[:, 0] += 1.0  # one prototype favoured by every sample: plain softmax would be unbalanced
    q = sinkhorn_knopp(logits, temp=1.0, iterations=3)
    assert q.shape == (64, 8)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert (q >= 0).all()
    usage = q.sum(dim=0) / 64
    assert torch.allclose(usage, torch.full((8,), 1 / 8), atol=0.01)
    assert F.softmax(logits, dim=1).mean(0)[0] > 0.2  # what centering-free softmax would give


def test_sinkhorn_knopp_identical_rows_become_uniform():
    # Hand case: every sample prefers prototype 0 equally, so balancing usage forces 1/K everywhere.
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(4, 1)
    q = sinkhorn_knopp(logits, temp=0.1)
    assert torch.allclose(q, torch.full((4, 3), 1 / 3), atol=1e-6)


def test_centering_uses_then_updates_the_ema_center():
    targets = TeacherTargets(out_dim=2, method="centering", center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    probs = targets(logits, temp=0.5)
    assert torch.allclose(probs, F.softmax(logits / 0.5, dim=1))  # center starts at zero
    assert torch.allclose(targets.center, torch.tensor([[0.2, 0.3]]))  # 0.9 * 0 + 0.1 * mean
    probs = targets(logits, temp=0.5)
    assert torch.allclose(probs, F.softmax((logits - torch.tensor([0.2, 0.3])) / 0.5, dim=1))
    assert torch.allclose(targets.center, torch.tensor([[0.38, 0.57]]))  # 0.9 * [.2, .3] + 0.1 * [2, 3]


def test_centering_ignores_an_empty_batch():
    targets = TeacherTargets(out_dim=2, method="centering")
    targets(torch.zeros(0, 2), temp=0.1)
    assert torch.equal(targets.center, torch.zeros(1, 2))


# --- DINO / iBOT / KoLeo -----------------------------------------------------------------------

def test_dino_loss_hand_computed_skips_same_view_pairs():
    loss_fn = DINOLoss(out_dim=2, student_temp=0.5)
    # Logits are halved so that logits / student_temp give the log-probabilities named below.
    s_global0 = torch.tensor([[0.0, 0.0]])  # probs [1/2, 1/2]
    s_global1 = torch.tensor([[LN3, 0.0]]) * 0.5  # probs [3/4, 1/4]
    s_local = torch.tensor([[0.0, LN3]]) * 0.5  # probs [1/4, 3/4]
    t_global0 = torch.tensor([[1.0, 0.0]])
    t_global1 = torch.tensor([[0.5, 0.5]])
    loss = loss_fn([s_global0, s_global1, s_local], [t_global0, t_global1])
    expected = (
        LN2  # student view 0 vs teacher view 1
        - math.log(3 / 4)  # student view 1 vs teacher view 0
        - math.log(1 / 4)  # local vs teacher view 0
        - 0.5 * (math.log(1 / 4) + math.log(3 / 4))  # local vs teacher view 1
    ) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_averages_over_the_batch():
    loss_fn = DINOLoss(out_dim=2, student_temp=1.0)
    students = [torch.tensor([[0.0, 0.0], [LN3, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])]
    teachers = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    # pair (s0, t1): rows -log(1/2), -log(1/4); pair (s1, t0): -log(1/2) twice
    expected = ((LN2 + math.log(4)) / 2 + LN2) / 2
    assert loss_fn(students, teachers).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_averages_per_image_then_over_all_images():
    loss_fn = iBOTPatchLoss(out_dim=2, student_temp=1.0)
    masks = torch.tensor([[True, True, False], [False, True, False], [False, False, False]])
    # Three masked patches, in masks[masks] order: image 0 (two), image 1 (one).
    student = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    per_patch = [LN2, -math.log(3 / 4), -math.log(1 / 4)]
    expected = ((per_patch[0] + per_patch[1]) / 2 + per_patch[2] + 0.0) / 3
    assert loss_fn(student, teacher, masks).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_on_hand_placed_points():
    loss_fn = KoLeoLoss()
    # Quarter-turns on the circle (scaled: the loss normalizes); each nearest neighbour is sqrt(2) away.
    points = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    assert loss_fn(points).item() == pytest.approx(-0.5 * LN2, abs=1e-6)
    # 0, 60 and 180 degrees: nearest distances 1, 1 and sqrt(3).
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    points = torch.tensor([[1.0, 0.0], [c, s], [-1.0, 0.0]])
    assert loss_fn(points).item() == pytest.approx(-LN3 / 6, abs=1e-6)


def test_koleo_gradient_pushes_close_points_apart():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    KoLeoLoss()(points).backward()
    assert points.grad[1, 1] < 0  # gradient descent raises point 1 away from point 0


# --- supervised --------------------------------------------------------------------------------

def test_bce_against_hand_computation():
    logits = torch.tensor([[0.0, LN3]])  # sigmoid: 1/2, 3/4
    labels = torch.tensor([1])
    plain = ClassificationLoss(2, "bce")(logits, labels)
    assert plain.item() == pytest.approx((LN2 - math.log(3 / 4)) / 2, rel=1e-6)
    smoothed = ClassificationLoss(2, "bce", label_smoothing=0.2)(logits, labels)  # targets 0.1, 0.9
    expected = (LN2 - (0.9 * math.log(3 / 4) + 0.1 * math.log(1 / 4))) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)


def test_ce_and_soft_targets():
    logits = torch.tensor([[0.0, LN3]])  # softmax 1/4, 3/4
    assert ClassificationLoss(2, "ce")(logits, torch.tensor([1])).item() == pytest.approx(-math.log(3 / 4))
    smoothed = ClassificationLoss(2, "ce", label_smoothing=0.2)(logits, torch.tensor([1]))
    assert smoothed.item() == pytest.approx(-(0.9 * math.log(3 / 4) + 0.1 * math.log(1 / 4)), rel=1e-6)
    soft = ClassificationLoss(2, "ce")(logits, torch.tensor([[0.5, 0.5]]))
    assert soft.item() == pytest.approx(-0.5 * (math.log(1 / 4) + math.log(3 / 4)), rel=1e-6)


# --- head --------------------------------------------------------------------------------------

def test_dino_head_outputs_bounded_prototype_scores():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    logits = head(torch.randn(5, 16) * 100)
    assert logits.shape == (5, 40)
    # unit-norm bottleneck . unit-norm prototypes = cosine similarity
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(40), atol=1e-5)
    assert logits.abs().max() <= 1.0 + 1e-5
