"""Training-step throughput of vanilla timm ViT vs each named specialization, in one process.

Models are timed interleaved (every repeat times each model once, in rotating order), and each
repeat's ratio is specialized / vanilla from that same repeat, so machine noise hits both sides.
The last line printed is one JSON object (the headline specialization, `paper` by default).

    python benchmarks/model_overhead.py --scale small --batch-size 8
    python benchmarks/model_overhead.py --scale small --batch-size 64 --compile   # on a GPU, as the trainer runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import timm
import torch

import trainer.models as tm
from trainer.models import PRESETS, count_flops, parameter_report


def build(scale: str, specialization: str | None) -> torch.nn.Module:
    kwargs = dict(tm.SCALES[scale], init_values=1e-5, num_classes=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if specialization is None:
            name, _ = tm.vanilla_counterpart(scale)
            return timm.create_model(name, **kwargs)
        return timm.create_model(tm.MODEL_NAMES[scale], specialization=specialization, **kwargs)


def time_steps(model, optimizer, images, labels, steps: int, device: torch.device) -> float:
    """Seconds per training step (forward + backward + optimizer step)."""
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="small", choices=list(tm.SCALES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--specializations", default="paper,norms,qkv_first_third,all",
                        help=f"comma-separated presets or rule strings (presets: {', '.join(PRESETS)})")
    parser.add_argument("--headline", default="paper", help="the specialization reported in the final JSON line")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per repeat")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps per model first (allocator, kernels; with --compile: compilation)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (the trainer's GPU default)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode; reduce-overhead replays CUDA graphs (fewer kernel launches)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True): one optimizer kernel (CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    specs = [s.strip() for s in args.specializations.split(",") if s.strip()]
    if args.headline not in specs:
        specs.insert(0, args.headline)

    torch.manual_seed(0)
    device = torch.device(args.device)
    img_size = tm.SCALES[args.scale]["img_size"]
    images = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    names = ["vanilla"] + specs
    models = {"vanilla": build(args.scale, None)}
    models.update({s: build(args.scale, s) for s in specs})
    flops = {n: count_flops(m, img_size) for n, m in models.items()}
    params = {n: parameter_report(m).total for n, m in models.items()}
    runs = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if args.fused_adamw else {}))
        step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
        time_steps(step_model, optimizer, images, labels, max(1, args.warmup), device)  # allocator, kernels, compile
        runs[name] = (step_model, optimizer)

    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds[name].append(time_steps(*runs[name], images, labels, args.steps, device))

    results = []
    header = f"{'specialization':<40} {'params (M)':>10} {'+params':>8} {'FLOPs ratio':>11} {'img/s':>8} {'throughput ratio':>16}"
    print(f"scale={args.scale} img={img_size} batch={args.batch_size} device={device} "
          f"bf16={device.type == 'cuda'} compile={args.compile}/{args.compile_mode} fused_adamw={args.fused_adamw} "
          f"threads={torch.get_num_threads()} "
          f"repeats={args.repeats}x{args.steps} steps")
    print(header)
    print("-" * len(header))
    for name in names:
        ratios = [v / s for v, s in zip(seconds["vanilla"], seconds[name])]
        row = {
            "scale": args.scale,
            "specialization": "none" if name == "vanilla" else tm.Specialization.parse(name).canonical(),
            "params_vanilla": params["vanilla"],
            "params_specialized": params[name],
            "param_overhead": params[name] / params["vanilla"] - 1,
            "flops_ratio": flops[name] / flops["vanilla"],
            "throughput_img_s": args.batch_size / statistics.median(seconds[name]),
            "throughput_ratio": statistics.median(ratios),
            "throughput_ratio_min": min(ratios),
            "throughput_ratio_max": max(ratios),
        }
        results.append((name, row))
        print(f"{name:<40} {params[name] / 1e6:>10.2f} {row['param_overhead']:>+8.2%} {row['flops_ratio']:>11.4f} "
              f"{row['throughput_img_s']:>8.1f} {row['throughput_ratio']:>10.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    headline = dict(next(row for name, row in results if name == args.headline))
    headline.update(batch_size=args.batch_size, device=str(device), repeats=args.repeats, steps=args.steps,
                    bf16=device.type == "cuda", compile=args.compile, compile_mode=args.compile_mode,
                    fused_adamw=args.fused_adamw,
                    all={name: {"throughput_ratio": row["throughput_ratio"], "flops_ratio": row["flops_ratio"],
                                "param_overhead": row["param_overhead"], "throughput_img_s": row["throughput_img_s"]}
                         for name, row in results})
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
