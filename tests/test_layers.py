"""pk.rms_norm, pk.swiglu and pk.gelu against the float64 references of tests/reference.py and against
transformers' own formulas (LlamaRMSNorm, GemmaRMSNorm, act_fn(gate) * up, written out in
reference.py; F.gelu for pk.gelu): every dtype, with and without a weight (x's dtype or float32), Gemma's offset,
odd sizes, empty tensors, non-contiguous inputs, forward and backward, the CUDA kernels through
the emulator, thread-count independence of the weight gradient, opcheck, gradcheck,
torch.compile(fullgraph=True), autocast and bad input."""
import math
import zlib

import pytest
import torch

import pretrain_kernels as pk

import reference as ref

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True

OPS = torch.ops.pretrain_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error against float64 (a rounding or two of the result to the dtype)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---- rms_norm --------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 1), (3, 7), (2, 5, 63), (129, 16), (4, 1000), (2, 3, 1027)]


@pytest.mark.parametrize("weight_kind", ["same", "float32", None])
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(device, shape, dtype, weight_kind):
    seed = hash((shape, str(dtype), weight_kind)) % 1000
    x = rand(*shape, dtype=dtype, seed=seed, scale=3.0).to(device).requires_grad_()
    w = None
    if weight_kind is not None:
        w = (1 + 0.5 * rand(shape[-1], dtype=torch.float64, seed=seed + 1))
        w = w.to(dtype if weight_kind == "same" else torch.float32).to(device).requires_grad_()
    out = pk.rms_norm(x, w, eps=1e-5)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_() if w is not None else None
    want = ref.rms_norm_ref(xr, wr, eps=1e-5)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert rel(out, want) < TOL[dtype], rel(out, want)
    g = rand(*shape, dtype=dtype, seed=seed + 2).to(device)
    out.backward(g)
    want.backward(g.double())
    assert x.grad.dtype == dtype
    # dx = rstd * (dn - n * mean(dn * n)) cancels (exactly so for D = 1): its error is measured
    # against the size of the terms, rstd * |dn|
    rstd = xr.detach().pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    terms = (g.double().cpu() * rstd * (wr.detach() if w is not None else 1.0)).norm().item()
    err = (x.grad.double().cpu() - xr.grad).norm().item()
    assert err < 2 * TOL[dtype] * max(xr.grad.norm().item(), terms), (err, terms)
    if w is not None:
        assert w.grad.dtype == w.dtype and w.grad.shape == w.shape
        assert rel(w.grad, wr.grad) < 2 * TOL[dtype], rel(w.grad, wr.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_offset_gemma(device, dtype):
    x = rand(5, 33, dtype=dtype, seed=3).to(device).requires_grad_()
    w = rand(33, dtype=dtype, seed=4).mul(0.1).to(device).requires_grad_()
    out = pk.rms_norm(x, w, eps=1e-6, offset=1.0)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = ref.rms_norm_ref(xr, wr, eps=1e-6, offset=1.0)
    assert rel(out, want) < TOL[dtype]
    g = rand(5, 33, dtype=dtype, seed=5).to(device)
    out.backward(g)
    want.backward(g.double())
    assert rel(x.grad, xr.grad) < 2 * TOL[dtype] and rel(w.grad, wr.grad) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_formulas(device, dtype):
    # LlamaRMSNorm rounds the normalised value before the weight, GemmaRMSNorm after; both agree
    # with pk.rms_norm to the last bit or two (the sum of squares is added in another order).
    # (transformers computes float64 inputs in float32; pk.rms_norm keeps float64 in float64.)
    x = rand(64, 256, dtype=dtype, seed=6, scale=2.0).to(device)
    w = (1 + 0.3 * rand(256, dtype=torch.float64, seed=7)).to(dtype).to(device)
    ulp = ULP[dtype]
    llama = pk.rms_norm(x, w, eps=1e-6)
    want = ref.llama_rms_norm_ref(x, w, eps=1e-6)
    assert llama.dtype == want.dtype == dtype
    torch.testing.assert_close(llama, want, rtol=4 * ulp, atol=1e-30)
    gemma = pk.rms_norm(x, w, eps=1e-6, offset=1.0)
    torch.testing.assert_close(gemma, ref.gemma_rms_norm_ref(x, w, eps=1e-6), rtol=4 * ulp, atol=1e-30)
    if dtype != torch.float32:
        # the flag decides the rounding: Llama's rounding with Gemma's offset is another result
        other = pk.rms_norm(x, w, offset=1.0, round_before_weight=True)
        assert not torch.equal(other, gemma)
        torch.testing.assert_close(other, gemma, rtol=4 * ulp, atol=1e-30)


def test_rms_norm_non_contiguous(device):
    base = rand(3, 40, 6, dtype=torch.float32, seed=8).to(device)
    x = base.transpose(1, 2)  # [3, 6, 40], feature stride 6
    w = rand(40, dtype=torch.float32, seed=9).to(device)
    assert not x.is_contiguous()
    out = pk.rms_norm(x, w)
    assert rel(out, ref.rms_norm_ref(x, w)) < TOL[torch.float32]
    xs = rand(4, 50, dtype=torch.float32, seed=10).to(device)[:, 5:45].requires_grad_()
    xs.retain_grad()
    pk.rms_norm(xs, w).sum().backward()
    xr = xs.detach().double().requires_grad_()
    ref.rms_norm_ref(xr, w).sum().backward()
    assert rel(xs.grad, xr.grad) < 1e-5


def test_rms_norm_empty(device):
    for shape in [(0, 8), (2, 0, 8), (3, 0)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        w = torch.ones(shape[-1], device=device, requires_grad=True)
        out = pk.rms_norm(x, w)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()


def test_rms_norm_rstd_and_raw_backward(device):
    x = rand(6, 24, dtype=torch.bfloat16, seed=11).to(device)
    w = rand(24, dtype=torch.float32, seed=12).to(device)
    out, rstd = OPS.rms_norm(x, w, 1e-6, 0.0, True)
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    want = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd.double(), want, rtol=1e-6, atol=0)
    g = rand(6, 24, dtype=torch.bfloat16, seed=13).to(device)
    dx, dw = OPS.rms_norm_backward(g, x, w, rstd, 0.0, True, False)
    assert dx.shape == x.shape and dw.numel() == 0
    dx2, dw2 = OPS.rms_norm_backward(g, x, w, rstd, 0.0, True, True)
    assert torch.equal(dx, dx2) and dw2.dtype == torch.float32 and dw2.shape == (24,)


def test_rms_norm_weight_grad_is_independent_of_threads():
    x = rand(1000, 96, dtype=torch.float32, seed=14).requires_grad_()
    w = rand(96, dtype=torch.float32, seed=15).requires_grad_()
    g = rand(1000, 96, dtype=torch.float32, seed=16)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            w.grad = None
            pk.rms_norm(x, w).backward(g)
            grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.emulated
def test_rms_norm_emulated_weight_grad_is_deterministic(emu):
    # the CUDA backward sums the blocks' partial weight gradients in order: the same bits twice,
    # and the CPU's result to float32 rounding
    x = rand(300, 40, dtype=torch.float32, seed=17)
    w = rand(40, dtype=torch.float32, seed=18)
    g = rand(300, 40, dtype=torch.float32, seed=19)
    _, rstd = emu.rms_norm(x, w, 1e-6, 0.0, True)
    a = emu.rms_norm_backward(g, x, w, rstd, 0.0, True, True)
    b = emu.rms_norm_backward(g, x, w, rstd, 0.0, True, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cpu = OPS.rms_norm_backward(g, x, w, rstd, 0.0, True, True)
    torch.testing.assert_close(a[0], cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], cpu[1], rtol=1e-5, atol=1e-5)


# ---- swiglu ----------------------------------------------------------------------------------------

SWIGLU_SHAPES = [(1,), (7,), (3, 63), (2, 5, 129), (4, 1000), (17, 33)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(device, shape, dtype):
    seed = hash((shape, str(dtype))) % 1000
    gate = rand(*shape, dtype=dtype, seed=seed, scale=4.0).to(device).requires_grad_()
    up = rand(*shape, dtype=dtype, seed=seed + 1).to(device).requires_grad_()
    out = pk.swiglu(gate, up)
    gr, ur = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want = ref.swiglu_ref(gr, ur)
    assert out.dtype == dtype and out.shape == gate.shape
    assert rel(out, want) < TOL[dtype], rel(out, want)
    g = rand(*shape, dtype=dtype, seed=seed + 2).to(device)
    out.backward(g)
    want.backward(g.double())
    assert rel(gate.grad, gr.grad) < 2 * TOL[dtype], rel(gate.grad, gr.grad)
    assert rel(up.grad, ur.grad) < 2 * TOL[dtype], rel(up.grad, ur.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_eager(device, dtype):
    # transformers' MLP: act_fn(gate) * up in the dtype (silu rounded, then the product)
    gate = rand(8, 300, dtype=dtype, seed=20, scale=5.0).to(device)
    up = rand(8, 300, dtype=dtype, seed=21).to(device)
    eager = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(pk.swiglu(gate, up), eager, rtol=2 * ULP[dtype], atol=1e-7)


def test_swiglu_extremes(device):
    gate = torch.tensor([-200.0, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 200.0, float("inf")], device=device)
    up = torch.ones_like(gate)
    out = pk.swiglu(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate), rtol=1e-6, atol=1e-30)
    assert torch.isnan(pk.swiglu(torch.tensor([float("nan")], device=device), torch.ones(1, device=device))).all()


def test_swiglu_non_contiguous(device):
    fused = rand(6, 2 * 40, dtype=torch.float32, seed=22).to(device).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)  # as a fused gate_up projection
    assert not gate.is_contiguous()
    out = pk.swiglu(gate, up)
    assert rel(out, ref.swiglu_ref(gate.detach(), up.detach())) < TOL[torch.float32]
    out.sum().backward()
    fr = fused.detach().double().requires_grad_()
    ref.swiglu_ref(*fr.chunk(2, dim=-1)).sum().backward()
    assert rel(fused.grad, fr.grad) < 1e-5


def test_swiglu_empty(device):
    gate = torch.empty(3, 0, device=device, requires_grad=True)
    up = torch.empty(3, 0, device=device, requires_grad=True)
    out = pk.swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (3, 0) and gate.grad.shape == (3, 0)


def test_swiglu_thread_count_does_not_change_results():
    gate, up = rand(64, 1000, dtype=torch.bfloat16, seed=23), rand(64, 1000, dtype=torch.bfloat16, seed=24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pk.swiglu(gate, up)
        torch.set_num_threads(max(2, threads))
        many = pk.swiglu(gate, up)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---- gelu ------------------------------------------------------------------------------------------

GELU_SHAPES = [(1,), (7,), (3, 63), (2, 5, 129), (4, 1000), (17, 33)]
APPROX = ["none", "tanh"]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", GELU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_gelu_matches_reference(device, shape, dtype, approximate):
    seed = zlib.crc32(repr((shape, str(dtype), approximate)).encode()) % 1000
    x = rand(*shape, dtype=dtype, seed=seed, scale=3.0).to(device).requires_grad_()
    out = pk.gelu(x, approximate=approximate)
    xr = x.detach().double().requires_grad_()
    want = ref.gelu_ref(xr, approximate)  # F.gelu in float64
    # F.gelu's own lower-tail cancellation (gelu_tail_ref keeps it; it matters when one tail
    # element is the whole tensor), and the rounding of results in the dtype's subnormal range
    # (float16: gelu(-5) = -1.4e-6 keeps 5 bits there)
    xt = x.detach().double().cpu().requires_grad_()
    tail = ref.gelu_tail_ref(xt, approximate)
    sub = x.numel() ** 0.5 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    err = (out.double().cpu() - want.detach()).norm().item()
    slack = sub + (tail - want).norm().item()
    assert err <= TOL[dtype] * want.norm().item() + slack, (err, want.norm().item(), slack)
    g = rand(*shape, dtype=dtype, seed=seed + 1).to(device)
    out.backward(g)
    want.backward(g.double())
    tail.backward(g.double().cpu())
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    err = (x.grad.double().cpu() - xr.grad).norm().item()
    slack = sub + (xt.grad - xr.grad).norm().item()
    assert err <= 2 * TOL[dtype] * xr.grad.norm().item() + slack, (err, xr.grad.norm().item(), slack)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_matches_eager(device, dtype, approximate):
    # F.gelu in the dtype computes in float32 and rounds once, as pk.gelu: above x = -2.5 the two
    # agree to one unit in the last place (rtol = the dtype's epsilon, atol = the smallest float16
    # subnormal). Below, torch's float32 1 + erf(x / sqrt 2) resp. 1 + tanh(u) cancels (bfloat16
    # gelu(-7) comes out -0): there pk.gelu is held to one unit of the accurate tail value instead.
    x = rand(8, 300, dtype=dtype, seed=53, scale=4.0).to(device).requires_grad_()
    g = rand(8, 300, dtype=dtype, seed=54).to(device)
    out = pk.gelu(x, approximate=approximate)
    out.backward(g)
    xe = x.detach().clone().requires_grad_()
    eager = torch.nn.functional.gelu(xe, approximate=approximate)
    eager.backward(g)
    body = x.detach() > -2.5
    assert body.sum() > 1500 and (~body).sum() > 20
    torch.testing.assert_close(out[body], eager[body], rtol=ULP[dtype], atol=2.0**-24)
    torch.testing.assert_close(x.grad[body], xe.grad[body], rtol=ULP[dtype], atol=2.0**-24)
    tail = ref.gelu_tail_ref(x.detach()[~body].cpu(), approximate)
    torch.testing.assert_close(out[~body].double().cpu(), tail, rtol=ULP[dtype], atol=2.0**-24)


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_float32_elementwise_error(device, approximate):
    # every float32 value of [-12, 12] on a fine grid, against gelu_tail_ref (float64 with the
    # lower tail intact): within (4 + 2 x^2) ulp, the error of rounding x / sqrt 2 (resp. u) once
    # amplified by gelu's relative condition number ~x^2 in the lower tail. The derivative is
    # measured against the size of its terms (it crosses zero near x = -0.75).
    x = torch.linspace(-12, 12, 24001, dtype=torch.float32).to(device)
    xd = x.double().cpu().requires_grad_()
    want = ref.gelu_tail_ref(xd, approximate)
    want.sum().backward()
    eps = torch.finfo(torch.float32).eps
    bound = (4 + 2 * xd.detach() ** 2) * eps
    out = pk.gelu(x, approximate=approximate).double().cpu()
    w = want.detach()
    keep = w.abs() > 1e-36  # below, float32 subnormals
    assert ((out - w).abs() <= bound * w.abs())[keep].all()
    assert torch.equal(out[~keep].abs() <= 1e-36, torch.ones_like(out[~keep], dtype=torch.bool))
    d = OPS.gelu_backward(torch.ones_like(x), x, approximate).double().cpu()
    if approximate == "tanh":
        s = torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd.detach() + 0.044715 * xd.detach() ** 3))
        scale = s + xd.detach().abs() * s * (1 - s) * math.sqrt(8 / math.pi) * (1 + 3 * 0.044715 * xd.detach() ** 2)
    else:
        phi = torch.exp(-0.5 * xd.detach() ** 2) / math.sqrt(2 * math.pi)
        scale = 0.5 * torch.special.erfc(-xd.detach() / math.sqrt(2)) + xd.detach().abs() * phi
    keep = scale > 1e-36
    assert ((d - xd.grad).abs() <= bound * scale)[keep].all()


