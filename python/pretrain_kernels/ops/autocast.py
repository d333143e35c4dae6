"""torch.autocast for the pretrain_kernels ops: each family behaves as its torch counterpart.

  attention   lower-precision policy, as torch's scaled_dot_product_attention: under autocast,
              q, k, v (float32, float16, bfloat16; never float64) are cast to the autocast dtype
              (torch.get_autocast_dtype of their device) and the output comes in that dtype.
              The attention mask (bool or float32) and the ALiBi slopes (float32) keep their
              dtypes. The KV-cache op writes its caches in place, so it cannot change their
              dtype: q, k_new and v_new are cast to the dtype of k_cache instead.
  denoising   float32 policy, as torch's mse_loss / the fp32 list: float16 and bfloat16 inputs
              (model outputs, samples, noise) are cast to float32, so the solver steps, add_noise
              and the loss run in float32 and return float32; float64 (the alphas_cumprod tables)
              and integer tensors are untouched.
  loss        lower-precision policy, as torch's F.linear (the matmuls of
              pk.linear_cross_entropy): hidden, weight and bias are cast to the autocast dtype;
              the row math is float32 inside the op whatever the dtype, and the loss float32.
  layers      pk.rms_norm as torch's rms_norm: float32 policy on CUDA (x and weight cast to
              float32, output float32); on the CPU unaffected, as torch's CPU autocast leaves
              rms_norm alone. pk.swiglu and pk.gelu are elementwise, as silu, gelu and mul: unaffected.
  masking, sampling, rotary
              unaffected (integer ids; sampling takes the logits in the dtype they come in;
              pk.rotary_embedding is elementwise, as torch's own mul/add: x keeps its dtype).

Two layers, so that both the raw ops and the Python API follow the policy:
  * the raw ops (torch.ops.pretrain_kernels.*): autocast kernels registered with the
    dispatcher: torch.library.register_autocast (float32) for the denoising ops, and kernels on
    the AutocastCPU / AutocastCUDA keys for the attention ops (register_autocast casts to one
    fixed dtype, where SDPA's policy follows the autocast dtype and must leave the mask and the
    slopes alone);
  * the public Python functions check their arguments before the dispatcher is reached (one
    dtype for q, k, v; model_output like sample), so the same casts are applied in front of
    those checks: the functions of ops.attention and ops.diffusion are wrapped in place when
    this module is imported (by ops/__init__, before anything else imports them), and every
    importer (pk.*, integrations, models, schedulers) gets the wrapped function. Without
    autocast the wrappers cost one call of torch._C._is_any_autocast_enabled.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import attention as _attention
from . import diffusion as _diffusion
from . import layers as _layers
from . import loss as _loss

_NS = "pretrain_kernels"
_DEVICES = ("cpu", "cuda")
_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_HALF = (torch.float16, torch.bfloat16)
# Whether autocast is on for any device: one call, where torch.is_autocast_enabled needs the
# device (the common case, autocast off, then costs the public functions almost nothing).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _eligible(t) -> bool:
    """torch's rule: autocast casts floating-point tensors other than float64."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _autocast_device(tensors) -> str | None:
    """The device type of the first tensor when autocast is on for it, else None."""
    if not _any_autocast():
        return None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dev = t.device.type
            if dev in _DISPATCH_KEYS and torch.is_autocast_enabled(dev):
                return dev
            return None
    return None


# ---- raw ops -------------------------------------------------------------------------------

_lib = torch.library.Library(_NS, "IMPL")


def _attn_fwd_kernel(device):
    op = torch.ops.pretrain_kernels.flash_attn_fwd.default

    def kernel(q, k, v, *rest):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) if _eligible(t) and t.device.type == device else t for t in (q, k, v))
        with torch.autocast(device, enabled=False):
            return op(q, k, v, *rest)
    return kernel


def _kvcache_kernel(device):
    op = torch.ops.pretrain_kernels.flash_attn_kvcache.default

    def kernel(q, k_cache, v_cache, cache_seqlens, k_new, v_new, *rest):
        dtype = k_cache.dtype
        q, k_new, v_new = (t.to(dtype) if _eligible(t) and t.device.type == device else t for t in (q, k_new, v_new))
        with torch.autocast(device, enabled=False):
            return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, *rest)
    return kernel


