"""Plain-PyTorch references the kernels are tested against (float64 where it matters).

One section per op family; each function is written for clarity, not speed."""
from __future__ import annotations

import torch

# ---- masking -------------------------------------------------------------------------------


def mlm_eligible(input_ids, vocab_size, special_ids=(), attention_mask=None):
    """Positions the masking ops may select: attended, inside the vocab, not special."""
    elig = (input_ids >= 0) & (input_ids < vocab_size)
    for s in special_ids:
        elig &= input_ids != s
    if attention_mask is not None:
        elig &= attention_mask.bool()
    return elig


# ---- diffusion -----------------------------------------------------------------------------
# Written from the papers' formulas (and diffusers' discretisations), in float64.
import math  # noqa: E402


def diffusion_betas(kind, n, beta_start=1e-4, beta_end=0.02):
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        return torch.tensor([min(1.0 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=torch.float64)
    if kind == "sigmoid":
        x = torch.linspace(-6.0, 6.0, n, dtype=torch.float64)
        return beta_start + (beta_end - beta_start) / (1.0 + torch.exp(-x))
    raise ValueError(kind)


def diffusion_alphas_cumprod(kind, n, beta_start=1e-4, beta_end=0.02, rescale=False):
    abar = torch.cumprod(1.0 - diffusion_betas(kind, n, beta_start, beta_end), 0)
    if rescale:  # Lin et al. 2023: shift and scale sqrt(abar) so that it ends at 0
        s = abar.sqrt()
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        abar = s**2
    return abar


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def diffusion_add_noise(x0, noise, t, acp, target):
    x0, noise = x0.double(), noise.double()
    if target == "flow":
        s = _bcast(torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0]), x0)
        return (1 - s) * x0 + s * noise, noise - x0
    a = _bcast(acp.double()[torch.as_tensor(t).long().expand(x0.shape[0])], x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    tgt = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[target]
    return xt, tgt


def diffusion_loss(pred, target, t=None, acp=None, weighting="none", gamma=5.0, prediction_type="epsilon",
                   reduction="mean"):
    per = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    if weighting == "min_snr":
        a = acp.double()[torch.as_tensor(t).long().expand(pred.shape[0])]
        snr = a / (1 - a)
        m = torch.minimum(snr, torch.full_like(snr, gamma))
        if prediction_type == "epsilon":
            w = torch.where(snr == 0, torch.ones_like(snr), m / snr)
        elif prediction_type == "v_prediction":
            w = m / (snr + 1)
        else:
            w = m
        per = per * w
    return per.mean() if reduction == "mean" else per
