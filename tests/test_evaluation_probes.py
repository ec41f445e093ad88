"""Probes on synthetic features with known answers, feature extraction, and `evaluate` end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from trainer.config import EvaluationConfig
from trainer.evaluation import evaluate
from trainer.evaluation.classification import knn_predict, knn_top1, linear_probe_top1
from trainer.evaluation.depth import depth_probe
from trainer.evaluation.features import FeatureCache, Standardizer, extract_features, subset_indices
from trainer.evaluation.segmentation import infer_num_classes, segmentation_probe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
        num_classes=0, init_values=1e-4, **kwargs,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- classification ----------------------------------------------------------------------------


def test_linear_probe_separates_linearly_separable_features():
    g = gen(0)
    num_classes, dim = 5, 32
    directions = torch.randn(num_classes, dim, generator=g) * 3

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        # A large shared offset and a badly scaled dimension: standardization must cope.
        x = directions[y] + torch.randn(n, dim, generator=g) + 50.0
        x[:, 0] *= 1000.0
        return x, y

    (tx, ty), (vx, vy) = sample(512), sample(256)
    top1 = linear_probe_top1(tx, ty, vx, vy, num_classes, epochs=20, lr=1e-2)
    assert top1 >= 0.99


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    g = gen(1)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = linear_probe_top1(x, y, x, y, 3, epochs=3, lr=1e-2)
    assert torch.equal(torch.rand(1), expected_next)
    assert a == linear_probe_top1(x, y, x, y, 3, epochs=3, lr=1e-2)


def test_knn_votes_are_temperature_weighted():
    # Query at angle 0. Class 1 has one neighbour at cos 1; class 0 has two at cos 0.8. With T=0.07
    # one exact match (weight e^{14.3}) outweighs two weaker ones (2 e^{11.4}); plain majority would not.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[2.0, 0.0]])  # scale must not matter: cosine similarity
    assert knn_predict(train, labels, query, num_classes=3, k=3).tolist() == [1]
    assert knn_predict(train, labels, query, num_classes=3, k=3, temperature=100.0).tolist() == [0]
    # k larger than the training set is clipped.
    assert knn_predict(train, labels, query, num_classes=3, k=50, temperature=0.07).tolist() == [1]


def test_knn_on_clustered_features_is_perfect():
    g = gen(2)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    ty, vy = torch.arange(400) % 4, torch.arange(100) % 4
    tx = centers[ty] + 0.05 * torch.randn(400, 16, generator=g)
    vx = centers[vy] + 0.05 * torch.randn(100, 16, generator=g)
    assert knn_top1(tx, ty, vx, vy, num_classes=4, k=20) == 1.0


# --- dense probes -------------------------------------------------------------------------------


def _patch_labels_to_masks(labels: torch.Tensor, patch: int) -> torch.Tensor:
    return labels.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


def test_segmentation_probe_reaches_high_miou_when_features_encode_the_label():
    g = gen(3)
    num_classes, dim, grid, patch = 4, 16, 4, 4
    codes = torch.randn(num_classes, dim, generator=g) * 2

    def sample(n):
        labels = torch.randint(0, num_classes, (n, grid, grid), generator=g)
        feats = codes[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, dim, grid, grid, generator=g)
        masks = _patch_labels_to_masks(labels, patch)
        masks[:, 0, 0] = 255  # some ignored pixels
        return feats, masks

    (tg, tm), (vg, vm) = sample(96), sample(32)
    out = segmentation_probe(tg, tm, vg, vm, num_classes, epochs=15, lr=5e-2, batch_size=32)
    # Bilinear upsampling of logits blurs patch borders a little; the interior is exact.
    assert out["seg_miou"] > 0.9
    assert out["seg_pixel_acc"] > 0.95
    assert infer_num_classes(tm, vm) == num_classes


def test_depth_probe_recovers_depth_that_is_linear_in_the_features():
    g = gen(4)
    dim, grid, size = 8, 4, 16
    w = F.normalize(torch.randn(dim, generator=g), dim=0)

    def sample(n):
        feats = torch.randn(n, dim, grid, grid, generator=g)
        patch_depth = 3.0 + 0.5 * torch.einsum("bchw,c->bhw", feats, w)
        # Interpolated like the probe's output, so that a linear probe can fit it exactly.
        depth = F.interpolate(patch_depth[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        depth = depth.clamp_min(0.5)
        depth[:, :, :2] = 0.0  # invalid pixels: must be ignored by the loss and the metrics
        return feats, depth

    (tg, td), (vg, vd) = sample(128), sample(32)
    out = depth_probe(tg, td, vg, vd, epochs=30, lr=5e-2, batch_size=32)
    baseline = vd[vd > 0].std().item()  # about the RMSE of predicting the mean depth
    assert out["depth_rmse"] < 0.1 * baseline
    assert 0 <= out["depth_abs_rel"] < 0.02


def test_standardizer_uses_train_statistics_per_channel():
    train = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    s = Standardizer(train)
    assert s(train).tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    assert s(torch.tensor([[1.0, 20.0]])).tolist() == [[0.0, 0.0]]


# --- feature extraction and evaluate -------------------------------------------------------------


def test_extract_features_matches_forward_features():
    model = tiny_vit(reg_tokens=2).eval()
    images = torch.randn(10, 3, 32, 32, generator=gen(5))
    masks = torch.randint(0, 3, (10, 32, 32), generator=gen(5))
    feats = extract_features(model, TensorDataset(images, masks), "cpu", dense=True, batch_size=4)
    with torch.no_grad():
        tokens = model.forward_features(images)
    patches = tokens[:, model.num_prefix_tokens:]
    assert torch.allclose(feats.cls, tokens[:, 0], atol=1e-5)
    assert torch.allclose(feats.mean_patch, patches.mean(1), atol=1e-5)
    assert feats.patch_grid.shape == (10, 64, 8, 8)
    # Row-major grid: token (r, c) is patch r * 8 + c.
    assert torch.allclose(feats.patch_grid[:, :, 1, 2], patches[:, 1 * 8 + 2], atol=1e-5)
    assert feats.targets.dtype == torch.uint8 and torch.equal(feats.targets.long(), masks)
    capped = extract_features(model, TensorDataset(images, masks), "cpu", max_samples=4)
    assert len(capped) == 4 and capped.patch_grid is None
    assert subset_indices(10, 4) == subset_indices(10, 4) != [0, 1, 2, 3]


def test_feature_cache_runs_the_backbone_once_for_tasks_sharing_images():
    model = tiny_vit().eval()
    forwards = []
    model.patch_embed.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
    images = torch.randn(10, 3, 32, 32, generator=gen(6))
    masks = TensorDataset(images, torch.randint(0, 3, (10, 32, 32), generator=gen(6)))
    depths = TensorDataset(images, torch.rand(10, 32, 32, generator=gen(6)))
    labels = TensorDataset(images, torch.arange(10))
    cache = FeatureCache()
    seg = extract_features(model, masks, "cpu", dense=True, batch_size=4, cache=cache)
    assert sum(forwards) == 10
    depth = extract_features(model, depths, "cpu", dense=True, batch_size=4, cache=cache)
    cls = extract_features(model, labels, "cpu", max_samples=6, batch_size=4, cache=cache)
    assert sum(forwards) == 10 + 6  # the subset's batches differ from the cached ones: computed
    assert depth.patch_grid is seg.patch_grid  # shared, not copied
    assert torch.equal(depth.targets, depths.tensors[1]) and cls.targets.tolist() == subset_indices(10, 6)
    again = extract_features(model, labels, "cpu", batch_size=4, cache=cache)
    assert sum(forwards) == 16 and torch.equal(again.cls, seg.cls) and again.patch_grid is None
    other = TensorDataset(images + 1, torch.arange(10))
    extract_features(model, other, "cpu", batch_size=4, cache=cache)
    assert sum(forwards) == 26  # different pixels: computed


def _dataset(kind: str, n: int, seed: int) -> TensorDataset:
    g = gen(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    if kind == "classification":
        labels = torch.randint(0, 3, (n,), generator=g)
        images += labels[:, None, None, None].float()  # a learnable signal
        return TensorDataset(images, labels)
    if kind == "segmentation":
        return TensorDataset(images, torch.randint(0, 3, (n, 32, 32), generator=g))
    return TensorDataset(images, torch.rand(n, 32, 32, generator=g) + 0.5)


def _eval_data(**kinds: bool) -> SimpleNamespace:
    pairs = {k: (_dataset(k, 48, 0), _dataset(k, 16, 1)) for k, on in kinds.items() if on}
    return SimpleNamespace(**pairs, num_classes=3, segmentation_num_classes=3)  # as trainer.data's EvalData


FAST = EvaluationConfig(probe_epochs=3, knn_k=5, max_train_samples=40, max_val_samples=16)
TASK_KEYS = {"linear_top1_cls", "linear_top1_cls_patch", "knn_top1", "seg_miou", "seg_pixel_acc",
             "depth_rmse", "depth_abs_rel"}


def test_evaluate_runs_everything_and_is_deterministic(tmp_path):
    model = tiny_vit()
    model.train()
    data = _eval_data(classification=True, segmentation=True, depth=True)
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = evaluate(model, data, FAST, "cpu", tmp_path / "a")
    assert torch.equal(torch.rand(1), expected_next)  # a training run's RNG stream is untouched
    assert model.training  # mode restored
    assert TASK_KEYS <= set(first)
    assert {"tokens/block0/cls_patch_cos_post", "tokens/early_cls_patch_cos_post",
            "tokens/late_cls_patch_cos_post"} <= set(first)
    assert all(math.isfinite(v) for v in first.values())
    assert (tmp_path / "a" / "token_interaction.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "a" / "token_interaction.json").is_file()

    torch.manual_seed(99)  # a different global seed must not change anything
    second = evaluate(model, data, FAST, "cpu", tmp_path / "b")
    assert first == second


def test_evaluate_skips_missing_data_and_disabled_tasks(tmp_path):
    model = tiny_vit()
    only_depth = evaluate(model, _eval_data(depth=True), FAST, "cpu", tmp_path)
    assert {k for k in only_depth if not k.startswith("tokens/")} == {"depth_rmse", "depth_abs_rel"}

    no_knn_no_tokens = FAST.model_copy(update={"knn": False, "token_interaction": False, "depth": False})
    out = evaluate(model, _eval_data(classification=True, depth=True), no_knn_no_tokens, "cpu", tmp_path / "c")
    assert set(out) == {"linear_top1_cls", "linear_top1_cls_patch"}
    assert not (tmp_path / "c" / "token_interaction.png").exists()

    assert evaluate(model, object(), FAST, "cpu", tmp_path / "d") == {}
    undeclared = SimpleNamespace(segmentation=_eval_data(segmentation=True).segmentation)  # classes inferred
    assert {"seg_miou", "seg_pixel_acc"} <= set(evaluate(model, undeclared, FAST, "cpu", tmp_path / "f"))
    empty = SimpleNamespace(classification=(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)),) * 2)
    assert evaluate(model, empty, FAST, "cpu", tmp_path / "e") == {}
