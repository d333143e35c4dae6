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
"""
from __future__ import annotations

import math
import numbers

import torch

from ._common import is_compiling, resolve_seed

_OPS = torch.ops.pretrain_kernels

SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TARGETS = ("epsilon", "v_prediction", "sample", "flow")


# ---- schedules ------------------------------------------------------------------------------


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_pos_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _check_real(name, value, *, low=None, low_open=False, high=None, finite=True):
    """A Python number as a float: never NaN, finite unless finite=False, and >= low (> low
    with low_open) / <= high where given. The messages match the ops' TORCH_CHECKs."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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
    if rescale_zero_terminal_snr:
        if betas.numel() < 2:
            raise ValueError("rescale_zero_terminal_snr: needs at least 2 timesteps")
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


def _per_sample(name, value, *, integral=False):
    """A per-sample parameter as a tensor: tensors pass (one value or one per sample),
    Python numbers become one-element CPU tensors (read by the op without a device copy)."""
    if isinstance(value, torch.Tensor):
        if integral and (value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()):
            raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a tensor or a number, got {type(value).__name__}")
    if integral:
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise ValueError(f"{name}: expected an integer timestep, got {value}")
        return _scalar_tensor(int(value), torch.int64)
    return _scalar_tensor(float(value), torch.float64)


