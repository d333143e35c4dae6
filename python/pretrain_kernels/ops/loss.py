"""The fused LM-head loss: pk.linear_cross_entropy.

    loss = F.cross_entropy(logits, targets, ignore_index=, label_smoothing=, reduction=)
    logits = F.linear(hidden, weight, bias)   (then softcap * tanh(logits / softcap) if softcap)

computed without ever holding the [tokens, vocab] logits: the tokens go through in chunks of
`chunk_size` rows; each chunk's logits are one matmul into a reused buffer, one fused row pass
turns them into the row losses and d loss / d logits (in place), and two more matmuls add the
chunk's share of the gradients for hidden, weight and bias (csrc/common/loss_ops.h). For
reduction "mean"/"sum" the gradients are computed in the forward pass (the backward only
scales them by grad_output, as Liger-Kernel does); for "none" the backward recomputes the
chunks with the per-token grad_output. Peak memory is the weight, its gradient, hidden, its
gradient and one chunk of logits.

Numerics: the matmuls run in the input dtype with float32 accumulation (as torch's F.linear),
the softcap, log-sum-exp and gradients in float32 (float64 for float64 inputs), grad_weight is
summed over the chunks in float32. The loss comes back in float32 (float64 for float64 inputs),
not in the input dtype as torch's cross_entropy of bf16 logits would.

Targets: a target equal to ignore_index adds nothing (and is not counted by "mean"; all rows
ignored gives NaN for "mean", 0 for "sum", as torch). A target outside [0, vocab) that is not
ignore_index raises on CPU tensors (ValueError from this function, RuntimeError from the raw
op); in GPU memory it cannot be checked without a host sync, and that row's loss and gradients
are NaN instead (csrc/common/loss.h).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._common import (apply_function, call_below_autograd, is_compiling, needs_autograd, not_differentiable,
                      register_autograd_function)

_OPS = torch.ops.pretrain_kernels
REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def auto_chunk_size(n_tokens: int, vocab: int) -> int:
    """Rows per chunk the op picks when chunk_size is None (csrc/common/loss.h): about 2^25
    logits (128 MB in float32), a power of two in [512, 4096], at most n_tokens."""
    rows = 512
    while rows < 4096 and rows * 2 * max(vocab, 1) <= 1 << 25:
        rows *= 2
    return min(rows, max(n_tokens, 1))


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", softcap: float | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits F.linear(hidden, weight, bias) without materialising them.

    hidden: [..., H] (float32, float16, bfloat16, float64; any strides); weight: [V, H] in the
    dtype of hidden; targets: int64/int32 shaped like hidden's leading dims; bias: [V] or None.
    ignore_index, label_smoothing, reduction: as torch.nn.functional.cross_entropy. softcap:
    None, or > 0 for Gemma-2's final-logit soft-capping, softcap * tanh(logits / softcap).
    chunk_size: rows of logits held at once (None: chosen from the sizes, auto_chunk_size);
    it changes results only by rounding (the matmul shapes, the order in which grad_weight
    adds the chunks), and the peak memory.

    Returns the loss in float32 (float64 for float64 inputs): a 0-d tensor for "mean"/"sum",
    shaped like targets for "none". Differentiable in hidden, weight and bias (reverse mode;
    double backward and forward mode raise NotImplementedError).
    """
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_tensor("targets", targets)
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden: expected float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor [..., hidden_size], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (that of hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected a tensor on {hidden.device} (that of hidden), got {weight.device}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [vocab, {H}] (hidden size of hidden), got {tuple(weight.shape)}")
    if V < 1:
        raise ValueError(f"weight: expected at least one vocabulary row, got shape {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected an int64 or int32 tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (the leading dims of hidden), "
                         f"got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets: expected a tensor on {hidden.device} (that of hidden), got {targets.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},) (vocab of weight), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} (that of weight), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected a tensor on {hidden.device} (that of hidden), got {bias.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    label_smoothing = _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of 'mean', 'sum', 'none', got {reduction!r}")
    if softcap is None:
        cap = 0.0
    else:
        cap = _check_real("softcap", softcap)
        if not (math.isfinite(cap) and cap > 0.0):
            raise ValueError(f"softcap: expected None or a finite value > 0, got {softcap}")
    if chunk_size is None:
        chunk = 0
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size: expected an int or None, got {type(chunk_size).__name__}")
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size: expected >= 1 or None, got {chunk}")
    if targets.device.type == "cpu" and not is_compiling() and targets.numel() > 0:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            v = int(targets[bad].flatten()[0])
            raise ValueError(f"targets: expected values in [0, {V}) or ignore_index ({ignore_index}), got {v}")

    h2 = hidden.reshape(-1, H)
    t1 = targets.reshape(-1)
    fused = reduction != "none"
    if needs_autograd(hidden, weight, bias):
        # only the gradients autograd will ask for: a frozen LM head skips the weight-sized product
        grads = (_GRAD_HIDDEN * hidden.requires_grad + _GRAD_WEIGHT * weight.requires_grad
                 + _GRAD_BIAS * (bias is not None and bias.requires_grad))
        out = apply_function(_LinearCrossEntropy, h2, weight, t1, bias, ignore_index, label_smoothing, cap, reduction,
                             fused, chunk, grads)
    else:
        out = call_below_autograd(_OPS.linear_cross_entropy.default, h2, weight, t1, bias, ignore_index,
                                  label_smoothing, cap, reduction, False, chunk)
    loss = out[0]
    return loss.reshape(targets.shape) if reduction == "none" else loss


# ---- fake kernels and autograd --------------------------------------------------------------


def _loss_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _check_devices(hidden, **others):
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == hidden.device,
                         lambda: f"{name}: expected a tensor on {hidden.device} (that of hidden), got {t.device}")


