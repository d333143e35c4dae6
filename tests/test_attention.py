"""Flash attention: forward, backward, varlen, GQA, causal/window, KV-cache decode, SDPA drop-in.

Accuracy is measured against the float64 reference (tests/reference.py) as the relative error
||out - ref|| / ||ref||, and must be at most twice torch SDPA's own error on the same inputs in
the same dtype."""
import math

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from reference import (ATTN_ERR_FLOOR, ATTN_FWD_CASES, assert_attention_matches, attention_dropout_mult, attention_ref,
                       attention_varlen_ref, attention_visible, contiguous_from_paged, dropout_threshold, kvcache_ref,
                       paged_from_contiguous, rel_err, torch_sdpa)

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
                                  (dout, *args[:3], out, lse, torch.randn_like(lse), *args[3:]),
                                  kwargs={"deterministic": deterministic})


def test_opcheck_kvcache():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 4, 16, generator=g)
    kc, vc = torch.randn(2, 10, 2, 16, generator=g), torch.randn(2, 10, 2, 16, generator=g)
    kn, vn = torch.randn(2, 3, 2, 16, generator=g), torch.randn(2, 3, 2, 16, generator=g)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    op = torch.ops.pretrain_kernels.flash_attn_kvcache
    torch.library.opcheck(op, (q, kc, vc, lens, kn, vn, 0.25, True, -1, -1, None))
    torch.library.opcheck(op, (q, kc, vc, lens, None, None, 0.25, False, -1, -1, None))


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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_same_tensor_as_q_k_v(backend):
    """Self-attention written f(x, x, x): one tensor in three places compiles (fullgraph) and its
    gradient is the sum of the three, as in eager mode."""
    g = torch.Generator().manual_seed(81)
    x = torch.randn(2, 13, 2, 16, generator=g, requires_grad=True)

    def f(x):
        return pk.flash_attention(x, x, x, causal=True).square().sum()

    def s(x):
        xt = x.transpose(1, 2)
        return pk.scaled_dot_product_attention(xt, xt, xt, is_causal=True).square().sum()

    for fn in (f, s):
        eager = fn(x)
        (ge,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(fn, fullgraph=True, backend=backend)(x)
        (gc,) = torch.autograd.grad(compiled, x)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(gc, ge)
        # the gradient of x is the sum over its three roles (three distinct float64 copies)
        x64 = x.detach().double().requires_grad_()
        q, k, v = (x64.clone() for _ in range(3))
        (gr,) = torch.autograd.grad(pk.flash_attention(q, k, v, causal=True).square().sum(), x64)
        torch.testing.assert_close(gc.double(), gr, atol=1e-4, rtol=1e-4)


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
    with pytest.raises(ValueError, match="dropout_p"):
        pk.scaled_dot_product_attention(q, q, q, dropout_p=1.1)
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
    out = op(q, kc, vc, lens, kn, vn, D ** -0.5, True, -1, -1, None)[0]
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


# ---- kv cache: paged layout, window, lse ----

KV_PAGE_SIZES = [1, 7, 16, 256]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("page_size", KV_PAGE_SIZES)
def test_kvcache_paged_equals_contiguous(page_size, dtype):
    """The same data in a contiguous cache and in pages at a random permutation of blocks: the
    same output and lse bits on the CPU, and the same cache contents after appends that cross
    page boundaries, over steps of 1, 5, 70 and 1 tokens (decode, the rows path, the packed
    path), with GQA, windows, causal or not, and rows at different lengths; blocks that no
    table names are never touched."""
    g = torch.Generator().manual_seed(20 + page_size)
    B, H, Hk, D = 3, 4, 2, 40
    cap = -(-300 // page_size) * page_size
    kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, page_size, gen=g)
    spare = torch.ones(kp.shape[0], dtype=torch.bool)
    spare[table.flatten().long()] = False
    kp_spare, vp_spare = kp[spare].clone(), vp[spare].clone()
    lens = torch.tensor([0, 17, 200], dtype=torch.int32)
    for n, causal, window in ((1, True, (-1, -1)), (5, True, (8, -1)), (70, False, (-1, -1)), (1, False, (30, 2))):
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        kw = dict(k_new=kn, v_new=vn, causal=causal, window=window, return_lse=True)
        out_c, lse_c = pk.flash_attention_with_kvcache(q, kc, vc, lens, **kw)
        out_p, lse_p = pk.flash_attention_with_kvcache(q, kp, vp, lens, block_table=table, **kw)
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
        assert torch.equal(contiguous_from_paged(kp, table), kc) and torch.equal(contiguous_from_paged(vp, table), vc)
        assert torch.equal(kp[spare], kp_spare) and torch.equal(vp[spare], vp_spare)
        lens += n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 48, 64])
