"""Denoising ops: noise schedules, fused noising (pk.add_noise), the fused weighted MSE
(pk.diffusion_loss, with a fused backward), timestep samplers, and fused solver steps
(pk.ddpm_step, pk.ddim_step, pk.euler_step, pk.heun_step, pk.dpmpp_2m_step,
pk.flow_match_step).

Each op is one pass over memory: per-sample coefficients are computed inside the kernel, in
double precision, from per-sample timesteps / sigmas given as tensors (one value, or one
per sample along dim 0), so nothing synchronises with the host and a whole sampling loop
can be captured in a CUDA graph. Math is float32 for fp32/fp16/bf16 inputs (float64 for
float64), and alphas_cumprod stays a float64 table: sqrt(1 - alpha_bar) is not lost to
rounding near t = 0 as it is when the table is cast to the sample's dtype.

Semantics follow diffusers' schedulers (DDPMScheduler.step, DDIMScheduler.step,
EulerDiscreteScheduler.step, HeunDiscreteScheduler.step, DPMSolverMultistepScheduler with
dpmsolver++ / sde-dpmsolver++, FlowMatchEulerDiscreteScheduler.step). Where a step needs
noise and no `noise` tensor is given, the noise is drawn in the kernel from Philox keyed by
`seed` (see pretrain_kernels.ops._common.resolve_seed), identically on CPU and CUDA (up to
an ulp of libm), but of course not equal to the torch.randn draws diffusers makes.

Argument checks (the wrappers raise TypeError / ValueError, the raw ops RuntimeError, each
naming the argument): tensors that go with the sample (model_output, noise, prev_x0, ...) have
its shape, dtype and device; per-sample parameters are one value or one per sample, on the
sample's device or a one-element CPU tensor. Values are checked where they are on the host
(Python numbers, CPU tensors): integer timesteps index alphas_cumprod (0 <= t < its length;
prev_timesteps may be negative, "past the last step"), alphas_cumprod lies in [0, 1], Karras
sigmas are finite with sigma > 0 where a step divides by it (sigma_next >= 0), flow-matching
sigmas lie in [0, 1]. Values in device memory are not read (that would be a host sync): a
timestep outside the table is a device-side assert, other values are used as given (NaN or inf
in the outputs of that sample), except the flow sigmas of dpmpp_2m_step (NaN, see there).
Shape and range errors that the ops used to raise reach callers as exceptions that are also
RuntimeErrors, so except clauses written for either kind keep working.
"""
from __future__ import annotations

import math
import numbers
import weakref

import torch

from .. import _C
from ._common import (_has_torch_function, apply_function, call_below_autograd, call_checked, is_compiling,
                      needs_autograd, not_differentiable, raw_op, register_autograd_function, resolve_seed)

_OPS = torch.ops.pretrain_kernels
_loss_direct = getattr(_C, "diffusion_loss_direct", None) or (lambda *args: NotImplemented)
# the public functions' eager calls (ops/_common.py: raw_op)
_ADD_NOISE = raw_op("pretrain_kernels::add_noise")
_DDPM_STEP = raw_op("pretrain_kernels::ddpm_step")
_DDIM_STEP = raw_op("pretrain_kernels::ddim_step")
_EULER_STEP = raw_op("pretrain_kernels::euler_step")
_HEUN_STEP = raw_op("pretrain_kernels::heun_step")
_DPMPP_2M_STEP = raw_op("pretrain_kernels::dpmpp_2m_step")
_FLOW_MATCH_STEP = raw_op("pretrain_kernels::flow_match_step")

SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TARGETS = ("epsilon", "v_prediction", "sample", "flow")
MAX_TRAIN_TIMESTEPS = 2**20  # the tables are built on the host (the cosine one by a Python loop)


