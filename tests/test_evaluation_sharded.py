"""Evaluation split over torch.distributed processes: 2 gloo processes give the metrics 1 process
gives, on the built-in data, for both protocols, and the token analysis runs on rank 0 alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import parse_config
from trainer.data.build import build_eval_datasets
from trainer.evaluation import evaluate
from trainer.evaluation.features import all_reduce_sum, gather_strided
from trainer.loop import backbone_factory

from support.protocols import DINOV2_SMALL

CONFIG = {
    "model": {"specialization": "paper"},
    "data": {"scenes": {"train_size": 96, "val_size": 40}},
    "evaluation": {"probe_epochs": 3, "max_train_samples": 96, "max_val_samples": 40},
    "tracking": {"enabled": False},
    "runtime": {"threads": 1},
}
# Features equal per image; a CPU matmul over another batch composition may differ in the last
# bits, and a probe trained on them in the 6th decimal: far below one image of 40 (0.025).
TOLERANCE = 1e-4


def _evaluate(out_dir: Path, protocol: str = "quick") -> dict[str, float]:
    cfg = parse_config({**CONFIG, "evaluation": {**CONFIG["evaluation"], "protocol": protocol, "dinov2": DINOV2_SMALL}})
    torch.manual_seed(0)
    backbone = backbone_factory(cfg)()
    return evaluate(backbone, build_eval_datasets(cfg), cfg.evaluation, "cpu", out_dir, batch_size=16)


def _rank(rank: int, world: int, init_file: str, out: str, protocol: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = _evaluate(Path(out) / f"rank{rank}", protocol)
        Path(out, f"metrics{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def _gather_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        total = 7  # not a multiple of the world size: rank 0 holds 3 rows, ranks 1 and 2 hold 2
        rows = torch.arange(rank, total, world)
        parts = {"float": torch.stack([rows.float(), -rows.float()], dim=1), "uint8": rows.to(torch.uint8)}
        # The probes' counters: CPU float64, here a non-contiguous view (a column of a matrix).
        counts = torch.tensor([[rank + 1.0, 10.0 * rank], [0.5, 2.0]], dtype=torch.float64)[:, 0]
        summed = all_reduce_sum(counts)
        Path(out, f"gather{rank}.json").write_text(json.dumps(
            {**{name: gather_strided(part, total).tolist() for name, part in parts.items()},
             "sum": summed.tolist(), "sum_device": str(summed.device), "sum_dtype": str(summed.dtype)}))
    finally:
        dist.destroy_process_group()


def test_gather_and_sum_over_processes(tmp_path):
    """gather_strided restores dataset order on every rank; all_reduce_sum sums CPU counters (the
    ones NCCL would refuse as they are) and hands them back on the CPU, in their dtype."""
    mp.spawn(_gather_rank, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        got = json.loads((tmp_path / f"gather{rank}.json").read_text())
        assert got["float"] == [[float(i), -float(i)] for i in range(7)]
        assert got["uint8"] == list(range(7))
        assert got["sum"] == [1.0 + 2.0 + 3.0, 1.5]
        assert (got["sum_device"], got["sum_dtype"]) == ("cpu", "torch.float64")


def test_all_reduce_sum_without_a_process_group_is_the_identity():
    counts = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert all_reduce_sum(counts) is counts


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["quick", "dinov2"])
def test_two_gloo_processes_give_the_metrics_of_one(tmp_path, protocol):
    single = _evaluate(tmp_path / "single", protocol)
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), protocol), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    expected = {"linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "tokens/early_cls_patch_cos_pre"}
    if protocol == "dinov2":
        expected |= {"seg_miou_ms", "depth_rmse_lin4", "knn_top1_k5", "linear_best_lr"}
    assert expected <= set(single) and set(ranks[0]) == set(single)
    for name, value in single.items():
        assert math.isclose(ranks[0][name], value, abs_tol=TOLERANCE), (name, ranks[0][name], value)
    # Rank 1 has every probe's metric too, but the token analysis (and its plot) is rank 0's alone.
    assert set(ranks[1]) == {k for k in single if not k.startswith("tokens/")}
    assert all(math.isclose(ranks[1][k], ranks[0][k], abs_tol=TOLERANCE) for k in ranks[1])
    assert (tmp_path / "rank0" / "token_interaction.png").is_file()
    assert not (tmp_path / "rank1" / "token_interaction.png").exists()
