"""The Triton kernels of the two-branch LayerNorm, LayerScale and Linear equal their aten compositions.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the variable must be
set before the kernels are defined) and are compiled for sm_90 ahead of time; on a GPU they run
compiled, in process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trainer.models import token_type_ops, token_type_triton

ops = torch.ops.specialized_vit
# (shape, num_prefix, bias, dtypes): a dim that is not a power of two, several prefix rows, more
# rows than backward programs (each program then loops over rows, the last ones partly past the end).
BOTH = (torch.float32, torch.bfloat16)


def cases() -> list:
    past_programs = token_type_triton._BACKWARD_PROGRAMS + 8  # rows: read when called (see the interpreter test)
    return [((2, 7, 48), 1, True, BOTH), ((2, 7, 64), 3, False, BOTH), ((1, past_programs, 8), 2, True, (torch.float32,)),
            ((3, 50, 24), 2, True, (torch.float32,))]  # 144 patch rows: three row tiles of the linear


def check(device: str) -> None:
    """Compare each kernel with the composition the CPU runs, on `device`, for fp32 and bf16 inputs."""
    composition = {name: token_type_ops.COMPOSITIONS[getattr(ops, name).default]
                   for name in ("layer_norm", "layer_norm_backward", "scale", "scale_backward", "linear",
                                "linear_backward")}
    g = torch.Generator().manual_seed(0)
    for shape, p, bias, dtype in [(*c[:3], d) for c in cases() for d in c[3]]:
        d = shape[-1]
        x, grad = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
        w, b, pw, pb = (torch.randn(d, generator=g).to(device) for _ in range(4))
        b, pb = (b, pb) if bias else (None, None)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        # The reference: the aten composition in float32 (the kernels compute in float32 whatever they load).
        xf, gf = x.float(), grad.float()
        got = token_type_triton.layer_norm(x, w, b, pw, pb, p, 1e-6)
        want = composition["layer_norm"](xf, w, b, pw, pb, p, 1e-6)
        compare(f"layer_norm {shape} {dtype}", got, want, tol)
        compare(f"layer_norm_backward {shape} {dtype}", token_type_triton.layer_norm_backward(grad, x, *got[1:], w, pw, p, bias),
                composition["layer_norm_backward"](gf, xf, *want[1:], w, pw, p, bias), tol)
        compare(f"scale {shape} {dtype}", [token_type_triton.scale(x, w, pw, p)], [composition["scale"](xf, w, pw, p)], tol)
        compare(f"scale_backward {shape} {dtype}", token_type_triton.scale_backward(gf, x, w, pw, p),
                composition["scale_backward"](gf, xf, w, pw, p), tol)
        check_linear(composition, shape, p, bias, dtype, device, g)


def check_linear(composition: dict, shape: tuple, p: int, bias: bool, dtype: torch.dtype, device: str,
                 g: torch.Generator) -> None:
    """The grouped GEMM: out-features that are not a multiple of a tile, rows spanning several tiles."""
    out = 40
    x = torch.randn(shape, generator=g).to(device, dtype)
    grad = torch.randn((*shape[:-1], out), generator=g).to(device, dtype)
    w, pw = (torch.randn(out, shape[-1], generator=g).to(device, dtype) for _ in range(2))
    b, pb = (torch.randn(out, generator=g).to(device, dtype) for _ in range(2)) if bias else (None, None)
    # fp32: sums of up to `rows` products in another order; bf16: one rounding of the output.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    f = (lambda t: None if t is None else t.float())
    compare(f"linear {shape} {dtype}", [token_type_triton.linear(x, w, b, pw, pb, p)],
            [composition["linear"](*map(f, (x, w, b, pw, pb)), p)], tol)
    compare(f"linear_backward {shape} {dtype}", token_type_triton.linear_backward(grad, x, w, pw, p, bias),
            composition["linear_backward"](*map(f, (grad, x, w, pw)), p, bias), tol)


def compare(what: str, got, want, tol: dict) -> None:
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m: f"{what} [{i}]: {m}")


@pytest.mark.slow
def test_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # The interpreter runs each program in Python: with 4 backward programs instead of 512 the
    # rows-past-programs case (each program looping over rows) takes 12 rows, not 520.
    code = "import test_token_type_triton as t; t.token_type_triton._BACKWARD_PROGRAMS = 4; t.check('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernels_on_the_gpu():
    check("cuda")
    # The layers dispatch to the kernels on CUDA: one model step agrees with the CPU composition.
    x = torch.randn(4, 9, 32)
    norm = torch.nn.LayerNorm(32)
    args = (norm.weight.detach(), norm.bias.detach(), norm.weight.detach() * 2, norm.bias.detach() + 1, 2, 1e-6)
    cpu = ops.layer_norm(x, *args)[0]
    gpu = ops.layer_norm(x.cuda(), *(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))[0]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


# The interpreter checks what the kernels compute, not that they compile: this compiles each one,
# in every autotuned tile config, for an H100/H200 (sm_90) without a GPU, as a launch would.
SM90 = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_SM90 = 232_448  # bytes a block may use on sm_90
FP32_POINTERS = {"Mean", "Rstd", "Partial"}  # statistics and partial sums: always fp32


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name[0].isupper():
            return "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        return "fp32" if name == "eps" else "i32"
    return {p.name: kind(p.name) for p in kernel.params}


def _compile_cases():
    """bf16 (the trainer's GPU precision) in every config; fp32 (IEEE products) in the first."""
    tt = token_type_triton
    for normalize in (True, False):
        yield tt._affine_forward, "bf16", dict(NORMALIZE=normalize, HAS_BIAS=True, BLOCK=512), {}
        yield tt._affine_backward, "bf16", dict(NORMALIZE=normalize, BLOCK=512), {}
    for tuned in (tt._grouped_matmul, tt._grouped_weight_grad):
        for dtype, configs in (("bf16", tuned.configs), ("fp32", tuned.configs[:1])):
            for config in configs:
                constexprs = dict(HAS_BIAS=True, IEEE=dtype == "fp32", UPCAST=False, **config.kwargs)
                yield tuned.fn, dtype, constexprs, dict(num_warps=config.num_warps, num_stages=config.num_stages)


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    assert not token_type_triton._UPCAST  # the GPU's tile configs, not the interpreter's one
    compiled = 0
    for kernel, dtype, constexprs, options in _compile_cases():
        source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
        binary = triton.compile(source, target=SM90, options=options)
        assert binary.metadata.shared <= SHARED_MEMORY_SM90, (kernel.__name__, constexprs, binary.metadata.shared)
        compiled += 1
    assert compiled == 4 + len(token_type_triton._MATMUL_CONFIGS) + len(token_type_triton._WEIGHT_GRAD_CONFIGS) + 2