# ---- schedules ------------------------------------------------------------------------------


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _check_flag(name, value):
    """A bool option (Python or NumPy bool, or the ints 0 and 1)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (isinstance(value, numbers.Integral)
                                                                      and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


def _check_real(name, value, *, low=None, low_open=False, high=None, finite=True):
    """A Python number as a float: never NaN, finite unless finite=False, and >= low (> low
    with low_open) / <= high where given. The messages match the ops' TORCH_CHECKs."""
    if value.__class__ is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) and not finite:
        raise ValueError(f"{name}: expected a number (+-inf allowed), got NaN")
    bad = math.isnan(v) or (finite and math.isinf(v))
    bad = bad or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
    if bad:
        what = "a finite value" if finite else "a value"
        if low is not None and high is not None:
            what = f"a value in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        raise ValueError(f"{name}: expected {what}, got {value}")
    return v


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), discretised as
    beta_i = min(1 - abar(t_{i+1}) / abar(t_i), max_beta)."""

    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def schedule_betas(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02, rescale_zero_terminal_snr: bool = False, *,
                   trained_betas=None) -> torch.Tensor:
    """The betas of a schedule, float64 on the CPU (see noise_schedule)."""
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten().clone()
        if betas.numel() == 0 or not bool(((betas >= 0) & (betas < 1)).all()):
            raise ValueError("trained_betas: expected a non-empty sequence of values in [0, 1)")
    else:
        _check_choice("kind", kind, SCHEDULE_KINDS)
        n = _check_pos_int("num_train_timesteps", num_train_timesteps)
        if n > MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps: expected at most {MAX_TRAIN_TIMESTEPS}, got {n}")
        beta_start = _check_real("beta_start", beta_start, low=0.0)
        beta_end = _check_real("beta_end", beta_end, low=0.0)
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
        if not bool((betas < 1).all()):
            raise ValueError(f"beta_start/beta_end: betas must stay below 1, got up to {float(betas.max())}")
    if _check_flag("rescale_zero_terminal_snr", rescale_zero_terminal_snr):
        if betas.numel() < 2:
            raise ValueError("rescale_zero_terminal_snr: needs at least 2 timesteps")
        if not bool((betas[1:] > 0).any()):
            raise ValueError("rescale_zero_terminal_snr: every beta after the first is 0 (alphas_cumprod does not "
                             "fall), so there is no signal-to-noise ratio to rescale to zero")
        betas = globals()["rescale_zero_terminal_snr"](betas)
    return betas


def noise_schedule(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02, rescale_zero_terminal_snr: bool = False) -> torch.Tensor:
    """alphas_cumprod (alpha_bar_t, t = 0..num_train_timesteps-1) as a float64 CPU tensor.

    kind: "linear", "scaled_linear" (Stable Diffusion), "squaredcos_cap_v2" (improved-DDPM
    cosine), "sigmoid" (GeoDiff). rescale_zero_terminal_snr: rescale to zero terminal SNR
    (the last value becomes 0). The same formulas as diffusers' schedulers, evaluated in
    float64 instead of float32.
    """
    betas = schedule_betas(kind, num_train_timesteps, beta_start, beta_end, rescale_zero_terminal_snr)
    return torch.cumprod(1.0 - betas, dim=0)


# ---- argument helpers -----------------------------------------------------------------------


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension, got a 0-d tensor")
    return x


_scalar_cache: dict = {}


def _scalar_tensor(value, dtype):
    """A one-element CPU tensor for a Python number. Cached (the ops never write to it), so
    a sampling loop does not pay a tensor construction per coefficient per step."""
    if is_compiling():
        return torch.tensor(value, dtype=dtype)
    key = (value, dtype)
    t = _scalar_cache.get(key)
    if t is None:
        if len(_scalar_cache) > 8192:
            _scalar_cache.clear()
        t = _scalar_cache[key] = torch.tensor(value, dtype=dtype)
    return t


class _ArgValueError(ValueError, RuntimeError):
    """A ValueError that is also a RuntimeError: raised by the wrappers for checks that reached
    callers as the op's RuntimeError before the wrappers made them (shapes, timestep ranges),
    so that except clauses written for either keep working."""


class _ArgTypeError(TypeError, RuntimeError):
    """A TypeError that is also a RuntimeError (see _ArgValueError)."""


_INT64 = (-(2**63), 2**63)
_PER_SAMPLE_FLOAT = (torch.float32, torch.float64, torch.int32, torch.int64)
_INTEGER = (torch.int32, torch.int64)


def _like(name, t, ref, ref_name="sample"):
    """A tensor shaped like `ref` (same shape, dtype and device), as the ops require."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise _ArgTypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if t.shape != ref.shape:
        raise _ArgValueError(f"{name}: expected shape {list(ref.shape)} (that of {ref_name}), got {list(t.shape)}")
    if t.device != ref.device:
        raise _ArgValueError(f"{name}: expected a tensor on {ref.device} (that of {ref_name}), got {t.device}")
    return t


def _per_sample(name, value, ref=None, *, integral=False):
    """A per-sample parameter as a tensor: tensors pass (one value, or one per sample along
    dim 0 of `ref`), Python numbers become one-element CPU tensors (read by the op without a
    device copy)."""
    if value.__class__ is torch.Tensor and ref is not None and value.dim() <= 1:
        # the common case in one test: a one-element CPU tensor, or one value per sample on the
        # device of the sample
        n = value.numel()
        if ((value.dtype in _INTEGER if integral else value.dtype in _PER_SAMPLE_FLOAT)
                and ((n == 1 and value.is_cpu) or (n == ref.shape[0] and value.device == ref.device))):
            return value
    if isinstance(value, torch.Tensor):
        if integral:
            if value.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected an integer tensor (int32 or int64), got {value.dtype}")
        elif value.dtype not in _PER_SAMPLE_FLOAT:
            raise TypeError(f"{name}: expected a float32, float64 or integer tensor, got {value.dtype}")
        if ref is not None:
            B = ref.shape[0]
            if value.dim() > 1 or value.numel() not in (1, B):
                raise _ArgValueError(f"{name}: expected one value or one per sample ({B}), got shape "
                                     f"{list(value.shape)}")
            if value.device != ref.device and not (value.device.type == "cpu" and value.numel() == 1):
                raise ValueError(f"{name}: expected a tensor on {ref.device} (that of the sample) or a one-element "
                                 f"CPU tensor, got {value.device}")
        return value
    cls = value.__class__
    if cls is not int and cls is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name}: expected a tensor or a number, got {type(value).__name__}")
    if integral:
        if cls is not int and not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name}: expected an integer timestep, got {value}")
        if not _INT64[0] <= int(value) < _INT64[1]:
            raise ValueError(f"{name}: expected an int64 value, got {int(value)}")
        return _scalar_tensor(int(value), torch.int64)
    return _scalar_tensor(float(value), torch.float64)


