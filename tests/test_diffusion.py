"""Denoising ops: schedules, add_noise, diffusion_loss, timestep samplers and the fused solver
steps, against diffusers (test dependency) and the float64 references in tests/reference.py.
Only the tests that compare with diffusers need it: they take the `diffusers` fixture and skip
alone when it is missing; the references, opcheck, compile and bad-input tests always run."""
import math

import numpy as np
import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.ops import diffusion as D

import reference as ref

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True


@pytest.fixture(scope="module")
def diffusers():
    """The diffusers module; a test that takes this fixture skips (alone) without it."""
    try:
        import diffusers
    except ImportError as e:  # missing, or not importable with this torch
        pytest.skip(f"diffusers is not importable: {e}")
    return diffusers

OPS = torch.ops.pretrain_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float32).to(device=device, dtype=dtype)


# ---- schedules ------------------------------------------------------------------------------

KINDS = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_schedule(kind, rescale):
    bs, be = (0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02)
    acp = pk.noise_schedule(kind, 1000, bs, be, rescale_zero_terminal_snr=rescale)
    assert acp.dtype == torch.float64 and acp.shape == (1000,)
    # float64 reference of the same formulas: relative 1e-12
    want = ref.diffusion_alphas_cumprod(kind, 1000, bs, be, rescale)
    assert rel(acp, want) < 1e-12
    assert bool(((acp[1:] <= acp[:-1])).all())
    if rescale:
        assert acp[-1].item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_noise_schedule_matches_diffusers(diffusers, kind, rescale):
    bs, be = (0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02)
    acp = pk.noise_schedule(kind, 1000, bs, be, rescale_zero_terminal_snr=rescale)
    # diffusers builds the same table in float32
    d = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=bs, beta_end=be, rescale_betas_zero_snr=rescale)
    assert rel(acp, d.alphas_cumprod) < 2e-6
    if rescale:
        # diffusers' own rescale function, run in float64, agrees to 1e-12
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
        betas = rescale_zero_terminal_snr(D.schedule_betas(kind, 1000, bs, be))
        assert rel(acp, torch.cumprod(1 - betas, 0)) < 1e-12


def test_noise_schedule_bad_args():
    with pytest.raises(ValueError, match="kind"):
        pk.noise_schedule("cosine")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        pk.noise_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta_start/beta_end"):
        pk.noise_schedule("linear", 10, 0.5, 1.5)


# ---- add_noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample", "flow"])
def test_add_noise(device, target, dtype):
    B = 7
    x0 = randn(B, 3, 9, 5, seed=1, device=device, dtype=dtype)
    noise = randn(B, 3, 9, 5, seed=2, device=device, dtype=dtype)
    acp = pk.noise_schedule("scaled_linear", 1000, 0.00085, 0.012)
    if target == "flow":
        t = torch.rand(B, generator=gen(3)).to(device)
        t[0], t[1] = 0.0, 1.0
    else:
        t = torch.randint(0, 1000, (B,), generator=gen(3)).to(device)
        t[0], t[1] = 0, 999
    xt, tgt = pk.add_noise(x0, noise, t, acp.to(device) if target != "flow" else None, target=target)
    assert xt.dtype == dtype and tgt.dtype == dtype and xt.shape == x0.shape
    want_xt, want_tgt = ref.diffusion_add_noise(x0.cpu(), noise.cpu(), t.cpu(), acp, target)
    assert rel(xt, want_xt) < TOL[dtype]
    assert rel(tgt, want_tgt) < TOL[dtype]


@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
def test_add_noise_matches_diffusers(diffusers, device, target):
    B = 7
    x0, noise = randn(B, 3, 9, 5, seed=1, device=device), randn(B, 3, 9, 5, seed=2, device=device)
    t = torch.randint(0, 1000, (B,), generator=gen(3))
    t[0], t[1] = 0, 999
    acp = pk.noise_schedule("scaled_linear", 1000, 0.00085, 0.012)
    xt, tgt = pk.add_noise(x0, noise, t.to(device), acp.to(device), target=target)
    d = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert rel(xt, d.add_noise(x0.cpu(), noise.cpu(), t)) < 1e-5
    if target == "v_prediction":
        assert rel(tgt, d.get_velocity(x0.cpu(), noise.cpu(), t)) < 1e-5


def test_add_noise_half_keeps_small_noise_scales():
    # At t = 0, sqrt(1 - abar) = 0.01: casting abar to fp16 first (as diffusers does) rounds
    # abar to 1 and drops the noise; the fused op keeps it.
    acp = pk.noise_schedule("linear")
    x0 = randn(4, 64, seed=4, dtype=torch.float16)
    noise = randn(4, 64, seed=5, dtype=torch.float16)
    t = torch.zeros(4, dtype=torch.long)
    xt, v = pk.add_noise(x0, noise, t, acp, target="v_prediction")
    want_xt, want_v = ref.diffusion_add_noise(x0, noise, t, acp, "v_prediction")
    assert rel(xt, want_xt) < 1e-3 and rel(v, want_v) < 1e-3
    naive = acp.to(torch.float16)[t].reshape(-1, 1)
    assert bool((naive == 1).all())  # the bug the op avoids
    assert rel(xt - x0, want_xt - x0.double()) < 0.05


def test_add_noise_scalar_timestep_and_noncontiguous(device):
    acp = pk.noise_schedule("linear").to(device)
    x0 = randn(6, 10, 8, seed=6, device=device).transpose(1, 2)
    noise = randn(6, 8, 10, seed=7, device=device)
    xt, tgt = pk.add_noise(x0, noise, 500, acp, target="v_prediction")
    want_xt, want_tgt = ref.diffusion_add_noise(x0.cpu(), noise.cpu(), torch.full((6,), 500), acp.cpu(), "v_prediction")
    assert rel(xt, want_xt) < 1e-6 and rel(tgt, want_tgt) < 1e-6
    e0, e1 = pk.add_noise(x0[:0], noise[:0], torch.zeros(0, dtype=torch.long, device=device), acp)
    assert e0.shape == (0, 8, 10) and e1.shape == (0, 8, 10)


# ---- diffusion_loss -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighting,prediction_type", [("none", "epsilon"), ("min_snr", "epsilon"),
                                                       ("min_snr", "v_prediction"), ("min_snr", "sample")])