@pytest.mark.parametrize("head_dim", [64, 160])
def test_kvcache_paged_decode_long_rows_equal_contiguous(head_dim, page_size, dtype):
    """Decode over caches of several key blocks (the CPU kernels read the keys and values a page
    run at a time and fetch the next block's rows ahead): the bits of the contiguous cache, at
    page sizes that are and are not powers of two, head dims that take one and two passes over
    the value columns, GQA, and rows of different lengths (0, inside a page, on page ends).
    Table entries past the pages a row uses hold invalid block ids and are never read."""
    g = torch.Generator().manual_seed(7 * page_size + head_dim)
    B, H, Hk = 5, 4, 2
    cap = -(-700 // page_size) * page_size
    kc, vc = rand(B, cap, Hk, head_dim, dtype=dtype, gen=g), rand(B, cap, Hk, head_dim, dtype=dtype, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, page_size, gen=g)
    lens = torch.tensor([0, 5, 3 * page_size - 1, 383, cap - 1], dtype=torch.int32)
    for b in range(B):  # past the pages of len + 1 keys
        table[b, -(-(int(lens[b]) + 1) // page_size):] = [-7, 2 ** 30][b % 2]
    q = rand(B, 1, H, head_dim, dtype=dtype, gen=g)
    kn, vn = rand(B, 1, Hk, head_dim, dtype=dtype, gen=g), rand(B, 1, Hk, head_dim, dtype=dtype, gen=g)
    kw = dict(k_new=kn, v_new=vn, return_lse=True)
    out_c, lse_c = pk.flash_attention_with_kvcache(q, kc, vc, lens, **kw)
    out_p, lse_p = pk.flash_attention_with_kvcache(q, kp, vp, lens, block_table=table, **kw)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    ref, _, _, _ = kvcache_ref(q, kc, vc, lens, k_new=kn, v_new=vn)
    assert rel_err(out_c, ref) < (2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 3, 16, 64])
@pytest.mark.parametrize("case", ["plain", "window", "softcap_alibi"])
def test_kvcache_paged_page_runs_equal_contiguous(case, page_size, dtype):
    """The CPU decode kernels walk the keys and values a page (run) at a time, 16 keys per step:
    steps inside one page, steps across several pages (page sizes 1 and 3), steps starting
    inside a page (a window starts the keys anywhere), cache lengths off multiples of the page
    size, GQA (3 query heads per kv head, 1 and 2 query rows), head dims of one full and one
    masked vector pass. The paged cache gives the contiguous cache's bits, out and lse, and
    both match the float64 reference, with soft-capping and ALiBi slopes per (batch, head)."""
    g = torch.Generator().manual_seed(1000 + 10 * page_size + len(case))
    B, H, Hk = 4, 6, 2
    cap = -(-300 // page_size) * page_size
    lens = torch.tensor([0, 37, 130, cap - 2], dtype=torch.int32)
    window = (45, -1) if case == "window" else (-1, -1)
    softcap = 0.9 if case == "softcap_alibi" else None
    slopes = torch.rand(B, H, generator=g) * 0.3 if case == "softcap_alibi" else None
    for D, n in ((64, 1), (40, 2)):
        kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
        kp, vp, table = paged_from_contiguous(kc, vc, page_size, gen=g)
        for b in range(B):  # entries past the pages a row uses are never read
            table[b, -(-(int(lens[b]) + n) // page_size):] = -1
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        kw = dict(k_new=kn, v_new=vn, window=window, softcap=softcap, alibi_slopes=slopes, return_lse=True)
        out_c, lse_c = pk.flash_attention_with_kvcache(q, kc, vc, lens, **kw)
        out_p, lse_p = pk.flash_attention_with_kvcache(q, kp, vp, lens, block_table=table, **kw)
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
        ref, ref_lse, _, _ = kvcache_ref(q, kc, vc, lens + n, window=window, softcap=softcap, alibi_slopes=slopes)
        assert rel_err(out_c, ref) < (2e-2 if dtype != torch.float32 else 1e-5)
        live = torch.isfinite(ref_lse)
        assert torch.equal(live, torch.isfinite(lse_c))
        torch.testing.assert_close(lse_c[live].double(), ref_lse[live], atol=1e-4, rtol=1e-4)


def _kv_sdpa_err(q, k_rows, v_rows, lens, s_new, causal, window, scale):
    """torch SDPA's relative error (in q's dtype) on the rows a kv-cache call attends to."""
    left, right = window
    outs, refs = [], []
    for b in range(q.shape[0]):
        L = int(lens[b]) + s_new
        kb, vb = k_rows[b:b + 1, :L].to(q.dtype), v_rows[b:b + 1, :L].to(q.dtype)
        outs.append(torch_sdpa(q[b:b + 1], kb, vb, window=(left, 0 if causal else right), scale=scale))
        refs.append(attention_ref(q[b:b + 1], kb, vb, window=(left, 0 if causal else right), scale=scale)[0])
    return rel_err(torch.cat(outs), torch.cat(refs))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (True, (6, -1)), (True, (0, 7)), (False, (6, 3)),
                                            (False, (-1, 0)), (False, (0, -1)), (False, (2**62, 2**62))],
                         ids=lambda c: str(c))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_window_and_lse_match_reference(paged, causal, window, dtype):
    """Sliding-window decode / chunked prefill (aligned bottom-right; causal sets right = 0)
    and the returned lse against the float64 reference, contiguous and paged (page size 5),
    with GQA, an empty row and a window wider than any row."""
    g = torch.Generator().manual_seed(31)
    B, H, Hk, D, cap, n = 3, 6, 2, 24, 65, 3
    kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
    table = None
    if paged:
        kc, vc, table = paged_from_contiguous(kc, vc, 5, gen=g)
    lens = torch.tensor([0, 9, 40], dtype=torch.int32)
    q = rand(B, n, H, D, dtype=dtype, gen=g)
    kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
    ref, ref_lse, k_rows, v_rows = kvcache_ref(q, kc, vc, lens, k_new=kn, v_new=vn, causal=causal, scale=0.3,
                                               window=window, block_table=table)
    out, lse = pk.flash_attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, causal=causal, scale=0.3,
                                               window=window, block_table=table, return_lse=True)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (B, H, n)
    rows = (kc, vc) if table is None else (contiguous_from_paged(kc, table), contiguous_from_paged(vc, table))
    assert torch.equal(rows[0], k_rows.to(dtype)) and torch.equal(rows[1], v_rows.to(dtype))
    sdpa_err = _kv_sdpa_err(q, k_rows, v_rows, lens, n, causal, window, 0.3)
    assert_attention_matches(out, lse, ref, ref_lse, sdpa_err, dtype)


def kvcache_paged_rows_that_do_not_fit(op):
    """Runs the kv-cache op `op` (raw schema) on a paged cache (page size 3, 3 blocks per row)
    where row 1 (7 + 3 tokens in 9) and row 2 (negative length) do not fit; row 3's table holds
    -1 and 99 past the pages it uses (never read). Checks the rule against the reference and
    returns (out, lse, k_pages, v_pages)."""
    g = torch.Generator().manual_seed(41)
    B, H, Hk, D, ps = 4, 4, 2, 16, 3
    kc, vc = rand(B, 9, Hk, D, gen=g), rand(B, 9, Hk, D, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, ps, gen=g)
    table[3, 2] = -1
    table[3, 1] = 99
    q = rand(B, 2, H, D, gen=g)
    kn, vn = rand(B, 3, Hk, D, gen=g), rand(B, 3, Hk, D, gen=g)
    lens = torch.tensor([4, 7, -1, 0], dtype=torch.int32)
    ref, ref_lse, k_rows, v_rows = kvcache_ref(q, kp, vp, lens, k_new=kn, v_new=vn, scale=0.25, block_table=table)
    k0, v0 = kp.clone(), vp.clone()
    out, lse = op(q, kp, vp, lens, kn, vn, 0.25, True, -1, -1, table)
    assert torch.isnan(out[1:3]).all() and torch.isnan(lse[1:3]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[3]).any()
    for b in (0, 3):
        assert rel_err(out[b], ref[b]) < 1e-5
        torch.testing.assert_close(lse[b].double(), ref_lse[b], atol=1e-5, rtol=0)
    k_want, v_want = k0.clone(), v0.clone()  # only the new tokens of rows 0 and 3 are written
    for b in (0, 3):
        for t in range(int(lens[b]), int(lens[b]) + 3):
            k_want[table[b, t // ps], t % ps], v_want[table[b, t // ps], t % ps] = kn[b, t - lens[b]], vn[b, t - lens[b]]
    assert torch.equal(kp, k_want) and torch.equal(vp, v_want)
    return out, lse, kp, vp


def test_kvcache_paged_rows_that_do_not_fit():
    """A paged row that does not fit follows the rule of the contiguous cache (no write, NaN
    out and lse); table entries past the pages a row uses are never read."""
    kvcache_paged_rows_that_do_not_fit(torch.ops.pretrain_kernels.flash_attn_kvcache)


def test_kvcache_paged_block_ids_out_of_range_raise_on_cpu():
    """On the CPU a block id outside [0, num_blocks) among the pages a row uses raises, naming
    the row, before anything is written (CUDA, which cannot raise without a host sync, treats
    the row as one that does not fit: tests/test_attention_cuda_emulated.py)."""
    g = torch.Generator().manual_seed(42)
    kc, vc = rand(3, 8, 1, 8, gen=g), rand(3, 8, 1, 8, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, 4, gen=g)
    q, kn, vn = rand(3, 1, 2, 8, gen=g), rand(3, 1, 1, 8, gen=g), rand(3, 1, 1, 8, gen=g)
    lens = torch.tensor([2, 4, 1], dtype=torch.int32)
    k0, v0 = kp.clone(), vp.clone()
    for bad in (kp.shape[0], -1, 2**31 - 1):
        t = table.clone()
        t[1, 1] = bad  # row 1 writes its new token at position 4: page 1
        with pytest.raises(RuntimeError, match=f"block_table: row 1 uses block id {bad} at index 1"):
            pk.flash_attention_with_kvcache(q, kp, vp, lens, k_new=kn, v_new=vn, block_table=t)
        assert torch.equal(kp, k0) and torch.equal(vp, v0)
    t = table.clone()
    t[0, 1] = -7  # row 0 uses page 0 only: never read
    out = pk.flash_attention_with_kvcache(q, kp, vp, lens, k_new=kn, v_new=vn, block_table=t)
    assert torch.isfinite(out).all()


def test_kvcache_paged_rows_sharing_a_block_do_not_crash():
    """Two rows whose tables name the same block share its memory (the caller's business): the
    call runs, and a row that only reads the shared block sees what the other wrote."""
    g = torch.Generator().manual_seed(43)
    kp, vp = rand(4, 4, 1, 8, gen=g), rand(4, 4, 1, 8, gen=g)
    table = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    q, kn, vn = rand(2, 1, 2, 8, gen=g), rand(2, 1, 1, 8, gen=g), rand(2, 1, 1, 8, gen=g)
    lens = torch.tensor([5, 3], dtype=torch.int32)
    out, lse = pk.flash_attention_with_kvcache(q, kp, vp, lens, k_new=kn, v_new=vn, block_table=table,
                                               return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.equal(kp[1, 1], kn[0, 0]) and torch.equal(kp[0, 3], kn[1, 0])


def test_opcheck_kvcache_paged_and_window():
    g = torch.Generator().manual_seed(44)
    kc, vc = rand(2, 12, 2, 16, gen=g), rand(2, 12, 2, 16, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, 4, gen=g)
    q, kn, vn = rand(2, 3, 4, 16, gen=g), rand(2, 3, 2, 16, gen=g), rand(2, 3, 2, 16, gen=g)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    op = torch.ops.pretrain_kernels.flash_attn_kvcache
    torch.library.opcheck(op, (q, kp, vp, lens, kn, vn, 0.25, True, 4, -1, table))
    torch.library.opcheck(op, (q, kp, vp, lens, None, None, 0.25, False, 2, 1, table))
    torch.library.opcheck(op, (q, kc, vc, lens, kn, vn, 0.25, False, 3, 0, None))


def test_kvcache_paged_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(45)
    kc, vc = rand(2, 16, 2, 16, gen=g), rand(2, 16, 2, 16, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, 4, gen=g)
    q, kn, vn = rand(2, 1, 4, 16, gen=g), rand(2, 1, 2, 16, gen=g), rand(2, 1, 2, 16, gen=g)
    lens = torch.tensor([3, 9], dtype=torch.int32)

    def f(q, kp, vp, lens, kn, vn, table):
        out, lse = pk.flash_attention_with_kvcache(q, kp, vp, lens, k_new=kn, v_new=vn, window=(4, -1),
                                                   block_table=table, return_lse=True)
        return out * 2, lse

    kp2, vp2 = kp.clone(), vp.clone()
    want = f(q, kp2, vp2, lens, kn, vn, table)
    got = torch.compile(f, fullgraph=True)(q, kp, vp, lens, kn, vn, table)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)


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
print("isa", pk.build_info()["cpu_isa"], flush=True)
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)):
    for (sq, sk, H, Hk, D, causal) in ((37, 129, 4, 2, 40, True), (130, 70, 2, 1, 96, False), (1, 300, 2, 2, 64, True),
                                       (161, 161, 4, 1, 64, True)):
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


_ISA_LEVELS = ["generic", "avx2", "avx512", "avx512bf16", "amx"]  # csrc/cpu/cpu_isa.h, in order


@pytest.mark.parametrize("isa", ["generic", "avx512", "avx512bf16", "amx"])
def test_other_instruction_sets(isa):
    """Each instruction-set level of the CPU kernels, forced through PK_CPU_ISA in a fresh
    process: the portable loops (CPUs without AVX-512), the AVX-512 path without the bf16
    instructions, the bf16 tiles on vdpbf16ps (AVX512-BF16) and on AMX; float32, bfloat16 and
    float16 forward and backward against the float64 reference. A level the CPU lacks skips."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PK_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                       text=True, timeout=300)
    got = next((line.split()[1] for line in r.stdout.splitlines() if line.startswith("isa ")), None)
    assert got in _ISA_LEVELS, (r.stdout[-500:], r.stderr[-2000:])
    if _ISA_LEVELS.index(got) < _ISA_LEVELS.index(isa):
        why = {"amx": "no AMX here (the CPU lacks amx-tile/amx-bf16, or Linux did not grant the process the "
                      "tile state: arch_prctl(ARCH_REQ_XCOMP_PERM))",
               "avx512bf16": "the CPU has no AVX512-BF16"}.get(isa, f"the CPU has no {isa}")
        pytest.skip(f"PK_CPU_ISA={isa}: {why}; the kernels run {got}")
    assert got == isa
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# ---- prefix-LM (prefix_lens) ------------------------------------------------------------------
# In sequence b every query also sees the keys j < prefix_lens[b] (a bidirectional prefix, causal
# order after it); a left window still bounds what a query sees. The reference builds that mask
# explicitly (reference.attention_visible(prefix=...)).

# (B, Sq, Sk, H, Hk, D, causal, window, prefix per sequence): prefixes 0, 1, a middle value and
# Sk; more queries than keys (early rows see only the prefix), fewer, a left window, a right
# window without causal, no causal and no right window (the prefix changes nothing), GQA.
PREFIX_CASES = [
    (4, 70, 70, 4, 2, 32, True, (-1, -1), [0, 1, 35, 70]),
    (2, 40, 130, 2, 1, 64, True, (-1, -1), [1, 100]),
    (2, 150, 60, 2, 2, 24, True, (-1, -1), [30, 60]),
    (2, 129, 129, 3, 1, 40, True, (16, -1), [0, 100]),
    (2, 65, 65, 2, 2, 8, False, (20, 3), [1, 50]),
    (2, 33, 33, 2, 2, 16, False, (-1, -1), [5, 33]),
    (1, 200, 200, 2, 1, 128, True, (-1, -1), [77]),
]


def _prefix_inputs(case, dtype, seed):
    B, sq, sk, H, Hk, D, causal, window, pl = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    return q, k, v, dout, torch.tensor(pl, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_prefix_lm_matches_reference(case, dtype, adevice):
    """Forward (out, lse) and the three gradients against the float64 reference, within twice
    torch SDPA's error on the same mask (given explicitly)."""
    B, sq, sk, H, Hk, D, causal, window, pl = case
    q, k, v, dout, prefix = _prefix_inputs(case, dtype, sq * 31 + sk + D)
    kw = dict(causal=causal, window=window)
    ref, ref_lse = attention_ref(q, k, v, prefix_lens=pl, **kw)

    def grads(fn, dt, dev="cpu"):
        xs = [t.detach().to(dev, dt).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        return out, [g.cpu() for g in torch.autograd.grad(out, xs, dout.to(dev, dt))]

    xs = [t.detach().to(adevice) for t in (q, k, v)]
    out, lse = pk.flash_attention(*xs, prefix_lens=prefix.to(adevice), return_lse=True, **kw)
    theirs = rel_err(torch_sdpa(q, k, v, prefix_lens=pl, **kw), ref)
    assert_attention_matches(out.cpu(), lse.cpu(), ref, ref_lse, theirs, dtype)
    _, rg = grads(lambda a, b, c: attention_ref(a, b, c, prefix_lens=pl, **kw)[0], torch.float64)
    _, og = grads(lambda a, b, c: pk.flash_attention(a, b, c, prefix_lens=prefix.to(adevice), **kw), dtype, adevice)
    _, tg = grads(lambda a, b, c: torch_sdpa(a, b, c, prefix_lens=pl, **kw), dtype)
    for name, o, t, r in zip("qkv", og, tg, rg):
        assert o.dtype == dtype and o.shape == r.shape
        assert rel_err(o, r) <= 2 * max(rel_err(t, r), FLOOR[dtype]), (name, rel_err(o, r), rel_err(t, r))
    # the prefix changed what the queries see exactly where the mask says it should
    plain = attention_ref(q, k, v, **kw)[0]
    changed = [not torch.equal(attention_visible(sq, sk, prefix=n, **kw), attention_visible(sq, sk, **kw)) for n in pl]
    assert any(changed) == (causal or window[1] >= 0)
    for b in range(B):
        assert torch.equal(ref[b], plain[b]) != changed[b]


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (7, 2)), (True, (12, -1))])
def test_prefix_lm_varlen_gqa(causal, window, adevice):
    """Varlen: a different prefix per sequence (0, the sequence's key count, 1, a middle value,
    an empty sequence), GQA, forward and backward in float64 (CPU) / float32 against the
    per-sequence reference; and each sequence equals a dense call with its own prefix."""
    g = torch.Generator().manual_seed(21)
    lens_q, lens_k = [23, 9, 1, 70, 0], [30, 9, 17, 131, 4]
    prefix = [0, 9, 1, 64, 2]
    H, Hk, D = 6, 2, 24
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    dt = torch.float64 if adevice.type == "cpu" else torch.float32
    q = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), Hk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64)
    xs = [t.to(adevice, dt).requires_grad_() for t in (q, k, v)]
    pl = torch.tensor(prefix, dtype=torch.int32, device=adevice)
    out, lse = pk.flash_attention(*xs, causal=causal, window=window, cu_seqlens_q=cu_q.to(adevice),
                                  cu_seqlens_k=cu_k.to(adevice), prefix_lens=pl, return_lse=True)
    grads = torch.autograd.grad(out, xs, dout.to(adevice, dt))
    rs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_varlen_ref(*rs, cu_q, cu_k, prefix_lens=prefix, causal=causal, window=window)
    rgrads = torch.autograd.grad(ref, rs, dout)
    tol = 1e-12 if dt == torch.float64 else 1e-5
    assert rel_err(out, ref) < tol
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    torch.testing.assert_close(lse.cpu().double()[fin], ref_lse[fin], atol=tol, rtol=0)
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 10 * tol
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        sq_, sk_ = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        ob = pk.flash_attention(xs[0][sq_][None], xs[1][sk_][None], xs[2][sk_][None], causal=causal, window=window,
                                prefix_lens=pl[b:b + 1])
        torch.testing.assert_close(ob[0], out[sq_], atol=tol, rtol=0)


