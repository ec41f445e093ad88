"""Throughput of `python -m trainer` vs a minimal hand-written timm training loop, in one run.

Both train the same model on the same data (scenes + 3-Augment through a plain DataLoader in the
hand-written loop) with the same batch size, optimizer and loss, so the ratio is the trainer's own
overhead: scheduling, resumable sampling, logging, checkpoints. A third column runs the loop on
one fixed random batch (no data pipeline) to show what augmentation itself costs. The runs are
interleaved over repeats; each repeat's ratio is trainer / hand-written. Last line: one JSON object.

    python benchmarks/trainer_overhead.py --scale micro --batch-size 64 --steps 60
    python benchmarks/trainer_overhead.py --device cuda --compile on   # GPU: bf16 autocast, as the trainer
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import yaml

import trainer.models as tm

ROOT = Path(__file__).resolve().parents[1]


def trial_config(scale: str, specialization: str, batch_size: int, steps: int, threads: int,
                 device: str = "cpu", compile_: bool = False) -> dict:
    return {
        "model": {"scale": scale, "specialization": specialization},
        "data": {"scenes": {"train_size": max(1024, batch_size * 8), "num_classes": 4}},
        "schedule": {"steps": steps, "batch_size": batch_size, "warmup_steps": 1, "checkpoint_every": max(1, steps // 2),
                     "log_every": max(1, steps // 4)},
        "evaluation": {"linear": False, "knn": False, "segmentation": False, "depth": False, "token_interaction": False},
        "tracking": {"enabled": False},
        "runtime": {"threads": threads, "device": device, "compile": "on" if compile_ else "off"},
    }


def hand_written_loop(scale: str, specialization: str, batch_size: int, steps: int, threads: int,
                      device: str = "cpu", compile_: bool = False, with_data: bool = True) -> float:
    """img/s of the simplest correct training loop (steps after the first 2): a DataLoader over the
    trainer's own training set, or (with_data=False) one fixed random batch. On CUDA: bf16
    autocast, and each timed step ends with a synchronize (the trainer reads its loss every step)."""
    from trainer.config import parse_config
    from trainer.data import build_train_dataset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    args = tm.SCALES[scale]
    dev = torch.device(device)
    model = timm.create_model(tm.MODEL_NAMES[scale], specialization=specialization, init_values=1e-4, num_classes=4)
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    step_model = torch.compile(model) if compile_ else model
    fixed = (torch.randn(batch_size, 3, args["img_size"], args["img_size"], device=dev),
             torch.randint(0, 4, (batch_size,), device=dev))
    if with_data:
        dataset = build_train_dataset(parse_config(trial_config(scale, specialization, batch_size, steps, threads)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                             collate_fn=dataset.collate)
        batches = (batch for _ in range(steps) for batch in loader)  # epoch after epoch
    model.train()
    elapsed = 0.0
    for step in range(steps):
        start = time.perf_counter()
        images, labels = next(batches) if with_data else fixed
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        targets = torch.nn.functional.one_hot(labels, 4).float()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = step_model(images)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= 2:
            elapsed += time.perf_counter() - start
    return batch_size * (steps - 2) / elapsed


def trainer_run(scale: str, specialization: str, batch_size: int, steps: int, threads: int,
                device: str = "cpu", compile_: bool = False) -> float:
    config = trial_config(scale, specialization, batch_size, steps, threads, device, compile_)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trial.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--out", str(Path(tmp) / "out")],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return json.loads((Path(tmp) / "out" / "result.json").read_text())["throughput_img_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="micro", choices=list(tm.SCALES))
    parser.add_argument("--specialization", default="paper")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="both loops run here (the trainer with runtime.device set to it)")
    parser.add_argument("--compile", default="off", choices=["on", "off"], help="torch.compile in both loops")
    args = parser.parse_args()

    run = (args.scale, args.specialization, args.batch_size, args.steps, args.threads, args.device,
           args.compile == "on")
    hand, ours, no_data = [], [], []
    for _ in range(args.repeats):
        hand.append(hand_written_loop(*run))
        ours.append(trainer_run(*run))
        no_data.append(hand_written_loop(*run, with_data=False))
    ratios = [o / h for o, h in zip(ours, hand)]
    print(f"scale={args.scale} specialization={args.specialization} batch={args.batch_size} steps={args.steps} "
          f"threads={args.threads} device={args.device} compile={args.compile}")
    print(f"{'repeat':>6} {'hand-written img/s':>19} {'python -m trainer img/s':>24} {'ratio':>7} "
          f"{'no data pipeline img/s':>23}")
    for i, (h, o, r, n) in enumerate(zip(hand, ours, ratios, no_data)):
        print(f"{i:>6} {h:>19.1f} {o:>24.1f} {r:>7.3f} {n:>23.1f}")
    print(json.dumps({"scale": args.scale, "specialization": args.specialization, "batch_size": args.batch_size,
                      "device": args.device, "compile": args.compile,
                      "hand_written_img_s": statistics.median(hand), "trainer_img_s": statistics.median(ours),
                      "no_data_pipeline_img_s": statistics.median(no_data),
                      "throughput_ratio": statistics.median(ratios), "target": 0.95}))


if __name__ == "__main__":
    main()