def test_diffusion_loss(device, weighting, prediction_type, dtype):
    B = 9
    acp = pk.noise_schedule("linear", rescale_zero_terminal_snr=True)
    pred = randn(B, 4, 17, seed=8, device=device, dtype=dtype).requires_grad_()
    target = randn(B, 4, 17, seed=9, device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, 1000, (B,), generator=gen(10))
    t[0] = 999  # zero SNR: epsilon weight 1
    t = t.to(device)
    loss = pk.diffusion_loss(pred, target, t, acp.to(device), weighting=weighting, gamma=5.0,
                             prediction_type=prediction_type)
    p64 = pred.detach().cpu().double().requires_grad_()
    y64 = target.detach().cpu().double().requires_grad_()
    want = ref.diffusion_loss(p64, y64, t.cpu(), acp, weighting, 5.0, prediction_type)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    loss.backward()
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else (5e-3 if dtype == torch.float16 else 3e-2)
    assert rel(pred.grad, p64.grad) < tol and rel(target.grad, y64.grad) < tol
    per = pk.diffusion_loss(pred.detach(), target.detach(), t, acp.to(device), weighting=weighting,
                            prediction_type=prediction_type, reduction="none")
    assert per.shape == (B,)
    assert rel(per, ref.diffusion_loss(p64.detach(), y64.detach(), t.cpu(), acp, weighting, 5.0, prediction_type,
                                       reduction="none")) < 1e-5


def test_diffusion_loss_gradcheck():
    acp = pk.noise_schedule("linear")
    t = torch.tensor([0, 400, 999])
    pred = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen(11), requires_grad=True)
    target = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen(12), requires_grad=True)
    f = lambda p, y: pk.diffusion_loss(p, y, t, acp, weighting="min_snr", prediction_type="v_prediction",  # noqa: E731
                                       reduction="none")
    assert torch.autograd.gradcheck(f, (pred, target))
    g = lambda p, y: pk.diffusion_loss(p, y)  # noqa: E731
    assert torch.autograd.gradcheck(g, (pred, target))


def test_diffusion_loss_long_rows_deterministic():
    # Several chunks per sample: the sum is split and recombined in a fixed order.
    p = randn(3, 5000, seed=13)
    y = randn(3, 5000, seed=14)
    a = pk.diffusion_loss(p, y, reduction="none")
    torch.set_num_threads(1)
    b = pk.diffusion_loss(p, y, reduction="none")
    assert torch.equal(a, b)
    assert rel(a, ((p.double() - y.double()) ** 2).mean(1)) < 1e-6


# ---- timestep samplers ----------------------------------------------------------------------


def test_sample_timesteps_uniform():
    t = pk.sample_timesteps(20000, kind="uniform", num_train_timesteps=10, generator=gen(15))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 9
    counts = torch.bincount(t, minlength=10).double()
    chi2 = (((counts - 2000) ** 2) / 2000).sum().item()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


@pytest.mark.parametrize("kind", ["logit_normal", "mode"])
def test_sample_timesteps_sd3(diffusers, kind):
    from diffusers.training_utils import compute_density_for_timestep_sampling
    u = pk.sample_timesteps(64, kind=kind, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=gen(16))
    want = compute_density_for_timestep_sampling(kind, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                 generator=gen(16))
    assert torch.allclose(u, want, rtol=0, atol=1e-7)
    shifted = pk.sample_timesteps(64, kind=kind, logit_mean=0.3, logit_std=1.2, shift=3.0, generator=gen(16))
    assert torch.allclose(shifted, 3.0 * want / (1 + 2.0 * want), atol=1e-6)
    assert bool(((shifted >= 0) & (shifted <= 1)).all())


def test_sample_timesteps_bad_args():
    with pytest.raises(ValueError, match="kind"):
        pk.sample_timesteps(4, kind="beta")
    with pytest.raises(ValueError, match="batch_size"):
        pk.sample_timesteps(0)


# ---- single steps against diffusers ----------------------------------------------------------


def _acp64(sched, device):
    return sched.alphas_cumprod.double().to(device)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_step(diffusers, device, prediction_type, variance_type):
    d = diffusers.DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type,
                                beta_schedule="squaredcos_cap_v2", clip_sample=prediction_type == "sample")
    d.set_timesteps(20, device=None)
    x, mo = randn(3, 4, 6, 6, seed=17), randn(3, 4, 6, 6, seed=18)
    for t in [int(d.timesteps[0]), int(d.timesteps[7]), int(d.timesteps[-1])]:
        out = d.step(mo, t, x, generator=gen(19))
        noise = torch.randn(x.shape, generator=gen(19))
        prev = int(d.previous_timestep(t))
        got, x0 = pk.ddpm_step(mo.to(device), x.to(device), t, prev, _acp64(d, device), noise=noise.to(device),
                               prediction_type=prediction_type, variance_type=variance_type,
                               clip_sample=prediction_type == "sample")
        assert rel(got, out.prev_sample) < 1e-5
        assert rel(x0, out.pred_original_sample) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_step_per_sample_timesteps(diffusers, device, dtype):
    # Reference: diffusers' step on float64 tables and inputs (its float32 tables lose
    # sqrt(1 - abar) near t = 0, the error the op avoids).
    d = diffusers.DDPMScheduler(clip_sample=True)  # no set_timesteps: prev_t = t - 1
    d.alphas_cumprod = d.alphas_cumprod.double()
    d.one = d.one.double()
    x, mo = randn(5, 3, 8, seed=20), randn(5, 3, 8, seed=21)
    t = torch.tensor([999, 500, 10, 1, 0])
    noise = torch.cat([torch.randn((1, 3, 8), generator=gen(100 + b), dtype=torch.float64) for b in range(5)])
    got, x0 = pk.ddpm_step(mo.to(device, dtype), x.to(device, dtype), t.to(device), (t - 1).to(device),
                           _acp64(d, device), noise=noise.to(device, dtype))
    for b in range(5):
        want = d.step(mo[b:b + 1].double(), int(t[b]), x[b:b + 1].double(), generator=gen(100 + b))
        assert rel(got[b:b + 1], want.prev_sample) < TOL[dtype]
        assert rel(x0[b:b + 1], want.pred_original_sample) < TOL[dtype]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip,use_clipped", [(0.0, False, False), (0.0, True, True), (0.7, True, False)])
def test_ddim_step(diffusers, device, prediction_type, eta, clip, use_clipped):
    d = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip, set_alpha_to_one=False,
                                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    d.set_timesteps(25)
    ratio = 1000 // 25
    x, mo = randn(4, 3, 7, 5, seed=23), randn(4, 3, 7, 5, seed=24) * 1.5
    noise = randn(4, 3, 7, 5, seed=25)
    for t in [int(d.timesteps[0]), int(d.timesteps[12]), int(d.timesteps[-1])]:
        out = d.step(mo, t, x, eta=eta, use_clipped_model_output=use_clipped,
                     variance_noise=noise if eta > 0 else None)
        got, x0 = pk.ddim_step(mo.to(device), x.to(device), t, t - ratio, _acp64(d, device), eta=eta,
                               final_alpha_cumprod=float(d.final_alpha_cumprod), prediction_type=prediction_type,
                               clip_sample=clip, use_clipped_model_output=use_clipped,
                               noise=noise.to(device) if eta > 0 else None)
        assert rel(got, out.prev_sample) < 1e-5
        assert rel(x0, out.pred_original_sample) < 1e-5