def test_gelu_extremes(device):
    # against gelu_tail_ref (F.gelu itself cancels to -0 in the lower tail, even in float64)
    x = torch.tensor([-1e30, -200.0, -90.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 20.0, 90.0, 200.0, 1e30,
                      float("inf")], device=device)
    for approximate in APPROX:
        for dtype in (torch.float32, torch.float64):
            xt = x.to(dtype)
            out = pk.gelu(xt, approximate=approximate)
            xr = xt.double().cpu().requires_grad_()
            want = ref.gelu_tail_ref(xr, approximate)
            torch.testing.assert_close(out.cpu(), want.detach().to(dtype), rtol=1e-6, atol=0)
            want[:-1].sum().backward()
            d = OPS.gelu_backward(torch.ones_like(xt), xt, approximate).cpu()
            torch.testing.assert_close(d[:-1], xr.grad[:-1].to(dtype), rtol=1e-6, atol=0)
            assert torch.isnan(pk.gelu(torch.tensor([float("nan")], dtype=dtype, device=device),
                                       approximate=approximate)).all()


def test_gelu_non_contiguous(device):
    base = rand(6, 2 * 40, dtype=torch.float32, seed=55, scale=3.0).to(device).requires_grad_()
    x = base[:, ::2]
    y = base.t()
    assert not x.is_contiguous() and not y.is_contiguous()
    for approximate in APPROX:
        out = pk.gelu(x, approximate=approximate)
        assert rel(out, ref.gelu_ref(x.detach(), approximate)) < TOL[torch.float32]
        assert rel(pk.gelu(y, approximate=approximate), ref.gelu_ref(y.detach(), approximate)) < TOL[torch.float32]
    base.grad = None
    pk.gelu(x, approximate="tanh").sum().backward()
    br = base.detach().double().requires_grad_()
    ref.gelu_ref(br[:, ::2], "tanh").sum().backward()
    assert rel(base.grad, br.grad) < 1e-5
    gn = rand(40, 6, dtype=torch.float32, seed=56).to(device).t()  # a non-contiguous grad_out
    assert rel(OPS.gelu_backward(gn, x.detach(), "none"), OPS.gelu_backward(gn.contiguous(), x.detach(), "none")) == 0