def test_prefix_lm_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    for shape, causal, window, pl in (((2, 6, 6, 2, 1, 3), True, (-1, -1), [2, 6]),
                                      ((2, 7, 5, 2, 2, 4), True, (2, -1), [3, 0]),
                                      ((1, 5, 8, 2, 1, 3), False, (1, 1), [4])):
        B, sq, sk, H, Hk, D = shape
        q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        prefix = torch.tensor(pl, dtype=torch.int32)
        # rows that see no key have lse -inf (numerical differentiation cannot handle it): out only
        lse = bool(torch.isfinite(attention_ref(q, k, v, causal=causal, window=window, prefix_lens=pl)[1]).all())
        assert torch.autograd.gradcheck(
            lambda a, b, c: pk.flash_attention(a, b, c, causal=causal, window=window, prefix_lens=prefix,
                                               return_lse=lse), (q, k, v))
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(8, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    prefix = torch.tensor([2, 1, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pk.flash_attention(a, b, c, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           prefix_lens=prefix, return_lse=True), (q, k, v))


def test_prefix_lm_random_shapes_against_reference():
    """Many random shapes, lengths, windows, alignments and prefixes (float64): the tile logic
    (which key blocks a query block visits, which query blocks a key block visits in the
    backward, which tiles need an element mask) must agree with the plain mask everywhere.
    Lengths straddle the CPU kernels' blocks (64 / 128 rows and keys)."""
    g = torch.Generator().manual_seed(2024)
    ops = torch.ops.pretrain_kernels
    for it in range(80):
        ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        B, sq, sk = ri(1, 3), ri(1, 300), ri(1, 300)
        Hk = ri(1, 2)
        H, D = Hk * ri(1, 3), ri(1, 20)
        left = [-1, -1, ri(0, 150)][ri(0, 2)]
        right = [0, 0, -1, ri(0, 40)][ri(0, 3)]
        br = bool(ri(0, 1))
        pl = [ri(0, sk) if ri(0, 3) else [0, sk, 1][ri(0, 2)] for _ in range(B)]
        q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        prefix = torch.tensor(pl, dtype=torch.int32)
        out, lse = ops.flash_attn_fwd(q, k, v, None, None, None, -1, -1, D ** -0.5, left, right, br, 0.0, None, prefix)
        ref, ref_lse = attention_ref(q, k, v, window=(left, right), bottom_right=br, prefix_lens=pl)
        what = (B, sq, sk, H, Hk, D, left, right, br, pl)
        assert rel_err(out, ref) < 1e-12, what
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin), what
        dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
        grads = ops.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, D ** -0.5, left, right,
                                   br, 0.0, None, prefix)
        rgrads = torch.autograd.grad(ref, (q, k, v), dout)
        for a, r in zip(grads, rgrads):
            assert rel_err(a, r) < 1e-11, what


