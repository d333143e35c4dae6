"""Flash attention on CUDA: the CUDA kernels (csrc/cuda/attention_*.cu) against the float64
reference (tests/reference.py), against torch SDPA's own error in the same dtype, and against
the CPU op on the same inputs. Every feature is crossed: causal / window / bottom-right with
unequal lengths, GQA/MQA, varlen, lse, split-KV decode with in-place append, the caller's
mask (SDPA drop-in), float32 / float16 / bfloat16, head dims that need padding, lengths 1,
17, 1000 and 4097.

Accuracy is the relative error ||x - ref|| / ||ref||; the bound is twice torch SDPA's error on
the same inputs and dtype, with a per-dtype floor (see test_attention.py)."""
import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from reference import (ATTN_ERR_FLOOR, ATTN_FWD_CASES, ATTN_LSE_ATOL, assert_attention_matches, attention_ref,
                       attention_varlen_ref, attention_visible, contiguous_from_paged, kvcache_ref,
                       paged_from_contiguous, rel_err, torch_sdpa)

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FLOOR, LSE_ATOL = ATTN_ERR_FLOOR, ATTN_LSE_ATOL


def rand(*shape, dtype=torch.float32, gen=None, device=DEV):
    return torch.randn(*shape, dtype=torch.float32, generator=gen).to(device=device, dtype=dtype)


# (B, Sq, Sk, H, Hk, D, causal, window): the CPU cases, then lengths 4097 and more
FWD_CASES = ATTN_FWD_CASES + [
    (1, 4097, 4097, 2, 1, 64, True, (-1, -1)),
    (1, 4097, 4097, 1, 1, 128, False, (-1, -1)),
    (2, 1000, 4097, 2, 2, 32, False, (-1, -1)),
    (1, 300, 300, 2, 1, 160, True, (64, -1)),
    (4, 17, 1000, 8, 1, 128, False, (-1, -1)),  # MQA
]


def _fwd_inputs(case, dtype, seed_extra=0):
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 1000 + sk + D + seed_extra)
    return rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference(case, dtype):
    B, sq, sk, H, Hk, D, causal, window = case
    q, k, v = _fwd_inputs(case, dtype)
    out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    assert out.device.type == "cuda" and out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, sq) and lse.dtype == torch.float32
    ref, ref_lse = attention_ref(q, k, v, causal=causal, window=window)
    theirs = rel_err(torch_sdpa(q, k, v, causal=causal, window=window), ref)
    assert_attention_matches(out, lse, ref, ref_lse, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [FWD_CASES[i] for i in (0, 2, 4, 6, 8, 11, 15)],
                         ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_cpu_op(case, dtype):
    B, sq, sk, H, Hk, D, causal, window = case
    q, k, v = _fwd_inputs(case, dtype, seed_extra=1)
    out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    out_c, lse_c = pk.flash_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal, window=window, return_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().float(), out_c.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(lse_c))
    fin = torch.isfinite(lse_c)
    torch.testing.assert_close(lse.cpu()[fin], lse_c[fin], atol=LSE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_left_causal_and_scale(dtype):
    g = torch.Generator().manual_seed(11)
    for sq, sk in ((70, 20), (20, 70), (33, 33)):
        q, k, v = rand(2, sq, 4, 64, dtype=dtype, gen=g), rand(2, sk, 2, 64, dtype=dtype, gen=g), rand(
            2, sk, 2, 64, dtype=dtype, gen=g)
        out, lse = torch.ops.pretrain_kernels.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, 0, False)
        ref, ref_lse = attention_ref(q, k, v, causal=True, scale=0.3, bottom_right=False)
        theirs = rel_err(torch_sdpa(q, k, v, causal=True, bottom_right=False, scale=0.3), ref)
        assert rel_err(out, ref) <= 2 * max(theirs, FLOOR[dtype])


