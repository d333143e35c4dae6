"""pk.rotary_embedding against the float64 reference of tests/reference.py: both pair layouts,
tables shared by the batch and per token, varlen, partial rotary_dim, odd sizes, strided x
(heads sliced out of a fused qkv projection, a non-unit feature stride), every dtype, the
backward (rotation by -theta) and double backward, the CUDA kernel through the emulator,
opcheck, gradcheck, torch.compile(fullgraph=True) and bad input."""
import pytest
import torch

import pretrain_kernels as pk

import reference as ref

# `device` also runs the CUDA kernel on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True

OPS = torch.ops.pretrain_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error against float64 (one rounding of the result to the dtype)
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def tables(rows, half, *, seed, batch=None, base=10000.0, dtype=torch.float32):
    """cos/sin of random positions ([rows, half], or per token [batch, rows, half])."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows,) if batch is None else (batch, rows)
    pos = torch.randint(0, 4096, shape, generator=g).double()
    inv = base ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = pos[..., None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


CASES = [
    # B, T, H, D, half (rd / 2), per_token
    (1, 1, 1, 2, 1, False),
    (2, 7, 3, 64, 32, False),
    (3, 63, 4, 16, 8, True),
    (1, 129, 2, 10, 3, False),    # partial rotary, odd half
    (2, 5, 1, 128, 64, True),
    (1, 1000, 1, 4, 2, False),
]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, case, dtype, interleaved):
    B, T, H, D, half, per_token = case
    seed = hash((case, str(dtype), interleaved)) % 1000
    x = rand(B, T, H, D, dtype=dtype, seed=seed).to(device).requires_grad_()
    cos, sin = tables(T, half, seed=seed + 1, batch=B if per_token else None)
    cos, sin = cos.to(device), sin.to(device)
    out = pk.rotary_embedding(x, cos, sin, interleaved=interleaved)
    xr = x.detach().double().requires_grad_()
    want = ref.rotary_embedding_ref(xr, cos, sin, interleaved)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert rel(out, want) < TOL[dtype], rel(out, want)
    g = rand(B, T, H, D, dtype=torch.float64, seed=seed + 2)
    out.backward(g.to(dtype).to(device))
    want.backward(g.to(dtype).double())
    assert x.grad.dtype == dtype
    assert rel(x.grad, xr.grad) < TOL[dtype], rel(x.grad, xr.grad)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(device, dtype, interleaved):
    N, H, D = 37, 3, 32
    x = rand(N, H, D, dtype=dtype, seed=3).to(device)
    cos, sin = tables(N, D // 2, seed=4)
    out = pk.rotary_embedding(x, cos.to(device), sin.to(device), interleaved=interleaved)
    want = ref.rotary_embedding_ref(x, cos, sin, interleaved)
    assert out.shape == (N, H, D) and rel(out, want) < TOL[dtype]


def test_agrees_with_the_complex_reference():
    # the two references of tests/reference.py (pairs as complex numbers) tie the layouts down
    B, T, H, D, half = 2, 9, 3, 12, 5
    x = rand(B, T, H, D, dtype=torch.float64, seed=5)
    theta = rand(T, half, dtype=torch.float64, seed=6) * 3
    positions = torch.arange(T).expand(B, T)
    for interleaved in (False, True):
        out = pk.rotary_embedding(x, theta.cos(), theta.sin(), interleaved=interleaved)
        torch.testing.assert_close(out, ref.rotary_ref(x, theta, positions, interleaved), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_qkv_heads_in_one_call(device, interleaved):
    # query and key heads sliced out of one qkv projection (strided over tokens and heads)
    B, T, H, Hk, D = 2, 11, 4, 2, 16
    qkv = rand(B, T, H + 2 * Hk, D, dtype=torch.float32, seed=7).to(device).requires_grad_()
    cos, sin = tables(T, D // 2, seed=8)
    qk, v = qkv.split([H + Hk, Hk], dim=2)
    assert not qk.is_contiguous()
    out = pk.rotary_embedding(qk, cos.to(device), sin.to(device), interleaved=interleaved)
    want = ref.rotary_embedding_ref(qk.detach(), cos, sin, interleaved)
    assert rel(out, want) < TOL[torch.float32]
    (out.sum() * 2 + v.sum()).backward()
    gref = ref.rotary_embedding_ref(torch.full_like(qk, 2.0), cos, sin, interleaved, conjugate=True)
    torch.testing.assert_close(qkv.grad[:, :, :H + Hk].double(), gref, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv.grad[:, :, H + Hk:], torch.ones_like(v))


def test_non_unit_feature_stride(device):
    B, T, H, D = 2, 5, 3, 8
    base = rand(B, T, D, H, dtype=torch.float32, seed=9).to(device)
    x = base.transpose(2, 3)  # feature stride H
    cos, sin = tables(T, D // 2, seed=10)
    out = pk.rotary_embedding(x, cos.to(device), sin.to(device))
    assert rel(out, ref.rotary_embedding_ref(x, cos, sin, False)) < TOL[torch.float32]


@pytest.mark.parametrize("interleaved", [False, True])
def test_conjugate_inverts(device, interleaved):
    x = rand(2, 6, 2, 8, dtype=torch.float32, seed=11).to(device)
    cos, sin = (t.to(device) for t in tables(6, 4, seed=12))
    y = OPS.rotary_embedding(x, cos, sin, interleaved, False)
    back = OPS.rotary_embedding(y, cos, sin, interleaved, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x)


def test_tables_in_other_dtypes(device):
    x = rand(1, 4, 2, 8, dtype=torch.bfloat16, seed=13).to(device)
    cos, sin = tables(4, 4, seed=14, dtype=torch.float64)
    out = pk.rotary_embedding(x, cos.to(device), sin.to(device))
    want = ref.rotary_embedding_ref(x, cos.float(), sin.float(), False)
    assert rel(out, want) < TOL[torch.bfloat16]


def test_empty(device):
    x = torch.empty(2, 0, 3, 8, device=device)
    cos, sin = torch.empty(0, 4, device=device), torch.empty(0, 4, device=device)
    assert pk.rotary_embedding(x, cos, sin).shape == x.shape


def test_thread_count_does_not_change_results():
    x = rand(4, 257, 4, 64, dtype=torch.bfloat16, seed=15)
    cos, sin = tables(257, 32, seed=16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pk.rotary_embedding(x, cos, sin, interleaved=True)
        torch.set_num_threads(max(2, threads))
        many = pk.rotary_embedding(x, cos, sin, interleaved=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---- autograd, opcheck, compile ----------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_gradcheck_and_gradgradcheck(interleaved, per_token):
    x = rand(2, 5, 2, 6, dtype=torch.float64, seed=17).requires_grad_()
    cos, sin = tables(5, 2, seed=18, batch=2 if per_token else None, dtype=torch.float64)

    def f(t):
        return pk.rotary_embedding(t, cos, sin, interleaved=interleaved)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = rand(2, 5, 3, 8, dtype=dtype, seed=19).requires_grad_()
        cos, sin = tables(5, 3, seed=20)
        for interleaved in (False, True):
            for conjugate in (False, True):
                torch.library.opcheck(OPS.rotary_embedding.default, (x, cos, sin, interleaved, conjugate))
        xv = rand(7, 2, 4, dtype=dtype, seed=21)
        cv, sv = tables(7, 2, seed=22)
        torch.library.opcheck(OPS.rotary_embedding.default, (xv, cv, sv, True, False))


def test_func_transforms():
    x = rand(2, 4, 2, 6, dtype=torch.float64, seed=23)
    cos, sin = tables(4, 3, seed=24, dtype=torch.float64)
    g = torch.func.grad(lambda t: (pk.rotary_embedding(t, cos, sin) ** 2).sum())(x)
    xr = x.clone().requires_grad_()
    (ref.rotary_embedding_ref(xr, cos, sin, False) ** 2).sum().backward()
    torch.testing.assert_close(g, xr.grad)
    batched = torch.vmap(lambda t: pk.rotary_embedding(t, cos, sin, interleaved=True))(x[:, None])
    torch.testing.assert_close(batched[:, 0], ref.rotary_embedding_ref(x, cos, sin, True))


@pytest.mark.parametrize("interleaved", [False, True])
def test_compile_fullgraph(interleaved):
    x = rand(2, 9, 3, 16, dtype=torch.float32, seed=25)
    cos, sin = tables(9, 8, seed=26)

    def f(t, c, s):
        return (pk.rotary_embedding(t, c, s, interleaved=interleaved) * torch.arange(16.0)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out2 = compiled(a, cos, sin), f(b, cos, sin)
    out.backward()
    out2.backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lambda t: pk.rotary_embedding(t, cos, sin), fullgraph=True,
                                                 backend="aot_eager")(x), pk.rotary_embedding(x, cos, sin))


def test_autocast_keeps_the_dtype():
    x = rand(1, 3, 2, 8, dtype=torch.float32, seed=27)
    cos, sin = tables(3, 4, seed=28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pk.rotary_embedding(x, cos, sin)
    assert out.dtype == torch.float32
    assert torch.equal(out, pk.rotary_embedding(x, cos, sin))


# ---- bad input ---------------------------------------------------------------------------------


def _good():
    x = rand(2, 5, 3, 8, dtype=torch.float32, seed=29)
    cos, sin = tables(5, 4, seed=30)
    return dict(x=x, cos=cos, sin=sin)


BAD = [
    ("x", lambda a: a.update(x=a["x"].long()), TypeError),
    ("x", lambda a: a.update(x=a["x"][0, 0]), ValueError),
    ("cos", lambda a: a.update(cos=a["cos"][:4], sin=a["sin"][:4]), ValueError),
    ("cos", lambda a: a.update(cos=a["cos"].repeat(1, 2), sin=a["sin"].repeat(1, 2)), ValueError),  # rd 16 > D 8
    ("cos", lambda a: a.update(cos=a["cos"][:, :0], sin=a["sin"][:, :0]), ValueError),
    ("cos", lambda a: a.update(cos=a["cos"].expand(3, 5, 4), sin=a["sin"].expand(3, 5, 4)), ValueError),  # batch 3
    ("cos", lambda a: a.update(cos=a["cos"].int()), TypeError),
    ("cos, sin", lambda a: a.update(sin=a["sin"][:, :3]), ValueError),
]


@pytest.mark.parametrize("name,edit,exc", BAD)
def test_bad_input(name, edit, exc):
    args = _good()
    edit(args)
    with pytest.raises(exc, match=name):
        pk.rotary_embedding(args["x"], args["cos"], args["sin"])
    if exc is ValueError or name != "x":
        with pytest.raises(RuntimeError, match=name):
            OPS.rotary_embedding(args["x"], args["cos"], args["sin"], False, False)


def test_bad_interleaved_and_non_tensors():
    args = _good()
    with pytest.raises(TypeError, match="interleaved"):
        pk.rotary_embedding(args["x"], args["cos"], args["sin"], interleaved=1)
    with pytest.raises(TypeError, match="cos"):
        pk.rotary_embedding(args["x"], [1.0], args["sin"])


@pytest.mark.emulated
def test_bad_input_emulated_cuda(emu):
    # the CUDA entry point runs the same checks (csrc/common/rotary.h)
    args = _good()
    with pytest.raises(RuntimeError, match="rotary_dim"):
        emu.rotary_embedding(args["x"], args["cos"].repeat(1, 2), args["sin"].repeat(1, 2), False, False)
    with pytest.raises(RuntimeError, match="cos"):
        emu.rotary_embedding(args["x"], args["cos"][:4], args["sin"][:4], False, False)
    out = emu.rotary_embedding(args["x"], args["cos"], args["sin"], True, False)
    assert rel(out, ref.rotary_embedding_ref(args["x"], args["cos"], args["sin"], True)) < 1e-6



@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_apply_rope_keeps_the_eager_numerics(dtype):
    # models/gpt.py rotates through the op; the result is the eager float32 rotation it replaced,
    # bit for bit (products and differences rounded as the eager ops round them)
    from pretrain_kernels.models.gpt import apply_rope, rope_tables

    def eager(x, cos, sin):
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)

    x = rand(2, 37, 6, 64, dtype=dtype, seed=32)
    for positions in (torch.arange(37), torch.arange(37).expand(2, 37) + torch.tensor([[0], [5]])):
        cos, sin = rope_tables(positions, 64, 10000.0)
        assert torch.equal(apply_rope(x, cos, sin), eager(x, cos, sin))
