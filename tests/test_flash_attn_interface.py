"""pretrain_kernels.flash_attn_interface: FlashAttention 2's signatures on the pk kernels, against
the float64 reference of tests/reference.py (and pk.flash_attention, which they call), on the CPU
kernels and on the emulated CUDA kernels (tests/emulated_cuda.py)."""
import inspect
import math

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels import flash_attn_interface as fai
from reference import ATTN_ERR_FLOOR, attention_ref, attention_varlen_ref, rel_err, rotary_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the error of the kernels against the float64 reference, per input dtype (relative, whole output)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}

# FlashAttention 2.7's signatures (flash_attn/flash_attn_interface.py): names, order, defaults
FA2_SIGNATURES = {
    "flash_attn_func": "(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                       "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_qkvpacked_func": "(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                                 "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_kvpacked_func": "(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                                "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_varlen_func": "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
                              "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                              "alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None)",
    "flash_attn_varlen_qkvpacked_func": "(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, "
                                        "causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
                                        "deterministic=False, return_attn_probs=False)",
    "flash_attn_varlen_kvpacked_func": "(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
                                       "dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                                       "softcap=0.0, alibi_slopes=None, deterministic=False, "
                                       "return_attn_probs=False)",
    "flash_attn_with_kvcache": "(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, "
                               "cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, "
                               "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                               "rotary_interleaved=True, alibi_slopes=None, num_splits=0, "
                               "return_softmax_lse=False)",
}


EMULATE_CUDA = True  # the `device` fixture: cpu, cuda (with a GPU), and the emulated CUDA kernels


def on(device, *ts):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)


def rand(*shape, dtype=torch.float32, gen=None, requires_grad=False):
    t = torch.randn(*shape, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("name", sorted(FA2_SIGNATURES))
def test_signatures_are_flash_attn_2(name):
    sig = inspect.signature(getattr(fai, name))
    text = "(" + ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                           for p in sig.parameters.values()) + ")"
    assert text == FA2_SIGNATURES[name]


# (B, Sq, Sk, H, Hk, D, causal, window, softcap, alibi)
CASES = [
    (2, 17, 17, 4, 2, 64, True, (-1, -1), 0.0, False),
    (1, 1, 33, 2, 1, 40, True, (-1, -1), 0.0, True),
    (3, 29, 45, 6, 3, 32, False, (7, 3), 0.0, False),
    (1, 63, 63, 2, 2, 128, True, (16, 0), 30.0, True),
    (2, 40, 21, 3, 1, 24, False, (-1, -1), 5.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_flash_attn_func_matches_reference(device, case, dtype):
    B, Sq, Sk, H, Hk, D, causal, window, softcap, alibi = case
    g = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    q, k, v = rand(B, Sq, H, D, dtype=dtype, gen=g), rand(B, Sk, Hk, D, dtype=dtype, gen=g), \
        rand(B, Sk, Hk, D, dtype=dtype, gen=g)
    slopes = torch.rand(B, H, generator=g) if alibi else None
    q, k, v, slopes = on(device, q, k, v, slopes)
    scale = 0.7 / math.sqrt(D)
    out, lse, probs = fai.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                          softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, scale=scale, window=window,
                                 softcap=softcap or None, alibi_slopes=slopes)
    assert probs is None and out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < max(TOL[dtype], ATTN_ERR_FLOOR[dtype])
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-4, rtol=0)
    # the same as pk.flash_attention (the function it calls), and out alone without return_attn_probs
    direct = pk.flash_attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap or None,
                                alibi_slopes=slopes)
    assert torch.equal(out, direct)
    assert torch.equal(fai.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                           softcap=softcap, alibi_slopes=slopes), out)


