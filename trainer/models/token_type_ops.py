"""The two-branch LayerNorm, LayerScale and Linear as fused ops: the first `num_prefix` tokens of
each sequence use the prefix weights, the others the patch weights, in ONE dispatched op forward
and one backward (`torch.ops.specialized_vit.*`), as the shared layer costs.

Three ways the same function runs:
- eager: an `autograd.Function` around the ops. Their implementation below is a composition of aten
  ops (every device; meta tensors get shapes from it); on CUDA they run Triton kernels
  (`token_type_triton.py`): norm and scale one launch forward and one plus a small reduction
  backward, the linear a grouped GEMM, one launch forward and two backward.
- `torch.compile`: norm and scale as `*_graph` formulations in plain differentiable ops, which
  inductor fuses into their neighbours' kernels; the linear stays the op (dynamo traces the
  Function), called as one extern kernel. Traced as two GEMMs and a `cat`, its row split cost
  inductor a copy kernel per GEMM and direction: `all` generated 1.49x vanilla's kernels.
- `torch.fx` and TorchScript: the `*_graph` formulations, which they can represent.
(`autograd.Function` + `torch.library.Library` rather than `torch.library.custom_op`: measured on
CPU, custom_op's Python autograd and dispatch cost ~4x the Function route per call.)
"""

from __future__ import annotations

from math import prod
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

_lib = torch.library.Library("specialized_vit", "DEF")
_lib.define("layer_norm(Tensor x, Tensor weight, Tensor? bias, Tensor prefix_weight, Tensor? prefix_bias, "
            "int num_prefix, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define("layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor weight, "
            "Tensor prefix_weight, int num_prefix, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("scale(Tensor x, Tensor gamma, Tensor prefix_gamma, int num_prefix) -> Tensor")
_lib.define("scale_backward(Tensor grad, Tensor x, Tensor gamma, Tensor prefix_gamma, int num_prefix) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("linear(Tensor x, Tensor weight, Tensor? bias, Tensor prefix_weight, Tensor? prefix_bias, "
            "int num_prefix) -> Tensor")
_lib.define("linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor prefix_weight, int num_prefix, "
            "bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
ops = torch.ops.specialized_vit


# --- the traced formulations: plain differentiable ops, no in-place writes ---------------------


def _is_prefix(x: Tensor, num_prefix: int) -> Tensor:
    """(tokens, 1) bool: which rows of a (..., tokens, dim) sequence use the prefix weights."""
    return (torch.arange(x.shape[-2], device=x.device) < num_prefix).unsqueeze(-1)


def layer_norm_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor], prefix_weight: Tensor,
                     prefix_bias: Optional[Tensor], num_prefix: int, eps: float) -> Tensor:
    """One normalization without affine, then each row takes its branch's affine (inductor fuses
    it all into the normalization's kernel; selecting outputs generated fewer kernels than
    selecting per-token weight tables)."""
    is_prefix = _is_prefix(x, num_prefix)
    normed = F.layer_norm(x, [x.shape[-1]], None, None, eps)
    if bias is None or prefix_bias is None:
        return torch.where(is_prefix, normed * prefix_weight, normed * weight)
    return torch.where(is_prefix, torch.addcmul(prefix_bias, normed, prefix_weight), torch.addcmul(bias, normed, weight))


def scale_graph(x: Tensor, gamma: Tensor, prefix_gamma: Tensor, num_prefix: int) -> Tensor:
    return x * torch.where(_is_prefix(x, num_prefix), prefix_gamma, gamma)


def linear_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor], prefix_weight: Tensor,
                 prefix_bias: Optional[Tensor], num_prefix: int) -> Tensor:
    prefix, patch = x.narrow(-2, 0, num_prefix), x.narrow(-2, num_prefix, x.shape[-2] - num_prefix)
    return torch.cat((F.linear(prefix, prefix_weight, prefix_bias), F.linear(patch, weight, bias)), dim=-2)


# --- the ops' implementations: aten compositions (CPU, CUDA linear, meta) ------------------------
# In-place prefix-row writes are fine here: autograd and tracers see only the op. `narrow`, not
# `t[..., :p, :]`: Python indexing costs several times a narrow on the host, per call.


def _prefix(t: Tensor, num_prefix: int) -> Tensor:
    return t.narrow(-2, 0, num_prefix)


def _patch(t: Tensor, num_prefix: int) -> Tensor:
    return t.narrow(-2, num_prefix, t.shape[-2] - num_prefix)