def _assert_matches_with_infinities(got, want, tol):
    """Finite exactly where `want` is, equal (signed infinities) where it is not, close elsewhere."""
    got, want = got.cpu().double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.equal(got[~fin].nan_to_num(), want[~fin].nan_to_num())
    assert rel(got[fin], want[fin]) < tol


ZERO_SNR_DDIM = [(True, False, 0.0), (True, True, 0.7), (False, False, 0.0), (False, True, 0.0), (True, False, 1.0)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip,use_clipped,eta", ZERO_SNR_DDIM)
def test_ddim_step_zero_terminal_snr(diffusers, device, prediction_type, clip, use_clipped, eta):
    # alphas_cumprod[999] == 0: epsilon prediction divides by sqrt(0) for x0, which clipping
    # brings back to [-1, 1] in diffusers; the kernel gets the same finite sample (it used to
    # compute inf - inf), and the same infinities without clipping.
    d = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                prediction_type=prediction_type, clip_sample=clip)
    d.set_timesteps(10)
    assert float(d.alphas_cumprod[999]) == 0.0 and int(d.timesteps[0]) == 999
    acp = pk.noise_schedule("linear", rescale_zero_terminal_snr=True)
    d.alphas_cumprod = acp.clone()  # diffusers in float64 (at eta = 1 its float32 sqrt(1 - a - std^2) is noise)
    d.final_alpha_cumprod = d.final_alpha_cumprod.double()
    seed = 60 + int(eta * 10)
    x, mo, noise = randn(3, 4, 5, seed=seed), randn(3, 4, 5, seed=seed + 1) * 2, randn(3, 4, 5, seed=seed + 2)
    for t in (999, int(d.timesteps[1])):
        out = d.step(mo.double(), t, x.double(), eta=eta, use_clipped_model_output=use_clipped,
                     variance_noise=noise.double() if eta else None)
        got, x0 = pk.ddim_step(mo.to(device), x.to(device), t, t - 100, acp.to(device), eta=eta,
                               prediction_type=prediction_type, clip_sample=clip,
                               use_clipped_model_output=use_clipped, noise=noise.to(device) if eta else None)
        if clip or prediction_type != "epsilon":
            assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(x0).all())
        _assert_matches_with_infinities(got, out.prev_sample, 1e-5)
        _assert_matches_with_infinities(x0, out.pred_original_sample, 1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type,clip", [("fixed_small", True), ("fixed_large", True), ("fixed_small", False)])
def test_ddpm_step_zero_terminal_snr(diffusers, device, prediction_type, variance_type, clip):
    d = diffusers.DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip)
    d.set_timesteps(10)
    acp = pk.noise_schedule("linear", rescale_zero_terminal_snr=True)
    x, mo = randn(3, 4, 5, seed=70), randn(3, 4, 5, seed=71) * 2
    out = d.step(mo, 999, x, generator=gen(72))
    noise = torch.randn(x.shape, generator=gen(72))
    got, x0 = pk.ddpm_step(mo.to(device), x.to(device), 999, int(d.previous_timestep(999)), acp.to(device),
                           prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip,
                           noise=noise.to(device))
    if clip or prediction_type != "epsilon":
        assert bool(torch.isfinite(got).all())
    _assert_matches_with_infinities(got, out.prev_sample, 1e-5)
    _assert_matches_with_infinities(x0, out.pred_original_sample, 1e-5)


