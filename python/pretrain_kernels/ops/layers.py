"""Decoder-layer ops: pk.rms_norm, pk.swiglu and pk.gelu (fused forward and backward each).

    rms_norm(x, w):  y = x * rsqrt(mean(x^2, -1) + eps) * (offset + w)
    swiglu(g, u):    y = silu(g) * u
    gelu(x):         y = x * Phi(x)  (approximate="none"), or
                     y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (approximate="tanh")

rms_norm keeps its statistics in float32 (float64 for float64 x) for every input dtype and
returns y in x's dtype. Where the cast back to x's dtype happens follows transformers:
LlamaRMSNorm (also Mistral, Qwen2, ...) rounds the normalised value to x's dtype and then
multiplies by the weight (round_before_weight=True), GemmaRMSNorm multiplies in float32 and
rounds once ((1 + w) convention, offset=1.0, round_before_weight=False). For float32 and
float64 inputs both are the same. The forward saves only rstd per row; the backward gives dx and
dw in one pass per row. swiglu rounds silu(gate) to the dtype before the product, as the eager
act_fn(gate) * up of transformers' MLPs does; its backward recomputes silu from the inputs.
gelu is torch's F.gelu (same approximate names, default "none"), computed in float32 (float64
for float64) and rounded once to x's dtype as torch does; the tanh form is evaluated as
x / (1 + exp(-2u)), which keeps its relative accuracy where tanh(u) is near -1 (torch's
1 + tanh(u) loses digits there). Its backward recomputes from x.

Autocast: as torch's own ops. rms_norm follows F.rms_norm (float32 policy on CUDA: x and weight
are cast to float32 and the output is float32; on the CPU, where torch's CPU autocast leaves
rms_norm alone, nothing changes); swiglu and gelu are elementwise, as silu, gelu and mul: inputs
keep their dtype.

Kernels: csrc/cpu/layers.cpp, csrc/cuda/layers.cu, with the checks and the math in
csrc/common/layers.h.
"""
from __future__ import annotations

import numbers

import torch

from ._common import (apply_function, call_below_autograd, needs_autograd, not_differentiable,
                      register_autograd_function)

_OPS = torch.ops.pretrain_kernels
_RMS_NORM_OP = _OPS.rms_norm.default
_SWIGLU_OP = _OPS.swiglu.default
_GELU_OP = _OPS.gelu.default
_GELU_APPROXIMATE = ("none", "tanh")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return v


def _check_norm(x, weight, eps, offset, round_before_weight):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor with at least one dim (the normalised last dim), got a 0-d tensor")
    eps = _check_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    offset = _check_number("offset", offset)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a tensor or None, got {type(weight).__name__}")
        if weight.device != x.device:
            raise ValueError(f"weight: expected a tensor on {x.device} (that of x), got {weight.device}")
        if weight.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"weight: expected the dtype of x ({x.dtype}) or float32, got {weight.dtype}")
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight: expected shape ({x.shape[-1]},) (the last dim of x), got {tuple(weight.shape)}")
    if round_before_weight is None:
        round_before_weight = offset == 0.0
    elif not isinstance(round_before_weight, bool):
        raise TypeError(f"round_before_weight: expected a bool or None, got {type(round_before_weight).__name__}")
    return eps, offset, round_before_weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, offset: float = 0.0,
             round_before_weight: bool | None = None) -> torch.Tensor:
    """Root-mean-square normalisation over the last dim of x, scaled by offset + weight.

    x: any shape [..., D] (float32, float16, bfloat16, float64; any strides). weight: [D] in x's
    dtype or float32, or None (no scale: y is the normalised x). eps: added to the mean square.
    offset: added to the weight (1.0 for Gemma's (1 + w) convention, 0.0 for Llama, Mistral,
    Qwen2). round_before_weight: round the normalised value to x's dtype before the weight
    multiply (transformers' LlamaRMSNorm) or multiply in float32 and round once (GemmaRMSNorm);
    None picks Llama's for offset 0 and Gemma's otherwise. Statistics in float32 (float64 for
    float64 x); returns a new contiguous tensor shaped and typed like x. Differentiable in x and
    weight.
    """
    eps, offset, rbw = _check_norm(x, weight, eps, offset, round_before_weight)
    if needs_autograd(x, weight):
        return apply_function(_RMSNorm, x, weight, eps, offset, rbw)[0]
    return call_below_autograd(_RMS_NORM_OP, x, weight, eps, offset, rbw)[0]


