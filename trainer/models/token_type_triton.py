"""Triton kernels for the two-branch LayerNorm and LayerScale on CUDA (`token_type_ops.py` registers them).

One kernel family covers both: a row-wise affine whose weights are chosen per row by token type
(row % tokens < num_prefix picks the prefix weights), with NORMALIZE for the LayerNorm. Forward:
one launch, a program per row. Backward: one launch that writes the input gradient and per-program
partial sums of the four weight gradients, then one reduction over programs.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1, tests/test_token_type_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BACKWARD_PROGRAMS = 512  # enough to fill an H100; partial sums stay small (4 x 512 x dim floats)


@triton.jit
def _affine_forward(X, Y, W, B, PW, PB, Mean, Rstd, tokens, num_prefix, dim, eps,
                    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        mean = tl.sum(x, axis=0) / dim
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / dim + eps)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
        x = centered * rstd
    is_prefix = (row % tokens) < num_prefix
    w = tl.where(is_prefix, tl.load(PW + cols, mask=mask, other=0.0), tl.load(W + cols, mask=mask, other=0.0))
    y = x * w.to(tl.float32)
    if HAS_BIAS:
        b = tl.where(is_prefix, tl.load(PB + cols, mask=mask, other=0.0), tl.load(B + cols, mask=mask, other=0.0))
        y += b.to(tl.float32)
    tl.store(Y + row * dim + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _affine_backward(DY, X, W, PW, Mean, Rstd, DX, Partial, rows, tokens, num_prefix, dim, rows_per_program,
                     NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    pw = tl.load(PW + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    dpw = tl.zeros([BLOCK], dtype=tl.float32)
    dpb = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = (pid * rows_per_program + i).to(tl.int64)
        valid = row < rows
        m = mask & valid
        x = tl.load(X + row * dim + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dim + cols, mask=m, other=0.0).to(tl.float32)
        if NORMALIZE:
            mean = tl.load(Mean + row, mask=valid, other=0.0)
            rstd = tl.load(Rstd + row, mask=valid, other=0.0)
            x = tl.where(m, (x - mean) * rstd, 0.0)
        prefix = ((row % tokens) < num_prefix).to(tl.float32)
        wdy = (prefix * pw + (1.0 - prefix) * w) * dy
        if NORMALIZE:
            c1 = tl.sum(x * wdy, axis=0) / dim
            c2 = tl.sum(wdy, axis=0) / dim
            dx = (wdy - (x * c1 + c2)) * rstd
        else:
            dx = wdy
        tl.store(DX + row * dim + cols, dx.to(DX.dtype.element_ty), mask=m)
        dyx = dy * x
        dw += (1.0 - prefix) * dyx
        db += (1.0 - prefix) * dy
        dpw += prefix * dyx
        dpb += prefix * dy
    out = Partial + pid * dim + cols
    stride = tl.num_programs(0) * dim
    tl.store(out, dw, mask=mask)
    tl.store(out + stride, db, mask=mask)
    tl.store(out + 2 * stride, dpw, mask=mask)
    tl.store(out + 3 * stride, dpb, mask=mask)


def _block_and_warps(dim: int) -> tuple[int, int]:
    block = triton.next_power_of_2(dim)
    return block, min(max(block // 256, 1), 8)


def _forward(x: Tensor, out_dtype: torch.dtype, weight, bias, prefix_weight, prefix_bias, num_prefix: int,
             eps: float, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()
    dim, tokens = x.shape[-1], x.shape[-2]
    rows = x.numel() // dim
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    # The scale (normalize=False) has no statistics: `out` stands in for the unused pointers.
    mean = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if normalize else out
    rstd = torch.empty_like(mean) if normalize else out
    has_bias = bias is not None and prefix_bias is not None
    block, warps = _block_and_warps(dim)
    _affine_forward[(rows,)](x, out, weight, bias if has_bias else weight, prefix_weight,
                             prefix_bias if has_bias else prefix_weight, mean, rstd, tokens, num_prefix, dim, eps,
                             NORMALIZE=normalize, HAS_BIAS=has_bias, BLOCK=block, num_warps=warps)
    return out, mean, rstd


def _backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, prefix_weight: Tensor,
              num_prefix: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, sums) where sums[0..3] are the grads of weight, bias, prefix weight, prefix bias."""
    grad, x = grad.contiguous(), x.contiguous()
    dim, tokens = x.shape[-1], x.shape[-2]
    rows = x.numel() // dim
    programs = min(rows, _BACKWARD_PROGRAMS)
    grad_x = torch.empty_like(x)
    partial = torch.empty((4, programs, dim), dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(dim)
    _affine_backward[(programs,)](grad, x, weight, prefix_weight, mean, rstd, grad_x, partial, rows, tokens,
                                  num_prefix, dim, triton.cdiv(rows, programs),
                                  NORMALIZE=normalize, BLOCK=block, num_warps=warps)
    return grad_x, partial.sum(1)


def layer_norm(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps):
    return _forward(x, x.dtype, weight, bias, prefix_weight, prefix_bias, num_prefix, eps, normalize=True)


def layer_norm_backward(grad, x, mean, rstd, weight, prefix_weight, num_prefix, has_bias):
    grad_x, sums = _backward(grad, x, mean, rstd, weight, prefix_weight, num_prefix, normalize=True)
    sums = sums.to(weight.dtype)
    if not has_bias:  # as the aten composition: zeros where there is no bias
        sums[1::2] = 0
    return grad_x, sums[0], sums[1], sums[2], sums[3]


def scale(x, gamma, prefix_gamma, num_prefix):
    out_dtype = torch.promote_types(x.dtype, gamma.dtype)
    return _forward(x, out_dtype, gamma, None, prefix_gamma, None, num_prefix, 0.0, normalize=False)[0]


def scale_backward(grad, x, gamma, prefix_gamma, num_prefix):
    grad_x, sums = _backward(grad, x, x, x, gamma, prefix_gamma, num_prefix, normalize=False)  # x: unused mean/rstd
    sums = sums.to(gamma.dtype)
    return grad_x, sums[0], sums[2]