def _lce_kernel(device):
    op = torch.ops.pretrain_kernels.linear_cross_entropy.default

    def kernel(hidden, weight, targets, bias, *rest):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight, bias = (t.to(dtype) if _eligible(t) and t.device.type == device else t
                                for t in (hidden, weight, bias))
        with torch.autocast(device, enabled=False):
            return op(hidden, weight, targets, bias, *rest)
    return kernel


_FP32_OPS = ("add_noise", "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddim_step", "euler_step",
             "heun_step", "dpmpp_2m_step", "flow_match_step")

for _dev in _DEVICES:
    _lib.impl("flash_attn_fwd", _attn_fwd_kernel(_dev), _DISPATCH_KEYS[_dev])
    _lib.impl("flash_attn_kvcache", _kvcache_kernel(_dev), _DISPATCH_KEYS[_dev])
    _lib.impl("linear_cross_entropy", _lce_kernel(_dev), _DISPATCH_KEYS[_dev])
    for _name in _FP32_OPS:
        torch.library.register_autocast(f"{_NS}::{_name}", _dev, torch.float32, lib=_lib)
torch.library.register_autocast(f"{_NS}::rms_norm", "cuda", torch.float32, lib=_lib)  # CPU: as torch, untouched


# ---- Python API ----------------------------------------------------------------------------


def _positions(fn, names):
    params = list(inspect.signature(fn).parameters)
    return [(params.index(n), n) for n in names]


def _lower_precision(fn, names, target=None):
    """Wrap fn so that, under autocast, the tensors `names` are cast to the autocast dtype (or,
    with target, to the dtype of the argument named target) before fn checks them."""
    where = _positions(fn, names)
    target_at = _positions(fn, [target])[0] if target else None

    def arg(args, kwargs, i, n):
        return args[i] if i < len(args) else kwargs.get(n)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast():
            return fn(*args, **kwargs)
        first = arg(args, kwargs, *where[0])
        dev = _autocast_device((first,))
        if dev is None:
            return fn(*args, **kwargs)
        if target_at is not None:
            t = arg(args, kwargs, *target_at)
            if not isinstance(t, torch.Tensor):
                return fn(*args, **kwargs)
            dtype = t.dtype
        else:
            dtype = torch.get_autocast_dtype(dev)
        args = list(args)
        for i, n in where:
            t = arg(args, kwargs, i, n)
            if _eligible(t) and t.device.type == dev and t.dtype != dtype:
                if i < len(args):
                    args[i] = t.to(dtype)
                else:
                    kwargs[n] = t.to(dtype)
        return fn(*args, **kwargs)

    wrapper.__pk_autocast__ = True
    return wrapper


def _float32(fn, devices=_DEVICES):
    """Wrap fn so that, under autocast (on one of `devices`), its float16/bfloat16 tensor
    arguments become float32."""

    def up(t, dev):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF and t.device.type == dev else t

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast():
            return fn(*args, **kwargs)
        dev = _autocast_device(list(args) + list(kwargs.values()))
        if dev is None or dev not in devices:
            return fn(*args, **kwargs)
        return fn(*(up(a, dev) for a in args), **{k: up(v, dev) for k, v in kwargs.items()})

    wrapper.__pk_autocast__ = True
    return wrapper


def _wrap(module, name, wrap):
    fn = getattr(module, name)
    if not getattr(fn, "__pk_autocast__", False):  # once, however often this module is reloaded
        setattr(module, name, wrap(fn))


_wrap(_attention, "flash_attention", lambda f: _lower_precision(f, ("q", "k", "v")))
_wrap(_attention, "scaled_dot_product_attention", lambda f: _lower_precision(f, ("query", "key", "value")))
_wrap(_attention, "flash_attention_with_kvcache",
      lambda f: _lower_precision(f, ("q", "k_new", "v_new"), target="k_cache"))
_wrap(_loss, "linear_cross_entropy", lambda f: _lower_precision(f, ("hidden", "weight", "bias")))
for _name in ("add_noise", "diffusion_loss", "ddpm_step", "ddim_step", "euler_step", "heun_step", "dpmpp_2m_step",
              "flow_match_step"):
    _wrap(_diffusion, _name, _float32)
_wrap(_layers, "rms_norm", lambda f: _float32(f, devices=("cuda",)))
