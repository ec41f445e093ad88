"""Per-batch cost of training augmentation: the per-sample torchvision path vs the batch path.

Both paths augment the same training batches of the trainer's own data (the scenes) as a
DataLoader with `num_workers: 0` would: fetch the keys, augment, collate. Supervised: DeiT-III
3-Augment with the relabel from segmentation; dinov2: DINOv2's multi-crop (2 global + L local).
The per-sample path is `TrainDataset` with `SupervisedTransform` / `MultiCropTransform`, what the
trainer used before; the batch path is `BatchTrainDataset` with `BatchSupervisedTransform` /
`BatchMultiCropTransform`, what `build_train_dataset` gives now. The two are timed interleaved (each repeat times both, in
alternating order) and each repeat's ratio is per-sample / batch, so machine noise hits both.
The last line printed is one JSON object.

    python benchmarks/augment_overhead.py                       # the default sweep's setting: 32 px, batch 64
    python benchmarks/augment_overhead.py --framework dinov2 --local-crops 4   # 32 px globals, 12 px locals
    python benchmarks/augment_overhead.py --img-size 224 --batch-size 32 --train-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trainer.config import TrialConfig
from trainer.data import (
    BatchMultiCropTransform,
    BatchSupervisedTransform,
    BatchTrainDataset,
    MultiCropTransform,
    SupervisedTransform,
    TrainDataset,
    collate_multicrop,
    resolve_local_crop_size,
)
from trainer.data.scenes import scenes_split


def seconds_per_batch(dataset: TrainDataset, batches: list[list[tuple[int, int]]]) -> float:
    """What a DataLoader with num_workers 0 does per batch: fetch the keys, then collate."""
    fetch = getattr(dataset, "__getitems__", None) or (lambda keys: [dataset[k] for k in keys])
    start = time.perf_counter()
    for keys in batches:
        dataset.collate(fetch(keys))
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default="supervised", choices=["supervised", "dinov2"])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--local-crops", type=int, default=4, help="dinov2: local crops per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2048, help="scenes generated (the default sweep's)")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per path per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the default sweep runs 1)")
    parser.add_argument("--no-three-augment", action="store_true", help="supervised: crop + flip only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = scenes_split("train", args.train_size, args.img_size, 4, 0).materialize()
    if args.framework == "supervised":
        options = dict(three_augment=not args.no_three_augment, relabel_from_segmentation=True)
        paths = {"per_sample": TrainDataset(base, SupervisedTransform(args.img_size, **options), seed=0),
                 "batch": BatchTrainDataset(base, BatchSupervisedTransform(args.img_size, **options), seed=0)}
        setting = f"three_augment={not args.no_three_augment}"
    else:
        local_size = resolve_local_crop_size(TrialConfig(model={"img_size": args.img_size}))
        crops = (args.img_size, local_size, args.local_crops)
        paths = {"per_sample": TrainDataset(base, MultiCropTransform(*crops), seed=0, collate=collate_multicrop),
                 "batch": BatchTrainDataset(base, BatchMultiCropTransform(*crops), seed=0)}
        setting = f"local_crops={args.local_crops}x{local_size}px"
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(0)).tolist()
    n_batches = args.batches * (args.repeats + 1)
    if n_batches * args.batch_size > len(base):
        order = order * (n_batches * args.batch_size // len(base) + 1)
    batches = [[(0, i) for i in order[b * args.batch_size:(b + 1) * args.batch_size]] for b in range(n_batches)]

    for dataset in paths.values():  # warm-up: allocator, resize-matrix cache
        seconds_per_batch(dataset, batches[:args.batches])
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.repeats):
        chunk = batches[(r + 1) * args.batches:(r + 2) * args.batches]
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            seconds[name].append(seconds_per_batch(paths[name], chunk))

    ratios = [p / b for p, b in zip(seconds["per_sample"], seconds["batch"])]
    per_sample_ms, batch_ms = (1000 * statistics.median(seconds[n]) for n in ("per_sample", "batch"))
    print(f"{args.framework} img={args.img_size} batch={args.batch_size} {setting} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}x{args.batches} batches")
    print(f"{'path':<12} {'ms/batch (median)':>18} {'min':>8} {'max':>8}")
    for name in paths:
        ms = [1000 * s for s in seconds[name]]
        print(f"{name:<12} {statistics.median(ms):>18.2f} {min(ms):>8.2f} {max(ms):>8.2f}")
    print(f"speed-up per-sample / batch: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(json.dumps({
        "framework": args.framework, "img_size": args.img_size, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "setting": setting,
        "per_sample_ms_per_batch": per_sample_ms, "batch_ms_per_batch": batch_ms,
        "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
    }))


if __name__ == "__main__":
    main()