@pytest.mark.parametrize("name,kwargs", [
    ("DDIMScheduler", dict()), ("EulerDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict()), ("DPMSolverMultistepScheduler", dict(prediction_type="v_prediction"))])
def test_scheduler_first_steps_zero_terminal_snr(diffusers, name, kwargs):
    # The first steps of a trailing zero-SNR schedule (t = 999 first) through the scheduler
    # classes: finite and equal to diffusers.
    theirs = getattr(diffusers, name)(rescale_betas_zero_snr=True, timestep_spacing="trailing", **kwargs)
    ours = getattr(pk.schedulers, name).from_config(theirs.config)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    a = randn(2, 3, 6, seed=73) * float(getattr(theirs, "init_noise_sigma", 1.0))
    b = a.clone()
    for t, t2 in list(zip(theirs.timesteps, ours.timesteps))[:3]:
        ia = theirs.scale_model_input(a, t) if hasattr(theirs, "scale_model_input") else a
        a = theirs.step(_fake_model(ia, t), t, a).prev_sample
        b = ours.step(_fake_model(ours.scale_model_input(b, t2), t2), t2, b).prev_sample
        assert bool(torch.isfinite(b).all())
        assert rel(b, a) < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_euler_step(diffusers, device, prediction_type, churn):
    d = diffusers.EulerDiscreteScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                         beta_start=0.00085, beta_end=0.012)
    d.set_timesteps(30)
    x, mo = randn(2, 4, 8, 8, seed=26) * 5, randn(2, 4, 8, 8, seed=27)
    for i in [0, 13, 29]:
        d._step_index = i
        out = d.step(mo, d.timesteps[i], x, s_churn=churn, s_tmin=0.5, s_tmax=20.0, generator=gen(28))
        gamma = min(churn / (len(d.sigmas) - 1), 2**0.5 - 1)
        noise = torch.randn(x.shape, generator=gen(28)) if gamma > 0 and 0.5 <= d.sigmas[i] <= 20 else None
        got, x0 = pk.euler_step(mo.to(device), x.to(device), d.sigmas[i], d.sigmas[i + 1],
                                prediction_type=prediction_type, s_churn=churn, num_inference_steps=len(d.sigmas) - 1,
                                s_tmin=0.5, s_tmax=20.0, noise=None if noise is None else noise.to(device),
                                seed=None if noise is not None or gamma == 0 else 0)
        assert rel(got, out.prev_sample) < 1e-5
        assert rel(x0, out.pred_original_sample) < 1e-5
        if churn:  # `gamma`, the per-step churn, is the backward-compatible spelling
            again, _ = pk.euler_step(mo.to(device), x.to(device), d.sigmas[i], d.sigmas[i + 1],
                                     prediction_type=prediction_type, gamma=gamma, s_tmin=0.5, s_tmax=20.0,
                                     noise=None if noise is None else noise.to(device),
                                     seed=None if noise is not None else 0)
            assert torch.equal(again, got)


def test_euler_churn_arguments():
    # Messages name the argument the caller passed: s_churn / gamma in the wrapper,
    # churn_gamma in the raw op.
    x, mo = randn(2, 3, seed=90), randn(2, 3, seed=91)
    with pytest.raises(ValueError, match="s_churn: expected a finite value >= 0, got -1"):
        pk.euler_step(mo, x, 2.0, 1.0, s_churn=-1.0, num_inference_steps=10)
    with pytest.raises(ValueError, match="s_churn: expected a finite value >= 0, got inf"):
        pk.euler_step(mo, x, 2.0, 1.0, s_churn=math.inf, num_inference_steps=10)
    with pytest.raises(ValueError, match="gamma: expected a finite value >= 0, got nan"):
        pk.euler_step(mo, x, 2.0, 1.0, gamma=math.nan)
    with pytest.raises(ValueError, match="num_inference_steps: required with s_churn > 0"):
        pk.euler_step(mo, x, 2.0, 1.0, s_churn=1.0)
    with pytest.raises(ValueError, match="num_inference_steps: expected a positive int"):
        pk.euler_step(mo, x, 2.0, 1.0, s_churn=1.0, num_inference_steps=0)
    with pytest.raises(ValueError, match="gamma: .*not both"):
        pk.euler_step(mo, x, 2.0, 1.0, s_churn=1.0, num_inference_steps=4, gamma=0.1)
    with pytest.raises(RuntimeError, match="churn_gamma: expected a finite value >= 0, got -0.5"):
        OPS.euler_step(mo, x, torch.tensor(2.0), torch.tensor(1.0), None, torch.tensor([1]), "epsilon", -0.5, 0.0,
                       math.inf, 1.0)
    # diffusers' clamp: the churn per step is at most sqrt(2) - 1
    a, _ = pk.euler_step(mo, x, 2.0, 1.0, s_churn=100.0, num_inference_steps=10, seed=3)
    b, _ = pk.euler_step(mo, x, 2.0, 1.0, gamma=2**0.5 - 1, seed=3)
    assert torch.equal(a, b)


def _fake_model(x, t):
    """A smooth deterministic stand-in for a denoiser."""
    return torch.tanh(0.6 * x + 0.0007 * float(t)) + 0.1 * torch.sin(x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heun_loop(diffusers, device, prediction_type):
    d = diffusers.HeunDiscreteScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    d.set_timesteps(10)
    x = randn(2, 3, 8, 8, seed=29) * d.init_noise_sigma
    a = x.clone()
    for t in d.timesteps:
        a = d.step(_fake_model(d.scale_model_input(a, t), t), t, a).prev_sample
    sig = torch.cat([d.sigmas[:1], d.sigmas[1::2]])
    ts = d.timesteps[0::2]
    b = x.to(device)
    for i in range(len(ts)):
        s, sn = sig[i], sig[i + 1]
        mo = _fake_model(b / (s**2 + 1) ** 0.5, ts[i])
        x1, deriv = pk.heun_step(mo, b, s, sn, prediction_type=prediction_type)
        if float(sn) == 0.0:
            b = x1
            break
        mo2 = _fake_model(x1 / (sn**2 + 1) ** 0.5, ts[i + 1])
        b, _ = pk.heun_step(mo2, x1, s, sn, prev_derivative=deriv, prev_sample=b, prediction_type=prediction_type)
    assert rel(b, a) < 1e-4


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_match_step(diffusers, device, stochastic):
    d = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    d.set_timesteps(4)
    x, v = randn(3, 16, 5, seed=30), randn(3, 16, 5, seed=31)
    for i in range(4):
        d._step_index = i
        out = d.step(v, d.timesteps[i], x, generator=gen(32))
        noise = torch.randn(x.shape, generator=gen(32)) if stochastic else None
        got, x0 = pk.flow_match_step(v.to(device), x.to(device), d.sigmas[i], d.sigmas[i + 1], stochastic=stochastic,
                                     noise=None if noise is None else noise.to(device))
        assert rel(got, out.prev_sample) < 1e-5
        assert rel(x0, x - d.sigmas[i] * v) < 1e-6
        only, empty = pk.flow_match_step(v.to(device), x.to(device), d.sigmas[i], d.sigmas[i + 1],
                                         stochastic=stochastic, noise=None if noise is None else noise.to(device),
                                         return_x0=False)
        assert torch.equal(only, got) and empty.numel() == 0


@pytest.mark.parametrize("algorithm_type,solver_type,prediction_type", [
    ("dpmsolver++", "midpoint", "epsilon"), ("dpmsolver++", "heun", "v_prediction"),
    ("dpmsolver++", "midpoint", "sample"), ("sde-dpmsolver++", "midpoint", "epsilon"),
    ("sde-dpmsolver++", "heun", "epsilon")])
def test_dpmpp_steps(diffusers, device, algorithm_type, solver_type, prediction_type):
    d = diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm_type, solver_type=solver_type,
                                              prediction_type=prediction_type, use_karras_sigmas=True)
    d.set_timesteps(10)
    x = randn(2, 4, 6, 6, seed=33)
    noises = [randn(2, 4, 6, 6, seed=100 + i) for i in range(10)]
    a, b, prev_x0 = x.clone(), x.to(device), None
    sde = algorithm_type.startswith("sde")
    for i, t in enumerate(d.timesteps):
        mo = _fake_model(a, t)
        a = d.step(mo, t, a, variance_noise=noises[i] if sde else None).prev_sample
        mob = _fake_model(b, t)
        first = i == 0 or i == 9
        kw = dict(prediction_type=prediction_type, algorithm_type=algorithm_type, solver_type=solver_type,
                  noise=noises[i].to(device) if sde else None)
        if first:
            b, prev_x0 = pk.dpmpp_2m_step(mob, b, d.sigmas[i], d.sigmas[i + 1], **kw)
        else:
            b, prev_x0 = pk.dpmpp_2m_step(mob, b, d.sigmas[i], d.sigmas[i + 1], prev_x0=prev_x0,
                                          sigma_prev=d.sigmas[i - 1], **kw)
        assert rel(b, a) < 1e-5, i


def test_steps_per_sample_sigmas(device):
    # One sigma per sample equals running each sample alone.
    x, mo = randn(3, 2, 9, seed=34), randn(3, 2, 9, seed=35)
    sig = torch.tensor([14.6, 3.0, 0.2], dtype=torch.float32)
    nxt = torch.tensor([10.0, 1.5, 0.0], dtype=torch.float32)
    for fn in (pk.euler_step, pk.flow_match_step, pk.dpmpp_2m_step, pk.heun_step):
        s = sig / 15 if fn is pk.flow_match_step else sig
        n = nxt / 15 if fn is pk.flow_match_step else nxt
        got, _ = fn(mo.to(device), x.to(device), s.to(device), n.to(device))
        for b in range(3):
            one, _ = fn(mo[b:b + 1], x[b:b + 1], float(s[b]), float(n[b]))
            assert rel(got[b:b + 1], one) < 1e-6


# ---- stochastic steps: distribution and reproducibility -------------------------------------


def test_ddpm_noise_distribution():
    stats = pytest.importorskip("scipy.stats")
    acp = pk.noise_schedule("linear")
    x, mo = randn(4, 64, 64, seed=36), randn(4, 64, 64, seed=37)
    t = torch.tensor([999, 600, 300, 55])
    mean, _ = pk.ddpm_step(mo, x, t, t - 50, acp, noise=torch.zeros_like(x), clip_sample=False)
    got, _ = pk.ddpm_step(mo, x, t, t - 50, acp, seed=1234, clip_sample=False)
    for b in range(4):
        a_t, a_p = acp[t[b]], acp[t[b] - 50]
        std = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt().item()
        z = ((got[b] - mean[b]) / std).flatten().double()
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
        assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
        # neighbouring elements are independent
        assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 / math.sqrt(z.numel())
    again, _ = pk.ddpm_step(mo, x, t, t - 50, acp, seed=1234, clip_sample=False)
    other, _ = pk.ddpm_step(mo, x, t, t - 50, acp, seed=1235, clip_sample=False)
    assert torch.equal(got, again) and not torch.equal(got, other)
    torch.set_num_threads(1)
    assert torch.equal(got, pk.ddpm_step(mo, x, t, t - 50, acp, seed=1234, clip_sample=False)[0])
    torch.manual_seed(5)
    g1 = pk.ddpm_step(mo, x, t, t - 50, acp)[0]
    torch.manual_seed(5)
    assert torch.equal(g1, pk.ddpm_step(mo, x, t, t - 50, acp)[0])
    # no noise at t = 0
    z0 = pk.ddpm_step(mo, x, 0, -1, acp, seed=1)[0]
    assert torch.equal(z0, pk.ddpm_step(mo, x, 0, -1, acp, noise=torch.zeros_like(x))[0])


def _philox4x32_10(c, k):
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = c
    k0, k1 = k
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


def test_in_kernel_noise_is_box_muller_on_philox():
    # The noise of element i: Philox block i // 4 keyed by the seed, words (2p, 2p + 1) with
    # p = (i // 2) % 2, Box-Muller cos (even i) or sin (odd i); checked against float64 math.
    seed, offset = 987654321, 0x44494605  # flow_match_step's Philox offset
    z, _ = pk.flow_match_step(torch.zeros(1, 300), torch.zeros(1, 300), 0.5, 1.0, stochastic=True, seed=seed)
    for i in range(300):
        w = _philox4x32_10((i >> 2, 0, offset, 0), (seed & 0xFFFFFFFF, seed >> 32))
        p = (i >> 1) & 1
        u1 = ((w[2 * p] >> 8) + 1) * 2.0**-24
        u2 = (w[2 * p + 1] >> 8) * 2.0**-24
        r = math.sqrt(-2 * math.log(u1))
        want = r * (math.sin(2 * math.pi * u2) if i & 1 else math.cos(2 * math.pi * u2))
        assert abs(z[0, i].item() - want) < 2e-6 * max(1.0, abs(want)), i


def test_stochastic_steps_cpu_cuda_match(cuda_kernels):
    acp = pk.noise_schedule("linear")
    x, mo = randn(3, 4, 33, 17, seed=38), randn(3, 4, 33, 17, seed=39)
    t = torch.tensor([900, 500, 20])
    calls = [
        lambda dev, s: pk.ddpm_step(mo.to(dev), x.to(dev), t.to(dev), (t - 20).to(dev), acp.to(dev), seed=s),
        lambda dev, s: pk.ddim_step(mo.to(dev), x.to(dev), t.to(dev), (t - 20).to(dev), acp.to(dev), eta=1.0, seed=s),
        lambda dev, s: pk.euler_step(mo.to(dev), x.to(dev), 3.0, 2.0, gamma=0.3, seed=s),
        lambda dev, s: pk.dpmpp_2m_step(mo.to(dev), x.to(dev), 3.0, 2.0, algorithm_type="sde-dpmsolver++", seed=s),
        lambda dev, s: pk.flow_match_step(mo.to(dev), x.to(dev), 0.7, 0.5, stochastic=True, seed=s),
    ]
    dev = cuda_kernels.device
    for call in calls:
        a, _ = call("cpu", 77)
        with cuda_kernels.run():
            b, _ = call(dev, 77)
            c, _ = call(dev, torch.tensor([77], device=dev))
        assert torch.allclose(a, b.cpu(), rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)


# ---- schedulers: whole loops against diffusers ------------------------------------------------

SCHED_CASES = [
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False), 50),
    ("DDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing",
                           rescale_betas_zero_snr=True), 10),
    ("DDIMScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=False), 10),
    ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 50),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1), 10),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="trailing"), 10),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, solver_type="heun"), 50),
    ("DPMSolverMultistepScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading",
                                         final_sigmas_type="sigma_min", lower_order_final=False), 20),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 10),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 4),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, shift_terminal=0.1), 4),
]