def test_gelu_empty(device):
    for shape in [(0,), (3, 0), (2, 0, 5)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        out = pk.gelu(x, approximate="tanh")
        out.sum().backward()
        assert out.shape == shape and x.grad.shape == shape


def test_gelu_thread_count_does_not_change_results():
    x = rand(64, 1000, dtype=torch.bfloat16, seed=57, scale=3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [pk.gelu(x, approximate=a) for a in APPROX]
        torch.set_num_threads(max(2, threads))
        many = [pk.gelu(x, approximate=a) for a in APPROX]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


_GELU_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import pretrain_kernels as pk
import reference as ref
print("isa", pk.build_info()["cpu_isa"], flush=True)
x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for approximate in ("none", "tanh"):
        xt = x.to(dtype)
        xd = xt.double().requires_grad_()
        want = ref.gelu_tail_ref(xd, approximate)
        want.sum().backward()
        out = pk.gelu(xt, approximate=approximate)
        d = torch.ops.pretrain_kernels.gelu_backward(torch.ones_like(xt), xt, approximate)
        tol = {{torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}}[dtype]
        for a, b in ((out, want.detach()), (d, xd.grad)):
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err < tol, (dtype, approximate, err)
print("ok")
"""


def test_gelu_generic_instruction_set():
    """The portable loops (CPUs without AVX-512), forced through PK_CPU_ISA=generic in a fresh
    process: every dtype, both forms, forward and backward against the float64 tail reference."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PK_CPU_ISA="generic")
    r = subprocess.run([sys.executable, "-c", _GELU_ISA_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert "isa generic" in r.stdout, (r.stdout[-500:], r.stderr[-2000:])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# ---- autograd, opcheck, compile, autocast ------------------------------------------------------------


@pytest.mark.parametrize("offset,with_weight", [(0.0, True), (1.0, True), (0.0, False)])
def test_rms_norm_gradcheck(offset, with_weight):
    x = rand(4, 9, dtype=torch.float64, seed=25).requires_grad_()
    w = rand(9, dtype=torch.float64, seed=26).requires_grad_() if with_weight else None
    inputs = (x, w) if with_weight else (x,)
    assert torch.autograd.gradcheck(lambda *a: pk.rms_norm(a[0], a[1] if with_weight else None, 1e-3, offset=offset),
                                    inputs)


def test_swiglu_gradcheck():
    gate = rand(3, 11, dtype=torch.float64, seed=27, scale=3.0).requires_grad_()
    up = rand(3, 11, dtype=torch.float64, seed=28).requires_grad_()
    assert torch.autograd.gradcheck(pk.swiglu, (gate, up))


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_gradcheck(approximate):
    x = rand(3, 11, dtype=torch.float64, seed=58, scale=3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pk.gelu(t, approximate=approximate), (x,))


def test_double_backward_raises():
    x = rand(3, 8, dtype=torch.float64, seed=29).requires_grad_()
    w = rand(8, dtype=torch.float64, seed=30).requires_grad_()
    for fn, args in ((lambda a, b: pk.rms_norm(a, b), (x, w)), (pk.swiglu, (x, x.detach().clone().requires_grad_())),
                     (lambda a: pk.gelu(a, approximate="tanh"), (x,))):
        (g,) = torch.autograd.grad(fn(*args).pow(2).sum(), args[0], create_graph=True)
        with pytest.raises(NotImplementedError, match="double backward"):
            g.sum().backward()


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = rand(5, 24, dtype=dtype, seed=31).requires_grad_()
        for w in (rand(24, dtype=dtype, seed=32).requires_grad_(), rand(24, dtype=torch.float32, seed=33), None):
            for offset, rbw in ((0.0, True), (1.0, False)):
                torch.library.opcheck(OPS.rms_norm.default, (x, w, 1e-6, offset, rbw))
                _, rstd = OPS.rms_norm(x.detach(), w.detach() if w is not None else None, 1e-6, offset, rbw)
                g = rand(5, 24, dtype=dtype, seed=34)
                wd = w.detach() if w is not None else None
                torch.library.opcheck(OPS.rms_norm_backward.default, (g, x.detach(), wd, rstd, offset, rbw, True))
        gate = rand(4, 3, 10, dtype=dtype, seed=35).requires_grad_()
        up = rand(4, 3, 10, dtype=dtype, seed=36).requires_grad_()
        torch.library.opcheck(OPS.swiglu.default, (gate, up))
        torch.library.opcheck(OPS.swiglu_backward.default, (rand(4, 3, 10, dtype=dtype, seed=37), gate.detach(),
                                                            up.detach()))
        for approximate in APPROX:
            torch.library.opcheck(OPS.gelu.default, (gate, approximate))
            torch.library.opcheck(OPS.gelu_backward.default, (rand(4, 3, 10, dtype=dtype, seed=59), gate.detach(),
                                                              approximate))


def test_compile_fullgraph():
    x = rand(6, 32, dtype=torch.float32, seed=38)
    w = rand(32, dtype=torch.float32, seed=39)
    gate, up = rand(6, 48, dtype=torch.float32, seed=40), rand(6, 48, dtype=torch.float32, seed=41)
    proj = rand(32, 48, dtype=torch.float32, seed=42)

    def f(x, w, gate, up):
        h = pk.rms_norm(x, w, 1e-5) @ proj
        return (pk.swiglu(gate + h, up) ** 2).sum() + pk.gelu(h * up, approximate="tanh").sum() + pk.gelu(gate).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, w, gate, up)]
    b = [t.clone().requires_grad_() for t in (x, w, gate, up)]
    out, out2 = compiled(*a), f(*b)
    out.backward()
    out2.backward()
    torch.testing.assert_close(out, out2)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad)
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, w, gate, up), f(x, w, gate, up))