# (B, Sq, Sk, H, Hk, D, causal, window)
BWD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 128, 128, 4, 2, 40, True, (-1, -1)),
    (1, 33, 200, 2, 1, 96, True, (-1, -1)),
    (1, 200, 33, 2, 2, 128, True, (-1, -1)),
    (1, 129, 129, 2, 1, 8, False, (20, 3)),
    (2, 65, 70, 2, 2, 256, False, (-1, -1)),
    (1, 1, 17, 1, 1, 1, False, (-1, -1)),
    (1, 1000, 1000, 4, 1, 64, True, (-1, -1)),
    (1, 4097, 4097, 1, 1, 128, True, (-1, -1)),
    (2, 300, 1000, 2, 2, 32, False, (100, 50)),
]


# dtype x dQ scheme of the tensor-core backward: "separate" and "ordered" are the schemes of
# deterministic=True (PK_ATTENTION_BWD picks one), "atomic" is deterministic=False; float32 runs
# the SIMT kernels, which have one scheme
BWD_MODES = [(torch.float16, "separate"), (torch.bfloat16, "separate"), (torch.float32, "separate"),
             (torch.float16, "ordered"), (torch.bfloat16, "ordered"), (torch.bfloat16, "atomic"),
             (torch.float16, "atomic")]


@pytest.mark.parametrize("dtype, mode", BWD_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_reference(case, dtype, mode, monkeypatch):
    monkeypatch.setenv("PK_ATTENTION_BWD", "ordered" if mode == "ordered" else "separate")
    deterministic = mode != "atomic"
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 7 + sk + D)
    draws = 3 if sq * sk < 10**6 else 1
    errs = {"ours": [0.0] * 3, "torch": [0.0] * 3}
    for _ in range(draws):
        q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
            B, sk, Hk, D, dtype=dtype, gen=g)
        dout = rand(B, sq, H, D, dtype=dtype, gen=g)

        def grads(fn, dt):
            xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            fn(*xs).backward(dout.to(dt))
            return [x.grad for x in xs]

        ref = grads(lambda a, b, c: attention_ref(a, b, c, causal=causal, window=window)[0], torch.float64)
        ours = grads(lambda a, b, c: pk.flash_attention(a, b, c, causal=causal, window=window,
                                                        deterministic=deterministic), dtype)
        theirs = grads(lambda a, b, c: torch_sdpa(a, b, c, causal=causal, window=window), dtype)
        for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
            assert o.dtype == dtype and o.shape == r.shape and o.device.type == "cuda"
            errs["ours"][i] += rel_err(o, r) / draws
            errs["torch"][i] += rel_err(t, r) / draws
    for name, eo, et in zip("qkv", errs["ours"], errs["torch"]):
        assert eo <= 2 * max(et, FLOOR[dtype]), (name, eo, et)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backward_matches_cpu_op_and_lse_gradient(dtype):
    g = torch.Generator().manual_seed(12)
    q, k, v = rand(2, 77, 4, 64, dtype=dtype, gen=g), rand(2, 90, 2, 64, dtype=dtype, gen=g), rand(
        2, 90, 2, 64, dtype=dtype, gen=g)
    dout, dlse = rand(2, 77, 4, 64, dtype=dtype, gen=g), rand(2, 4, 77, gen=g)
    res = []
    for dev in ("cuda", "cpu"):
        xs = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
        out, lse = pk.flash_attention(*xs, causal=True, window=(30, -1), return_lse=True)
        res.append(torch.autograd.grad((out, lse), xs, (dout.to(dev), dlse.to(dev))))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(*res):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_equals_per_sequence(dtype):
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k = [5, 0, 129, 1, 64, 1000], [7, 3, 129, 40, 1, 1000]
    H, Hk, D = 4, 2, 64
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    q = rand(sum(lens_q), H, D, dtype=dtype, gen=g).requires_grad_()
    k = rand(sum(lens_k), Hk, D, dtype=dtype, gen=g).requires_grad_()
    v = rand(sum(lens_k), Hk, D, dtype=dtype, gen=g).requires_grad_()
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    for causal, window, maxlen in ((True, (-1, -1), True), (False, (8, 2), False)):
        out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=max(lens_q) if maxlen else None,
                                      max_seqlen_k=max(lens_k) if maxlen else None, return_lse=True)
        assert lse.shape == (H, sum(lens_q))
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(lens_q)):
            sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            qb, kb, vb = (t[s].detach()[None].requires_grad_() for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
            ob, lb = pk.flash_attention(qb, kb, vb, causal=causal, window=window, return_lse=True)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out[sl_q], ob[0], atol=tol, rtol=0)
            fin = torch.isfinite(lb[0])
            assert torch.equal(torch.isfinite(lse[:, sl_q]), fin)
            torch.testing.assert_close(lse[:, sl_q][fin], lb[0][fin], atol=1e-4, rtol=0)
            if qb.numel() == 0:
                continue
            gb = torch.autograd.grad(ob, (qb, kb, vb), dout[sl_q][None])
            for a, r in ((dq[sl_q], gb[0][0]), (dk[sl_k], gb[1][0]), (dv[sl_k], gb[2][0])):
                torch.testing.assert_close(a, r, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)
    ref, _ = attention_varlen_ref(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=True)
    out = pk.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_split_kv_and_append(dtype):
    """Batch 1 and 3 with long caches (split-KV), rows at different lengths, appends in place;
    each step equals causal attention over the same prefix."""
    g = torch.Generator().manual_seed(3)
    for B, H, Hk, D, smax, start in ((1, 8, 1, 128, 4097, [4000]), (3, 4, 2, 64, 1100, [0, 17, 1000]),
                                     (2, 2, 2, 256, 300, [1, 250])):
        k_cache = rand(B, smax, Hk, D, dtype=dtype, gen=g)
        v_cache = rand(B, smax, Hk, D, dtype=dtype, gen=g)
        lens = torch.tensor(start, dtype=torch.int32, device=DEV)
        for n in (1, 1, 17, 1):
            q = rand(B, n, H, D, dtype=dtype, gen=g)
            kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
            out = pk.flash_attention_with_kvcache(q, k_cache, v_cache, lens, k_new=kn, v_new=vn, causal=True)
            for b in range(B):
                L = int(lens[b]) + n
                assert torch.equal(k_cache[b, L - n:L], kn[b]) and torch.equal(v_cache[b, L - n:L], vn[b])
                kk, vv = k_cache[b:b + 1, :L], v_cache[b:b + 1, :L]
                ref, _ = attention_ref(q[b:b + 1], kk, vv, causal=True)
                theirs = rel_err(torch_sdpa(q[b:b + 1], kk, vv, causal=True), ref)
                assert rel_err(out[b:b + 1], ref) <= 2 * max(theirs, FLOOR[dtype])
                full = pk.flash_attention(q[b:b + 1], kk, vv, causal=True)
                torch.testing.assert_close(out[b:b + 1], full, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
            lens += n
        q = rand(B, 2, H, D, dtype=dtype, gen=g)
        out = pk.flash_attention_with_kvcache(q, k_cache, v_cache, lens, causal=False)
        for b in range(B):
            ref, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :lens[b]], v_cache[b:b + 1, :lens[b]])
            assert rel_err(out[b:b + 1], ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
def test_decode_paged_equals_contiguous(page_size, dtype):
    """Paged and contiguous caches holding the same data: the same output and lse bits and the
    same cache contents, over appends that cross pages (split-KV decode, chunks), with GQA and
    windows; against the reference; a block id out of range gives the row NaN, nothing written."""
    g = torch.Generator().manual_seed(60 + page_size)
    B, H, Hk, D = 3, 8, 2, 128
    cap = -(-1100 // page_size) * page_size
    kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, page_size, gen=g)
    lens = torch.tensor([0, 17, 1000], dtype=torch.int32, device=DEV)
    for n, causal, window in ((1, True, (-1, -1)), (17, True, (64, -1)), (1, False, (100, 3))):
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        ref, ref_lse, _, _ = kvcache_ref(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), k_new=kn.cpu(), v_new=vn.cpu(),
                                         causal=causal, window=window)
        kw = dict(k_new=kn, v_new=vn, causal=causal, window=window, return_lse=True)
        out_c, lse_c = pk.flash_attention_with_kvcache(q, kc, vc, lens, **kw)
        out_p, lse_p = pk.flash_attention_with_kvcache(q, kp, vp, lens, block_table=table, **kw)
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
        assert torch.equal(contiguous_from_paged(kp, table), kc) and torch.equal(contiguous_from_paged(vp, table), vc)
        assert rel_err(out_p, ref) <= {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
        torch.testing.assert_close(lse_p.cpu().double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)
        lens += n
    bad = table.clone()
    bad[1, 0] = kp.shape[0]
    k0 = kp.clone()
    out, lse = pk.flash_attention_with_kvcache(q, kp, vp, lens, k_new=kn, v_new=vn, block_table=bad, return_lse=True)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all() and not torch.isnan(out[[0, 2]]).any()
    changed = (kp != k0).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {int(x) for x in table[[0, 2]].flatten()}


def test_decode_matches_cpu_op():
    g = torch.Generator().manual_seed(13)
    q = rand(2, 3, 4, 16, gen=g, device="cpu")
    kc, vc = rand(2, 10, 2, 16, gen=g, device="cpu"), rand(2, 10, 2, 16, gen=g, device="cpu")
    kn, vn = rand(2, 3, 2, 16, gen=g, device="cpu"), rand(2, 3, 2, 16, gen=g, device="cpu")
    lens = torch.tensor([2, 7], dtype=torch.int32)
    kc_g, vc_g = kc.cuda(), vc.cuda()
    out_g = pk.flash_attention_with_kvcache(q.cuda(), kc_g, vc_g, lens.cuda(), k_new=kn.cuda(), v_new=vn.cuda())
    out_c = pk.flash_attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn)
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc_g.cpu(), kc) and torch.equal(vc_g.cpu(), vc)