def _rows_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the last (the feature dimension)."""
    return t.sum(list(range(t.dim() - 1)))


def _layer_norm(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps):
    d = x.shape[-1]
    out, mean, rstd = torch.native_layer_norm(x, [d], weight, bias, eps)
    _prefix(out, num_prefix).copy_(torch.native_layer_norm(_prefix(x, num_prefix), [d], prefix_weight, prefix_bias, eps)[0])
    return out, mean, rstd


def _layer_norm_backward(grad, x, mean, rstd, weight, prefix_weight, num_prefix, has_bias):
    d, p = x.shape[-1], num_prefix
    mask = [True, True, has_bias]
    # The patch branch over every row, the prefix rows' gradient zeroed (so they add nothing to its
    # weight gradients): as autograd differentiated the overwritten rows before. A clone, because
    # autograd may hand the same gradient tensor to other consumers. The bias argument only tells
    # native_layer_norm_backward that a bias exists: the weight stands in (same shape).
    patch_grad = grad.clone()
    _prefix(patch_grad, p).zero_()
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(patch_grad, x, [d], mean, rstd, weight, weight,
                                                                       mask)
    g, xs, m, r = (_prefix(t, p).contiguous() for t in (grad, x, mean, rstd))  # the kernel reads dense rows
    prefix_grad_x, grad_pw, grad_pb = torch.ops.aten.native_layer_norm_backward(g, xs, [d], m, r, prefix_weight,
                                                                                prefix_weight, mask)
    _prefix(grad_x, p).copy_(prefix_grad_x)
    if not has_bias:
        grad_b = grad_pb = torch.zeros_like(weight)
    return grad_x, grad_w, grad_b, grad_pw, grad_pb


def _scale(x, gamma, prefix_gamma, num_prefix):
    out = x * gamma
    torch.mul(_prefix(x, num_prefix), prefix_gamma, out=_prefix(out, num_prefix))
    return out


def _scale_backward(grad, x, gamma, prefix_gamma, num_prefix):
    p = num_prefix
    grad_x = torch.mul(grad, gamma).to(x.dtype)
    torch.mul(_prefix(grad, p), prefix_gamma, out=_prefix(grad_x, p))
    grad_gamma = _rows_sum(_patch(grad, p) * _patch(x, p)).to(gamma.dtype)
    grad_prefix_gamma = _rows_sum(_prefix(grad, p) * _prefix(x, p)).to(prefix_gamma.dtype)
    return grad_x, grad_gamma, grad_prefix_gamma


def _linear_backward(grad, x, weight, prefix_weight, num_prefix, has_bias):
    p = num_prefix
    g_prefix, g_patch, x_prefix, x_patch = _prefix(grad, p), _patch(grad, p), _prefix(x, p), _patch(x, p)
    grad_x = torch.cat((g_prefix @ prefix_weight, g_patch @ weight), dim=-2)
    grad_w = g_patch.flatten(0, -2).t() @ x_patch.flatten(0, -2)
    grad_pw = g_prefix.flatten(0, -2).t() @ x_prefix.flatten(0, -2)
    if not has_bias:
        zeros = grad.new_zeros(grad.shape[-1])
        return grad_x, grad_w, zeros, grad_pw, zeros
    return grad_x, grad_w, _rows_sum(g_patch), grad_pw, _rows_sum(g_prefix)


# The linear's traced formulation writes nothing in place: it is the composition too.
_COMPOSITIONS = {"layer_norm": _layer_norm, "layer_norm_backward": _layer_norm_backward, "scale": _scale,
                 "scale_backward": _scale_backward, "linear": linear_graph, "linear_backward": _linear_backward}
for _name, _fn in _COMPOSITIONS.items():
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
# Op -> its aten composition, for counting what the op runs inside (accounting.KernelOpCounter).
COMPOSITIONS = {getattr(ops, name).default: fn for name, fn in _COMPOSITIONS.items()}

if torch.cuda.is_available():  # Triton ships with torch's CUDA builds; CPU-only installs may lack it
    from trainer.models import token_type_triton

    _lib.impl("layer_norm", token_type_triton.layer_norm, "CUDA")
    _lib.impl("layer_norm_backward", token_type_triton.layer_norm_backward, "CUDA")
    _lib.impl("scale", token_type_triton.scale, "CUDA")
    _lib.impl("scale_backward", token_type_triton.scale_backward, "CUDA")
    _lib.impl("linear", token_type_triton.linear, "CUDA")
    _lib.impl("linear_backward", token_type_triton.linear_backward, "CUDA")


@register_flop_formula(ops.linear)
def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * prod(x_shape[:-1]) * w_shape[0] * w_shape[1]  # every token through one of the two maps


@register_flop_formula(ops.linear_backward)
def _linear_backward_flops(grad_shape, x_shape, w_shape, *args, **kwargs) -> int:
    return 4 * prod(x_shape[:-1]) * w_shape[0] * w_shape[1]  # grad input + grad weight


# --- eager: autograd around the ops (`.default`: no overload lookup per call) ---------------------


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps):
        out, mean, rstd = ops.layer_norm.default(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps)
        ctx.save_for_backward(x, mean, rstd, weight, prefix_weight)
        ctx.num_prefix, ctx.has_bias = num_prefix, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight, prefix_weight = ctx.saved_tensors
        gx, gw, gb, gpw, gpb = ops.layer_norm_backward.default(grad, x, mean, rstd, weight, prefix_weight,
                                                               ctx.num_prefix, ctx.has_bias)
        return gx, gw, gb if ctx.has_bias else None, gpw, gpb if ctx.has_bias else None, None, None


class _ScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, prefix_gamma, num_prefix):
        ctx.save_for_backward(x, gamma, prefix_gamma)
        ctx.num_prefix = num_prefix
        return ops.scale.default(x, gamma, prefix_gamma, num_prefix)

    @staticmethod
    def backward(ctx, grad):
        x, gamma, prefix_gamma = ctx.saved_tensors
        return *ops.scale_backward.default(grad, x, gamma, prefix_gamma, ctx.num_prefix), None


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prefix_weight, prefix_bias, num_prefix):
        ctx.save_for_backward(x, weight, prefix_weight)
        ctx.num_prefix, ctx.has_bias = num_prefix, bias is not None
        return ops.linear.default(x, weight, bias, prefix_weight, prefix_bias, num_prefix)

    @staticmethod
    def backward(ctx, grad):
        x, weight, prefix_weight = ctx.saved_tensors
        gx, gw, gb, gpw, gpb = ops.linear_backward.default(grad, x, weight, prefix_weight, ctx.num_prefix, ctx.has_bias)
        return gx, gw, gb if ctx.has_bias else None, gpw, gpb if ctx.has_bias else None, None


# --- entry points: the layers call these ---------------------------------------------------------


def _traced(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], prefix_weight: Tensor,
               prefix_bias: Optional[Tensor], num_prefix: int, eps: float) -> Tensor:
    if torch.jit.is_scripting():  # its own `if`: TorchScript then skips compiling the rest
        return layer_norm_graph(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps)
    if _traced(x):
        return layer_norm_graph(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # CUDA autocast runs layer_norm in float32
        x = x.float()
    return _LayerNormFn.apply(x, weight, bias, prefix_weight, prefix_bias, num_prefix, eps)


def scale(x: Tensor, gamma: Tensor, prefix_gamma: Tensor, num_prefix: int) -> Tensor:
    if torch.jit.is_scripting():  # its own `if`: TorchScript then skips compiling the rest
        return scale_graph(x, gamma, prefix_gamma, num_prefix)
    if _traced(x):
        return scale_graph(x, gamma, prefix_gamma, num_prefix)
    return _ScaleFn.apply(x, gamma, prefix_gamma, num_prefix)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], prefix_weight: Tensor,
           prefix_bias: Optional[Tensor], num_prefix: int) -> Tensor:
    if torch.jit.is_scripting():  # its own `if`: TorchScript then skips compiling the rest
        return linear_graph(x, weight, bias, prefix_weight, prefix_bias, num_prefix)
    if isinstance(x, torch.fx.Proxy):  # torch.compile traces the Function below: one extern kernel
        return linear_graph(x, weight, bias, prefix_weight, prefix_bias, num_prefix)
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # As autocast does for F.linear, but outside the Function: autograd then casts the grads back.
        dtype = torch.get_autocast_dtype(device)
        x, weight, prefix_weight = x.to(dtype), weight.to(dtype), prefix_weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        prefix_bias = None if prefix_bias is None else prefix_bias.to(dtype)
    return _LinearFn.apply(x, weight, bias, prefix_weight, prefix_bias, num_prefix)