def _check_swiglu(gate, up):
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if gate.dtype not in _FLOATS:
        raise TypeError(f"gate: expected float32, float16, bfloat16 or float64, got {gate.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected the dtype of gate ({gate.dtype}), got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up: expected a tensor on {gate.device} (that of gate), got {up.device}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the SwiGLU activation of Llama, Mistral and Qwen2 MLPs (act_fn(gate_proj(x))
    * up_proj(x)), forward and backward fused.

    gate, up: one shape and dtype (float32, float16, bfloat16, float64), on one device, any
    strides. Math in float32 (float64 for float64); silu(gate) is rounded to the dtype before the
    product, as the eager expression rounds it. Returns a new contiguous tensor. Differentiable in
    both; the backward recomputes silu (nothing but the inputs is saved).
    """
    _check_swiglu(gate, up)
    if needs_autograd(gate, up):
        return apply_function(_SwiGLU, gate, up)
    return call_below_autograd(_SWIGLU_OP, gate, up)


def _check_gelu(x, approximate):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if not isinstance(approximate, str):
        raise TypeError(f"approximate: expected a str ('none' or 'tanh'), got {type(approximate).__name__}")
    if approximate not in _GELU_APPROXIMATE:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, as torch.nn.functional.gelu (same names and default), forward and backward fused.

    x: any shape (float32, float16, bfloat16, float64), any strides. approximate: "none" (the
    exact x * Phi(x), Phi the normal CDF) or "tanh" (GPT-2's 0.5 x (1 + tanh(sqrt(2/pi) (x +
    0.044715 x^3)))). Math in float32 (float64 for float64), rounded once to x's dtype. Returns
    a new contiguous tensor. Differentiable; the backward recomputes from x (only x is saved).
    """
    _check_gelu(x, approximate)
    if needs_autograd(x):
        return apply_function(_GELU, x, approximate)
    return call_below_autograd(_GELU_OP, x, approximate)


# ---- fake kernels --------------------------------------------------------------------------------


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pretrain_kernels::rms_norm")
def _fake_rms_norm(x, weight, eps, offset, round_before_weight):
    torch._check(x.dim() >= 1, lambda: "x: expected at least one dim")
    if weight is not None:
        torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1], lambda: "weight: expected shape [D]")
        torch._check(weight.device == x.device, lambda: "weight: expected a tensor on the device of x")
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_acc(x.dtype))


@torch.library.register_fake("pretrain_kernels::rms_norm_backward")
def _fake_rms_norm_backward(grad_out, x, weight, rstd, offset, round_before_weight, weight_grad):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out: expected the shape of x")
    dw = weight.new_empty(weight.shape) if (weight is not None and weight_grad) else x.new_empty((0,))
    return x.new_empty(x.shape), dw


@torch.library.register_fake("pretrain_kernels::swiglu")
def _fake_swiglu(gate, up):
    torch._check(gate.shape == up.shape, lambda: "up: expected the shape of gate")
    return gate.new_empty(gate.shape)


@torch.library.register_fake("pretrain_kernels::swiglu_backward")
def _fake_swiglu_backward(grad_out, gate, up):
    torch._check(gate.shape == up.shape, lambda: "up: expected the shape of gate")
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("pretrain_kernels::gelu")
def _fake_gelu(x, approximate):
    torch._check(approximate in _GELU_APPROXIMATE, lambda: "approximate: expected 'none' or 'tanh'")
    return x.new_empty(x.shape)


@torch.library.register_fake("pretrain_kernels::gelu_backward")
def _fake_gelu_backward(grad_out, x, approximate):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out: expected the shape of x")
    torch._check(approximate in _GELU_APPROXIMATE, lambda: "approximate: expected 'none' or 'tanh'")
    return x.new_empty(x.shape)


# ---- autograd (see ops/_common.py) ---------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.rms_norm (pretrain_kernels::rms_norm)"

    @staticmethod
    def forward(x, weight, eps, offset, round_before_weight):
        return _OPS.rms_norm(x, weight, eps, offset, round_before_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, offset, round_before_weight = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.options = (offset, round_before_weight)

    @staticmethod
    def backward(ctx, grad, _unused):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_w):
            return None, None, None, None, None
        x, weight, rstd = ctx.saved_tensors
        offset, rbw = ctx.options
        dx, dw = _rms_norm_backward(grad.contiguous(), x, weight, rstd, offset, rbw, bool(need_w))
        return (dx if need_x else None), (dw if need_w else None), None, None, None


class _SwiGLU(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.swiglu (pretrain_kernels::swiglu)"

    @staticmethod
    def forward(gate, up):
        return _OPS.swiglu(gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None
        gate, up = ctx.saved_tensors
        dg, du = _swiglu_backward(grad.contiguous(), gate, up)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


class _GELU(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.gelu (pretrain_kernels::gelu)"

    @staticmethod
    def forward(x, approximate):
        return _OPS.gelu(x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, approximate = inputs
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        (x,) = ctx.saved_tensors
        return _gelu_backward(grad.contiguous(), x, ctx.approximate), None


register_autograd_function("pretrain_kernels::rms_norm", _RMSNorm, public="pk.rms_norm")
register_autograd_function("pretrain_kernels::swiglu", _SwiGLU, public="pk.swiglu")
register_autograd_function("pretrain_kernels::gelu", _GELU, public="pk.gelu")
_rms_norm_backward = not_differentiable("pretrain_kernels::rms_norm_backward", "pk.rms_norm")
_swiglu_backward = not_differentiable("pretrain_kernels::swiglu_backward", "pk.swiglu")
_gelu_backward = not_differentiable("pretrain_kernels::gelu_backward", "pk.gelu")