@pytest.mark.parametrize("case", CASES[:3])
def test_flash_attn_func_backward(case):
    B, Sq, Sk, H, Hk, D, causal, window, softcap, alibi = case
    g = torch.Generator().manual_seed(7)
    q, k, v = (rand(B, s, h, D, dtype=torch.float64, gen=g, requires_grad=True)
               for s, h in ((Sq, H), (Sk, Hk), (Sk, Hk)))
    slopes = torch.rand(H, generator=g) if alibi else None
    out = fai.flash_attn_func(q, k, v, causal=causal, window_size=window, alibi_slopes=slopes)
    ref, _ = attention_ref(q, k, v, causal=causal, window=window, alibi_slopes=slopes)
    dout = torch.randn_like(ref, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_packed_functions_equal_unpacked():
    g = torch.Generator().manual_seed(3)
    qkv = rand(2, 19, 3, 4, 32, gen=g, requires_grad=True)
    out = fai.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    assert torch.equal(out, fai.flash_attn_func(q, k, v, causal=True))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0

    q = rand(2, 7, 4, 32, gen=g)
    kv = rand(2, 19, 2, 2, 32, gen=g)
    out, lse, _ = fai.flash_attn_kvpacked_func(q, kv, window_size=(4, 2), return_attn_probs=True)
    ref_out, ref_lse, _ = fai.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(4, 2), return_attn_probs=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(11)
    lq, lk = [5, 1, 17, 9], [8, 3, 17, 30]
    cu_q, cu_k = _cu(lq), _cu(lk)
    H, Hk, D = 4, 2, 48
    q, k, v = rand(sum(lq), H, D, dtype=dtype, gen=g), rand(sum(lk), Hk, D, dtype=dtype, gen=g), \
        rand(sum(lk), Hk, D, dtype=dtype, gen=g)
    slopes = torch.rand(H, generator=g)
    q, k, v, slopes, cu_q, cu_k = on(device, q, k, v, slopes, cu_q, cu_k)
    out, lse, _ = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True,
                                             window_size=(6, -1), alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, window=(6, -1), alibi_slopes=slopes)
    assert rel_err(out, ref) < max(TOL[dtype], ATTN_ERR_FLOOR[dtype])
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-4, rtol=0)

    qkv = torch.stack([q, q, q], 1)  # self-attention, packed
    out = fai.flash_attn_varlen_qkvpacked_func(qkv, cu_q, max(lq), causal=True)
    ref, _ = attention_varlen_ref(q, q, q, cu_q, cu_q, causal=True)
    assert rel_err(out, ref) < max(TOL[dtype], ATTN_ERR_FLOOR[dtype])
    kv = torch.stack([k, v], 1)
    out = fai.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk))
    ref, _ = attention_varlen_ref(q, k, v, cu_q, cu_k)
    assert rel_err(out, ref) < max(TOL[dtype], ATTN_ERR_FLOOR[dtype])