SDPA_CASES = [
    ((2, 4, 37, 40), (2, 2, 50, 40), (2, 2, 50, 24), None, None, False, True),
    ((2, 4, 37, 40), (2, 4, 50, 40), (2, 4, 50, 40), None, None, True, False),
    ((2, 3, 64, 16), (2, 3, 64, 16), (2, 3, 64, 16), (64, 64), torch.float32, False, False),
    ((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 16), (2, 1, 17, 33), torch.bool, False, False),
    ((3, 10, 8), (3, 12, 8), (3, 12, 8), (10, 12), torch.bool, False, False),
    ((2, 2, 3, 9, 8), (2, 2, 3, 9, 8), (2, 2, 3, 9, 8), (9, 9), torch.float32, False, False),
    ((1, 2, 70, 8), (1, 2, 20, 8), (1, 2, 20, 8), None, None, True, False),
    ((1, 2, 1000, 64), (1, 2, 1000, 64), (1, 2, 1000, 64), (1, 1, 1000, 1000), torch.bool, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SDPA_CASES)))
def test_sdpa_drop_in_with_masks(case, dtype):
    qs, ks, vs, ms, mdt, causal, gqa = SDPA_CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = rand(*qs, dtype=dtype, gen=g), rand(*ks, dtype=dtype, gen=g), rand(*vs, dtype=dtype, gen=g)
    mask = None
    if ms is not None:
        mask = (torch.rand(*ms, generator=g) > 0.3).to(DEV) if mdt == torch.bool else rand(*ms, gen=g).to(dtype)
        if mdt == torch.bool:
            mask[..., 0, :] = False
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ours = pk.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sdpa_ref(q64, k64, v64, mask, causal)
    theirs = torch.nan_to_num(theirs, nan=0.0)  # rows without a visible key: 0, as ours
    assert rel_err(ours, ref) <= 2 * max(rel_err(theirs, ref), FLOOR[dtype])
    dout = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    g_theirs = torch.autograd.grad(theirs, (q, k, v), dout)
    for a, t, r in zip(g_ours, g_theirs, g_ref):
        assert rel_err(a, r) <= 2 * max(rel_err(torch.nan_to_num(t, nan=0.0), r), FLOOR[dtype])