def test_prefix_lm_opcheck_and_compile():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 9, 4, 16, generator=g)
    k = torch.randn(2, 11, 2, 16, generator=g)
    v = torch.randn(2, 11, 2, 16, generator=g)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32)
    strided = torch.tensor([5, 0, 2, 0], dtype=torch.int32)[::2]  # a non-contiguous [batch] view
    samples = [
        (q, k, v, None, None, None, -1, -1, 0.25, -1, 0, True, 0.0, None, torch.tensor([4, 11], dtype=torch.int32)),
        (q[0], k[0], v[0], cu_q, cu_k, None, 5, 6, 0.25, 3, 0, True, 0.0, None, strided),
        (q, k, v, None, None, None, -1, -1, 0.3, -1, 2, False, 0.0, None, torch.tensor([0, 7], dtype=torch.int32)),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, args)
        qq, kk, vv = (t.clone().requires_grad_() for t in args[:3])
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, (qq, kk, vv, *args[3:]))
        out, lse = torch.ops.pretrain_kernels.flash_attn_fwd(*args)
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_bwd,
                              (torch.randn_like(out), *args[:3], out, lse, torch.randn_like(lse), *args[3:]))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    prefix = torch.tensor([3, 8], dtype=torch.int32)

    def f(q, k, v, prefix):
        out, lse = pk.flash_attention(q, k, v, causal=True, window=(6, -1), prefix_lens=prefix, return_lse=True)
        return out.sum() + lse.sum()

    eager = f(qg, kg, vg, prefix)
    ge = torch.autograd.grad(eager, (qg, kg, vg))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(qg, kg, vg, prefix)
    gc = torch.autograd.grad(compiled, (qg, kg, vg))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
    assert not torch.equal(eager, f(qg, kg, vg, torch.zeros(2, dtype=torch.int32)))


def test_prefix_lm_bad_inputs():
    q, k = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 1, 8)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    fa = pk.flash_attention
    with pytest.raises(TypeError, match="prefix_lens: expected an int32 tensor"):
        fa(q, k, k, causal=True, prefix_lens=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="prefix_lens: expected an int32 tensor"):
        fa(q, k, k, causal=True, prefix_lens=[1, 2])
    with pytest.raises(ValueError, match=r"prefix_lens: expected shape \(2,\)"):
        fa(q, k, k, causal=True, prefix_lens=i32(1, 2, 3))
    with pytest.raises(ValueError, match=r"prefix_lens: expected shape \(2,\)"):
        fa(q, k, k, causal=True, prefix_lens=i32(1, 2)[None])
    with pytest.raises(ValueError, match="prefix_lens: expected a tensor on cpu"):
        fa(q, k, k, causal=True, prefix_lens=torch.zeros(2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"prefix_lens: expected values in \[0, 7\] \(the keys of sequence 1\), "
                                          r"got 8 at row 1"):
        fa(q, k, k, causal=True, prefix_lens=i32(7, 8))
    with pytest.raises(ValueError, match=r"got -1 at row 0"):
        fa(q, k, k, causal=True, prefix_lens=i32(-1, 0))
    # varlen: the bound is each sequence's own key count
    qv, kv_ = torch.randn(9, 2, 8), torch.randn(10, 2, 8)
    cu_q, cu_k = i32(0, 4, 9), i32(0, 3, 10)
    fa(qv, kv_, kv_, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, prefix_lens=i32(3, 7))
    with pytest.raises(ValueError, match=r"expected values in \[0, 3\] \(the keys of sequence 0\), got 4 at row 0"):
        fa(qv, kv_, kv_, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, prefix_lens=i32(4, 7))
    with pytest.raises(ValueError, match=r"prefix_lens: expected shape \(2,\)"):
        fa(qv, kv_, kv_, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, prefix_lens=i32(3))
    # the raw op (CPU): the same checks in attention_checks.h, and the values on the host
    ops = torch.ops.pretrain_kernels

    def raw(prefix, qq=q, kk=k):
        return ops.flash_attn_fwd(qq, kk, kk, None, None, None, -1, -1, 0.3, -1, 0, True, 0.0, None, prefix)

    with pytest.raises(RuntimeError, match="prefix_lens: expected an int32 tensor, got Long"):
        raw(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"prefix_lens: expected shape \[2\]"):
        raw(i32(1))
    with pytest.raises(RuntimeError, match=r"prefix_lens: expected values in \[0, keys of the sequence\], got 9 at "
                                           r"row 1 \(7 keys\)"):
        raw(i32(0, 9))
    with pytest.raises(RuntimeError, match="got -3 at row 0"):
        raw(i32(-3, 0))
    with pytest.raises(RuntimeError, match=r"got 4 at row 0 \(3 keys\)"):
        ops.flash_attn_fwd(qv, kv_, kv_, cu_q, cu_k, None, -1, -1, 0.3, -1, 0, True, 0.0, None, i32(4, 7))
    out, lse = raw(i32(2, 7))
    with pytest.raises(RuntimeError, match="got 8 at row 1"):
        ops.flash_attn_bwd(out, q, k, k, out, lse, None, None, None, None, -1, -1, 0.3, -1, 0, True, prefix_lens=i32(2, 8))
    with pytest.raises(RuntimeError, match=r"prefix_lens: expected shape \[2\]"):
        ops.flash_attn_bwd(out, q, k, k, out, lse, None, None, None, None, -1, -1, 0.3, -1, 0, True, prefix_lens=i32(2, 3, 4))
    # the fake kernels check as the C++ does (meta tensors)
    m = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(RuntimeError, match="prefix_lens: expected an int32 tensor"):
        ops.flash_attn_fwd(m(q), m(k), m(k), None, None, None, -1, -1, 0.3, -1, 0, True, prefix_lens=m(torch.tensor([1, 2])))
    with pytest.raises(RuntimeError, match=r"prefix_lens: expected shape \[2\]"):
        ops.flash_attn_fwd(m(q), m(k), m(k), None, None, None, -1, -1, 0.3, -1, 0, True, 0.0, None, m(i32(1)))
    with pytest.raises(RuntimeError, match="prefix_lens: expected a tensor on meta"):
        ops.flash_attn_fwd(m(q), m(k), m(k), None, None, None, -1, -1, 0.3, -1, 0, True, 0.0, None, i32(1, 2))
    out_m, _ = ops.flash_attn_fwd(m(q), m(k), m(k), None, None, None, -1, -1, 0.3, -1, 0, True, 0.0, None, m(i32(1, 2)))
    assert out_m.shape == q.shape and out_m.device.type == "meta"


# ---- score modifiers: soft-cap and ALiBi -----------------------------------------------------

# (B, Sq, Sk, H, Hk, D, causal, window): odd sizes, GQA, unequal lengths both ways, windows,
# decode-like rows, rows that see no key (window (2, 1) with Sq > Sk)
MOD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 130, 130, 4, 2, 40, True, (-1, -1)),
    (1, 33, 200, 2, 1, 96, True, (-1, -1)),
    (1, 200, 33, 2, 2, 8, True, (-1, -1)),
    (1, 129, 140, 2, 1, 24, False, (20, 3)),
    (2, 1, 150, 4, 1, 64, True, (-1, -1)),
    (1, 9, 5, 2, 1, 7, False, (2, 1)),
]
MODS = {
    "softcap": lambda B, H, g: dict(softcap=2.5),
    "alibi-h": lambda B, H, g: dict(alibi_slopes=torch.rand(H, generator=g) * 0.5),
    "alibi-bh": lambda B, H, g: dict(alibi_slopes=torch.rand(B, H, generator=g) * 0.5),
    "both": lambda B, H, g: dict(softcap=1.5, alibi_slopes=torch.rand(B, H, generator=g) * 0.3),
}


