"""What one training step dispatches, vanilla timm ViT vs each named specialization (CPU, runs anywhere).

A CPU proxy for a GPU's kernel launches (issue 12). Eager: aten ops that launch a kernel (views,
detach and allocations left out) in one step of forward + cross-entropy + backward + fused AdamW,
counted with a TorchDispatchMode; a fused two-branch op counts once, and the `inside` column
counts the aten ops of its CPU composition instead (what a device without its kernel runs).
Compiled: torch.compile of forward + backward, the kernels inductor generates
(`torch._inductor.metrics.generated_kernel_count`, on CPU one per loop nest), the kernel calls in
the generated code (fused kernels, extern GEMM calls and fallback ops: attention, the two-branch
linear, one kernel each on CUDA), and dynamo's graph breaks.
With --device cuda it also counts what the proxy stands for: the CUDA kernels one eager bf16
training step launches (torch.profiler). The last line printed is one JSON object.

    python benchmarks/dispatch_count.py                      # ViT-S, eager and compiled (~10 min cold on 2 cores)
    python benchmarks/dispatch_count.py --compile-scale none # eager only, seconds
    python benchmarks/dispatch_count.py --device cuda --batch-size 64 --compile-scale none
"""

from __future__ import annotations

import argparse
import json
import re
import warnings

import timm
import torch
import torch._dynamo
import torch._inductor.metrics
from torch._inductor.utils import run_and_get_code

import trainer.models as tm

NAMED = ["none", "norms", "qkv_first_third", "paper", "all"]


def build(scale: str, specialization: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(tm.SCALES[scale], init_values=1e-5, num_classes=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scales without LayerScale: ls1/ls2 absent
        if specialization is None:
            return timm.create_model(tm.vanilla_counterpart(scale)[0], **kwargs)
        return timm.create_model(tm.MODEL_NAMES[scale], specialization=specialization, **kwargs)


def cuda_launches(model: torch.nn.Module, img_size: int, batch_size: int) -> int:
    """CUDA kernels (and memcpy/memset) of one eager training step under bf16 autocast, as the trainer runs."""
    x = torch.randn(batch_size, 3, img_size, img_size, device="cuda")
    y = torch.randint(0, 1000, (batch_size,), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state, Triton compilation
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def compiled_counts(model: torch.nn.Module, img_size: int, batch_size: int) -> dict[str, int]:
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch_size,))
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    compiled = torch.compile(model)
    _, codes = run_and_get_code(lambda: torch.nn.functional.cross_entropy(compiled(x), y).backward())
    calls = sum(len(re.findall(r"^\s+(?:buf\d+ = )?(?:cpp_fused_\w+\(|triton_\w+\.run\(|extern_kernels\.\w+\("
                               r"|torch\.ops\.\w+\.\w+\.default\()", code, re.M))
                for code in codes)
    return {"inductor_kernels": torch._inductor.metrics.generated_kernel_count, "kernel_calls": calls,
            "graph_breaks": breaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="small", choices=list(tm.SCALES), help="scale of the eager count")
    parser.add_argument("--compile-scale", default="small", choices=[*tm.SCALES, "none"],
                        help="scale of the compiled count (none: skip compiling)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the eager step runs; cuda adds the profiled kernel launches")
    parser.add_argument("--specializations", default=",".join(NAMED[1:]),
                        help="comma-separated presets or rule strings, compared with vanilla timm")
    args = parser.parse_args()
    names = ["vanilla"] + [s.strip() for s in args.specializations.split(",") if s.strip()]

    rows: dict[str, dict[str, float]] = {}
    for name in names:
        spec = None if name == "vanilla" else name
        model = build(args.scale, spec).to(args.device)
        img = tm.SCALES[args.scale]["img_size"]
        row = {"eager_ops": sum(tm.count_kernel_ops(model, img, args.batch_size).values()),
               "eager_ops_inside": sum(tm.count_kernel_ops(model, img, args.batch_size, inside_fused=True).values())}
        if args.device == "cuda":
            row["cuda_launches"] = cuda_launches(model, img, args.batch_size)
        if args.compile_scale != "none":
            compiled = build(args.compile_scale, spec)
            row.update(compiled_counts(compiled, tm.SCALES[args.compile_scale]["img_size"], args.batch_size))
        rows[name] = row
        print(f"counted {name}: {row}", flush=True)

    base = rows["vanilla"]
    for row in rows.values():
        row.update({f"{k}_ratio": row[k] / base[k] for k in ("eager_ops", "eager_ops_inside", "cuda_launches",
                                                            "inductor_kernels", "kernel_calls") if k in row})
    print(f"eager: scale={args.scale} batch={args.batch_size} device={args.device} (one step: forward, backward, fused AdamW); "
          f"compiled: scale={args.compile_scale} (forward + backward)")
    header = (f"{'specialization':<24} {'eager ops':>9} {'ratio':>6} {'inside':>7} {'ratio':>6} "
              f"{'cuda launches':>13} {'ratio':>6} {'inductor kernels':>16} {'ratio':>6} {'kernel calls':>12} {'ratio':>6} "
              f"{'breaks':>6}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        line = (f"{name:<24} {r['eager_ops']:>9} {r['eager_ops_ratio']:>6.3f} {r['eager_ops_inside']:>7} "
                f"{r['eager_ops_inside_ratio']:>6.3f}")
        line += f" {r['cuda_launches']:>13} {r['cuda_launches_ratio']:>6.3f}" if "cuda_launches" in r else f" {'-':>13} {'':>6}"
        if "inductor_kernels" in r:
            line += (f" {r['inductor_kernels']:>16} {r['inductor_kernels_ratio']:>6.3f} {r['kernel_calls']:>12} "
                     f"{r['kernel_calls_ratio']:>6.3f} {r['graph_breaks']:>6}")
        print(line)
    print(json.dumps({"scale": args.scale, "compile_scale": args.compile_scale, "batch_size": args.batch_size,
                      "device": args.device,
                      "targets": {"paper_eager_ops_ratio": 1.15, "all_eager_ops_ratio": 1.40,
                                  "inductor_kernels_ratio": 1.05, "graph_breaks": 0},
                      "rows": rows}))


if __name__ == "__main__":
    main()