def test_func_transforms():
    x = rand(3, 10, dtype=torch.float64, seed=43)
    w = rand(10, dtype=torch.float64, seed=44)
    g = torch.func.grad(lambda t: (pk.rms_norm(t, w) ** 2).sum())(x)
    xr = x.clone().requires_grad_()
    (ref.rms_norm_ref(xr, w) ** 2).sum().backward()
    torch.testing.assert_close(g, xr.grad)
    batched = torch.vmap(lambda t: pk.swiglu(t, t * 2))(x)
    torch.testing.assert_close(batched, ref.swiglu_ref(x, x * 2))
    g = torch.func.grad(lambda t: pk.gelu(t, approximate="tanh").sum())(x)
    xr = x.clone().requires_grad_()
    ref.gelu_ref(xr, "tanh").sum().backward()
    torch.testing.assert_close(g, xr.grad)
    torch.testing.assert_close(torch.vmap(pk.gelu)(x), ref.gelu_ref(x))


def test_autocast_cpu_is_like_torch():
    # torch's CPU autocast leaves rms_norm, silu and mul alone: the dtypes stay
    x = rand(4, 16, dtype=torch.float32, seed=45)
    w = rand(16, dtype=torch.float32, seed=46)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.rms_norm(xb, (16,), w.bfloat16()).dtype == torch.bfloat16
        out = pk.rms_norm(x, w)
        outb = pk.rms_norm(xb, w)
        s = pk.swiglu(x, x)
        assert torch.nn.functional.gelu(x).dtype == torch.float32
        ge, geb = pk.gelu(x), pk.gelu(xb, approximate="tanh")
    assert ge.dtype == torch.float32 and geb.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.equal(out, pk.rms_norm(x, w))
    assert outb.dtype == torch.bfloat16 and torch.equal(outb, pk.rms_norm(xb, w))
    assert s.dtype == torch.float32