def _mods_to(mods, device):
    return {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in mods.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mod", list(MODS), ids=str)
@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_score_mods_match_reference(case, mod, dtype, adevice):
    """Forward and gradients with softcap / ALiBi against the float64 reference, within twice
    the error of the eager composite in the same dtype (floored per dtype)."""
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 31 + sk + D + len(mod))
    mods = MODS[mod](B, H, g)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g) * 2, rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    kw = dict(causal=causal, window=window)

    def run(fn, dt, dev="cpu"):
        xs = [t.detach().to(dev, dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*xs)
        grads = torch.autograd.grad(out, xs, dout.to(dev, dt))
        return out.detach().cpu(), lse.detach().cpu(), [x.cpu() for x in grads]

    ref, ref_lse, rgrads = run(lambda a, b, c: attention_ref(a, b, c, **kw, **mods), torch.float64)
    out, lse, grads = run(lambda a, b, c: pk.flash_attention(a, b, c, **kw, **_mods_to(mods, adevice),
                                                             return_lse=True), dtype, adevice)
    eager, _, egrads = run(lambda a, b, c: attention_ref(a, b, c, **kw, **mods, compute_dtype=dtype), dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=20 * ATTN_ERR_FLOOR[dtype], rtol=0)
    assert rel_err(out, ref) <= 2 * max(rel_err(eager, ref), FLOOR[dtype])
    for name, o, e, r in zip("qkv", grads, egrads, rgrads):
        assert rel_err(o, r) <= 2 * max(rel_err(e, r), 2 * FLOOR[dtype]), (name, rel_err(o, r), rel_err(e, r))


@pytest.mark.parametrize("prefix", [False, True], ids=["noprefix", "prefix"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [(-1, -1), (6, 2)], ids=["nowindow", "window"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mod", list(MODS), ids=str)
def test_score_mods_every_combination(mod, causal, window, gqa, varlen, prefix, adevice):
    """softcap / ALiBi with causal, windows, GQA, unequal lengths, varlen (per-sequence
    alignment of the ALiBi distance) and the prefix-LM mask, forward and backward in float32
    against the reference."""
    g = torch.Generator().manual_seed(13)
    H, Hk, D = (6, 2, 24) if gqa else (3, 3, 24)
    lens_q = [23, 1, 70] if varlen else [37, 37]
    lens_k = [9, 17, 131] if varlen else [29, 29]
    B, tq, tk = len(lens_q), sum(lens_q), sum(lens_k)
    mods = MODS[mod](B, H, g)
    q = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(tk, Hk, D, generator=g, dtype=torch.float64)
    dout = torch.randn(tq, H, D, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q32, k32, v32 = (t.to(adevice, torch.float32).requires_grad_() for t in (q, k, v))
    dm = _mods_to(mods, adevice)
    pl = [n // 2 for n in lens_k] if prefix else None
    if prefix:
        dm["prefix_lens"] = torch.tensor(pl, dtype=torch.int32, device=adevice)
    if varlen:
        out = pk.flash_attention(q32, k32, v32, causal=causal, window=window, cu_seqlens_q=cu_q.to(adevice),
                                 cu_seqlens_k=cu_k.to(adevice), **dm)
    else:
        out = pk.flash_attention(q32.view(B, -1, H, D), k32.view(B, -1, Hk, D), v32.view(B, -1, Hk, D),
                                 causal=causal, window=window, **dm).reshape(tq, H, D)
    grads = torch.autograd.grad(out, (q32, k32, v32), dout.to(adevice, torch.float32))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention_varlen_ref(qr, kr, vr, cu_q, cu_k, causal=causal, window=window, prefix_lens=pl, **mods)
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    assert rel_err(out, ref) < 2e-6
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) < 2e-5


def test_score_mods_gradcheck_float64():
    g = torch.Generator().manual_seed(21)
    cases = [
        dict(shape=(1, 5, 7, 2, 1, 4), causal=True, window=(-1, -1), softcap=0.7, alibi=None),
        dict(shape=(2, 4, 6, 2, 2, 3), causal=False, window=(2, 1), softcap=None, alibi=(2,)),
        dict(shape=(2, 4, 6, 4, 2, 5), causal=True, window=(-1, -1), softcap=1.3, alibi=(2, 4)),
        dict(shape=(1, 6, 4, 2, 1, 3), causal=False, window=(2, 1), softcap=0.5, alibi=(2,), lse=False),
    ]
    for c in cases:
        B, sq, sk, H, Hk, D = c["shape"]
        q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        slopes = None if c["alibi"] is None else torch.rand(*c["alibi"][:-1], H, generator=g)
        fn = lambda a, b, cc: pk.flash_attention(a, b, cc, causal=c["causal"], window=c["window"],  # noqa: E731
                                                 softcap=c["softcap"], alibi_slopes=slopes,
                                                 return_lse=c.get("lse", True))
        assert torch.autograd.gradcheck(fn, (q, k, v))
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(8, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    slopes = torch.rand(3, 2, generator=g)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pk.flash_attention(a, b, c, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softcap=0.9,
                                           alibi_slopes=slopes), (q, k, v))


def test_score_mods_limits_and_no_slope_gradient():
    """A huge cap changes nothing measurable; zero slopes are plain attention; slopes that
    require grad get none (as FlashAttention)."""
    g = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(2, 19, 4, 16, generator=g) for _ in range(3))
    plain = pk.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(pk.flash_attention(q, k, v, causal=True, softcap=1e7), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(pk.flash_attention(q, k, v, causal=True, alibi_slopes=torch.zeros(4)), plain,
                               atol=1e-6, rtol=0)
    slopes = torch.rand(4, generator=g).requires_grad_()
    qg = q.clone().requires_grad_()
    pk.flash_attention(qg, k, v, alibi_slopes=slopes, softcap=3.0).sum().backward()
    assert slopes.grad is None and qg.grad is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_mods_kvcache(dtype, adevice):
    """Decode and chunked prefill with softcap / ALiBi: the ALiBi distance is aligned to each
    row's cache length (cache_seqlens + seqlen_new keys)."""
    g = torch.Generator().manual_seed(23)
    B, Smax, H, Hk, D = 3, 40, 4, 2, 32
    lens = torch.tensor([5, 0, 30], dtype=torch.int32)
    for s_new, sq in ((1, 1), (4, 4)):
        kc, vc = rand(B, Smax, Hk, D, dtype=dtype, gen=g), rand(B, Smax, Hk, D, dtype=dtype, gen=g)
        kn, vn = rand(B, s_new, Hk, D, dtype=dtype, gen=g), rand(B, s_new, Hk, D, dtype=dtype, gen=g)
        q = rand(B, sq, H, D, dtype=dtype, gen=g)
        slopes = torch.rand(B, H, generator=g)
        out = pk.flash_attention_with_kvcache(q.to(adevice), kc.to(adevice), vc.to(adevice), lens.to(adevice),
                                              k_new=kn.to(adevice), v_new=vn.to(adevice), softcap=2.0,
                                              alibi_slopes=slopes.to(adevice)).cpu()
        for b in range(B):
            n = int(lens[b]) + s_new
            keys = torch.cat([kc[b, :lens[b]], kn[b]])[None]
            vals = torch.cat([vc[b, :lens[b]], vn[b]])[None]
            ref, _ = attention_ref(q[b:b + 1], keys, vals, causal=True, softcap=2.0, alibi_slopes=slopes[b])
            eager, _ = attention_ref(q[b:b + 1], keys, vals, causal=True, softcap=2.0, alibi_slopes=slopes[b],
                                     compute_dtype=dtype)
            assert keys.shape[1] == n
            assert rel_err(out[b:b + 1], ref) <= 2 * max(rel_err(eager, ref), FLOOR[dtype])


@pytest.mark.parametrize("cap", [0.37, 30.0])
def test_softcap_tanh_is_within_a_few_ulps(cap):
    """With one key and head_dim 1 the lse of a query is its capped score, cap * tanh(s / cap),
    and d lse / d q = scale * k * (1 - tanh^2): the CPU kernel's tanh (a vector version on
    AVX-512) against float64, over scores from -20 cap to 20 cap."""
    n = 200_000
    s = torch.linspace(-20 * cap, 20 * cap, n, dtype=torch.float64)
    q = s.float().view(1, n, 1, 1).requires_grad_()
    k = torch.ones(1, 1, 1, 1)
    out, lse = pk.flash_attention(q, k, k, scale=1.0, softcap=cap, return_lse=True)
    t = torch.tanh(q.detach().double().view(-1) / cap)
    ref = cap * t
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((lse.double().view(-1) - ref).abs() <= 4 * ulp).all()
    (dq,) = torch.autograd.grad(lse.sum(), q)
    torch.testing.assert_close(dq.double().view(-1), 1 - t * t, atol=4e-7, rtol=0)


def test_score_mods_opcheck():
    g = torch.Generator().manual_seed(24)
    q = torch.randn(2, 9, 4, 16, generator=g)
    k = torch.randn(2, 11, 2, 16, generator=g)
    v = torch.randn(2, 11, 2, 16, generator=g)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32)
    mask = (torch.rand(9, 11, generator=g) > 0.2).expand(2, 4, 9, 11)
    sl_h, sl_bh = torch.rand(4, generator=g), torch.rand(2, 4, generator=g)
    samples = [
        (q, k, v, None, None, None, -1, -1, 0.25, -1, 0, True, 3.0, sl_h),
        (q[0], k[0], v[0], cu_q, cu_k, None, 5, 6, 0.25, 3, -1, True, 0.0, sl_bh),
        (q, k, v, None, None, mask, -1, -1, 0.3, -1, -1, False, 1.5, None),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, args)
        qq, kk, vv = (t.clone().requires_grad_() for t in args[:3])
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, (qq, kk, vv, *args[3:]))
        out, lse = torch.ops.pretrain_kernels.flash_attn_fwd(*args)
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_bwd,
                              (torch.randn_like(out), *args[:3], out, lse, torch.randn_like(lse), *args[3:]))
    q1 = torch.randn(2, 3, 4, 16, generator=g)
    kc, vc = torch.randn(2, 10, 2, 16, generator=g), torch.randn(2, 10, 2, 16, generator=g)
    kn, vn = torch.randn(2, 3, 2, 16, generator=g), torch.randn(2, 3, 2, 16, generator=g)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache,
                          (q1, kc, vc, lens, kn, vn, 0.25, True, -1, -1, None, 2.0, sl_bh))
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache,
                          (q1, kc, vc, lens, None, None, 0.25, False, -1, -1, None, 0.0, sl_h))