def sdpa_ref(q, k, v, mask, causal):
    """torch SDPA semantics (..., heads, L, E) through the float64 reference (rows without a
    visible key give 0)."""
    shape = q.shape
    if q.dim() == 3:
        q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        m4 = None if mask is None else mask.expand(q.shape[0], q.shape[1], k.shape[1]).unsqueeze(1)
    else:
        q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
        m4 = None
        if mask is not None:
            m4 = mask.expand(*q.shape[:-1], k.shape[-2]).reshape(-1, *q4.shape[1:3], k.shape[-2])
    if m4 is not None and m4.dtype != torch.bool:
        m4 = m4.double()
    out, _ = attention_ref(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), causal=causal,
                           bottom_right=False, attn_mask=m4)
    return out.transpose(1, 2).reshape(*shape[:-1], v.shape[-1])


def test_noncontiguous_and_unaligned_inputs():
    g = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        base = rand(2, 40, 6, 3, 32, dtype=dtype, gen=g)
        q, k, v = base[:, :33, :, 0], base[:, :, ::2, 1], base[:, :, ::2, 2]
        qd = rand(2, 6, 33, 64, dtype=dtype, gen=g)[..., ::2].transpose(1, 2)  # non-unit last-dim stride
        odd = rand(2, 33, 6, 41, dtype=dtype, gen=g)[..., 1:]  # 40 wide, rows start off 16-byte alignment
        for qq in (q, qd, odd):
            kk, vv = (k, v) if qq.shape[-1] == 32 else (odd[:, :, :3].contiguous(), odd[:, :, 3:])
            out = pk.flash_attention(qq, kk, vv, causal=True)
            ref, _ = attention_ref(qq, kk, vv, causal=True)
            theirs = rel_err(torch_sdpa(qq, kk, vv, causal=True), ref)
            assert rel_err(out, ref) <= 2 * max(theirs, FLOOR[dtype])
            xs = [t.detach().requires_grad_() for t in (qq, kk, vv)]
            pk.flash_attention(*xs, causal=True).sum().backward()
            rs = [t.detach().double().requires_grad_() for t in (qq, kk, vv)]
            attention_ref(*rs, causal=True)[0].sum().backward()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            for a, b in zip(xs, rs):
                assert rel_err(a.grad, b.grad) < tol