@pytest.mark.cuda
def test_autocast_cuda_is_like_torch():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU and a CUDA build of the extension")
    x = rand(4, 16, dtype=torch.float32, seed=47).cuda()
    w = rand(16, dtype=torch.float32, seed=48).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = torch.nn.functional.rms_norm(x.bfloat16(), (16,), w.bfloat16())
        out = pk.rms_norm(x.bfloat16(), w.bfloat16())
        raw = OPS.rms_norm(x.bfloat16(), w.bfloat16(), 1e-6, 0.0, True)[0]
        s = pk.swiglu(x.half(), x.half())
    assert want.dtype == out.dtype == raw.dtype == torch.float32
    assert s.dtype == torch.float16


# ---- bad input -------------------------------------------------------------------------------------


def _good_norm():
    return dict(x=rand(3, 8, dtype=torch.float32, seed=49), weight=rand(8, dtype=torch.float32, seed=50))


NORM_BAD = [
    ("x", lambda a: a.update(x=a["x"].long()), TypeError),
    ("x", lambda a: a.update(x=torch.tensor(1.0)), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"][:5]), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"].expand(2, 8)), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"].double()), TypeError),
    ("weight", lambda a: a.update(x=a["x"].bfloat16(), weight=a["weight"].half()), TypeError),
    ("eps", lambda a: a.update(eps=-1.0), ValueError),
    ("eps", lambda a: a.update(eps=float("nan")), ValueError),
    ("offset", lambda a: a.update(offset=float("inf")), ValueError),
]