@pytest.mark.parametrize("name,kwargs,steps", SCHED_CASES)
def test_scheduler_loop(diffusers, device, name, kwargs, steps):
    theirs = getattr(diffusers, name)(**kwargs)
    ours = getattr(pk.schedulers, name).from_config(theirs.config)
    extra = dict(mu=0.8) if kwargs.get("use_dynamic_shifting") else {}
    theirs.set_timesteps(steps, **extra)
    ours.set_timesteps(steps, device=device, **extra)
    assert np.allclose(theirs.timesteps.numpy(), ours.timesteps.cpu().numpy(), rtol=1e-4, atol=1e-4)
    assert np.allclose(theirs.sigmas.numpy() if hasattr(theirs, "sigmas") else 0,
                       ours.sigmas.cpu().numpy() if hasattr(theirs, "sigmas") else 0, rtol=1e-4, atol=1e-6)
    x = randn(2, 4, 8, 8, seed=40)
    init = getattr(theirs, "init_noise_sigma", 1.0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(init), rel=1e-5)
    a, b = x * init, (x * float(ours.init_noise_sigma)).to(device)
    for t, t2 in zip(theirs.timesteps, ours.timesteps):
        ia = theirs.scale_model_input(a, t) if hasattr(theirs, "scale_model_input") else a
        a = theirs.step(_fake_model(ia, t), t, a).prev_sample
        b = ours.step(_fake_model(ours.scale_model_input(b, t2), t2), t2, b).prev_sample
    assert rel(b, a) < 1e-4