def _cache_ref(q, k_cache, v_cache, lens, k_new, v_new, causal, scale=None):
    """Per row: the cache's first lens[b] tokens then the new ones, attended in float64."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        kk, vv = k_cache[b, :n], v_cache[b, :n]
        if k_new is not None:
            kk, vv = torch.cat([kk, k_new[b]]), torch.cat([vv, v_new[b]])
        o, _ = attention_ref(q[b:b + 1], kk[None], vv[None], causal=causal, scale=scale)
        outs.append(o[0])
    return torch.stack(outs)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache_append_with_rotary(device, dtype, causal, interleaved):
    g = torch.Generator().manual_seed(int(causal) * 2 + int(interleaved))
    B, Sq, S_new, H, Hk, D, Smax, rd = 3, 2, 2, 4, 2, 32, 24, 16
    q = rand(B, Sq, H, D, dtype=dtype, gen=g)
    k_cache, v_cache = rand(B, Smax, Hk, D, dtype=dtype, gen=g), rand(B, Smax, Hk, D, dtype=dtype, gen=g)
    k, v = rand(B, S_new, Hk, D, dtype=dtype, gen=g), rand(B, S_new, Hk, D, dtype=dtype, gen=g)
    lens = torch.tensor([0, 5, 20], dtype=torch.int32)
    theta = torch.rand(Smax + 4, rd // 2, generator=g) * 3
    cos, sin = theta.cos(), theta.sin()
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    q, k_cache, v_cache, k, v, cos, sin, lens = on(device, q, k_cache, v_cache, k, v, cos, sin, lens)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                      causal=causal, rotary_interleaved=interleaved)
    q, k_cache, v_cache, k, v, lens = on("cpu", q, k_cache, v_cache, k, v, lens)
    # reference: rotate in float64 with the complex-number form, append, attend
    pos_k = lens.long()[:, None] + torch.arange(S_new)[None]
    pos_q = lens.long()[:, None] + (torch.arange(Sq)[None] if causal else torch.zeros(1, Sq, dtype=torch.long))
    k_rot = rotary_ref(k, theta, pos_k, interleaved)
    q_rot = rotary_ref(q, theta, pos_q, interleaved)
    ref = _cache_ref(q_rot, kc0.double(), vc0.double(), lens, k_rot, v.double(), causal)
    assert rel_err(out, ref) < 3 * max(TOL[dtype], ATTN_ERR_FLOOR[dtype])
    for b in range(B):  # the new tokens (rotated) landed at cache_seqlens[b]; nothing else changed
        n = int(lens[b])
        torch.testing.assert_close(k_cache[b, n:n + S_new].double(), k_rot[b], atol=2e-2 if dtype != torch.float32
                                   else 1e-5, rtol=0)
        assert torch.equal(v_cache[b, n:n + S_new], v[b])
        keep = torch.ones(Smax, dtype=torch.bool)
        keep[n:n + S_new] = False
        assert torch.equal(k_cache[b, keep], kc0[b, keep]) and torch.equal(v_cache[b, keep], vc0[b, keep])


def test_kvcache_int_seqlens_none_and_batch_idx(device):
    g = torch.Generator().manual_seed(5)
    B, H, D, Smax = 2, 2, 16, 10
    q = rand(B, 1, H, D, gen=g).to(device)
    k_cache, v_cache = rand(5, Smax, H, D, gen=g).to(device), rand(5, Smax, H, D, gen=g).to(device)
    # cache_seqlens=None: the whole cache (rows 0 and 1)
    out = fai.flash_attn_with_kvcache(q, k_cache[:B], v_cache[:B])
    ref = _cache_ref(q, k_cache.double(), v_cache.double(), [Smax] * B, None, None, False)
    assert rel_err(out, ref) < 1e-5
    # an int: the same length in every row
    out = fai.flash_attn_with_kvcache(q, k_cache[:B], v_cache[:B], cache_seqlens=4, causal=True)
    ref = _cache_ref(q, k_cache.double(), v_cache.double(), [4] * B, None, None, True)
    assert rel_err(out, ref) < 1e-5
    # cache_batch_idx: batch element b uses cache row idx[b]; the appended token lands there
    idx = torch.tensor([4, 1], dtype=torch.int32, device=device)
    k, v = rand(B, 1, H, D, gen=g).to(device), rand(B, 1, H, D, gen=g).to(device)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    lens = torch.tensor([3, 6], dtype=torch.int32, device=device)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, cache_batch_idx=idx,
                                      causal=True)
    ref = _cache_ref(q, kc0[idx.long()].double(), vc0[idx.long()].double(), lens, k.double(), v.double(), True)
    assert rel_err(out, ref) < 1e-5
    for b, row in enumerate(idx.tolist()):
        assert torch.equal(k_cache[row, int(lens[b])], k[b, 0]) and torch.equal(v_cache[row, lens[b]], v[b, 0])
    for row in (0, 2, 3):
        assert torch.equal(k_cache[row], kc0[row]) and torch.equal(v_cache[row], vc0[row])


def test_unsupported_arguments_raise_not_implemented():
    q = torch.randn(1, 3, 2, 8)
    cache = torch.randn(1, 6, 2, 8)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        fai.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=2,
                                    cache_leftpad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="block_table"):
        cu = torch.tensor([0, 3], dtype=torch.int32)
        fai.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 3, 3, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="qkv"):
        fai.flash_attn_qkvpacked_func(torch.randn(1, 3, 2, 2, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        fai.flash_attn_func(q, q, q, dropout_p=1.5)


def test_deterministic_is_accepted():
    """deterministic=True: the backward is deterministic already; the flag is accepted."""
    g = torch.Generator().manual_seed(1)
    q = rand(1, 9, 2, 16, gen=g, requires_grad=True)
    grads = []
    for _ in range(2):
        out = fai.flash_attn_func(q, q, q, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.sum(), q)[0])
    assert torch.equal(grads[0], grads[1])


def test_dropout_reaches_the_kernel():
    g = torch.Generator().manual_seed(2)
    q = rand(2, 33, 2, 16, gen=g)
    torch.manual_seed(0)
    a = fai.flash_attn_func(q, q, q, dropout_p=0.3, causal=True)
    torch.manual_seed(0)
    b = fai.flash_attn_func(q, q, q, dropout_p=0.3, causal=True)
    c = fai.flash_attn_func(q, q, q, dropout_p=0.3, causal=True)
    plain = fai.flash_attn_func(q, q, q, causal=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)


def test_paged_cache_equals_contiguous():
    g = torch.Generator().manual_seed(4)
    B, H, D, page, pages = 2, 2, 16, 4, 3
    q = rand(B, 1, H, D, gen=g)
    k_cache, v_cache = rand(B, page * pages, H, D, gen=g), rand(B, page * pages, H, D, gen=g)
    perm = torch.randperm(B * pages, generator=g)
    block_table = perm.view(B, pages).to(torch.int32)
    k_paged = torch.empty(B * pages, page, H, D)
    v_paged = torch.empty(B * pages, page, H, D)
    for b in range(B):
        for i in range(pages):
            k_paged[block_table[b, i]] = k_cache[b, i * page:(i + 1) * page]
            v_paged[block_table[b, i]] = v_cache[b, i * page:(i + 1) * page]
    lens = torch.tensor([5, 11], dtype=torch.int32)
    out = fai.flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=lens, block_table=block_table, causal=True)
    ref = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    torch.testing.assert_close(out, ref)


def test_bad_kvcache_arguments_name_themselves():
    q = torch.randn(2, 1, 2, 8)
    kc, vc = torch.randn(3, 6, 2, 8), torch.randn(3, 6, 2, 8)
    cos = torch.randn(8, 2)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="rotary_cos, rotary_sin"):
        fai.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=lens, rotary_cos=cos, rotary_sin=cos[:, :1])
    with pytest.raises(ValueError, match="rotary_cos, rotary_sin: pass both"):
        fai.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=lens, rotary_cos=cos)
    with pytest.raises(ValueError, match="rotary_cos"):
        fai.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=lens, rotary_cos=torch.randn(8, 5),
                                    rotary_sin=torch.randn(8, 5))
    with pytest.raises(ValueError, match="cache_batch_idx"):
        fai.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 3],
                                                                                                 dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_batch_idx"):
        fai.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="cache_seqlens"):
        fai.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=2.5)
    with pytest.raises(ValueError, match="k, v"):
        fai.flash_attn_with_kvcache(q, kc[:2], vc[:2], k=torch.randn(2, 1, 2, 8), cache_seqlens=lens)
    with pytest.raises(TypeError, match="softcap"):
        fai.flash_attn_func(q, q, q, softcap="big")
