"""Triton kernels for the two-branch LayerNorm, LayerScale and Linear on CUDA (`token_type_ops.py`
registers them).

Norm and scale: one kernel family, a row-wise affine whose weights are chosen per row by token type
(row % tokens < num_prefix picks the prefix weights), with NORMALIZE for the LayerNorm. Forward:
one launch, a program per row. Backward: one launch that writes the input gradient and per-program
partial sums of the four weight gradients, then one reduction over programs.

Linear: a grouped GEMM. The rows of a group (patch rows, then prefix rows) are addressed in place,
row = (i // count) * tokens + first + i % count, so neither the sequence nor its gradient is split,
copied or concatenated, and every row is multiplied once, by its own branch's weight: forward one
launch (bias included), backward one launch for the input gradient and one for both branches'
weight and bias gradients.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1, tests/test_token_type_triton.py).
"""

from __future__ import annotations

import os

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


# --- the two-branch linear: a grouped GEMM over the patch rows and the prefix rows ----------------

# Triton's interpreter multiplies bf16 tiles wrongly (3.8: garbage from tl.dot on bf16): there the
# tiles are upcast to fp32 first, which gives the same products the GPU's bf16 dot accumulates in fp32.
_UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


def _tile_configs(names: tuple[str, str, str], gpu: list[tuple[int, ...]], interpreted: tuple[int, int, int]):
    """Autotuned tile sizes (blocks, stages, warps; the GPU's from Triton's matmul tutorial), one
    fixed config in the interpreter (a single config is never benchmarked)."""
    if _UPCAST:
        return [triton.Config(dict(zip(names, interpreted)))]
    return [triton.Config(dict(zip(names, c[:3])), num_stages=c[3], num_warps=c[4]) for c in gpu]


_MATMUL_CONFIGS = _tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [(128, 256, 64, 3, 8), (128, 128, 32, 4, 4),
                                (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)], (64, 64, 32))
_WEIGHT_GRAD_CONFIGS = _tile_configs(("BLOCK_N", "BLOCK_K", "BLOCK_R"), [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4),
                                     (128, 64, 32, 4, 4), (64, 64, 64, 3, 4)], (64, 32, 64))