def test_ddpm_scheduler_class(diffusers):
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ours = pk.schedulers.DDPMScheduler.from_config(theirs.config)
    for n in (10, 37):
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        assert torch.equal(theirs.timesteps, ours.timesteps)
    x, mo = randn(2, 3, 8, 8, seed=41), randn(2, 3, 8, 8, seed=42)
    for t in ours.timesteps[[0, 5, -1]]:
        out = ours.step(mo, t, x, generator=gen(1))
        want = theirs.step(mo, int(t), x, generator=gen(1))
        assert rel(out.pred_original_sample, want.pred_original_sample) < 1e-5
        mean = pk.ddpm_step(mo, x, int(t), int(theirs.previous_timestep(int(t))), ours.alphas_cumprod,
                            noise=torch.zeros_like(x))[0]
        std = 0.0 if int(t) == 0 else float(theirs._get_variance(int(t))) ** 0.5
        want_mean = want.prev_sample - std * torch.randn(x.shape, generator=gen(1))
        assert rel(mean, want_mean) < 1e-5
        resid = (out.prev_sample - mean).flatten()
        if std > 1e-3:
            assert abs(resid.std().item() / std - 1) < 0.1
        elif int(t) == 0:
            assert resid.abs().max().item() == 0
    assert out[0] is out.prev_sample and ours.step(mo, int(ours.timesteps[-1]), x, return_dict=False)[0].shape == x.shape
    xt = ours.add_noise(x, mo, torch.tensor([3, 500]))
    assert rel(xt, theirs.add_noise(x, mo, torch.tensor([3, 500]))) < 1e-5


def test_scheduler_set_timesteps_spacings(diffusers):
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        for spacing in ("leading", "trailing", "linspace"):
            for n in (1, 7, 50, 999):
                theirs = getattr(diffusers, name)(timestep_spacing=spacing, steps_offset=1)
                ours = getattr(pk.schedulers, name).from_config(theirs.config)
                theirs.set_timesteps(n)
                ours.set_timesteps(n)
                assert np.allclose(theirs.timesteps.numpy(), ours.timesteps.numpy(), atol=1e-3), (name, spacing, n)
                if hasattr(theirs, "sigmas"):
                    assert np.allclose(theirs.sigmas.numpy(), ours.sigmas.numpy(), rtol=2e-5, atol=1e-6)


def test_scheduler_config_roundtrip(diffusers):
    ours = pk.schedulers.EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert ours.config.prediction_type == "v_prediction" and ours.config["beta_schedule"] == "scaled_linear"
    theirs = diffusers.EulerDiscreteScheduler.from_config(ours.config)
    assert theirs.config.prediction_type == "v_prediction"
    back = pk.schedulers.DDIMScheduler.from_config(theirs.config, clip_sample=False)
    assert back.config.beta_schedule == "scaled_linear" and back.config.clip_sample is False
    assert pk.schedulers.DPMSolverMultistepScheduler.order == 1 and len(back) == 1000
    with pytest.raises(AttributeError):
        ours.config.prediction_type = "epsilon"


def test_scheduler_bad_args():
    with pytest.raises(ValueError, match="num_inference_steps"):
        pk.schedulers.DDIMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pk.schedulers.EulerDiscreteScheduler().set_timesteps(2000)
    with pytest.raises(ValueError, match="thresholding"):
        pk.schedulers.DDPMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="solver_order"):
        pk.schedulers.DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="timestep_spacing"):
        pk.schedulers.DDIMScheduler(timestep_spacing="even").set_timesteps(10)
    s = pk.schedulers.EulerDiscreteScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.zeros(1, 2), 3, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pk.schedulers.DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2))


def test_scheduler_in_diffusers_pipeline(diffusers):
    from diffusers import DDIMPipeline, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    want = pipe(generator=gen(3), num_inference_steps=10, output_type="np").images
    pipe.scheduler = pk.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
    got = pipe(generator=gen(3), num_inference_steps=10, output_type="np").images
    assert isinstance(pipe.scheduler, pk.schedulers.DDIMScheduler)
    assert np.abs(got - want).max() < 1e-4


# ---- op checks ------------------------------------------------------------------------------


def _op_cases(device):
    acp = pk.noise_schedule("linear").to(device)
    x, mo, z = (randn(3, 2, 5, seed=s, device=device) for s in (50, 51, 52))
    t = torch.tensor([999, 400, 0], device=device)
    sig, sig_n = torch.tensor([10.0, 3.0, 1.0], device=device), torch.tensor([5.0, 1.0, 0.5], device=device)
    seed = torch.tensor([9], dtype=torch.int64)
    p = x.clone().requires_grad_()
    return [
        (OPS.add_noise, (x, z, t, acp, "v_prediction")),
        (OPS.add_noise, (x, z, torch.rand(3, device=device), None, "flow")),
        (OPS.diffusion_loss, (p, mo, t, acp, "min_snr", 5.0, "epsilon")),
        (OPS.diffusion_loss, (p, mo, None, None, "none", 5.0, "epsilon")),
        (OPS.diffusion_loss_backward, (torch.ones(3, device=device), x, mo, t, acp, "min_snr", 5.0, "sample")),
        (OPS.ddpm_step, (mo, x, t, t - 20, acp, None, seed, "epsilon", "fixed_small", True, 1.0)),
        (OPS.ddim_step, (mo, x, t, t - 20, acp, z, None, 1.0, 0.5, "v_prediction", False, 1.0, False)),
        (OPS.euler_step, (mo, x, sig, sig_n, None, seed, "epsilon", 0.2, 0.0, float("inf"), 1.0)),
        (OPS.heun_step, (mo, x, sig, sig_n, z, x, "epsilon", False, 1.0)),
        (OPS.dpmpp_2m_step, (mo, x, z, sig * 2, sig, sig_n, None, seed, "epsilon", "sde-dpmsolver++", "midpoint", 2,
                             False)),
        (OPS.flow_match_step, (mo, x, sig / 10, sig_n / 10, None, seed, True, True)),
        (OPS.flow_match_step, (mo, x, sig / 10, sig_n / 10, None, None, False, False)),
    ]


def test_opcheck(device):
    for op, args in _op_cases(device):
        torch.library.opcheck(op, args)


