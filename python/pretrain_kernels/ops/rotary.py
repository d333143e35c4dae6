"""Rotary position embedding: pk.rotary_embedding (one fused op, forward and backward).

    out[..., first]  = x[..., first] * cos - x[..., second] * sin
    out[..., second] = x[..., first] * sin + x[..., second] * cos

for the pairs (first, second) = (2i, 2i+1) when interleaved (GPT-J, and the GPT model of this
package), (i, i + rotary_dim / 2) otherwise (the rotate-half layout of GPT-NeoX and Llama,
FlashAttention's default); the features past rotary_dim = 2 * cos.shape[-1] are copied. The
math runs in float32 (float64 for float64 x) and the result comes back in x's dtype, as a new
contiguous tensor. The backward is the same op rotating by -theta. cos and sin are constants:
they get no gradient.

Kernels: csrc/cpu/rotary.cpp, csrc/cuda/rotary.cu, with the checks and the math in
csrc/common/rotary.h.
"""
from __future__ import annotations

import torch

from ._common import apply_function, call_below_autograd, needs_autograd, register_autograd_function

_OPS = torch.ops.pretrain_kernels
_ROTARY_OP = _OPS.rotary_embedding.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, cos, sin, interleaved):
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x: expected [batch, seqlen, heads, head_dim] or varlen [tokens, heads, head_dim], "
                         f"got shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (that of x), got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos, sin: expected one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    T = x.shape[0] if x.dim() == 3 else x.shape[1]
    allowed = [(T,)] if x.dim() == 3 else [(T,), (x.shape[0], T)]
    if cos.dim() < 1 or tuple(cos.shape[:-1]) not in allowed:
        want = ("[tokens, rotary_dim / 2]" if x.dim() == 3 else
                "[seqlen, rotary_dim / 2] or per token [batch, seqlen, rotary_dim / 2]")
        raise ValueError(f"cos: expected {want} for x of shape {tuple(x.shape)}, got {tuple(cos.shape)}")
    if not 1 <= cos.shape[-1] <= x.shape[-1] // 2:
        raise ValueError(f"cos: rotary_dim (2 * its last dim, {2 * cos.shape[-1]}) must be in [2, head_dim "
                         f"{x.shape[-1]}]")


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False,
                     ) -> torch.Tensor:
    """Rotate x by the rotary position embedding given as cos/sin tables.

    x: [batch, seqlen, heads, head_dim] or varlen [tokens, heads, head_dim] (float32, float16,
    bfloat16, float64; any strides, e.g. the query and key heads sliced out of one fused qkv
    projection, rotated in one call). cos, sin: the angles' cosines and sines, [seqlen,
    rotary_dim / 2] shared by the batch, or per token [batch, seqlen, rotary_dim / 2]
    ([tokens, rotary_dim / 2] for varlen x); any float dtype, read in float32. interleaved:
    pairs (x[2i], x[2i+1]) (GPT-J) instead of (x[i], x[i + rotary_dim / 2]) (GPT-NeoX, Llama).

    Returns a new contiguous tensor shaped and typed like x. Differentiable in x (the backward
    is the rotation by -theta, itself differentiable); cos and sin get no gradient.
    """
    _check(x, cos, sin, interleaved)
    if needs_autograd(x):
        return apply_function(_Rotary, x, cos, sin, interleaved, False)
    return call_below_autograd(_ROTARY_OP, x, cos, sin, interleaved, False)


# ---- fake kernel and autograd ----------------------------------------------------------------


@torch.library.register_fake("pretrain_kernels::rotary_embedding")
def _fake(x, cos, sin, interleaved, conjugate):
    torch._check(x.dim() in (3, 4), lambda: "x: expected [batch, seqlen, heads, head_dim] or [tokens, heads, head_dim]")
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check(t.device == x.device, lambda: f"{name}: expected a tensor on {x.device} (that of x)")
    torch._check(cos.shape == sin.shape, lambda: "cos, sin: expected one shape")
    return x.new_empty(x.shape)


def _rotate(x, cos, sin, interleaved, conjugate):
    if needs_autograd(x):
        return apply_function(_Rotary, x, cos, sin, interleaved, conjugate)
    return call_below_autograd(_ROTARY_OP, x, cos, sin, interleaved, conjugate)


class _Rotary(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.rotary_embedding (pretrain_kernels::rotary_embedding)"

    @staticmethod
    def forward(x, cos, sin, interleaved, conjugate):
        return _OPS.rotary_embedding(x, cos, sin, interleaved, conjugate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, cos, sin, interleaved, conjugate = inputs
        ctx.save_for_backward(cos, sin)
        ctx.options = (interleaved, conjugate)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        cos, sin = ctx.saved_tensors
        interleaved, conjugate = ctx.options
        # the transpose of a rotation is the rotation by the opposite angle
        return _rotate(grad, cos, sin, interleaved, not conjugate), None, None, None, None


register_autograd_function("pretrain_kernels::rotary_embedding", _Rotary, public="pk.rotary_embedding")