def test_score_mods_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(25)
    q = torch.randn(2, 20, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)
    slopes = torch.rand(2, 4, generator=g)

    def f(q, k, v, slopes):
        out, lse = pk.flash_attention(q, k, v, causal=True, softcap=4.0, alibi_slopes=slopes, return_lse=True)
        return out.sum() + lse.sum()

    eager = f(q, k, v, slopes)
    ge = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, slopes)
    gc = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


SCORE_MOD_BAD = [
    (dict(softcap=0.0), ValueError, "softcap: expected a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap: expected a finite number > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap: expected a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap: expected a finite number > 0"),
    (dict(softcap=1e-300), ValueError, "softcap: expected a value in"),
    (dict(softcap=True), TypeError, "softcap: expected a float or None"),
    (dict(softcap="1"), TypeError, "softcap: expected a float or None"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes: expected a float32 tensor"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, "alibi_slopes: expected a float32 tensor"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes: expected a float32 tensor"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes: expected shape \[4\] or \[2, 4\]"),
    (dict(alibi_slopes=torch.ones(4, 2)), ValueError, r"alibi_slopes: expected shape \[4\] or \[2, 4\]"),
    (dict(alibi_slopes=torch.ones(1, 2, 4)), ValueError, r"alibi_slopes: expected shape \[4\] or \[2, 4\]"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes: expected a tensor on cpu"),
    (dict(alibi_slopes=torch.tensor([0.1, float("nan"), 0.2, 0.3])), ValueError, "alibi_slopes: expected finite"),
    (dict(alibi_slopes=torch.tensor([0.1, 0.2, float("inf"), 0.3])), ValueError, "alibi_slopes: expected finite"),
]


@pytest.mark.parametrize("kw, exc, msg", SCORE_MOD_BAD, ids=range(len(SCORE_MOD_BAD)))
def test_score_mods_bad_inputs_python(kw, exc, msg):
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(exc, match=msg):
        pk.flash_attention(q, k, v, **kw)
    kc, vc, lens = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8), torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(exc, match=msg):
        pk.flash_attention_with_kvcache(q[:, :1], kc, vc, lens, **kw)


@pytest.mark.parametrize("kw, msg", [
    (dict(softcap=-1.0), "softcap: expected a finite number > 0"),
    (dict(softcap=float("nan")), "softcap: expected a finite number > 0"),
    (dict(softcap=float("inf")), "softcap: expected a finite number > 0"),
    (dict(softcap=1e-300), "softcap: expected a value in"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), "alibi_slopes: expected a float32 tensor"),
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes: expected shape \[4\] or \[2, 4\]"),
    (dict(alibi_slopes=torch.ones(2, 3)), r"alibi_slopes: expected shape \[4\] or \[2, 4\]"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), "alibi_slopes: expected a tensor on cpu"),
    (dict(alibi_slopes=torch.tensor([0.1, float("nan"), 0.2, 0.3])), "alibi_slopes: expected finite"),
], ids=range(9))
def test_score_mods_bad_inputs_raw_ops(kw, msg):
    """The raw ops raise RuntimeError (TORCH_CHECK in csrc/common/attention_checks.h, or the
    fake kernel when a meta tensor is involved) for each bad softcap / slopes."""
    ops = torch.ops.pretrain_kernels
    softcap, slopes = kw.get("softcap", 0.0), kw.get("alibi_slopes")
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(RuntimeError, match=msg):
        ops.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, -1, True, softcap, slopes)
    out, lse = ops.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, -1, True)
    with pytest.raises(RuntimeError, match=msg):
        ops.flash_attn_bwd(out, q, k, v, out, lse, None, None, None, None, -1, -1, 0.3, -1, -1, True, softcap, slopes)
    kc, vc, lens = torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8), torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=msg):
        ops.flash_attn_kvcache(q[:, :1], kc, vc, lens, None, None, 0.3, True, -1, -1, None, softcap, slopes)