_FEW_VALUES = 64


def _finite(v):
    """isfinite of a Python number (a value read by _check_values) or of a tensor."""
    return math.isfinite(v) if isinstance(v, (int, float)) else torch.isfinite(v)


def _check_values(name, t, ok, expect, *, cls=ValueError):
    """ok(values) for a per-sample tensor made by _per_sample (a Python number became a one-element
    CPU tensor), where its values are on the host: CPU tensors, outside torch.compile. Values in
    device memory are not read (a host sync); the ops check the same on the host."""
    if not t.is_cpu or is_compiling() or t.numel() == 0:
        return
    if t.numel() <= _FEW_VALUES:  # a few values: read once, checked in Python (each torch op costs more)
        for i, v in enumerate(t.reshape(-1).tolist()):
            if not ok(v):
                raise cls(f"{name}: expected {expect}, got {v}" + (f" at sample {i}" if t.numel() > 1 else ""))
        return
    bad = ~ok(t.reshape(-1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise cls(f"{name}: expected {expect}, got {t.reshape(-1)[i].item()} at sample {i}")


def _check_timesteps(name, t, n, *, allow_negative=False):
    """Integer timesteps index alphas_cumprod (n entries): 0 <= t < n, or any negative value
    meaning "past the last step" where allow_negative."""
    _check_values(name, t, lambda v: v < n, f"values below {n} (the length of alphas_cumprod)", cls=_ArgValueError)
    if not allow_negative:
        _check_values(name, t, lambda v: v >= 0, "non-negative values", cls=_ArgValueError)


def _sigma_positive(name, t):
    _check_values(name, t, lambda v: _finite(v) & (v > 0), "finite values > 0")


def _sigma_nonneg(name, t):
    _check_values(name, t, lambda v: _finite(v) & (v >= 0), "finite values >= 0")


def _sigma_unit(name, t):  # flow matching: x_t = (1 - s) x0 + s noise, s in [0, 1]
    _check_values(name, t, lambda v: (v >= 0) & (v <= 1), "values in [0, 1]")


_acp_checked: dict = {}  # id -> (weakref to the table, its _version) of CPU tables whose values passed


def _acp(alphas_cumprod, device):
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise TypeError(f"alphas_cumprod: expected a tensor (see pk.noise_schedule), got {type(alphas_cumprod).__name__}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod: expected a non-empty 1-D table, got shape {tuple(alphas_cumprod.shape)}")
    if alphas_cumprod.dtype not in (torch.float64, torch.float32):
        raise TypeError(f"alphas_cumprod: expected float64 (or float32), got {alphas_cumprod.dtype}")
    if alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod: expected a tensor on {device} (the sample's device), got {alphas_cumprod.device}")
    if alphas_cumprod.is_cpu and not is_compiling():
        # the values of a CPU table, once per table and version (the op checks them every call)
        key = id(alphas_cumprod)
        seen = _acp_checked.get(key)
        if seen is None or seen[0]() is not alphas_cumprod or seen[1] != alphas_cumprod._version:
            bad = ~((alphas_cumprod >= 0) & (alphas_cumprod <= 1))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"alphas_cumprod: expected values in [0, 1], got {alphas_cumprod[i].item()} "
                                 f"at index {i}")
            if len(_acp_checked) > 256:
                _acp_checked.clear()
            _acp_checked[key] = (weakref.ref(alphas_cumprod), alphas_cumprod._version)
    return alphas_cumprod


def _clip_range(clip_sample, clip_sample_range):
    """clip_sample_range as a float; checked (finite, > 0) where clipping is on, as the ops do."""
    if clip_sample_range.__class__ is not float and (isinstance(clip_sample_range, bool)
                                                    or not isinstance(clip_sample_range, numbers.Real)):
        raise TypeError(f"clip_sample_range: expected a float, got {type(clip_sample_range).__name__}")
    if not clip_sample:
        return float(clip_sample_range)  # unused
    return _check_real("clip_sample_range", clip_sample_range, low=0.0, low_open=True)


def _check_flow_sigma(name, t):
    """Flow sigmas lie in [0, 1]: checked here for Python numbers and CPU tensors (the op checks
    them again). Values in device memory reach the kernels, which give NaN for a sample whose
    sigma is outside [0, 1] (see dpmpp_2m_step)."""
    _check_values(name, t, lambda v: (v >= 0) & (v <= 1), "values in [0, 1] with flow_sigmas=True")


# The step wrappers convert what the op cannot take (Python numbers) and check the arguments that
# the op would coerce (Python scalars, strings); the tensors' shapes, dtypes, devices and host
# values, which the op checks as well, are checked by the *_checks functions only when the op
# raises, or before the call while torch.compile traces (see call_checked).


def _per_sample_arg(name, value, *, integral=False):
    """A per-sample parameter for the op: a tensor as it is (checked by the op, and by _per_sample
    in the *_checks functions), a Python number as a one-element CPU tensor (checked here)."""
    return value if value.__class__ is torch.Tensor else _per_sample(name, value, integral=integral)


def _schedule_checks(model_output, sample, t, prev, alphas_cumprod, noise):
    """The checks of a DDPM-type step's tensors: model_output and noise like the sample,
    alphas_cumprod a table of values in [0, 1], timesteps in [0, len(alphas_cumprod)),
    prev_timesteps below len(alphas_cumprod) (negative: the last step)."""
    _like("model_output", model_output, sample)
    if noise is not None:
        _like("noise", noise, sample)
    acp = _acp(alphas_cumprod, sample.device)
    _per_sample("timesteps", t, sample, integral=True)
    _per_sample("prev_timesteps", prev, sample, integral=True)
    _check_timesteps("timesteps", t, acp.numel())
    _check_timesteps("prev_timesteps", prev, acp.numel(), allow_negative=True)


def _check_distinct(sigma_prev, sigma):
    """sigma_prev != sigma sample by sample, where both are on the host: the ratio r0 of the
    second order update divides by their log-SNR difference."""
    if sigma_prev.device.type != "cpu" or sigma.device.type != "cpu" or is_compiling():
        return
    a, b = torch.broadcast_tensors(sigma_prev.reshape(-1).double(), sigma.reshape(-1).double())
    same = a == b
    if bool(same.any()):
        i = int(same.nonzero()[0, 0])
        raise ValueError(f"sigma_prev: expected a value other than sigma ({b[i].item()})"
                         + (f" at sample {i}" if same.numel() > 1 else ""))


def _sigmas(sigma, sigma_next):
    """(sigma, sigma_next) of a sigma-parametrised step as per-sample tensors (_sigma_checks checks
    them)."""
    return _per_sample_arg("sigma", sigma), _per_sample_arg("sigma_next", sigma_next)


def _sigma_checks(model_output, sample, sigma, sigma_next, noise):
    """model_output and noise like the sample, sigma and sigma_next one value or one per sample."""
    _like("model_output", model_output, sample)
    if noise is not None:
        _like("noise", noise, sample)
    _per_sample("sigma", sigma, sample)
    _per_sample("sigma_next", sigma_next, sample)


def _noise_or_seed(noise, seed, generator, device, needed):
    if noise is not None:
        if seed is not None or generator is not None:
            raise ValueError("noise: pass either a noise tensor or seed/generator, not both")
        return noise, None
    if not needed:
        return None, None
    return None, resolve_seed(seed, generator, device)


# ---- training side --------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps, alphas_cumprod: torch.Tensor | None = None, *,
              target: str = "epsilon"):
    """Forward diffusion in one pass. Returns (x_t, target).

    DDPM-type schedules (alphas_cumprod given, timesteps integer [B] or one value):
      x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and the training target
      "epsilon": noise; "v_prediction": sqrt(abar_t) noise - sqrt(1 - abar_t) x0;
      "sample": x0.
    "flow" (rectified flow / flow matching; timesteps are float sigmas s in [0, 1]):
      x_t = (1 - s) x0 + s noise, target = noise - x0.
    x_t equals diffusers' scheduler.add_noise (FlowMatchEulerDiscreteScheduler.scale_noise for
    "flow"), the v target its get_velocity.
    """
    x0 = _tensor("x0", x0)
    _check_choice("target", target, TARGETS)
    if target == "flow" or alphas_cumprod is None:
        _like("noise", noise, x0, "x0")
    if target == "flow":
        t = _per_sample("timesteps", timesteps, x0)
        _sigma_unit("timesteps", t)
        acp = None if alphas_cumprod is None else _acp(alphas_cumprod, x0.device)  # the op does not read it
        return _ADD_NOISE(x0, noise, t, acp, target)
    if alphas_cumprod is None:
        raise ValueError(f"alphas_cumprod: required for target {target!r} (see pk.noise_schedule)")
    t = _per_sample_arg("timesteps", timesteps, integral=True)

    def checks():
        _like("noise", noise, x0, "x0")
        _per_sample("timesteps", t, x0, integral=True)
        _check_timesteps("timesteps", t, _acp(alphas_cumprod, x0.device).numel())

    return call_checked(_ADD_NOISE, (x0, noise, t, alphas_cumprod, target), checks)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps=None, alphas_cumprod=None, *,
                   weighting: str = "none", gamma: float = 5.0, prediction_type: str = "epsilon",
                   reduction: str = "mean"):
    """Fused (weighted) MSE: loss_b = w_b * mean over a sample of (pred - target)^2, then the
    mean over the batch (reduction="mean") or the per-sample losses [B] (reduction="none"),
    in float32 (float64 for float64 inputs).

    weighting "none": w = 1. "min_snr": Min-SNR-gamma (Hang et al. 2023) with
    snr = abar_t / (1 - abar_t): min(snr, gamma) / snr for epsilon prediction (1 where
    snr = 0), min(snr, gamma) / (snr + 1) for v_prediction, min(snr, gamma) for sample.
    Differentiable in pred and target; the backward is one fused pass. Reverse mode only
    (backward, torch.func.grad / vjp, vmap over them): double backward and forward mode
    (torch.func.jvp, forward_ad) raise NotImplementedError.
    """
    pred = _tensor("pred", pred)
    _check_choice("weighting", weighting, ("none", "min_snr"))
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("reduction", reduction, ("mean", "none"))
    gamma = _check_real("gamma", gamma, low=0.0, low_open=True)
    t = acp = None
    if weighting != "none":
        if timesteps is None or alphas_cumprod is None:
            raise ValueError(f"timesteps/alphas_cumprod: required for weighting {weighting!r}")
        t = _per_sample_arg("timesteps", timesteps, integral=True)
        acp = alphas_cumprod

    def checks():
        _like("target", target, pred, "pred")
        if acp is not None:
            _per_sample("timesteps", t, pred, integral=True)
            _check_timesteps("timesteps", t, _acp(acp, pred.device).numel())

    args = (pred, target, t, acp, weighting, gamma, prediction_type)
    if needs_autograd(pred, target):
        per_sample = call_checked(apply_function, (_DiffusionLoss, *args), checks)
    else:
        if not is_compiling() and not _has_torch_function(args):
            # CPU tensors: the kernel and the mean in one C call (csrc/module.cpp), or NotImplemented
            r = _loss_direct(*args, reduction == "mean")
            if r is not NotImplemented:
                return r
        per_sample = call_checked(call_below_autograd, (_OPS.diffusion_loss.default, *args), checks)
    return per_sample.mean() if reduction == "mean" else per_sample