# Bits of the ops' `grads` argument: the gradients computed (the others come back empty).
_GRAD_HIDDEN, _GRAD_WEIGHT, _GRAD_BIAS = 1, 2, 4
_GRAD_ALL = 7


def _grad_shapes(hidden, weight, bias, grads):
    V = weight.shape[0]
    return (hidden.new_empty(hidden.shape if grads & _GRAD_HIDDEN else (0,)),
            weight.new_empty(weight.shape if grads & _GRAD_WEIGHT else (0,)),
            weight.new_empty((V,) if (grads & _GRAD_BIAS and bias is not None) else (0,)))


@torch.library.register_fake("pretrain_kernels::linear_cross_entropy")
def _fake_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, reduction, compute_grad,
                  chunk_size, grads=_GRAD_ALL):
    _check_devices(hidden, weight=weight, targets=targets, bias=bias)
    torch._check(hidden.dim() == 2, lambda: "hidden: expected a 2-D tensor [tokens, hidden]")
    torch._check(weight.dim() == 2, lambda: "weight: expected a 2-D tensor [vocab, hidden]")
    N, V = hidden.shape[0], weight.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=_loss_dtype(hidden))
    torch._check(0 <= grads <= 7, lambda: f"grads: expected a bit set in [0, 7], got {grads}")
    return (loss,) + _grad_shapes(hidden, weight, bias, grads if compute_grad else 0)


@torch.library.register_fake("pretrain_kernels::linear_cross_entropy_backward")
def _fake_backward(grad_loss, hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, reduction,
                   chunk_size, grads=_GRAD_ALL):
    _check_devices(hidden, grad_loss=grad_loss, weight=weight, targets=targets, bias=bias)
    torch._check(hidden.dim() == 2, lambda: "hidden: expected a 2-D tensor [tokens, hidden]")
    torch._check(weight.dim() == 2, lambda: "weight: expected a 2-D tensor [vocab, hidden]")
    torch._check(0 <= grads <= 7, lambda: f"grads: expected a bit set in [0, 7], got {grads}")
    return _grad_shapes(hidden, weight, bias, grads)


# Autograd (see ops/_common.py). With compute_grad the forward already holds the gradients for
# grad_output = 1 and the backward scales them; otherwise it runs linear_cross_entropy_backward,
# which has no derivative itself.
class _LinearCrossEntropy(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.linear_cross_entropy (pretrain_kernels::linear_cross_entropy)"

    @staticmethod
    def forward(hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, reduction, compute_grad,
                chunk_size, grads):
        return _OPS.linear_cross_entropy(hidden, weight, targets, bias, ignore_index, label_smoothing, softcap,
                                         reduction, compute_grad, chunk_size, grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, reduction, compute_grad, chunk, grads = inputs
        _, gh, gw, gb = output
        ctx.mark_non_differentiable(gh, gw, gb)
        ctx.options = (ignore_index, label_smoothing, softcap, reduction, chunk)
        ctx.save_for_backward(hidden, weight, targets, bias)
        # With compute_grad the gradients for grad_output = 1 are already here. Eagerly the first
        # backward scales them in place and hands them over (no second weight-sized buffer);
        # a later backward through the same graph (retain_graph) recomputes from the inputs.
        # While torch.compile / AOTAutograd trace (tensor subclasses: fake, functional), they are
        # saved and scaled out of place.
        ctx.grads = None
        ctx.computed = grads if compute_grad else 0
        if compute_grad:
            if is_compiling() or type(gw) is not torch.Tensor:
                ctx.save_for_backward(hidden, weight, targets, bias, gh, gw, gb if bias is not None else None)
            else:
                ctx.grads = (gh, gw, gb if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        saved = ctx.saved_tensors
        hidden, weight, targets, bias = saved[:4]
        grads = saved[4:] if len(saved) > 4 else ctx.grads
        ctx.grads = None
        if not (need_h or need_w or need_b):
            return (None,) * 11
        wanted = _GRAD_HIDDEN * need_h + _GRAD_WEIGHT * need_w + _GRAD_BIAS * need_b
        if grads is not None and wanted & ~ctx.computed:
            grads = None  # asked for one the forward skipped: recompute
        if grads is not None:
            gh, gw, gb = grads
            g = grad_loss.to(gh.dtype)
            scale = (lambda t: t * g) if len(saved) > 4 else (lambda t: t.mul_(g))
            gh = scale(gh) if need_h else None
            gw = scale(gw) if need_w else None
            gb = scale(gb) if (need_b and gb is not None) else None
        else:
            ignore_index, label_smoothing, softcap, reduction, chunk = ctx.options
            gh, gw, gb = _backward(grad_loss, hidden, weight, targets, bias, ignore_index, label_smoothing, softcap,
                                   reduction, chunk, wanted)
            gh = gh if need_h else None
            gw = gw if need_w else None
            gb = gb if (need_b and bias is not None) else None
        return gh, gw, None, gb, None, None, None, None, None, None, None


register_autograd_function("pretrain_kernels::linear_cross_entropy", _LinearCrossEntropy,
                           public="pk.linear_cross_entropy")
_backward = not_differentiable("pretrain_kernels::linear_cross_entropy_backward", "pk.linear_cross_entropy")