@pytest.mark.parametrize("name,edit,exc", NORM_BAD)
def test_rms_norm_bad_input(name, edit, exc):
    args = dict(_good_norm(), eps=1e-6, offset=0.0)
    edit(args)
    with pytest.raises(exc, match=name):
        pk.rms_norm(args["x"], args["weight"], args["eps"], offset=args["offset"])
    if name != "x" or exc is ValueError:
        with pytest.raises(RuntimeError, match=name):
            OPS.rms_norm(args["x"], args["weight"], args["eps"], args["offset"], True)


def test_rms_norm_bad_types_and_backward_args():
    a = _good_norm()
    with pytest.raises(TypeError, match="weight"):
        pk.rms_norm(a["x"], [1.0] * 8)
    with pytest.raises(TypeError, match="eps"):
        pk.rms_norm(a["x"], a["weight"], "1e-6")
    with pytest.raises(TypeError, match="round_before_weight"):
        pk.rms_norm(a["x"], a["weight"], round_before_weight=1)
    _, rstd = OPS.rms_norm(a["x"], a["weight"], 1e-6, 0.0, True)
    with pytest.raises(RuntimeError, match="grad_out"):
        OPS.rms_norm_backward(a["x"][:2], a["x"], a["weight"], rstd, 0.0, True, True)
    with pytest.raises(RuntimeError, match="rstd"):
        OPS.rms_norm_backward(a["x"], a["x"], a["weight"], rstd[:2], 0.0, True, True)
    with pytest.raises(RuntimeError, match="rstd"):
        OPS.rms_norm_backward(a["x"], a["x"], a["weight"], rstd.double(), 0.0, True, True)


