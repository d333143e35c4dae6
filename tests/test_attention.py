"""Flash attention: forward, backward, varlen, GQA, causal/window, KV-cache decode, SDPA drop-in.

Accuracy is measured against the float64 reference (tests/reference.py) as the relative error
||out - ref|| / ||ref||, and must be at most twice torch SDPA's own error on the same inputs in
the same dtype."""
import math

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from reference import (ATTN_ERR_FLOOR, ATTN_FWD_CASES, assert_attention_matches, attention_ref, attention_varlen_ref,
                       attention_visible, rel_err, torch_sdpa)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# An error floor per dtype (a small fraction of one rounding of the output), so that a
# lucky, exact torch result on a tiny shape does not make the bound zero.
FLOOR = ATTN_ERR_FLOOR


@pytest.fixture
def adevice(device):
    """The conftest device, skipping CUDA until the attention ops have CUDA kernels."""
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "pretrain_kernels::flash_attn_fwd", "CUDA"):
        pytest.skip("no CUDA kernel for the attention ops in this build")
    return device


def rand(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, dtype=torch.float32, device=device, generator=gen).to(dtype)


FWD_CASES = ATTN_FWD_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference(case, dtype, adevice):
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 1000 + sk + D)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, window=window)
    q, k, v = q.to(adevice), k.to(adevice), v.to(adevice)
    out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, sq) and lse.dtype == torch.float32
    theirs = rel_err(torch_sdpa(q, k, v, causal=causal, window=window), ref)
    assert_attention_matches(out, lse, ref, ref_lse, theirs, dtype)