# ---- attention dropout ---------------------------------------------------------------------
# The keep mask is a pure function of (seed, offset, sequence, head, query, key)
# (csrc/common/attention_dropout.h); tests/reference.py computes the same mask from Philox's
# definition, so the float64 reference sees exactly the kernel's mask.

# (B, Sq, Sk, H, Hk, D, causal, window, varlen, extra keyword arguments)
DROPOUT_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), False, {}),
    (1, 130, 130, 4, 2, 40, True, (-1, -1), False, {}),
    (1, 33, 200, 2, 1, 96, True, (-1, -1), False, {}),
    (1, 129, 140, 2, 1, 24, False, (20, 3), False, {}),
    (2, 1, 150, 4, 1, 64, True, (-1, -1), False, {}),
    (3, 45, 61, 4, 2, 32, True, (-1, -1), True, {}),
    (2, 70, 70, 2, 1, 16, True, (9, -1), False, {"softcap": 2.0, "alibi": True, "prefix": True}),
    (3, 50, 50, 2, 2, 8, True, (-1, -1), True, {"softcap": 1.5, "prefix": True}),
]


def _dropout_case(case, dtype, seed):
    """Inputs of a DROPOUT_CASES entry: (q, k, v, keyword arguments of pk.flash_attention without
    dropout, of attention_ref / attention_varlen_ref, varlen)."""
    B, sq, sk, H, Hk, D, causal, window, varlen, extra = case
    g = torch.Generator().manual_seed(seed)
    kw = dict(causal=causal, window=window)
    if "softcap" in extra:
        kw["softcap"] = extra["softcap"]
    if extra.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, H, generator=g) * 0.3
    if extra.get("prefix"):
        kw["prefix_lens"] = torch.randint(0, min(sq, sk) + 1, (B,), generator=g, dtype=torch.int32)
    if varlen:
        lq = torch.randint(0, sq + 1, (B,), generator=g)
        lq[0] = sq
        lk = lq + (sk - sq)
        cu_q = torch.cat([torch.zeros(1, dtype=torch.int32), lq.cumsum(0).to(torch.int32)])
        cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), lk.cumsum(0).to(torch.int32)])
        if "prefix_lens" in kw:
            kw["prefix_lens"] = torch.minimum(kw["prefix_lens"], lk.to(torch.int32))
        q = rand(int(cu_q[-1]), H, D, dtype=dtype, gen=g)
        k, v = rand(int(cu_k[-1]), Hk, D, dtype=dtype, gen=g), rand(int(cu_k[-1]), Hk, D, dtype=dtype, gen=g)
        ours = dict(kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        ref = lambda a, b, c, **d: attention_varlen_ref(a, b, c, cu_q, cu_k, **d)  # noqa: E731
    else:
        q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
            B, sk, Hk, D, dtype=dtype, gen=g)
        ours = dict(kw)
        ref = attention_ref
    refkw = dict(kw)
    if "softcap" not in refkw:
        refkw["softcap"] = None
    return q, k, v, ours, ref, refkw


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "-".join(str(x) for x in c[:9]) + "".join(c[9]))
def test_dropout_matches_reference(case, dtype, adevice):
    """Forward and gradients with dropout against the float64 reference with the same keep mask,
    within twice the error of the eager composite in the same dtype (floored per dtype)."""
    if dtype == torch.float64 and adevice.type != "cpu":
        pytest.skip("float64 runs on the CPU only")
    p, seed, offset = 0.17, 1234567 + case[1], 3 + case[2]
    q, k, v, ours, ref, refkw = _dropout_case(case, dtype, seed=case[1] * 31 + case[5])
    dout = torch.randn(*q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    drop = (p, seed, offset)
    seed_t = torch.tensor([seed, offset], dtype=torch.int64)

    def run(fn, dt, dev="cpu"):
        xs = [t.detach().to(dev, dt).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to(dev, dt))
        return [out.detach().cpu()] + [x.grad.cpu() for x in xs]

    r = run(lambda a, b, c: ref(a, b, c, dropout=drop, **refkw)[0], torch.float64)
    o = run(lambda a, b, c: pk.flash_attention(a, b, c, dropout_p=p, seed=seed_t, **_mods_to(ours, adevice)), dtype,
            adevice)
    floor = ATTN_ERR_FLOOR[dtype]
    if dtype == torch.float64:
        for a, b in zip(o, r):
            assert rel_err(a, b) <= 1e-12
        return
    y = run(lambda a, b, c: ref(a, b, c, dropout=drop, compute_dtype=dtype, **refkw)[0], dtype)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], o, y, r):
        assert a.dtype == dtype
        assert rel_err(a, c) <= 2 * max(rel_err(b, c), 2 * floor), (name, rel_err(a, c), rel_err(b, c))
    # the lse is the one without dropout
    _, lse = pk.flash_attention(*(t.to(adevice) for t in (q, k, v)), dropout_p=p, seed=seed_t, return_lse=True,
                                **_mods_to(ours, adevice))
    _, lse0 = pk.flash_attention(*(t.to(adevice) for t in (q, k, v)), return_lse=True, **_mods_to(ours, adevice))
    assert torch.equal(lse.cpu(), lse0.cpu())


