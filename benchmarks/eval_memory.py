"""Peak memory of a trial's final evaluation, `quick` vs `dinov2` protocol, as the data grows.

Each measurement runs in its own process: build a micro model and its evaluation data (the built-in
scenes at `--img-size`, generated before measuring), reset the kernel's peak-RSS counter, run
`trainer.evaluation.evaluate`, and report the peak RSS above the resident set before it. `quick`
caches every image's patch tokens (grows with the data); `dinov2` trains its heads over augmented
crops, one batch of features at a time (k-NN keeps one [CLS] vector per image), so its peak should
stay flat. The dinov2 heads use scaled-down iteration counts (the official ones are steps, not data,
and do not change the memory). The last line printed is one JSON object.

    python benchmarks/eval_memory.py                        # 64 px, 256 and 1,024 training images
    python benchmarks/eval_memory.py --sizes 512 2048 --img-size 96
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dinov2_settings(size: int) -> dict:
    """DINOv2's pipelines at `size` px crops, with a CPU-sized number of iterations."""
    return {
        "segmentation": {"crop_size": size, "short_side": size, "stride": size * 2 // 3, "iterations": 8,
                         "batch_size": 8, "warmup_iterations": 2},
        "depth": {"crop_size": [size, size], "iterations": 8, "batch_size": 8, "warmup_iterations": 2,
                  "max_depth": 1.0, "eval_crop": None, "augmentation": {"border_crop": None}},
        "linear": {"epochs": 1, "iterations_per_epoch": 4, "batch_size": 16, "crop_size": size,
                   "resize_size": size, "learning_rates": [1e-3]},
        "knn": {"crop_size": size, "resize_size": size},
    }


def trial_config(protocol: str, train_size: int, img_size: int) -> dict:
    evaluation = {"protocol": protocol, "max_train_samples": None, "max_val_samples": None,
                  "probe_epochs": 2, "token_interaction": False}
    if protocol == "dinov2":
        evaluation["dinov2"] = _dinov2_settings(img_size)
    return {"model": {"scale": "micro", "img_size": img_size},
            "data": {"scenes": {"train_size": train_size, "val_size": 64}},  # the growth studied: training data
            "evaluation": evaluation, "runtime": {"device": "cpu", "threads": 1}}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(protocol: str, train_size: int, img_size: int) -> dict:
    """In this process: the evaluation's peak RSS above the resident set before it (MB)."""
    import torch

    from trainer.config import TrialConfig
    from trainer.data import build_eval_datasets
    from trainer.evaluation import evaluate
    from trainer.loop import backbone_factory

    torch.set_num_threads(1)
    cfg = TrialConfig.model_validate(trial_config(protocol, train_size, img_size))
    data = build_eval_datasets(cfg)
    for pair in (data.classification, data.segmentation, data.depth):  # generate the scenes now
        for part in pair or ():
            for i in range(len(part)):
                part[i]
    backbone = backbone_factory(cfg)()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    before = _rss_mb("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate(backbone, data, cfg.evaluation, "cpu", Path(out))
    return {"protocol": protocol, "train_size": train_size, "img_size": img_size,
            "rss_before_mb": round(before, 1), "peak_mb": round(_rss_mb("VmHWM"), 1),
            "eval_extra_mb": round(_rss_mb("VmHWM") - before, 1), "metrics": len(metrics)}


def measure(protocol: str, train_size: int, img_size: int) -> dict:
    """`measure_here` in a fresh process, so that no earlier measurement's allocations count."""
    done = subprocess.run([sys.executable, __file__, "--one", protocol, str(train_size), str(img_size)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="training images")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--one", nargs=3, metavar=("PROTOCOL", "TRAIN_SIZE", "IMG_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_here(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = [measure(protocol, size, args.img_size) for protocol in ("quick", "dinov2") for size in args.sizes]
    for row in rows:
        print(f"{row['protocol']:>6}  {row['train_size']:>6} images  eval peak +{row['eval_extra_mb']:.0f} MB "
              f"(process peak {row['peak_mb']:.0f} MB)")
    print(json.dumps({"img_size": args.img_size, "rows": rows}))


if __name__ == "__main__":
    main()