def test_compile_denoising_step():
    acp = pk.noise_schedule("scaled_linear", 1000, 0.00085, 0.012)
    x0, noise = randn(2, 4, 8, seed=53), randn(2, 4, 8, seed=54)
    t = torch.tensor([10, 700])

    def train_and_sample(x0, noise, t, pred):
        xt, target = pk.add_noise(x0, noise, t, acp, target="v_prediction")
        loss = pk.diffusion_loss(pred, target, t, acp, weighting="min_snr", prediction_type="v_prediction")
        p = pred.detach()  # the solver steps are not differentiable
        a, _ = pk.ddim_step(p, xt, t, t - 20, acp, prediction_type="v_prediction", clip_sample=False)
        b, _ = pk.ddpm_step(p, a, t, t - 20, acp, seed=3)
        c, _ = pk.euler_step(p, b, 3.0, 2.5)
        d, dv = pk.heun_step(p, c, 3.0, 2.5)
        e, x0p = pk.dpmpp_2m_step(p, d, 2.5, 2.0, prev_x0=c, sigma_prev=3.0)
        f, _ = pk.flow_match_step(p, e, 0.5, 0.25)
        return loss, f + dv + x0p

    pred = randn(2, 4, 8, seed=55).requires_grad_()
    eager = train_and_sample(x0, noise, t, pred)
    compiled = torch.compile(train_and_sample, fullgraph=True)(x0, noise, t, pred)
    assert torch.allclose(eager[0], compiled[0]) and torch.allclose(eager[1], compiled[1])
    compiled[0].backward()
    g = pred.grad.clone()
    pred.grad = None
    eager[0].backward()
    assert torch.allclose(g, pred.grad)


# ---- bad input ------------------------------------------------------------------------------


def test_bad_inputs():
    acp = pk.noise_schedule("linear")
    x, mo = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="timesteps: expected values below 1000"):
        pk.add_noise(x, mo, torch.tensor([1, 1000]), acp)
    with pytest.raises(RuntimeError, match="timesteps: expected non-negative"):
        pk.ddim_step(mo, x, torch.tensor([-1, 5]), torch.tensor([-1, 0]), acp)
    with pytest.raises(TypeError, match="timesteps: expected an integer tensor"):
        pk.add_noise(x, mo, torch.tensor([1.0, 2.0]), acp)
    with pytest.raises(RuntimeError, match="timesteps: expected one value or one per sample"):
        pk.add_noise(x, mo, torch.tensor([1, 2, 3]), acp)
    with pytest.raises(RuntimeError, match="model_output: expected shape"):
        pk.ddim_step(torch.randn(2, 4), x, 10, 0, acp)
    with pytest.raises(RuntimeError, match="model_output: expected dtype"):
        pk.euler_step(mo.double(), x, 1.0, 0.5)
    with pytest.raises(TypeError, match="sample: expected a float32"):
        pk.flow_match_step(mo, torch.ones(2, 3, dtype=torch.int64), 1.0, 0.5)
    with pytest.raises(ValueError, match="target"):
        pk.add_noise(x, mo, 3, acp, target="noise")
    with pytest.raises(ValueError, match="prediction_type"):
        pk.ddpm_step(mo, x, 3, 2, acp, prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        pk.ddpm_step(mo, x, 3, 2, acp, variance_type="learned")
    with pytest.raises(ValueError, match="weighting"):
        pk.diffusion_loss(x, mo, weighting="snr")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        pk.add_noise(x, mo, 3)
    with pytest.raises(RuntimeError, match="seed"):
        OPS.ddpm_step(mo, x, torch.tensor(3), torch.tensor(2), acp, None, None, "epsilon", "fixed_small", True, 1.0)
    with pytest.raises(RuntimeError, match="prediction_type"):
        OPS.ddim_step(mo, x, torch.tensor(3), torch.tensor(2), acp, None, None, 1.0, 0.0, "x0", True, 1.0, False)
    with pytest.raises(ValueError, match="eta"):
        pk.ddim_step(mo, x, 3, 2, acp, eta=-1.0)
    with pytest.raises(ValueError, match="prev_x0/sigma_prev"):
        pk.dpmpp_2m_step(mo, x, 1.0, 0.5, prev_x0=x)
    e = torch.empty(0, 3)
    assert pk.ddim_step(e, e, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), acp)[0].shape == (0, 3)