def sample_timesteps(batch_size: int, *, kind: str = "uniform", num_train_timesteps: int = 1000,
                     logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0,
                     device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps for a batch.

    "uniform": int64 timesteps uniform in [0, num_train_timesteps) (DDPM training).
    "logit_normal", "mode": float sigmas in (0, 1) for flow matching, as SD3 samples them
    (Esser et al. 2024): sigmoid(N(logit_mean, logit_std)), or the mode sampler
    1 - u - mode_scale (cos^2(pi u / 2) - 1 + u) with u uniform; then the shift
    s -> shift s / (1 + (shift - 1) s). Draws happen on the generator's device (the CPU
    when no generator is given, like diffusers' compute_density_for_timestep_sampling, so a
    seeded CPU generator gives the same numbers) and move to `device`.
    """
    batch_size = _check_pos_int("batch_size", batch_size)
    _check_choice("kind", kind, ("uniform", "logit_normal", "mode"))
    gdev = generator.device if generator is not None else torch.device("cpu")
    if kind == "uniform":
        n = _check_pos_int("num_train_timesteps", num_train_timesteps)
        if generator is None and device is not None:
            return torch.randint(0, n, (batch_size,), device=device)
        out = torch.randint(0, n, (batch_size,), generator=generator, device=gdev)
        return out if device is None else out.to(device)
    shift = _check_real("shift", shift, low=0.0, low_open=True)
    if kind == "logit_normal":
        logit_mean = _check_real("logit_mean", logit_mean)
        logit_std = _check_real("logit_std", logit_std, low=0.0)
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), generator=generator, device=gdev)
        u = torch.sigmoid(u)
    else:
        u = torch.rand(batch_size, generator=generator, device=gdev)
        # SD3's mode sampler stays a monotone map of [0, 1] onto itself for -1 <= s <= 2 / (pi - 2)
        s = _check_real("mode_scale", mode_scale, low=-1.0, high=2 / (math.pi - 2))
        u = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if shift != 1.0:
        u = _shift(u, shift)
    return u if device is None else u.to(device)


def shift_sigmas(sigmas, shift: float):
    """The SD3 timestep shift s -> shift s / (1 + (shift - 1) s) (tensor or number), for sigmas
    in [0, 1] (checked for numbers and CPU tensors) and a finite shift > 0."""
    shift = _check_real("shift", shift, low=0.0, low_open=True)
    if isinstance(sigmas, torch.Tensor):
        if not (sigmas.dtype.is_floating_point or sigmas.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"sigmas: expected a floating-point tensor, got {sigmas.dtype}")
        if sigmas.device.type == "cpu" and not is_compiling() and sigmas.numel():
            bad = ~((sigmas >= 0) & (sigmas <= 1))
            if bool(bad.any()):
                i = int(bad.reshape(-1).nonzero()[0, 0])
                raise ValueError(f"sigmas: expected values in [0, 1], got {sigmas.reshape(-1)[i].item()} at index {i}")
    else:
        v = _check_real("sigmas", sigmas)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"sigmas: expected values in [0, 1], got {sigmas}")
    return _shift(sigmas, shift)


def _shift(sigmas, shift):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# ---- sampling side --------------------------------------------------------------------------


def ddpm_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, *, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, noise=None, seed=None,
              generator=None):
    """One ancestral DDPM step (diffusers' DDPMScheduler.step). prev_timesteps < 0 means the
    last step (alpha_bar_prev = 1). Noise is added where t > 0, with the fixed_small,
    fixed_small_log (same values) or fixed_large variance. Returns (prev_sample, pred_x0)."""
    _tensor("sample", sample)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("variance_type", variance_type, ("fixed_small", "fixed_small_log", "fixed_large"))
    clip_sample_range = _clip_range(clip_sample, clip_sample_range)
    t = _per_sample_arg("timesteps", timesteps, integral=True)
    prev = _per_sample_arg("prev_timesteps", prev_timesteps, integral=True)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, True)
    return call_checked(_DDPM_STEP, (model_output, sample, t, prev, alphas_cumprod, noise, seed_t,
                                         prediction_type, variance_type, bool(clip_sample), clip_sample_range),
                        lambda: _schedule_checks(model_output, sample, t, prev, alphas_cumprod, noise))


def ddim_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, *, eta=0.0, final_alpha_cumprod=1.0,
              prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0, use_clipped_model_output=False,
              noise=None, seed=None, generator=None):
    """One DDIM step (diffusers' DDIMScheduler.step), stochastic when eta > 0.
    prev_timesteps < 0 uses final_alpha_cumprod (1.0, or alphas_cumprod[0] when the
    scheduler has set_alpha_to_one=False). Returns (prev_sample, pred_x0)."""
    _tensor("sample", sample)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    eta = _check_real("eta", eta, low=0.0)
    final_alpha_cumprod = _check_real("final_alpha_cumprod", final_alpha_cumprod, low=0.0, low_open=True, high=1.0)
    clip_sample_range = _clip_range(clip_sample, clip_sample_range)
    t = _per_sample_arg("timesteps", timesteps, integral=True)
    prev = _per_sample_arg("prev_timesteps", prev_timesteps, integral=True)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, eta > 0)
    return call_checked(_DDIM_STEP, (model_output, sample, t, prev, alphas_cumprod, noise, seed_t,
                                         final_alpha_cumprod, eta, prediction_type, bool(clip_sample),
                                         clip_sample_range, bool(use_clipped_model_output)),
                        lambda: _schedule_checks(model_output, sample, t, prev, alphas_cumprod, noise))


def _euler_options(gamma, s_churn, num_inference_steps, s_tmin, s_tmax, s_noise):
    """(churn per step, s_tmin, s_tmax, s_noise) of euler_step, checked."""
    if gamma is not None:
        if s_churn != 0.0 or num_inference_steps is not None:
            raise ValueError("gamma: the per-step churn; pass either gamma or s_churn (with num_inference_steps), "
                             "not both")
        churn = _check_real("gamma", gamma, low=0.0)
    else:
        s_churn = _check_real("s_churn", s_churn, low=0.0)
        if num_inference_steps is not None:
            num_inference_steps = _check_pos_int("num_inference_steps", num_inference_steps)
        churn = 0.0
        if s_churn > 0:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps: required with s_churn > 0 (the churn per step is "
                                 "min(s_churn / num_inference_steps, sqrt(2) - 1), as in diffusers)")
            churn = min(s_churn / num_inference_steps, 2**0.5 - 1)
    return (churn, _check_real("s_tmin", s_tmin, finite=False), _check_real("s_tmax", s_tmax, finite=False),
            _check_real("s_noise", s_noise))


def euler_step(model_output, sample, sigma, sigma_next, *, prediction_type="epsilon", s_churn=0.0,
               num_inference_steps=None, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, noise=None, seed=None,
               generator=None, gamma=None):
    """One Euler step on Karras sigmas (diffusers' EulerDiscreteScheduler.step). Returns
    (prev, pred_x0).

    Churn as in diffusers: s_churn (>= 0) with num_inference_steps (the scheduler's
    len(sigmas) - 1, required when s_churn > 0) gives the per-step churn
    gamma = min(s_churn / num_inference_steps, sqrt(2) - 1), applied where
    s_tmin <= sigma <= s_tmax with noise scaled by s_noise (noise is drawn only when
    gamma > 0). `gamma` (the per-step churn itself, what earlier versions took) is accepted
    instead of s_churn for backward compatibility; pass at most one of them."""
    _tensor("sample", sample)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if (gamma is None and num_inference_steps is None and s_churn.__class__ is float and s_tmin.__class__ is float
            and s_tmax.__class__ is float and s_noise.__class__ is float and s_churn == 0.0
            and s_tmin == s_tmin and s_tmax == s_tmax and math.isfinite(s_noise)):
        churn = 0.0  # no churn, plain numbers (not NaN; s_noise finite): _euler_options in one test
    else:
        churn, s_tmin, s_tmax, s_noise = _euler_options(gamma, s_churn, num_inference_steps, s_tmin, s_tmax, s_noise)
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, churn > 0)

    def values():
        _sigma_checks(model_output, sample, sigma, sigma_next, noise)
        _sigma_positive("sigma", sigma)  # x0 and the derivative divide by it
        _sigma_nonneg("sigma_next", sigma_next)

    return call_checked(_EULER_STEP, (model_output, sample, sigma, sigma_next, noise, seed_t, prediction_type,
                                          churn, s_tmin, s_tmax, s_noise), values)


def heun_step(model_output, sample, sigma, sigma_next, *, prev_derivative=None, prev_sample=None,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0):
    """Heun's 2nd order method (diffusers' HeunDiscreteScheduler.step), one stage per call.

    First stage (no prev_*): Euler from sigma to sigma_next; returns (x_euler, derivative).
    Second stage: model_output evaluated at sigma_next on x_euler (passed as `sample`), with
    prev_derivative / prev_sample from the first stage; returns (x_next, derivative)."""
    _tensor("sample", sample)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if (prev_derivative is None) != (prev_sample is None):
        raise ValueError("prev_derivative/prev_sample: pass both (second stage) or neither (first stage)")
    clip_sample_range = _clip_range(clip_sample, clip_sample_range)
    sigma, sigma_next = _sigmas(sigma, sigma_next)

    def values():
        _sigma_checks(model_output, sample, sigma, sigma_next, None)
        if prev_derivative is not None:
            _like("prev_derivative", prev_derivative, sample)
            _like("prev_sample", prev_sample, sample)
            _sigma_nonneg("sigma", sigma)
            _sigma_positive("sigma_next", sigma_next)  # the second stage divides by sigma_next
        else:
            _sigma_positive("sigma", sigma)  # the first stage divides by sigma
            _sigma_nonneg("sigma_next", sigma_next)

    return call_checked(_HEUN_STEP, (model_output, sample, sigma, sigma_next, prev_derivative, prev_sample,
                                         prediction_type, bool(clip_sample), clip_sample_range), values)


def dpmpp_2m_step(model_output, sample, sigma, sigma_next, *, prev_x0=None, sigma_prev=None,
                  prediction_type="epsilon", algorithm_type="dpmsolver++", solver_type="midpoint",
                  flow_sigmas=False, noise=None, seed=None, generator=None):
    """One DPM-Solver++ multistep update (diffusers' DPMSolverMultistepScheduler). First
    order without prev_x0; second order (2M) with prev_x0 (the x0 returned by the previous
    step) and sigma_prev. "sde-dpmsolver++" adds noise. Returns (prev_sample, x0).

    flow_sigmas=True (use_flow_sigmas in diffusers: alpha_t = 1 - sigma): sigma, sigma_next
    and sigma_prev must lie in [0, 1]. Python numbers and CPU tensors are checked and raise
    ValueError; sigmas in device memory cannot be checked without a host sync, so there the
    rule is: a sample whose sigma, sigma_next or (second order) sigma_prev is outside [0, 1] or
    NaN gets NaN in both outputs; the other samples are unaffected. Both kernels (CPU and
    CUDA) apply that rule to every value that reaches them."""
    _tensor("sample", sample)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES + ("flow_prediction",))
    _check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    if (prev_x0 is None) != (sigma_prev is None):
        raise ValueError("prev_x0/sigma_prev: pass both (second order) or neither (first order)")
    order = 1 if prev_x0 is None else 2
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    sp = None if order == 1 else _per_sample_arg("sigma_prev", sigma_prev)

    def values():
        _sigma_checks(model_output, sample, sigma, sigma_next, noise)
        if order == 2:
            _like("prev_x0", prev_x0, sample)
            _per_sample("sigma_prev", sp, sample)
        if flow_sigmas:
            for name, value in (("sigma", sigma), ("sigma_next", sigma_next), ("sigma_prev", sp)):
                if value is not None:
                    _check_flow_sigma(name, value)
        else:  # Karras sigmas: log(sigma) and divisions by sigma
            _sigma_positive("sigma", sigma)
            _sigma_nonneg("sigma_next", sigma_next)
            if sp is not None:
                _sigma_positive("sigma_prev", sp)
        if sp is not None:
            _check_distinct(sp, sigma)

    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, algorithm_type == "sde-dpmsolver++")
    return call_checked(_DPMPP_2M_STEP, (model_output, sample, prev_x0, sp, sigma, sigma_next, noise, seed_t,
                                             prediction_type, algorithm_type, solver_type, order, bool(flow_sigmas)),
                        values)


def flow_match_step(model_output, sample, sigma, sigma_next, *, stochastic=False, noise=None, seed=None,
                    generator=None, return_x0=True):
    """One flow-matching Euler step (diffusers' FlowMatchEulerDiscreteScheduler.step):
    prev = sample + (sigma_next - sigma) v, or with stochastic=True
    prev = (1 - sigma_next) x0 + sigma_next z, x0 = sample - sigma v. Returns (prev, x0);
    with return_x0=False x0 is not written (an empty tensor comes back), saving a pass."""
    _tensor("sample", sample)
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, bool(stochastic))

    def values():
        _sigma_checks(model_output, sample, sigma, sigma_next, noise)
        _sigma_unit("sigma", sigma)
        _sigma_unit("sigma_next", sigma_next)

    return call_checked(_FLOW_MATCH_STEP, (model_output, sample, sigma, sigma_next, noise, seed_t,
                                               bool(stochastic), bool(return_x0)), values)


# ---- fake kernels and autograd --------------------------------------------------------------


# Arguments that may be a one-element CPU tensor whatever the device of the data.
_HOST_SCALARS = ("timesteps", "prev_timesteps", "sigma", "sigma_next", "sigma_prev", "seed", "grad")


def _fake(op_name, ref_name, outputs):
    """The fake (meta) kernel of an op: device checks as the real kernels make them, then the
    outputs. It also runs whenever one argument is on the meta device beside real tensors, so
    such a call raises instead of returning uninitialised memory."""
    names = [a.name for a in getattr(torch.ops.pretrain_kernels, op_name).default._schema.arguments]

    def kernel(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        ref = bound[ref_name]
        for name, t in bound.items():
            if not isinstance(t, torch.Tensor) or t is ref:
                continue
            host_ok = name in _HOST_SCALARS and t.device.type == "cpu" and t.numel() == 1
            torch._check(t.device == ref.device or host_ok,
                         lambda: f"{name}: expected a tensor on {ref.device} (that of {ref_name})"
                                 f"{' or a one-element CPU tensor' if name in _HOST_SCALARS else ''}, got {t.device}")
        torch._check(ref.dim() >= 1, lambda: f"{ref_name}: expected a batch dimension")
        return outputs(ref, bound)

    torch.library.register_fake(f"pretrain_kernels::{op_name}")(kernel)


def _like_out(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


for _name in ("ddpm_step", "ddim_step", "euler_step", "heun_step", "dpmpp_2m_step"):
    _fake(_name, "sample", lambda sample, a: (_like_out(sample), _like_out(sample)))
_fake("flow_match_step", "sample",
      lambda sample, a: (_like_out(sample), _like_out(sample) if a["return_x0"] else sample.new_empty((0,))))
_fake("add_noise", "x0", lambda x0, a: (_like_out(x0), _like_out(x0)))
_fake("diffusion_loss", "pred", lambda pred, a: pred.new_empty(
    (pred.shape[0],), dtype=torch.float64 if pred.dtype == torch.float64 else torch.float32))
_fake("diffusion_loss_backward", "pred", lambda pred, a: _like_out(pred))


# Autograd (see ops/_common.py): diffusion_loss differentiates through diffusion_loss_backward,
# which itself has no derivative.
class _DiffusionLoss(torch.autograd.Function):
    generate_vmap_rule = True
    forward_mode_name = "pk.diffusion_loss (pretrain_kernels::diffusion_loss)"

    @staticmethod
    def forward(pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type):
        return _OPS.diffusion_loss(pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type = inputs
        ctx.save_for_backward(pred, target, timesteps, alphas_cumprod)
        ctx.options = (weighting, gamma, prediction_type)

    @staticmethod
    def backward(ctx, grad):
        pred, target, timesteps, alphas_cumprod = ctx.saved_tensors
        weighting, gamma, prediction_type = ctx.options
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_pred = g_target = None
        if need_pred or need_target:
            g = _loss_bwd(grad, pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type)
            g_pred = g if need_pred else None
            g_target = -g if need_target else None
        return g_pred, g_target, None, None, None, None, None


register_autograd_function("pretrain_kernels::diffusion_loss", _DiffusionLoss, public="pk.diffusion_loss")
_loss_bwd = not_differentiable("pretrain_kernels::diffusion_loss_backward", "pk.diffusion_loss")