# (B, Sq, Sk, H, Hk, D, causal, window)
BWD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 128, 128, 4, 2, 40, True, (-1, -1)),
    (1, 33, 200, 2, 1, 96, True, (-1, -1)),
    (1, 200, 33, 2, 2, 128, True, (-1, -1)),
    (1, 129, 129, 2, 1, 8, False, (20, 3)),
    (2, 65, 70, 2, 2, 256, False, (-1, -1)),
    (1, 1, 17, 1, 1, 1, False, (-1, -1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_reference(case, dtype, adevice):
    """Gradient errors, averaged over three draws: a single draw of a tiny shape (head_dim 1,
    a handful of keys) is dominated by cancellation in dS = P (dP - Di), where which of two
    float32 computations lands closer is luck."""
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 7 + sk + D)
    errs = {"ours": [0.0] * 3, "torch": [0.0] * 3}
    for _ in range(3):
        q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
            B, sk, Hk, D, dtype=dtype, gen=g)
        dout = rand(B, sq, H, D, dtype=dtype, gen=g)

        def grads(fn, dt, dev="cpu"):
            xs = [t.detach().to(dev, dt).requires_grad_() for t in (q, k, v)]
            fn(*xs).backward(dout.to(dev, dt))
            return [x.grad.cpu() for x in xs]

        ref = grads(lambda a, b, c: attention_ref(a, b, c, causal=causal, window=window)[0], torch.float64)
        ours = grads(lambda a, b, c: pk.flash_attention(a, b, c, causal=causal, window=window), dtype, adevice)
        theirs = grads(lambda a, b, c: torch_sdpa(a, b, c, causal=causal, window=window), dtype, adevice)
        for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
            assert o.dtype == dtype and o.shape == r.shape
            errs["ours"][i] += rel_err(o, r) / 3
            errs["torch"][i] += rel_err(t, r) / 3
    for name, eo, et in zip("qkv", errs["ours"], errs["torch"]):
        assert eo <= 2 * max(et, FLOOR[dtype]), (name, eo, et)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    cases = [
        dict(shape=(1, 5, 7, 2, 1, 4), causal=True, window=(-1, -1)),
        dict(shape=(2, 4, 6, 2, 2, 3), causal=False, window=(2, 1)),
        dict(shape=(1, 9, 9, 4, 2, 5), causal=False, window=(-1, -1)),
        # the first two queries see no key: out is 0 there (lse is -inf, which numerical
        # differentiation cannot handle, so only out is checked)
        dict(shape=(1, 6, 4, 2, 1, 3), causal=False, window=(2, 1), lse=False),
    ]
    for c in cases:
        B, sq, sk, H, Hk, D = c["shape"]
        q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        # out and lse both carry gradients (the lse one folds into the backward's Di term)
        fn = lambda a, b, cc: pk.flash_attention(a, b, cc, causal=c["causal"], window=c["window"],  # noqa: E731
                                                 return_lse=c.get("lse", True))
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_varlen_and_mask_float64():
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(8, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pk.flash_attention(a, b, c, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), (q, k, v))
    qs = torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ks = torch.randn(2, 2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    vs = torch.randn(2, 2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fmask = torch.randn(5, 6, dtype=torch.float64, generator=g)
    bmask = torch.rand(2, 1, 5, 6, generator=g) > 0.3
    for mask in (fmask, bmask):
        assert torch.autograd.gradcheck(lambda a, b, c: pk.scaled_dot_product_attention(a, b, c, attn_mask=mask),
                                        (qs, ks, vs))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("unequal", [False, True], ids=["sq=sk", "sq!=sk"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [(-1, -1), (6, 2)], ids=["nowindow", "window"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_combination(causal, window, gqa, unequal, varlen, adevice):
    """Each combination of causal / window / GQA / unequal lengths / varlen, forward and
    backward, against the float64 reference (float32, small odd shapes)."""
    g = torch.Generator().manual_seed(11)
    H, Hk, D = (6, 2, 24) if gqa else (3, 3, 24)
    lens_q = [23, 1, 70] if varlen else [37]
    lens_k = [9, 17, 131] if (varlen and unequal) else ([29] if unequal else lens_q)
    if not varlen:
        lens_q, lens_k = lens_q * 2, lens_k * 2  # batch of two
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q32, k32, v32 = (t.to(adevice, torch.float32).requires_grad_() for t in (q, k, v))
    if varlen:
        out = pk.flash_attention(q32, k32, v32, causal=causal, window=window, cu_seqlens_q=cu_q.to(adevice),
                                 cu_seqlens_k=cu_k.to(adevice))
    else:
        B = len(lens_q)
        out = pk.flash_attention(q32.view(B, -1, H, D), k32.view(B, -1, Hk, D), v32.view(B, -1, Hk, D),
                                 causal=causal, window=window).reshape(tq, H, D)
    grads = torch.autograd.grad(out, (q32, k32, v32), dout.to(adevice, torch.float32))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention_varlen_ref(qr, kr, vr, cu_q, cu_k, causal=causal, window=window)
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    assert rel_err(out, ref) < 1e-6
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_equals_per_sequence(dtype):
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k = [5, 0, 129, 1, 64], [7, 3, 129, 40, 1]
    H, Hk, D = 4, 2, 40
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = rand(sum(lens_q), H, D, dtype=dtype, gen=g).requires_grad_()
    k = rand(sum(lens_k), Hk, D, dtype=dtype, gen=g).requires_grad_()
    v = rand(sum(lens_k), Hk, D, dtype=dtype, gen=g).requires_grad_()
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    for causal, window in ((True, (-1, -1)), (False, (8, 2))):
        out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), return_lse=True)
        assert lse.shape == (H, sum(lens_q))
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        for b in range(len(lens_q)):
            sl_q, sl_k = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            qb, kb, vb = (t[s].detach()[None].requires_grad_() for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
            ob, lb = pk.flash_attention(qb, kb, vb, causal=causal, window=window, return_lse=True)
            assert torch.equal(out[sl_q], ob[0])
            assert torch.equal(lse[:, sl_q], lb[0])
            if qb.numel() == 0:
                continue
            gb = torch.autograd.grad(ob, (qb, kb, vb), dout[sl_q][None])
            torch.testing.assert_close(dq[sl_q], gb[0][0], atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
            torch.testing.assert_close(dk[sl_k], gb[1][0], atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
            torch.testing.assert_close(dv[sl_k], gb[2][0], atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    out = pk.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_equals_full_attention(dtype, adevice):
    """Prefill a chunk, then decode token by token: each step equals causal attention over
    the same prefix, and the cache holds exactly the tokens written."""
    g = torch.Generator().manual_seed(3)
    B, H, Hk, D, smax = 3, 4, 2, 64, 40
    total = 30
    q_all = rand(B, total, H, D, dtype=dtype, gen=g)
    k_all = rand(B, total, Hk, D, dtype=dtype, gen=g)
    v_all = rand(B, total, Hk, D, dtype=dtype, gen=g)
    k_cache = torch.zeros(B, smax, Hk, D, dtype=dtype)
    v_cache = torch.zeros(B, smax, Hk, D, dtype=dtype)
    start = torch.tensor([0, 3, 7], dtype=torch.int32)  # rows start at different cache lengths
    for b in range(B):  # pre-existing history for rows 1 and 2
        k_cache[b, :start[b]] = rand(int(start[b]), Hk, D, dtype=dtype, gen=g)
        v_cache[b, :start[b]] = rand(int(start[b]), Hk, D, dtype=dtype, gen=g)
    hist_k, hist_v = k_cache.clone(), v_cache.clone()
    q_all, k_all, v_all, k_cache, v_cache, hist_k, hist_v = (
        t.to(adevice) for t in (q_all, k_all, v_all, k_cache, v_cache, hist_k, hist_v))
    lens = start.clone().to(adevice)
    chunks = [9, 3] + [1] * (total - 9 - 3 - 10) + [10]  # 3 new tokens x 2 heads: the decode kernel
    pos = 0
    for n in chunks:
        out = pk.flash_attention_with_kvcache(q_all[:, pos:pos + n], k_cache, v_cache, lens,
                                              k_new=k_all[:, pos:pos + n], v_new=v_all[:, pos:pos + n], causal=True)
        for b in range(B):
            L = int(lens[b]) + n
            kk = torch.cat([hist_k[b, :start[b]], k_all[b, :pos + n]])
            vv = torch.cat([hist_v[b, :start[b]], v_all[b, :pos + n]])
            assert torch.equal(k_cache[b, :L], kk) and torch.equal(v_cache[b, :L], vv)
            full = pk.flash_attention(q_all[b:b + 1, pos:pos + n], kk[None], vv[None], causal=True)
            torch.testing.assert_close(out[b:b + 1], full, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
            ref, _ = attention_ref(q_all[b:b + 1, pos:pos + n], kk[None], vv[None], causal=True)
            assert rel_err(out[b:b + 1], ref) < (1e-6 if dtype == torch.float32 else 1e-2)
        lens += n
        pos += n
    # without new tokens: attends to the first cache_seqlens keys; non-causal sees them all
    q1 = rand(B, 2, H, D, dtype=dtype, gen=g).to(adevice)
    out = pk.flash_attention_with_kvcache(q1, k_cache, v_cache, lens, causal=False)
    for b in range(B):
        full = pk.flash_attention(q1[b:b + 1], k_cache[b:b + 1, :lens[b]], v_cache[b:b + 1, :lens[b]])
        torch.testing.assert_close(out[b:b + 1], full, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


SDPA_CASES = [
    # (query shape, key shape, value shape, mask shape or None, mask dtype, is_causal, gqa)
    ((2, 4, 37, 40), (2, 2, 50, 40), (2, 2, 50, 24), None, None, False, True),
    ((2, 4, 37, 40), (2, 4, 50, 40), (2, 4, 50, 40), None, None, True, False),
    ((2, 3, 64, 16), (2, 3, 64, 16), (2, 3, 64, 16), (64, 64), torch.float32, False, False),
    ((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 16), (2, 1, 17, 33), torch.bool, False, False),
    ((3, 10, 8), (3, 12, 8), (3, 12, 8), (10, 12), torch.bool, False, False),
    ((2, 2, 3, 9, 8), (2, 2, 3, 9, 8), (2, 2, 3, 9, 8), (9, 9), torch.float32, False, False),
    ((1, 2, 70, 8), (1, 2, 20, 8), (1, 2, 20, 8), None, None, True, False),  # L > S: top-left
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(SDPA_CASES)))
def test_sdpa_drop_in(case, dtype):
    qs, ks, vs, ms, mdt, causal, gqa = SDPA_CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = rand(*qs, dtype=dtype, gen=g), rand(*ks, dtype=dtype, gen=g), rand(*vs, dtype=dtype, gen=g)
    mask = None
    if ms is not None:
        mask = (torch.rand(*ms, generator=g) > 0.3) if mdt == torch.bool else rand(*ms, gen=g).to(dtype)
        if mdt == torch.bool:
            mask[..., 0, :] = False  # a row that sees no key
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ours = pk.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, theirs, **tol)
    dout = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (q, k, v), dout)
    g_theirs = torch.autograd.grad(theirs, (q, k, v), dout)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **tol)


def test_noncontiguous_inputs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 40, 6, 3, 32, generator=g)
    q, k, v = base[:, :33, :, 0], base[:, :, ::2, 1], base[:, :, ::2, 2]  # strided heads and sequence
    qd = torch.randn(2, 6, 33, 64, generator=g)[..., ::2].transpose(1, 2)  # non-unit last-dim stride
    for qq in (q, qd):
        assert not qq.is_contiguous()
        out = pk.flash_attention(qq, k, v, causal=True)
        ref, _ = attention_ref(qq, k, v, causal=True)
        assert rel_err(out, ref) < 1e-6
        qq = qq.detach().requires_grad_()
        kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
        pk.flash_attention(qq, kk, vv, causal=True).sum().backward()
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (qq, kk, vv))
        attention_ref(qr, kr, vr, causal=True)[0].sum().backward()
        for a, b in ((qq, qr), (kk, kr), (vv, vr)):
            assert rel_err(a.grad, b.grad) < 1e-5


def test_empty_inputs():
    q = torch.randn(0, 5, 2, 8, requires_grad=True)
    out = pk.flash_attention(q, torch.randn(0, 5, 2, 8), torch.randn(0, 5, 2, 8), causal=True)
    assert out.shape == (0, 5, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    # no keys: zero output, -inf lse
    out, lse = pk.flash_attention(torch.randn(1, 3, 2, 8), torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8),
                                  return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all()
    # varlen with no sequences
    cu = torch.zeros(1, dtype=torch.int32)
    out = pk.flash_attention(torch.randn(0, 2, 8), torch.randn(0, 2, 8), torch.randn(0, 2, 8), cu_seqlens_q=cu,
                             cu_seqlens_k=cu)
    assert out.shape == (0, 2, 8)
    out = pk.scaled_dot_product_attention(torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8), torch.randn(0, 2, 4, 8))
    assert out.shape == (0, 2, 4, 8)


def test_deterministic_and_thread_count_independent():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 300, 2, 64, generator=g, requires_grad=True)
    k = torch.randn(1, 300, 1, 64, generator=g, requires_grad=True)
    v = torch.randn(1, 300, 1, 64, generator=g, requires_grad=True)
    dout = torch.randn(1, 300, 2, 64, generator=g)
    results = []
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        out = pk.flash_attention(q, k, v, causal=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def _opcheck_samples():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 9, 4, 16, generator=g)
    k = torch.randn(2, 11, 2, 16, generator=g)
    v = torch.randn(2, 11, 2, 16, generator=g)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32)
    mask = (torch.rand(9, 11, generator=g) > 0.2).expand(2, 4, 9, 11)
    return [
        (q, k, v, None, None, None, -1, -1, 0.25, -1, 0, True),
        (q[0], k[0], v[0], cu_q, cu_k, None, 5, 6, 0.25, 3, -1, True),
        (q, k, v, None, None, mask, -1, -1, 0.3, -1, -1, False),
    ]


def test_opcheck_forward_and_backward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, args)
        q, k, v = (t.clone().requires_grad_() for t in args[:3])
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, (q, k, v, *args[3:]))
        out, lse = torch.ops.pretrain_kernels.flash_attn_fwd(*args)
        dout = torch.randn_like(out)
        for deterministic in (True, False):
            torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_bwd,
                                  (dout, *args[:3], out, lse, torch.randn_like(lse), *args[3:], deterministic))