SWIGLU_BAD = [
    ("gate", lambda a: a.update(gate=a["gate"].long(), up=a["up"].long()), TypeError),
    ("up", lambda a: a.update(up=a["up"].double()), TypeError),
    ("up", lambda a: a.update(up=a["up"][:, :3]), ValueError),
    ("up", lambda a: a.update(up=a["up"][:1]), ValueError),  # no broadcasting
]


@pytest.mark.parametrize("name,edit,exc", SWIGLU_BAD)
def test_swiglu_bad_input(name, edit, exc):
    args = dict(gate=rand(2, 5, dtype=torch.float32, seed=51), up=rand(2, 5, dtype=torch.float32, seed=52))
    edit(args)
    with pytest.raises(exc, match=name):
        pk.swiglu(args["gate"], args["up"])
    with pytest.raises(RuntimeError, match=name):
        OPS.swiglu(args["gate"], args["up"])
    with pytest.raises(TypeError, match="up"):
        pk.swiglu(args["gate"], 1.0)


GELU_BAD = [
    ("x", lambda a: a.update(x=a["x"].long()), TypeError),
    ("x", lambda a: a.update(x=a["x"].to(torch.complex64)), TypeError),
    ("approximate", lambda a: a.update(approximate="erf"), ValueError),
    ("approximate", lambda a: a.update(approximate="Tanh"), ValueError),
]