def test_empty_inputs():
    q = torch.randn(0, 5, 2, 8, device=DEV, requires_grad=True)
    out = pk.flash_attention(q, torch.randn(0, 5, 2, 8, device=DEV), torch.randn(0, 5, 2, 8, device=DEV), causal=True)
    assert out.shape == (0, 5, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    for dtype in DTYPES:
        z = torch.randn(1, 0, 2, 8, device=DEV, dtype=dtype)
        out, lse = pk.flash_attention(torch.randn(1, 3, 2, 8, device=DEV, dtype=dtype), z, z, return_lse=True)
        assert (out == 0).all() and torch.isinf(lse).all()
    cu = torch.zeros(1, dtype=torch.int32, device=DEV)
    z = torch.randn(0, 2, 8, device=DEV)
    assert pk.flash_attention(z, z, z, cu_seqlens_q=cu, cu_seqlens_k=cu).shape == (0, 2, 8)


@pytest.mark.parametrize("mode", ["separate", "ordered"])
def test_deterministic(mode, monkeypatch):
    """deterministic=True, run to run, bit for bit: the separate dQ pass and the ordered fused
    dQ (with and without a causal mask; 700 keys make 11 key blocks that take turns on every
    query tile), through pk.flash_attention and the SDPA drop-in."""
    monkeypatch.setenv("PK_ATTENTION_BWD", mode)
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for causal in (True, False):
            q = rand(1, 700, 4, 64, dtype=dtype, gen=g).requires_grad_()
            k = rand(1, 700, 1, 64, dtype=dtype, gen=g).requires_grad_()
            v = rand(1, 700, 1, 64, dtype=dtype, gen=g).requires_grad_()
            dout = rand(1, 700, 4, 64, dtype=dtype, gen=g)
            results = []
            for i in range(4):
                if i % 2:
                    out = pk.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=causal, enable_gqa=True,
                                                          deterministic=True).transpose(1, 2)
                else:
                    out = pk.flash_attention(q, k, v, causal=causal, deterministic=True)
                results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
            for first, again in ((results[0], results[2]), (results[1], results[3])):
                for a, b in zip(first, again):
                    assert torch.equal(a, b)


