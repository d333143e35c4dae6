"""Denoising benchmarks: the fused ops against diffusers' scheduler methods and the torch eager
code a user would otherwise write, on the same inputs.

    pk-bench diffusion [--device cpu|cuda] [--quick]
    python -m pretrain_kernels.bench.bench_diffusion                 # GPU: bandwidth table

Sizes: "pixels" 64x3x32x32 and "latents" 8x4x128x128 (float32; "pixels" only under --quick). Groups are named
"<op>-<device>-<size>"; each group holds the fused op ("pk"), diffusers ("diffusers") and the
eager composite ("eager"). "ddim_loop50" is a whole 50-step DDIM loop, model call excluded
(the model output is a fixed tensor). On CUDA each timed call runs the op 20 times and
synchronises once, so launch latency is amortised the same way for every contender.
"""
from __future__ import annotations

import math

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.bench.common import gpu_usable, quick, require

diffusers = require("diffusers", module_level=True) if __name__ != "__main__" else __import__("diffusers")

SIZES = quick({"pixels": (64, 3, 32, 32), "latents": (8, 4, 128, 128)}, {"pixels": (64, 3, 32, 32)})
DEVICES = ["cpu"] + (["cuda"] if gpu_usable() else [])
REPEAT_CUDA = 20
BENCH = pytest.mark.benchmark(max_time=quick(0.25, 0.05), min_rounds=quick(5, 3), warmup=True,
                              warmup_iterations=3)


def _timed(fn, device):
    if device == "cpu":
        return fn

    def run():
        for _ in range(REPEAT_CUDA):
            fn()
        torch.cuda.synchronize()
    return run


def _inputs(size, device):
    g = torch.Generator().manual_seed(0)
    shape = SIZES[size]
    x = torch.randn(shape, generator=g).to(device)
    mo = torch.randn(shape, generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    return x, mo, noise


def _run(benchmark, group, impl, fn, device):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    benchmark(_timed(fn, device))


IMPLS = ["pk", "diffusers", "eager"]


def cases(impls, bench=BENCH):
    """The marks of one op's benchmark: every device x size x impl, timed with `bench`."""
    def mark(fn):
        fn = pytest.mark.parametrize("device", DEVICES)(fn)
        fn = pytest.mark.parametrize("size", list(SIZES))(fn)
        fn = pytest.mark.parametrize("impl", impls)(fn)
        return bench(fn)
    return mark


@cases(IMPLS)
def test_add_noise(benchmark, device, size, impl):
    x, _, noise = _inputs(size, device)
    sched = diffusers.DDPMScheduler()
    ours = pk.schedulers.DDPMScheduler()
    acp = ours.alphas_cumprod.to(device)
    t = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    fns = {
        "pk": lambda: pk.add_noise(x, noise, t, acp),
        "diffusers": lambda: sched.add_noise(x, noise, t),
        "eager": lambda: (acp[t].sqrt().float().view(shape) * x + (1 - acp[t]).sqrt().float().view(shape) * noise,
                          noise),
    }
    _run(benchmark, f"add_noise-{device}-{size}", impl, fns[impl], device)


@cases(IMPLS)
def test_ddim_step(benchmark, device, size, impl):
    x, mo, _ = _inputs(size, device)
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(50)
    acp = pk.noise_schedule("linear").to(device)
    a_t, a_p = float(acp[501]), float(acp[481])

    def eager():
        x0 = (x - math.sqrt(1 - a_t) * mo) / math.sqrt(a_t)
        return math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * mo, x0

    fns = {
        "pk": lambda: pk.ddim_step(mo, x, 501, 481, acp, clip_sample=False),
        "diffusers": lambda: sched.step(mo, 501, x),
        "eager": eager,
    }
    _run(benchmark, f"ddim_step-{device}-{size}", impl, fns[impl], device)


@cases(["pk", "diffusers"])
def test_ddpm_step(benchmark, device, size, impl):
    x, mo, _ = _inputs(size, device)
    sched = diffusers.DDPMScheduler()
    sched.set_timesteps(50)
    acp = pk.noise_schedule("linear").to(device)
    seed = torch.tensor([7], dtype=torch.int64)
    fns = {
        "pk": lambda: pk.ddpm_step(mo, x, 500, 480, acp, seed=seed),  # noise drawn in the kernel
        "diffusers": lambda: sched.step(mo, 500, x),                  # noise from torch.randn
    }
    _run(benchmark, f"ddpm_step-{device}-{size}", impl, fns[impl], device)


@cases(IMPLS)
def test_euler_step(benchmark, device, size, impl):
    x, mo, _ = _inputs(size, device)
    sched = diffusers.EulerDiscreteScheduler()
    sched.set_timesteps(50)
    s, sn = sched.sigmas[10], sched.sigmas[11]

    def theirs():
        sched._step_index = 10
        return sched.step(mo, sched.timesteps[10], x)

    fv, fn_ = float(s), float(sn)
    fns = {
        "pk": lambda: pk.euler_step(mo, x, s, sn),
        "diffusers": theirs,
        "eager": lambda: (x + mo * (fn_ - fv), x - fv * mo),
    }
    _run(benchmark, f"euler_step-{device}-{size}", impl, fns[impl], device)


@cases(["pk", "diffusers"])
def test_dpmpp_2m_step(benchmark, device, size, impl):
    x, mo, prev = _inputs(size, device)
    sched = diffusers.DPMSolverMultistepScheduler()
    sched.set_timesteps(20)
    s0, s1, s2 = sched.sigmas[4], sched.sigmas[5], sched.sigmas[3]

    def theirs():
        sched._step_index = 4
        sched.lower_order_nums = 2
        sched.model_outputs = [None, prev]  # step shifts it to [prev, model_output]
        return sched.step(mo, sched.timesteps[4], x)

    fns = {
        "pk": lambda: pk.dpmpp_2m_step(mo, x, s0, s1, prev_x0=prev, sigma_prev=s2),
        "diffusers": theirs,
    }
    _run(benchmark, f"dpmpp_2m_step-{device}-{size}", impl, fns[impl], device)


@cases(IMPLS)
def test_flow_match_step(benchmark, device, size, impl):
    x, v, _ = _inputs(size, device)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    s, sn = sched.sigmas[1].cpu(), sched.sigmas[2].cpu()

    def theirs():
        sched._step_index = 1
        return sched.step(v, sched.timesteps[1], x)

    fv, fn_ = float(s), float(sn)
    fns = {
        "pk": lambda: pk.flow_match_step(v, x, s, sn, return_x0=False),  # what the scheduler returns
        "diffusers": theirs,
        "eager": lambda: x + (fn_ - fv) * v,
    }
    _run(benchmark, f"flow_match_step-{device}-{size}", impl, fns[impl], device)


@cases(["pk", "eager"])
def test_min_snr_loss_fwd_bwd(benchmark, device, size, impl):
    x, y, _ = _inputs(size, device)
    pred = x.clone().requires_grad_()
    acp = pk.noise_schedule("linear").to(device)
    t = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(2)).to(device)

    def eager():
        snr = acp[t] / (1 - acp[t])
        w = (torch.clamp(snr, max=5.0) / snr).float()
        loss = (torch.nn.functional.mse_loss(pred, y, reduction="none").flatten(1).mean(1) * w).mean()
        loss.backward()

    def fused():
        pk.diffusion_loss(pred, y, t, acp, weighting="min_snr").backward()

    _run(benchmark, f"min_snr_loss-{device}-{size}", impl, fused if impl == "pk" else eager, device)