@pytest.mark.parametrize("name,edit,exc", GELU_BAD)
def test_gelu_bad_input(name, edit, exc):
    args = dict(x=rand(2, 5, dtype=torch.float32, seed=60), approximate="tanh")
    edit(args)
    with pytest.raises(exc, match=name):
        pk.gelu(args["x"], approximate=args["approximate"])
    with pytest.raises(RuntimeError, match=name):
        OPS.gelu(args["x"], args["approximate"])
    with pytest.raises(RuntimeError, match=name):
        OPS.gelu_backward(torch.ones(args["x"].shape, dtype=args["x"].dtype), args["x"], args["approximate"])


def test_gelu_bad_types_and_backward_args():
    x = rand(2, 5, dtype=torch.float32, seed=61)
    with pytest.raises(TypeError, match="x"):
        pk.gelu([1.0, 2.0])
    with pytest.raises(TypeError, match="approximate"):
        pk.gelu(x, approximate=None)
    with pytest.raises(RuntimeError, match="grad_out"):
        OPS.gelu_backward(x[:1], x, "none")
    with pytest.raises(RuntimeError, match="grad_out"):
        OPS.gelu_backward(x.double(), x, "none")


@pytest.mark.emulated
def test_bad_input_emulated_cuda(emu):
    # the CUDA entry points run the same checks (csrc/common/layers.h)
    a = _good_norm()
    with pytest.raises(RuntimeError, match="weight"):
        emu.rms_norm(a["x"], a["weight"][:5], 1e-6, 0.0, True)
    with pytest.raises(RuntimeError, match="up"):
        emu.swiglu(a["x"], a["x"][:2])
    with pytest.raises(RuntimeError, match="approximate"):
        emu.gelu(a["x"], "erf")
    with pytest.raises(RuntimeError, match="grad_out"):
        emu.gelu_backward(a["x"][:1], a["x"], "tanh")
    out, _ = emu.rms_norm(a["x"], a["weight"], 1e-6, 0.0, True)
    assert rel(out, ref.rms_norm_ref(a["x"], a["weight"])) < 1e-6