def test_atomic_backward_gives_way_under_deterministic_algorithms(monkeypatch):
    """deterministic=False runs the deterministic scheme (the one PK_ATTENTION_BWD picks) while
    torch.use_deterministic_algorithms(True) is in force; the knob takes separate or ordered
    only."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (rand(1, 900, 2, 64, dtype=torch.bfloat16, gen=g).requires_grad_() for _ in range(3))
    dout = rand(1, 900, 2, 64, dtype=torch.bfloat16, gen=g)

    def dq(scheme, deterministic):
        monkeypatch.setenv("PK_ATTENTION_BWD", scheme)
        return torch.autograd.grad(pk.flash_attention(q, k, v, deterministic=deterministic), q, dout)[0]

    want = {s: dq(s, True) for s in ("ordered", "separate")}
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for s in ("ordered", "separate"):
            assert torch.equal(dq(s, False), want[s])
    finally:
        torch.use_deterministic_algorithms(was)
    for bad in ("bogus", "atomic"):
        with pytest.raises(RuntimeError, match="PK_ATTENTION_BWD"):
            dq(bad, True)


def test_float64_is_cpu_only():
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="float64 attention runs on the CPU only"):
        torch.ops.pretrain_kernels.flash_attn_fwd(x, x, x, None, None, None, -1, -1, 1.0, -1, -1, True)


def test_bad_inputs_cuda():
    q = torch.randn(1, 4, 6, 8, device=DEV)
    k = torch.randn(1, 4, 4, 8, device=DEV)
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        torch.ops.pretrain_kernels.flash_attn_fwd(q, k, k, None, None, None, -1, -1, 1.0, -1, -1, True)
    with pytest.raises(RuntimeError, match="expected a tensor on"):
        torch.ops.pretrain_kernels.flash_attn_fwd(q, q, q, torch.tensor([0, 4], dtype=torch.int32),
                                                  torch.tensor([0, 4], dtype=torch.int32), None, -1, -1, 1.0, -1,
                                                  -1, True)
    kc = torch.zeros(2, 8, 2, 8, device=DEV)
    with pytest.raises(RuntimeError, match="cache_seqlens: expected an int32"):
        torch.ops.pretrain_kernels.flash_attn_kvcache(torch.randn(2, 1, 2, 8, device=DEV), kc, kc,
                                                      torch.tensor([3, 4], device=DEV), None, None, 1.0, True,
                                                      -1, -1, None)


def _opcheck_samples():
    g = torch.Generator().manual_seed(6)
    q = rand(2, 9, 4, 16, gen=g)
    k = rand(2, 11, 2, 16, gen=g)
    v = rand(2, 11, 2, 16, gen=g)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 6, 11], dtype=torch.int32, device=DEV)
    mask = (torch.rand(9, 11, generator=g) > 0.2).to(DEV).expand(2, 4, 9, 11)
    return [
        (q, k, v, None, None, None, -1, -1, 0.25, -1, 0, True),
        (q[0], k[0], v[0], cu_q, cu_k, None, 5, 6, 0.25, 3, -1, True),
        (q, k, v, None, None, mask, -1, -1, 0.3, -1, -1, False),
        (q.half(), k.half(), v.half(), None, None, None, -1, -1, 0.25, -1, 0, True),
    ]


def test_opcheck_forward_and_backward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_fwd, args)
        out, lse = torch.ops.pretrain_kernels.flash_attn_fwd(*args)
        dout = torch.randn_like(out)
        for deterministic in (True, False):
            torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_bwd,
                                  (dout, *args[:3], out, lse, torch.randn_like(lse), *args[3:]),
                                  kwargs={"deterministic": deterministic})


def test_opcheck_kvcache():
    g = torch.Generator().manual_seed(7)
    q = rand(2, 3, 4, 16, gen=g)
    kc, vc = rand(2, 10, 2, 16, gen=g), rand(2, 10, 2, 16, gen=g)
    kn, vn = rand(2, 3, 2, 16, gen=g), rand(2, 3, 2, 16, gen=g)
    lens = torch.tensor([2, 7], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache, (q, kc, vc, lens, kn, vn, 0.25, True, -1, -1, None))
    torch.library.opcheck(torch.ops.pretrain_kernels.flash_attn_kvcache, (q, kc, vc, lens, None, None, 0.25, False, -1, -1, None))


def test_torch_compile_and_cuda_graph():
    g = torch.Generator().manual_seed(8)
    q = rand(2, 20, 4, 64, dtype=torch.bfloat16, gen=g).requires_grad_()
    k = rand(2, 24, 2, 64, dtype=torch.bfloat16, gen=g).requires_grad_()
    v = rand(2, 24, 2, 64, dtype=torch.bfloat16, gen=g).requires_grad_()

    def f(q, k, v):
        out, lse = pk.flash_attention(q, k, v, causal=True, window=(8, -1), return_lse=True)
        return out.float().sum() + lse.sum()

    eager = f(q, k, v)
    ge = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    gc = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

    # decode step captured in a CUDA graph: no host sync inside the ops
    kc, vc = torch.zeros(2, 64, 2, 64, device=DEV, dtype=torch.bfloat16), torch.zeros(2, 64, 2, 64, device=DEV,
                                                                                        dtype=torch.bfloat16)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=DEV)
    q1, kn, vn = (rand(2, 1, h, 64, dtype=torch.bfloat16, gen=g) for h in (4, 2, 2))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pk.flash_attention_with_kvcache(q1, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pk.flash_attention_with_kvcache(q1, kc, vc, lens, k_new=kn, v_new=vn)
    graph.replay()
    torch.cuda.synchronize()
    ref = pk.flash_attention(q1[:1], kc[:1, :4], vc[:1, :4], causal=True)
    torch.testing.assert_close(out[:1], ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_simt_path_agrees_with_tensor_cores(dtype, monkeypatch):
    """PK_ATTENTION_CUDA_PATH=simt runs float16 / bfloat16 through the SIMT kernels: both
    paths meet the reference bound and agree with each other (a first check to run when
    one of them looks wrong on a new GPU)."""
    g = torch.Generator().manual_seed(14)
    for B, sq, sk, H, Hk, D, causal, window in ((2, 77, 130, 4, 2, 64, True, (-1, -1)),
                                                (1, 200, 200, 2, 1, 128, False, (30, 10)),
                                                (1, 65, 33, 2, 2, 96, True, (-1, -1))):
        q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
            B, sk, Hk, D, dtype=dtype, gen=g)
        dout = rand(B, sq, H, D, dtype=dtype, gen=g)
        res = []
        for path in ("default", "simt"):
            if path == "simt":
                monkeypatch.setenv("PK_ATTENTION_CUDA_PATH", "simt")
            xs = [t.detach().requires_grad_() for t in (q, k, v)]
            out, lse = pk.flash_attention(*xs, causal=causal, window=window, return_lse=True)
            res.append((out, lse, *torch.autograd.grad(out, xs, dout)))
        monkeypatch.delenv("PK_ATTENTION_CUDA_PATH")
        xr = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = attention_ref(*xr, causal=causal, window=window)
        rgrads = torch.autograd.grad(ref, xr, dout.double())
        theirs = rel_err(torch_sdpa(q, k, v, causal=causal, window=window), ref)
        for out, lse, *grads in res:
            assert rel_err(out, ref) <= 2 * max(theirs, FLOOR[dtype])
            fin = torch.isfinite(ref_lse)
            torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=LSE_ATOL[dtype], rtol=0)
            for a, r in zip(grads, rgrads):
                assert rel_err(a, r) < 3e-2
        for a, b in zip(res[0], res[1]):
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("seed_on_gpu", [False, True], ids=["cpu-seed", "gpu-seed"])
def test_dropout_equals_cpu_op_and_graph_replays(seed_on_gpu):
    """Attention dropout on CUDA: forward and gradients equal the CPU op's with the same seed
    (the keep mask bit for bit: out > 0 in the same places with q = 0 and V = identity, on the
    SIMT kernels for float32 and on the tensor-core kernels for float16 / bfloat16), with the
    seed tensor on the CPU or on the GPU (read by the kernels); a captured CUDA graph draws a new
    mask when the GPU seed changes between replays."""
    B, sq, sk, H = 2, 70, 128, 2
    g = torch.Generator().manual_seed(3)
    seed = torch.tensor([-987654321, 17], dtype=torch.int64)
    s_dev = seed.to(DEV) if seed_on_gpu else seed
    q = torch.zeros(B, sq, H, sk)
    k = torch.randn(B, sk, 1, sk, generator=g)
    v = torch.eye(sk).expand(B, 1, sk, sk).transpose(1, 2).contiguous()
    out_c = pk.flash_attention(q, k, v, dropout_p=0.3, seed=seed)
    out_g = pk.flash_attention(q.to(DEV), k.to(DEV), v.to(DEV), dropout_p=0.3, seed=s_dev).cpu()
    assert torch.equal(out_c > 0, out_g > 0)
    for dtype in (torch.float16, torch.bfloat16):  # the tensor-core kernels draw the same mask
        xs = (t.to(DEV, dtype) for t in (q, k, v))
        assert torch.equal(out_c > 0, pk.flash_attention(*xs, dropout_p=0.3, seed=s_dev).cpu() > 0)
    for dtype in DTYPES:
        xs = [rand(B, sq, H, 64, dtype=dtype, gen=g, device="cpu") for _ in range(3)]
        dout = rand(B, sq, H, 64, dtype=dtype, gen=g, device="cpu")
        res = []
        for dev, s in (("cpu", seed), (DEV, s_dev)):
            a = [x.to(dev).requires_grad_() for x in xs]
            o = pk.flash_attention(*a, causal=True, dropout_p=0.1, seed=s)
            res.append([o.detach().cpu()] + [t.cpu() for t in torch.autograd.grad(o, a, dout.to(dev))])
        for a, c in zip(*res):
            assert rel_err(a, c) <= (1e-5 if dtype == torch.float32 else 2e-2)
    qd, kd, vd = q.to(DEV), k.to(DEV), v.to(DEV)
    sd = seed.to(DEV)
    pk.flash_attention(qd, kd, vd, dropout_p=0.3, seed=sd)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = pk.flash_attention(qd, kd, vd, dropout_p=0.3, seed=sd)
    graph.replay()
    first = static_out.clone()
    sd.copy_(torch.tensor([5, 0]))
    graph.replay()
    assert torch.equal(first.cpu() > 0, out_c > 0) and not torch.equal(first, static_out)