def test_opcheck_kvcache():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 4, 16, generator=g)
    kc, vc = torch.randn(2, 10, 2, 16, generator=g), torch.randn(2, 10, 2, 16, generator=g)
    kn, vn = torch.randn(2, 3, 2, 16, generator=g), torch.randn(2, 3, 2, 16, generator=g)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache, (q, kc, vc, lens, kn, vn, 0.25, True))
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache, (q, kc, vc, lens, None, None, 0.25, False))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 20, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)

    def f(q, k, v):
        out, lse = pk.flash_attention(q, k, v, causal=True, window=(8, -1), return_lse=True)
        return out.sum() + lse.sum()

    def s(q, k, v, mask):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return pk.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).sum()

    mask = torch.randn(20, 24)
    for fn, args in ((f, (q, k, v)), (s, (q, k, v, mask))):
        eager = fn(*args)
        ge = torch.autograd.grad(eager, (q, k, v))
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        gc = torch.autograd.grad(compiled, (q, k, v))
        torch.testing.assert_close(compiled, eager)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)

    def d(q, kc, vc, lens, kn, vn):
        return pk.flash_attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn)

    kc, vc = torch.zeros(2, 12, 2, 16), torch.zeros(2, 12, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    q1 = torch.randn(2, 1, 4, 16)
    kc2, vc2 = kc.clone(), vc.clone()
    eager = d(q1, kc, vc, lens, kn, vn)
    compiled = torch.compile(d, fullgraph=True, backend="aot_eager")(q1, kc2, vc2, lens, kn, vn)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_bad_inputs():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        pk.flash_attention(q, k, v)
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention(torch.randn(1, 4, 2, 257), torch.randn(1, 4, 2, 257), torch.randn(1, 4, 2, 257))
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16))
    with pytest.raises(TypeError, match="one dtype"):
        pk.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).double(), torch.randn(1, 4, 2, 8))
    with pytest.raises(TypeError, match="float32, float16"):
        pk.flash_attention(torch.ones(1, 4, 2, 8, dtype=torch.int32), torch.ones(1, 4, 2, 8, dtype=torch.int32),
                           torch.ones(1, 4, 2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="one device"):
        pk.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8, device="meta"), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="window"):
        pk.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), window=(-2, 0))
    # varlen
    qv, kv_ = torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected an int32"):
        pk.flash_attention(qv, kv_, kv_, cu_seqlens_q=torch.tensor([0, 9]), cu_seqlens_k=torch.tensor(
            [0, 9], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_q: expected non-decreasing"):
        pk.flash_attention(qv, kv_, kv_, cu_seqlens_q=torch.tensor([0, 5, 3, 9], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 3, 6, 9], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_k: expected to end at the token count 9"):
        pk.flash_attention(qv, kv_, kv_, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_q: expected to start at 0"):
        pk.flash_attention(qv, kv_, kv_, cu_seqlens_q=torch.tensor([1, 4, 9], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="pass both"):
        pk.flash_attention(qv, kv_, kv_, cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32))
    # kv cache
    kc, vc = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8)
    q1 = torch.randn(2, 1, 2, 8)
    with pytest.raises(RuntimeError, match="no two elements may share memory"):  # expanded along the batch
        pk.flash_attention_with_kvcache(q1, kc[:1].expand(2, -1, -1, -1), vc, torch.tensor([3, 4], dtype=torch.int32),
                                        k_new=torch.randn(2, 1, 2, 8), v_new=torch.randn(2, 1, 2, 8))
    with pytest.raises(RuntimeError, match="must not overlap each other"):
        pk.flash_attention_with_kvcache(q1, kc, kc, torch.tensor([3, 4], dtype=torch.int32),
                                        k_new=torch.randn(2, 1, 2, 8), v_new=torch.randn(2, 1, 2, 8))
    with pytest.raises(TypeError, match="cache_seqlens: expected an int32"):
        pk.flash_attention_with_kvcache(q1, kc, vc, torch.tensor([3, 4]))
    assert (kc == 0).all()  # nothing written by the failed calls
    # SDPA
    with pytest.raises(NotImplementedError, match="dropout_p"):
        pk.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        pk.scaled_dot_product_attention(torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="at most one"):
        pk.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="broadcastable"):
        pk.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    # the raw op checks too (no Python wrapper in the way)
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        torch.ops.pretrain_kernels.flash_attn_fwd(q, k[:, :, :4], v[:, :, :4], None, None, None, -1, -1, 1.0, -1, -1,
                                                  True)


def kvcache_rows_that_do_not_fit(op):
    """Runs the kv-cache op `op` (raw schema) on a batch where rows 1 (7 + 2 tokens in a cache of
    8) and 2 (negative length) do not fit; checks the rule and returns (out, k_cache, v_cache)."""
    g = torch.Generator().manual_seed(5)
    B, S, H, D = 4, 8, 2, 16
    kc, vc = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    kn, vn = torch.randn(B, 2, H, D, generator=g), torch.randn(B, 2, H, D, generator=g)
    q = torch.randn(B, 2, H, D, generator=g)
    lens = torch.tensor([3, 7, -1, 6], dtype=torch.int32)
    k0, v0 = kc.clone(), vc.clone()
    out = op(q, kc, vc, lens, kn, vn, D ** -0.5, True)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.equal(kc[1], k0[1]) and torch.equal(vc[1], v0[1]) and torch.equal(kc[2], k0[2])
    for b, L in ((0, 3), (3, 6)):
        assert not torch.isnan(out[b]).any()
        assert torch.equal(kc[b, L:L + 2], kn[b]) and torch.equal(vc[b, L:L + 2], vn[b])
        assert torch.equal(kc[b, :L], k0[b, :L]) and torch.equal(kc[b, L + 2:], k0[b, L + 2:])
        ref, _ = attention_ref(q[b:b + 1], kc[b:b + 1, :L + 2], vc[b:b + 1, :L + 2], causal=True)
        assert rel_err(out[b:b + 1], ref) < 1e-5
    return out, kc, vc


def test_kvcache_rows_that_do_not_fit():
    """The one rule for a cache row whose tokens do not fit, the same on the CPU and on CUDA
    (tests/test_attention_cuda_emulated.py runs the CUDA kernels through the same function):
    nothing is written into that row, its output is NaN, and the other rows are unaffected."""
    kvcache_rows_that_do_not_fit(torch.ops.pretrain_kernels.flash_attn_kvcache)
    q, kc = torch.randn(1, 1, 2, 8), torch.zeros(1, 4, 2, 8)
    out = pk.flash_attention_with_kvcache(q, kc, kc.clone(), torch.tensor([4], dtype=torch.int32),
                                          k_new=torch.ones(1, 1, 2, 8), v_new=torch.ones(1, 1, 2, 8))
    assert torch.isnan(out).all() and (kc == 0).all()


def test_scale_and_window_semantics():
    """scale multiplies the scores; window (left, right) bounds j - i (aligned bottom-right)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=g) for _ in range(3))
    out = pk.flash_attention(q, k, v, scale=0.5, window=(3, 2))
    ref, _ = attention_ref(q, k, v, scale=0.5, window=(3, 2))
    assert rel_err(out, ref) < 1e-6
    # window (0, 0): each query sees only its own key, so out == v (with equal heads)
    out = pk.flash_attention(q, k, v, window=(0, 0))
    torch.testing.assert_close(out, v)
    # causal with Sq > Sk: the first Sq - Sk queries see nothing
    out = pk.flash_attention(q, k[:, :5], v[:, :5], causal=True)
    assert (out[:, :7] == 0).all() and (out[:, 7:] != 0).any()
    assert math.isclose(pk.flash_attention(q[:, :1], k[:, :1], v[:, :1])[0, 0, 0, 0].item(), v[0, 0, 0, 0].item(),
                        rel_tol=1e-6)


_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import pretrain_kernels as pk
from reference import attention_ref
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)):
    for (sq, sk, H, Hk, D, causal) in ((37, 129, 4, 2, 40, True), (130, 70, 2, 1, 96, False), (1, 300, 2, 2, 64, True)):
        q, k, v = torch.randn(1, sq, H, D), torch.randn(1, sk, Hk, D), torch.randn(1, sk, Hk, D)
        q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = pk.flash_attention(q, k, v, causal=causal)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_ref(qr, kr, vr, causal=causal)[0]
        rgrads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
        for a, b in ((out, ref), *zip(grads, rgrads)):
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err < tol, (dtype, sq, sk, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["generic", "avx512"])
def test_other_instruction_sets(isa):
    """The portable loops (CPUs without AVX-512) and the AVX-512 path without the bf16
    instructions, forced through PK_CPU_ISA in a fresh process."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PK_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