def _acp(alphas_cumprod, device):
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise TypeError(f"alphas_cumprod: expected a tensor (see pk.noise_schedule), got {type(alphas_cumprod).__name__}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod: expected a non-empty 1-D table, got shape {tuple(alphas_cumprod.shape)}")
    if alphas_cumprod.dtype not in (torch.float64, torch.float32):
        raise TypeError(f"alphas_cumprod: expected float64 (or float32), got {alphas_cumprod.dtype}")
    if alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod: expected a tensor on {device} (the sample's device), got {alphas_cumprod.device}")
    return alphas_cumprod


def _clip_range(clip_sample, clip_sample_range):
    """clip_sample_range as a float; checked (finite, > 0) where clipping is on, as the ops do."""
    if not clip_sample:
        return float(clip_sample_range)
    return _check_real("clip_sample_range", clip_sample_range, low=0.0, low_open=True)


def _check_flow_sigma(name, value):
    """Flow sigmas lie in [0, 1]: checked here for Python numbers and CPU tensors (the op checks
    them again). Values in device memory reach the kernels, which give NaN for a sample whose
    sigma is outside [0, 1] (see dpmpp_2m_step)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and not is_compiling() and value.numel():
            bad = ~((value >= 0) & (value <= 1))
            if bool(bad.any()):
                i = int(bad.reshape(-1).nonzero()[0, 0])
                where = f" at sample {i}" if value.numel() > 1 else ""
                raise ValueError(f"{name}: expected values in [0, 1] with flow_sigmas=True, got "
                                 f"{value.reshape(-1)[i].item()}{where}")
        return
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected values in [0, 1] with flow_sigmas=True, got {value}")


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
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if target == "flow":
        t = _per_sample("timesteps", timesteps)
        acp = None if alphas_cumprod is None else _acp(alphas_cumprod, x0.device)
    else:
        if alphas_cumprod is None:
            raise ValueError(f"alphas_cumprod: required for target {target!r} (see pk.noise_schedule)")
        t = _per_sample("timesteps", timesteps, integral=True)
        acp = _acp(alphas_cumprod, x0.device)
    return _OPS.add_noise(x0, noise, t, acp, target)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps=None, alphas_cumprod=None, *,
                   weighting: str = "none", gamma: float = 5.0, prediction_type: str = "epsilon",
                   reduction: str = "mean"):
    """Fused (weighted) MSE: loss_b = w_b * mean over a sample of (pred - target)^2, then the
    mean over the batch (reduction="mean") or the per-sample losses [B] (reduction="none"),
    in float32 (float64 for float64 inputs).

    weighting "none": w = 1. "min_snr": Min-SNR-gamma (Hang et al. 2023) with
    snr = abar_t / (1 - abar_t): min(snr, gamma) / snr for epsilon prediction (1 where
    snr = 0), min(snr, gamma) / (snr + 1) for v_prediction, min(snr, gamma) for sample.
    Differentiable in pred and target; the backward is one fused pass.
    """
    pred = _tensor("pred", pred)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    _check_choice("weighting", weighting, ("none", "min_snr"))
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _check_choice("reduction", reduction, ("mean", "none"))
    gamma = _check_real("gamma", gamma, low=0.0, low_open=True)
    t = acp = None
    if weighting != "none":
        if timesteps is None or alphas_cumprod is None:
            raise ValueError(f"timesteps/alphas_cumprod: required for weighting {weighting!r}")
        t = _per_sample("timesteps", timesteps, integral=True)
        acp = _acp(alphas_cumprod, pred.device)
    per_sample = _OPS.diffusion_loss(pred, target, t, acp, weighting, gamma, prediction_type)
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
        u = 1 - u - _check_real("mode_scale", mode_scale) * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if shift != 1.0:
        u = shift_sigmas(u, shift)
    return u if device is None else u.to(device)


def shift_sigmas(sigmas, shift: float):
    """The SD3 timestep shift s -> shift s / (1 + (shift - 1) s) (tensor or number)."""
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
    acp = _acp(alphas_cumprod, sample.device)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, True)
    return _OPS.ddpm_step(model_output, sample, _per_sample("timesteps", timesteps, integral=True),
                          _per_sample("prev_timesteps", prev_timesteps, integral=True), acp, noise, seed_t,
                          prediction_type, variance_type, bool(clip_sample), clip_sample_range)


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
    acp = _acp(alphas_cumprod, sample.device)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, eta > 0)
    return _OPS.ddim_step(model_output, sample, _per_sample("timesteps", timesteps, integral=True),
                          _per_sample("prev_timesteps", prev_timesteps, integral=True), acp, noise, seed_t,
                          final_alpha_cumprod, eta, prediction_type, bool(clip_sample), clip_sample_range,
                          bool(use_clipped_model_output))


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
    s_tmin = _check_real("s_tmin", s_tmin, finite=False)
    s_tmax = _check_real("s_tmax", s_tmax, finite=False)
    s_noise = _check_real("s_noise", s_noise)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, churn > 0)
    return _OPS.euler_step(model_output, sample, _per_sample("sigma", sigma), _per_sample("sigma_next", sigma_next),
                           noise, seed_t, prediction_type, churn, s_tmin, s_tmax, s_noise)


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
    return _OPS.heun_step(model_output, sample, _per_sample("sigma", sigma), _per_sample("sigma_next", sigma_next),
                          prev_derivative, prev_sample, prediction_type, bool(clip_sample), clip_sample_range)


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
    if flow_sigmas:
        for name, value in (("sigma", sigma), ("sigma_next", sigma_next), ("sigma_prev", sigma_prev)):
            _check_flow_sigma(name, value)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, algorithm_type == "sde-dpmsolver++")
    sp = None if sigma_prev is None else _per_sample("sigma_prev", sigma_prev)
    return _OPS.dpmpp_2m_step(model_output, sample, prev_x0, sp, _per_sample("sigma", sigma),
                              _per_sample("sigma_next", sigma_next), noise, seed_t, prediction_type, algorithm_type,
                              solver_type, order, bool(flow_sigmas))


def flow_match_step(model_output, sample, sigma, sigma_next, *, stochastic=False, noise=None, seed=None,
                    generator=None, return_x0=True):
    """One flow-matching Euler step (diffusers' FlowMatchEulerDiscreteScheduler.step):
    prev = sample + (sigma_next - sigma) v, or with stochastic=True
    prev = (1 - sigma_next) x0 + sigma_next z, x0 = sample - sigma v. Returns (prev, x0);
    with return_x0=False x0 is not written (an empty tensor comes back), saving a pass."""
    _tensor("sample", sample)
    noise, seed_t = _noise_or_seed(noise, seed, generator, sample.device, bool(stochastic))
    return _OPS.flow_match_step(model_output, sample, _per_sample("sigma", sigma),
                                _per_sample("sigma_next", sigma_next), noise, seed_t, bool(stochastic),
                                bool(return_x0))


# ---- fake kernels and autograd --------------------------------------------------------------


def _fake_pair(model_output, sample, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


def _fake_add_noise(x0, noise, timesteps, alphas_cumprod, target):
    return torch.empty_like(x0), torch.empty_like(x0)


def _fake_loss(pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type):
    torch._check(pred.dim() >= 1, lambda: "pred: expected a batch dimension")
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return pred.new_empty((pred.shape[0],), dtype=dtype)


def _fake_loss_backward(grad, pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type):
    return torch.empty_like(pred)


def _fake_flow(model_output, sample, sigma, sigma_next, noise, seed, stochastic, return_x0):
    return torch.empty_like(sample), (torch.empty_like(sample) if return_x0 else sample.new_empty((0,)))


for _name in ("ddpm_step", "ddim_step", "euler_step", "heun_step", "dpmpp_2m_step"):
    torch.library.register_fake(f"pretrain_kernels::{_name}")(_fake_pair)
torch.library.register_fake("pretrain_kernels::flow_match_step")(_fake_flow)
torch.library.register_fake("pretrain_kernels::add_noise")(_fake_add_noise)
torch.library.register_fake("pretrain_kernels::diffusion_loss")(_fake_loss)
torch.library.register_fake("pretrain_kernels::diffusion_loss_backward")(_fake_loss_backward)


def _loss_setup_context(ctx, inputs, output):
    pred, target, timesteps, alphas_cumprod, weighting, gamma, prediction_type = inputs
    ctx.save_for_backward(pred, target, timesteps, alphas_cumprod)
    ctx.options = (weighting, gamma, prediction_type)


def _loss_backward(ctx, grad):
    pred, target, timesteps, alphas_cumprod = ctx.saved_tensors
    weighting, gamma, prediction_type = ctx.options
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_pred = g_target = None
    if need_pred or need_target:
        g = _OPS.diffusion_loss_backward(grad, pred, target, timesteps, alphas_cumprod, weighting, gamma,
                                         prediction_type)
        g_pred = g if need_pred else None
        g_target = -g if need_target else None
    return g_pred, g_target, None, None, None, None, None


torch.library.register_autograd("pretrain_kernels::diffusion_loss", _loss_backward, setup_context=_loss_setup_context)