_X, _MO = torch.randn(2, 3, generator=gen(80)), torch.randn(2, 3, generator=gen(81))
_ACP = pk.noise_schedule("linear")
_T = lambda v: torch.tensor(v)  # noqa: E731
INF, NAN = math.inf, math.nan
# (call, exception, message): each scalar knob, through the wrapper (ValueError) and the raw op
# (RuntimeError, the check in csrc/common/diffusion_ops.h that both backends share).
BAD_KNOBS = [
    (lambda: pk.ddim_step(_MO, _X, 10, 0, _ACP, eta=INF), ValueError, "eta: expected a finite value >= 0, got inf"),
    (lambda: pk.ddim_step(_MO, _X, 10, 0, _ACP, eta=NAN), ValueError, "eta: expected a finite value >= 0"),
    (lambda: OPS.ddim_step(_MO, _X, _T(10), _T(0), _ACP, _X, None, 1.0, INF, "epsilon", True, 1.0, False),
     RuntimeError, "eta: expected a finite value >= 0, got inf"),
    (lambda: pk.ddim_step(_MO, _X, 10, 0, _ACP, final_alpha_cumprod=NAN), ValueError, "final_alpha_cumprod"),
    (lambda: pk.ddim_step(_MO, _X, 10, 0, _ACP, clip_sample_range=INF), ValueError,
     "clip_sample_range: expected a finite value > 0, got inf"),
    (lambda: OPS.ddim_step(_MO, _X, _T(10), _T(0), _ACP, None, None, 1.0, 0.0, "epsilon", True, NAN, False),
     RuntimeError, "clip_sample_range: expected a finite value > 0, got nan"),
    (lambda: pk.ddpm_step(_MO, _X, 10, 0, _ACP, clip_sample_range=NAN), ValueError, "clip_sample_range"),
    (lambda: OPS.ddpm_step(_MO, _X, _T(10), _T(0), _ACP, _X, None, "epsilon", "fixed_small", True, INF),
     RuntimeError, "clip_sample_range: expected a finite value > 0, got inf"),
    (lambda: pk.heun_step(_MO, _X, 2.0, 1.0, clip_sample=True, clip_sample_range=-INF), ValueError,
     "clip_sample_range"),
    (lambda: OPS.heun_step(_MO, _X, _T(2.0), _T(1.0), None, None, "epsilon", True, INF), RuntimeError,
     "clip_sample_range: expected a finite value > 0, got inf"),
    (lambda: pk.diffusion_loss(_X, _MO, gamma=INF), ValueError, "gamma: expected a finite value > 0, got inf"),
    (lambda: pk.diffusion_loss(_X, _MO, _T([3, 4]), _ACP, weighting="min_snr", gamma=0.0), ValueError, "gamma"),
    (lambda: OPS.diffusion_loss(_X, _MO, _T([3, 4]), _ACP, "min_snr", INF, "epsilon"), RuntimeError,
     "gamma: expected a finite value > 0, got inf"),
    (lambda: OPS.diffusion_loss(_X, _MO, None, None, "none", NAN, "epsilon"), RuntimeError,
     "gamma: expected a finite value > 0, got nan"),
    (lambda: OPS.diffusion_loss_backward(_T([1.0, 1.0]), _X, _MO, None, None, "none", INF, "epsilon"), RuntimeError,
     "gamma: expected a finite value > 0"),
    (lambda: pk.euler_step(_MO, _X, 2.0, 1.0, s_noise=INF), ValueError, "s_noise: expected a finite value, got inf"),
    (lambda: pk.euler_step(_MO, _X, 2.0, 1.0, s_tmin=NAN), ValueError, "s_tmin: expected a number"),
    (lambda: pk.euler_step(_MO, _X, 2.0, 1.0, s_tmax=NAN), ValueError, "s_tmax: expected a number"),
    (lambda: OPS.euler_step(_MO, _X, _T(2.0), _T(1.0), None, None, "epsilon", 0.0, NAN, INF, 1.0), RuntimeError,
     "s_tmin: expected a number"),
    (lambda: OPS.euler_step(_MO, _X, _T(2.0), _T(1.0), None, None, "epsilon", 0.0, 0.0, NAN, 1.0), RuntimeError,
     "s_tmax: expected a number"),
    (lambda: OPS.euler_step(_MO, _X, _T(2.0), _T(1.0), None, None, "epsilon", 0.0, 0.0, INF, NAN), RuntimeError,
     "s_noise: expected a finite value, got nan"),
    (lambda: pk.dpmpp_2m_step(_MO, _X, 1.5, 0.5, flow_sigmas=True), ValueError,
     r"sigma: expected values in \[0, 1\] with flow_sigmas=True, got 1.5"),
    (lambda: pk.dpmpp_2m_step(_MO, _X, 0.5, _T([0.2, -0.1]), flow_sigmas=True), ValueError,
     r"sigma_next: expected values in \[0, 1\] with flow_sigmas=True, got -0.1"),
    (lambda: pk.dpmpp_2m_step(_MO, _X, 0.5, 0.2, prev_x0=_X, sigma_prev=NAN, flow_sigmas=True), ValueError,
     "sigma_prev: expected values in"),
    (lambda: OPS.dpmpp_2m_step(_MO, _X, None, None, _T([0.5, NAN]), _T(0.2), None, None, "flow_prediction",
                               "dpmsolver++", "midpoint", 1, True), RuntimeError,
     r"sigma: expected values in \[0, 1\] with flow_sigmas=True, got nan at sample 1"),
    (lambda: OPS.dpmpp_2m_step(_MO, _X, _X, _T(1.01), _T(0.5), _T(0.2), None, None, "flow_prediction",
                               "dpmsolver++", "midpoint", 2, True), RuntimeError, "sigma_prev: expected values in"),
    (lambda: pk.sample_timesteps(4, kind="logit_normal", logit_mean=NAN), ValueError, "logit_mean"),
    (lambda: pk.sample_timesteps(4, kind="logit_normal", logit_std=INF), ValueError, "logit_std"),
    (lambda: pk.sample_timesteps(4, kind="mode", mode_scale=NAN), ValueError, "mode_scale"),
    (lambda: pk.sample_timesteps(4, kind="mode", shift=INF), ValueError, "shift"),
]


@pytest.mark.parametrize("call,exc,match", BAD_KNOBS, ids=[f"{i}-{b[2].split(':')[0]}" for i, b in
                                                           enumerate(BAD_KNOBS)])
def test_bad_knobs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_flow_sigmas_in_range_accepted():
    # the ends of [0, 1] are valid flow sigmas (sigma_next = 0 is the last step)
    x, mo = randn(2, 5, seed=82), randn(2, 5, seed=83)
    out, x0 = pk.dpmpp_2m_step(mo, x, 1.0, 0.0, prediction_type="flow_prediction", flow_sigmas=True)
    assert bool(torch.isfinite(out).all()) and torch.allclose(out, x0)
    out, _ = pk.dpmpp_2m_step(mo, x, torch.tensor([0.5, 0.25]), 0.1, prev_x0=x0, sigma_prev=1.0,
                              prediction_type="flow_prediction", flow_sigmas=True)
    assert bool(torch.isfinite(out).all())


@pytest.mark.cuda
@pytest.mark.parametrize("order", [1, 2])
def test_flow_sigmas_out_of_range_on_device_give_nan(order):
    # Device sigmas are not read on the host: the documented rule is NaN outputs for a sample
    # whose sigma is outside [0, 1], the other samples as in a call without it.
    x, mo, p = (randn(4, 6, seed=s, device="cuda") for s in (84, 85, 86))
    good = torch.tensor([0.6, 0.5, 0.4, 0.3], device="cuda")
    nxt = torch.tensor([0.5, 0.4, 0.3, 0.2], device="cuda")
    bad = good.clone()
    bad[1], bad[3] = 1.5, float("nan")
    kw = dict(prediction_type="flow_prediction", flow_sigmas=True)
    if order == 2:
        kw.update(prev_x0=p, sigma_prev=torch.full((4,), 0.7, device="cuda"))
    want, want_x0 = pk.dpmpp_2m_step(mo, x, good, nxt, **kw)
    got, got_x0 = pk.dpmpp_2m_step(mo, x, bad, nxt, **kw)
    for g, w in ((got, want), (got_x0, want_x0)):
        assert bool(g[[1, 3]].isnan().all())
        assert torch.equal(g[[0, 2]], w[[0, 2]])
    if order == 2:
        kw["sigma_prev"] = torch.tensor([0.7, -0.5, 0.7, 0.7], device="cuda")
        got, _ = pk.dpmpp_2m_step(mo, x, good, nxt, **kw)
        assert bool(got[1].isnan().all()) and torch.equal(got[[0, 2, 3]], want[[0, 2, 3]])


# ---- CUDA only ------------------------------------------------------------------------------


@pytest.mark.cuda
def test_scheduler_loop_in_cuda_graph():
    s = pk.schedulers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False)
    s.set_timesteps(10, device="cuda")
    x = randn(2, 4, 16, 16, seed=60, device="cuda")
    static_x = x.clone()

    def loop(latents):
        for t in s.timesteps:
            latents = s.step(torch.tanh(latents), t, latents).prev_sample
        return latents

    eager = loop(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static_x)  # warm up
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(g):
        out = loop(static_x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5)