@cases(["pk", "diffusers"], bench=pytest.mark.benchmark(max_time=quick(1.0, 0.2), min_rounds=3, warmup=False))
def test_ddim_loop50(benchmark, device, size, impl):
    x, mo, _ = _inputs(size, device)
    cls = pk.schedulers.DDIMScheduler if impl == "pk" else diffusers.DDIMScheduler
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sched.set_timesteps(50, device=device)

    def loop():
        lat = x
        for t in sched.timesteps:
            lat = sched.step(mo, t, lat).prev_sample
        return lat

    benchmark.group = f"ddim_loop50-{device}-{size}"
    benchmark.extra_info["impl"] = impl
    if device == "cpu":
        benchmark(loop)
    else:
        def run():
            loop()
            torch.cuda.synchronize()
        benchmark(run)


def _graph_time_us(fn, calls=10, replays=20):
    """GPU time of one call of fn: `calls` calls captured in a CUDA graph, replayed, timed
    with CUDA events (no host launch overhead in the number)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def _gpu_table():
    """Achieved memory bandwidth of the fused steps on the GPU (kernel time from CUDA-graph
    replays), and a 50-step DDIM loop captured in one CUDA graph against the same loop run
    eagerly."""
    dev = "cuda"
    rows = []
    for shape in ((8, 4, 128, 128), (64, 16, 128, 128)):
        g = torch.Generator().manual_seed(0)
        x, mo, prev, out = (torch.randn(shape, generator=g).to(dev) for _ in range(4))
        acp = pk.noise_schedule("linear").to(dev)
        nbytes = x.numel() * 4
        cases = {
            "add_noise (2r+2w)": (lambda: pk.add_noise(x, mo, 500, acp), 4),
            "ddim_step (2r+2w)": (lambda: pk.ddim_step(mo, x, 501, 481, acp, clip_sample=False), 4),
            "ddpm_step+philox (2r+2w)": (lambda: pk.ddpm_step(mo, x, 500, 480, acp, seed=3), 4),
            "dpmpp_2m_step (3r+2w)": (lambda: pk.dpmpp_2m_step(mo, x, 3.0, 2.0, prev_x0=prev, sigma_prev=4.0), 5),
            "flow_match_step (2r+2w)": (lambda: pk.flow_match_step(mo, x, 0.5, 0.25), 4),
            "eager a*x+b*y (2r+1w)": (lambda: torch.add(x, mo, alpha=0.5, out=out), 3),
            "torch copy_ (1r+1w)": (lambda: out.copy_(x), 2),
        }
        for name, (fn, n_t) in cases.items():
            us = _graph_time_us(fn)
            rows.append((f"{name} {tuple(shape)}", us, n_t * nbytes / us / 1e3))
    # whole loop in a CUDA graph
    sched = pk.schedulers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(50, device=dev)
    x = torch.randn(8, 4, 128, 128, device=dev)
    mo = torch.randn_like(x)

    def loop(lat):
        for t in sched.timesteps:
            lat = sched.step(mo, t, lat).prev_sample
        return lat

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop(x)
    for label, fn in (("ddim 50-step loop, eager", lambda: loop(x)), ("ddim 50-step loop, one CUDA graph", graph.replay)):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        rows.append((label, start.elapsed_time(end) / 20 * 1e3, float("nan")))
    assert torch.allclose(out, loop(x), atol=1e-5)
    print(f"{'case':58s} {'us':>9s} {'GB/s':>8s}")
    for name, us, gbs in rows:
        print(f"{name:58s} {us:9.1f} {gbs:8.0f}")


if __name__ == "__main__":
    _gpu_table()