def test_dropout_gradcheck_float64():
    g = torch.Generator().manual_seed(11)
    seed = torch.tensor([987654321, 7], dtype=torch.int64)
    cases = [
        dict(shape=(1, 5, 7, 2, 1, 4), causal=True, window=(-1, -1)),
        dict(shape=(2, 9, 9, 4, 2, 5), causal=False, window=(-1, -1), softcap=2.0),
        dict(shape=(2, 6, 6, 2, 2, 3), causal=False, window=(2, 1)),
    ]
    for c in cases:
        B, sq, sk, H, Hk, D = c.pop("shape")
        q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g, requires_grad=True)
        fn = lambda a, b, cc: pk.flash_attention(a, b, cc, dropout_p=0.3, seed=seed, return_lse=True, **c)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(8, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(11, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: pk.flash_attention(a, b, c, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dropout_p=0.5,
                                           seed=seed), (q, k, v))
    qs, ks, vs = (torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: pk.scaled_dot_product_attention(a, b, c, dropout_p=0.25, is_causal=True, seed=5), (qs, ks, vs))


def _read_keep_mask(B, sq, sk, H, p, seed, device="cpu", **kw):
    """The keep mask of a call read back through its output: q = 0 makes every visible score
    equal (P = 1 / sk without a window), and V = identity (head_dim = sk) puts key j's factor in
    output column j, so out * sk / rscale is the 0/1 keep mask, exactly (float64 or float32)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    q = torch.zeros(B, sq, H, sk, dtype=dtype, device=device)
    k = torch.randn(B, sk, 1, sk, dtype=dtype, device=device)
    v = torch.eye(sk, dtype=dtype, device=device).expand(B, 1, sk, sk).transpose(1, 2).contiguous()
    out = pk.flash_attention(q, k, v, dropout_p=p, seed=seed, **kw)
    t = dropout_threshold(p)
    return out.cpu().double().permute(0, 2, 1, 3) * sk * (65536 - t) / 65536  # (B, H, sq, sk)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_dropout_keep_mask_is_the_reference_and_binomial(p):
    """The kernel's keep mask equals the reference's bit for bit, and its kept fraction passes a
    binomial test (5 sigma) at a fixed seed."""
    B, sq, sk, H = 2, 300, 256, 3
    seed = torch.tensor([0x9234_5678_9ABC_DEF0 - 2**64, 2**32 - 5], dtype=torch.int64)
    m = _read_keep_mask(B, sq, sk, H, p, seed)
    ref = attention_dropout_mult(p, int(seed[0]), int(seed[1]), B, H, sq, sk) > 0
    torch.testing.assert_close(m, ref.double(), rtol=0, atol=1e-9)
    n, kept = ref.numel(), int(ref.sum())
    keep = 1 - dropout_threshold(p) / 65536
    assert abs(kept - n * keep) <= 5 * math.sqrt(n * keep * (1 - keep)), (kept, n * keep)


def test_dropout_mean_converges_to_no_dropout():
    """Averaged over many seeds, the output converges to the output without dropout: every
    element within 6 standard errors (the variance of one draw is sum_j P_ij^2 V_jd^2 p / (1 - p)),
    and the mean squared z-score near 1."""
    g = torch.Generator().manual_seed(12)
    B, sq, sk, H, Hk, D, p, n = 1, 9, 23, 2, 1, 5, 0.3, 600
    q = torch.randn(B, sq, H, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, sk, Hk, D, dtype=torch.float64, generator=g)
    base = pk.flash_attention(q, k, v, causal=True)
    acc = torch.zeros_like(base)
    for s in range(n):
        acc += pk.flash_attention(q, k, v, causal=True, dropout_p=p, seed=1000 + s)
    mean = acc / n
    keep = 1 - dropout_threshold(p) / 65536
    P = torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * D ** -0.5 +
                      torch.where(attention_visible(sq, sk, causal=True), 0.0, float("-inf")), dim=-1)  # (B, H, sq, sk)
    var = (P ** 2) @ (v.transpose(1, 2) ** 2) * (1 - keep) / keep  # (B, H, sq, D)
    z = (mean - base) / (var.transpose(1, 2) / n).sqrt()
    assert z.abs().max() < 6, z.abs().max()
    assert 0.5 < (z ** 2).mean() < 1.6, (z ** 2).mean()


def test_dropout_reproducible_and_thread_count_independent():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 300, 4, 64, generator=g, requires_grad=True)
    k = torch.randn(2, 300, 2, 64, generator=g, requires_grad=True)
    v = torch.randn(2, 300, 2, 64, generator=g, requires_grad=True)
    dout = torch.randn(2, 300, 4, 64, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (2, 1, 2):
            torch.set_num_threads(t)
            out = pk.flash_attention(q, k, v, causal=True, dropout_p=0.1, seed=42)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)
    # torch.manual_seed makes unseeded calls reproducible; a generator too; other seeds differ
    torch.manual_seed(3)
    a = pk.flash_attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(3)
    b = pk.flash_attention(q, k, v, dropout_p=0.1)
    c = pk.flash_attention(q, k, v, dropout_p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(pk.flash_attention(q, k, v, dropout_p=0.1, generator=ga),
                       pk.flash_attention(q, k, v, dropout_p=0.1, generator=gb))
    # an int seed is (seed, offset 0); a different offset gives another mask
    s0 = pk.flash_attention(q, k, v, dropout_p=0.1, seed=42)
    assert torch.equal(s0, pk.flash_attention(q, k, v, dropout_p=0.1, seed=torch.tensor([42, 0])))
    assert not torch.equal(s0, pk.flash_attention(q, k, v, dropout_p=0.1, seed=torch.tensor([42, 1])))


def test_dropout_varlen_equals_dense_sequences():
    """A sequence's mask depends on its index and positions, not on the packing: varlen with equal
    lengths equals the dense call bit for bit in float64."""
    g = torch.Generator().manual_seed(14)
    B, S, H, D = 3, 37, 2, 8
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64, generator=g) for _ in range(3))
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    dense = pk.flash_attention(q, k, v, causal=True, dropout_p=0.4, seed=77)
    packed = pk.flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True, cu_seqlens_q=cu,
                                cu_seqlens_k=cu, dropout_p=0.4, seed=77)
    torch.testing.assert_close(packed, dense.flatten(0, 1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_one_and_tiny(dtype):
    """p = 1 drops everything: output 0 and zero gradients (torch's convention); the lse stays
    the one without dropout. p below 2^-17 rounds to no dropout."""
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out, lse = pk.flash_attention(q, k, v, dropout_p=1.0, seed=1, return_lse=True)
    assert (out == 0).all() and torch.isfinite(lse).all()
    out.backward(torch.randn_like(out))
    assert all((t.grad == 0).all() for t in (q, k, v))
    assert torch.equal(pk.flash_attention(q, k, v, dropout_p=1e-6, seed=1), pk.flash_attention(q, k, v))


def test_dropout_sdpa_drop_in():
    """SDPA's dropout_p: the same mask as flash_attention for the same seed (top-left causal)."""
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, 3, 21, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out = pk.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True, seed=9)
    ref, _ = attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, dropout=(0.2, 9, 0))
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    a = pk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(0)
    assert torch.equal(a, pk.scaled_dot_product_attention(q, k, v, dropout_p=0.2))


def test_dropout_opcheck_and_compile():
    ops = torch.ops.pretrain_kernels
    seed = torch.tensor([5, 6], dtype=torch.int64)
    for args in _opcheck_samples():
        full = (*args, 0.0, None, None, 0.2, seed)
        q, k, v = (t.clone().requires_grad_() for t in args[:3])
        torch.library.opcheck(ops.flash_attn_fwd, full)
        torch.library.opcheck(ops.flash_attn_fwd, (q, k, v, *full[3:]))
        out, lse = ops.flash_attn_fwd(*full)
        torch.library.opcheck(ops.flash_attn_bwd, (torch.randn_like(out), *args[:3], out, lse, torch.randn_like(lse),
                                                   *args[3:], 0.0, None, None, 0.2, seed))
    g = torch.Generator().manual_seed(17)
    q = torch.randn(2, 20, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 24, 2, 16, generator=g, requires_grad=True)

    def f(q, k, v, s):
        return pk.flash_attention(q, k, v, causal=True, dropout_p=0.1, seed=s).sum()

    s = torch.tensor([123, 4], dtype=torch.int64)
    eager = f(q, k, v, s)
    ge = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, s)
    gc = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

    def u(q, k, v):  # unseeded: the seed is drawn inside the graph
        return pk.flash_attention(q, k, v, dropout_p=0.1)

    torch.manual_seed(1)
    a = torch.compile(u, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.manual_seed(1)
    assert torch.equal(a, u(q, k, v))


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p: expected a probability in \[0, 1\]"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p: expected a probability in \[0, 1\]"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p: expected a probability in \[0, 1\]"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p: expected a float"),
    (dict(dropout_p=True), TypeError, "dropout_p: expected a float"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed: expected an int"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed: expected an int64"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2**32])), ValueError, r"seed: expected an offset in \[0, 2\*\*32\)"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2, 3])), ValueError, "seed: expected one element"),
    (dict(dropout_p=0.1, seed=1, generator=torch.Generator()), ValueError, "seed and generator"),
], ids=range(10))
def test_dropout_bad_inputs_python(kw, exc, msg):
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(exc, match=msg):
        pk.flash_attention(q, k, v, **kw)
    if "seed" not in kw and "generator" not in kw:
        with pytest.raises(exc, match=msg):
            pk.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
                                            **kw)


@pytest.mark.parametrize("p, seed, msg", [
    (float("nan"), torch.tensor([1, 2]), r"dropout_p: expected a probability in \[0, 1\]"),
    (-0.5, torch.tensor([1, 2]), r"dropout_p: expected a probability in \[0, 1\]"),
    (1.01, torch.tensor([1, 2]), r"dropout_p: expected a probability in \[0, 1\]"),
    (0.1, None, "dropout_seed: required when dropout_p > 0"),
    (0.1, torch.tensor([1]), r"dropout_seed: expected an int64 tensor of shape \[2\]"),
    (0.1, torch.tensor([1.0, 2.0]), r"dropout_seed: expected an int64 tensor of shape \[2\]"),
    (0.1, torch.tensor([1, -1]), r"dropout_seed: expected an offset in \[0, 2\^32\)"),
    (0.1, torch.tensor([1, 2], device="meta"), "dropout_seed: expected a CPU tensor or one on cpu"),
], ids=range(8))
def test_dropout_bad_inputs_raw_ops(p, seed, msg):
    """RuntimeError from the raw ops (set_dropout in csrc/common/attention_checks.h, or the fake
    kernel when a meta tensor is involved), forward and backward."""
    ops = torch.ops.pretrain_kernels
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(RuntimeError, match=msg):
        ops.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, -1, True, 0.0, None, None, p, seed)
    out, lse = ops.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, -1, True)
    with pytest.raises(RuntimeError, match=msg):
        ops.flash_attn_bwd(out, q, k, v, out, lse, None, None, None, None, -1, -1, 0.3, -1, -1, True, 0.0, None, None,
                           p, seed)