@triton.jit
def _group_rows(i, tokens, first, count):
    """Rows of the (batch * tokens)-row matrix that a group's i-th rows are: token `first + i % count`
    of sequence `i // count`."""
    return ((i // count) * tokens + first + i % count).to(tl.int64)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        product = tl.dot(a, b, input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.autotune(configs=_MATMUL_CONFIGS, key=["batch", "tokens", "k_dim", "n_dim"])
@triton.jit
def _grouped_matmul(A, W, PW, Bias, PBias, Y, tokens, num_prefix, batch, k_dim, n_dim, stride_wn, stride_wk,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[r] = A[r] @ W_r^T (+ bias_r), W_r the prefix weight where r % tokens < num_prefix.
    The first row tiles along axis 0 take patch rows, the others prefix rows."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    patch_tiles = tl.cdiv(batch * (tokens - num_prefix), BLOCK_M)
    if pid_m < patch_tiles:
        first, count, tile, w, bias = num_prefix, tokens - num_prefix, pid_m, W, Bias
    else:
        first, count, tile, w, bias = 0, num_prefix, pid_m - patch_tiles, PW, PBias
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < batch * count
    rows = _group_rows(i, tokens, first, count)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_dim
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(A + rows[:, None] * k_dim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += _dot(a, b, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * n_dim + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["batch", "tokens", "n_dim", "k_dim"])
@triton.jit
def _grouped_weight_grad(G, X, GW, GPW, GB, GPB, tokens, num_prefix, batch, n_dim, k_dim,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """GW[n, k] = sum over the group's rows of G[r, n] * X[r, k] (and GB[n] = sum G[r, n]); axis 2
    picks the group: 0 the patch rows into GW / GB, 1 the prefix rows into GPW / GPB."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        first, count, gw, gb = num_prefix, tokens - num_prefix, GW, GB
    else:
        first, count, gw, gb = 0, num_prefix, GPW, GPB
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = ns < n_dim, ks < k_dim
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, batch * count, BLOCK_R):
        i = r0 + tl.arange(0, BLOCK_R)
        ok = i < batch * count
        rows = _group_rows(i, tokens, first, count)
        g = tl.load(G + rows[None, :] * n_dim + ns[:, None], mask=n_ok[:, None] & ok[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * k_dim + ks[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        acc += _dot(g, x, IEEE, UPCAST)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=1)
    tl.store(gw + ns[:, None] * k_dim + ks[None, :], acc.to(gw.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        tl.store(gb + ns, bias_acc.to(gb.dtype.element_ty), mask=n_ok & (pid_k == 0))


def _ieee(x: Tensor) -> bool:
    """fp32 inputs multiply in full fp32 unless torch's own fp32 GEMMs may use TF32."""
    return x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _matmul(a: Tensor, weight: Tensor, prefix_weight: Tensor, bias, prefix_bias, n_dim: int,
            stride_wn: int, stride_wk: int, num_prefix: int) -> Tensor:
    """(..., tokens, k) @ each row's branch weight, given as (n, k) through its strides."""
    a = a.contiguous()
    tokens, k_dim = a.shape[-2], a.shape[-1]
    batch = a.numel() // max(tokens * k_dim, 1)
    out = torch.empty((*a.shape[:-1], n_dim), dtype=a.dtype, device=a.device)
    has_bias = bias is not None

    def grid(meta: dict) -> tuple[int, int]:
        m = meta["BLOCK_M"]
        return triton.cdiv(batch * (tokens - num_prefix), m) + triton.cdiv(batch * num_prefix, m), \
            triton.cdiv(n_dim, meta["BLOCK_N"])

    _grouped_matmul[grid](a, weight, prefix_weight, bias if has_bias else weight, prefix_bias if has_bias else weight,
                          out, tokens, num_prefix, batch, k_dim, n_dim, stride_wn, stride_wk,
                          HAS_BIAS=has_bias, IEEE=_ieee(a), UPCAST=_UPCAST)
    return out


def linear(x, weight, bias, prefix_weight, prefix_bias, num_prefix):
    if (bias is None) != (prefix_bias is None):
        raise ValueError("the two branches of a linear layer both have a bias or neither has")
    weight, prefix_weight = weight.contiguous(), prefix_weight.contiguous()  # one stride for both
    n_dim, k_dim = weight.shape
    return _matmul(x, weight, prefix_weight, bias, prefix_bias, n_dim, k_dim, 1, num_prefix)


def linear_backward(grad, x, weight, prefix_weight, num_prefix, has_bias):
    weight, prefix_weight = weight.contiguous(), prefix_weight.contiguous()  # one stride for both
    n_dim, k_dim = weight.shape
    # The input gradient: grad @ W_r, the same grouped GEMM with W read transposed (no bias).
    grad = grad.contiguous()
    grad_x = _matmul(grad, weight, prefix_weight, None, None, k_dim, 1, k_dim, num_prefix)
    x = x.contiguous()
    tokens = x.shape[-2]
    batch = x.numel() // max(tokens * k_dim, 1)
    grad_w, grad_pw = (torch.empty((n_dim, k_dim), dtype=grad.dtype, device=grad.device) for _ in range(2))
    grad_b, grad_pb = (torch.zeros(n_dim, dtype=grad.dtype, device=grad.device) for _ in range(2))

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(n_dim, meta["BLOCK_N"]), triton.cdiv(k_dim, meta["BLOCK_K"]), 2

    _grouped_weight_grad[grid](grad, x, grad_w, grad_pw, grad_b, grad_pb, tokens, num_prefix, batch, n_dim, k_dim,
                               HAS_BIAS=has_bias, IEEE=_ieee(grad), UPCAST=_UPCAST)
    return grad_x, grad_w, grad_b, grad_pw, grad_pb
