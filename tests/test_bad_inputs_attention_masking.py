"""Bad and unusual inputs for the attention family (pk.flash_attention incl. varlen,
pk.flash_attention_with_kvcache, pk.scaled_dot_product_attention; raw ops flash_attn_fwd /
flash_attn_bwd / flash_attn_kvcache) and the masking family (pk.mlm_mask, pk.span_mask,
pk.MLMCollator; raw ops mlm_mask / span_mask).

The list: wrong dtypes, ranks and devices (the 'meta' device stands in for a second device);
empty dimensions; non-contiguous, expanded (stride 0) and flipped views; NaN, inf, negative and
huge knobs; out-of-range ids and cache lengths; malformed cu_seqlens and seeds. The result is
never a crash, a hang, an out-of-bounds read or silent garbage:
  - invalid input raises a clear error naming the argument: TypeError / ValueError from the
    Python wrappers, RuntimeError from the raw ops (and from their fake kernels, which run when
    a meta tensor takes part in the call);
  - valid but unusual input gives the result of the float64 reference (tests/reference.py) or
    of the plain contiguous call;
  - what a GPU cannot check without a host sync follows the documented rule on both backends:
    kv-cache rows whose tokens do not fit give NaN and are not written; masking ids outside
    [0, vocab) are never selected and stay unchanged; per-row mask rates are clamped into
    [0, 1], NaN as 0; malformed cu_seqlens raise on the CPU, and CUDA clamps the offsets.

Raw-op cases that mean something for CUDA also run through the emulated CUDA kernels
(tests/emulated_cuda.py): the CUDA entry points share the C++ checks of
csrc/common/attention_checks.h and masking_checks.h, so the same error must come out (float64
is CPU-only there). Inputs are tiny: the emulator runs one fiber per CUDA thread."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import emulated_cuda
import pretrain_kernels as pk
from reference import attention_ref, attention_varlen_ref

OPS = torch.ops.pretrain_kernels
META = torch.device("meta")
I32, I64 = torch.int32, torch.int64
BIG = 2**70  # beyond int64
SCALE = 0.35


# ---- builders ------------------------------------------------------------------------------------


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(B=2, sq=5, sk=7, H=4, Hk=2, D=8, dtype=torch.float32):
    return randn(B, sq, H, D, seed=1, dtype=dtype), randn(B, sk, Hk, D, seed=2, dtype=dtype), randn(
        B, sk, Hk, D, seed=3, dtype=dtype)


def varlen(dtype=torch.float32):
    """Packed q (7 tokens), k/v (9 tokens), two sequences."""
    q, k, v = randn(7, 4, 8, seed=4, dtype=dtype), randn(9, 2, 8, seed=5, dtype=dtype), randn(9, 2, 8, seed=6,
                                                                                               dtype=dtype)
    return q, k, v, torch.tensor([0, 3, 7], dtype=I32), torch.tensor([0, 4, 9], dtype=I32)


def cu(*xs):
    return torch.tensor(xs, dtype=I32)


def fwd(ops, q=None, k=None, v=None, cu_q=None, cu_k=None, mask=None, max_q=-1, max_k=-1, scale=SCALE, left=-1,
        right=-1, br=True):
    if q is None:
        q, k, v = qkv()
    return ops.flash_attn_fwd(q, k, v, cu_q, cu_k, mask, max_q, max_k, scale, left, right, br)


def bwd(ops, **mods):
    """flash_attn_bwd on a valid saved forward, with some arguments replaced: mods maps a name
    to a value or to a function of the valid arguments."""
    q, k, v = qkv()
    out, lse = OPS.flash_attn_fwd(q, k, v, None, None, None, -1, -1, SCALE, -1, -1, True)
    a = dict(dout=randn(*out.shape, seed=7), q=q, k=k, v=v, out=out, lse=lse, dlse=None, cu_q=None, cu_k=None,
             mask=None, max_q=-1, max_k=-1, scale=SCALE, left=-1, right=-1, br=True, deterministic=True)
    a.update({n: (m(a) if callable(m) else m) for n, m in mods.items()})
    return ops.flash_attn_bwd(*a.values())


def kv_args(B=2, S=6, H=4, Hk=2, D=8, sq=1, s_new=1, lens=(2, 3), dtype=torch.float32):
    return dict(q=randn(B, sq, H, D, seed=8, dtype=dtype), k_cache=randn(B, S, Hk, D, seed=9, dtype=dtype),
                v_cache=randn(B, S, Hk, D, seed=10, dtype=dtype), cache_seqlens=torch.tensor(lens, dtype=I32),
                k_new=randn(B, s_new, Hk, D, seed=11, dtype=dtype), v_new=randn(B, s_new, Hk, D, seed=12, dtype=dtype))


def kvc(ops, scale=SCALE, causal=True, window=(-1, -1), **mods):
    a = kv_args()
    a.update({n: (m(a) if callable(m) else m) for n, m in mods.items()})
    return ops.flash_attn_kvcache(*a.values(), scale, causal, *window, None)


def kvp_args(lens=(2, 3)):
    """kv_args with a paged cache: 5 blocks of 4 positions, two per row."""
    a = kv_args(lens=lens)
    a["k_cache"], a["v_cache"] = randn(5, 4, 2, 8, seed=9), randn(5, 4, 2, 8, seed=10)
    a["block_table"] = torch.tensor([[3, 1], [0, 4]], dtype=I32)
    return a


def kvp(ops, scale=SCALE, causal=True, window=(-1, -1), **mods):
    a = kvp_args()
    a.update({n: (m(a) if callable(m) else m) for n, m in mods.items()})
    table = a.pop("block_table")
    return ops.flash_attn_kvcache(*a.values(), scale, causal, *window, table)


def kvp_py(**mods):
    a = kvp_args()
    kw = {"scale": SCALE, **{n: mods.pop(n) for n in ("causal", "scale", "window") if n in mods}}
    a.update({n: (m(a) if callable(m) else m) for n, m in mods.items()})
    return pk.flash_attention_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], k_new=a["k_new"],
                                           v_new=a["v_new"], block_table=a["block_table"], **kw)


def kv_py(**mods):
    a = kv_args()
    kw = {"scale": SCALE, **{n: mods.pop(n) for n in ("causal", "scale", "window") if n in mods}}
    a.update({n: (m(a) if callable(m) else m) for n, m in mods.items()})
    return pk.flash_attention_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], k_new=a["k_new"],
                                           v_new=a["v_new"], **kw)


def sdpa_in(B=2, H=4, L=5, S=7, E=8):
    return randn(B, H, L, E, seed=13), randn(B, H, S, E, seed=14), randn(B, H, S, E, seed=15)


V, MASK = 100, 3


def ids_(B=3, L=16, dtype=I64, seed=0):
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed)).to(dtype)


def mlm(ops, **over):
    a = dict(ids=ids_(), attn=None, special=None, ws=None, rows=None, seed=torch.tensor([1]), mask_prob=0.5,
             mask_id=MASK, vocab=V, replace=0.8, random=0.1, exact=False, max_pred=0)
    a.update(over)
    return ops.mlm_mask(*a.values())


def span(ops, **over):
    a = dict(ids=ids_(), attn=None, special=None, ws=None, rows=None, seed=torch.tensor([1]), mask_prob=0.5,
             mask_id=MASK, vocab=V, replace=0.8, random=0.1, gp=0.2, max_span=10)
    a.update(over)
    return ops.span_mask(*a.values())


MKW = dict(mask_token_id=MASK, vocab_size=V, seed=1)


def coll(**kw):
    return pk.MLMCollator(**{**dict(mask_token_id=MASK, pad_token_id=0, vocab_size=V, seed=0), **kw})


# ---- invalid input: the Python API ---------------------------------------------------------------
# (id, call, exception, message pattern naming the argument)

q4, k4, v4 = qkv()
qv3, kv3, vv3, cuq, cuk = varlen()
qs, ks, vs = sdpa_in()


def fa(**kw):
    args = kw.pop("args", None) or qkv()
    return pk.flash_attention(*args, **kw)


def fav(**kw):
    q, k, v, cq, ck = varlen()
    kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck, **kw}
    return pk.flash_attention(q, k, v, **kw)


PY_ERRORS = [
    # flash_attention: dtypes, ranks, devices, shapes
    ("fa-q-int", lambda: fa(args=(q4.int(), k4, v4)), TypeError, "q: expected float32"),
    ("fa-q-complex", lambda: fa(args=(q4.to(torch.complex64), k4, v4)), TypeError, "q: expected float32"),
    ("fa-q-list", lambda: fa(args=(q4.tolist(), k4, v4)), TypeError, "q: expected a torch.Tensor"),
    ("fa-mixed-dtypes", lambda: fa(args=(q4, k4.half(), v4)), TypeError, "one dtype"),
    ("fa-k-meta", lambda: fa(args=(q4, k4.to(META), v4)), ValueError, "one device"),
    ("fa-q-rank3", lambda: fa(args=(q4[0], k4, v4)), ValueError, "q: expected 4 dims"),
    ("fa-k-rank5", lambda: fa(args=(q4, k4[None], v4)), ValueError, "k: expected 4 dims"),
    ("fa-head-dim-0", lambda: fa(args=(q4[..., :0], k4[..., :0], v4[..., :0])), ValueError, "head_dim"),
    ("fa-head-dim-257", lambda: fa(args=qkv(D=257)), ValueError, "head_dim"),
    ("fa-head-dims-differ", lambda: fa(args=(q4, k4[..., :4], v4)), ValueError, "head_dim"),
    ("fa-kv-heads-0", lambda: fa(args=(q4, k4[:, :, :0], v4[:, :, :0])), ValueError, "heads"),
    ("fa-heads-not-multiple", lambda: fa(args=qkv(H=3, Hk=2)), ValueError, "multiple of the key/value heads"),
    ("fa-batch-differs", lambda: fa(args=(q4, k4[:1], v4[:1])), ValueError, "batch"),
    ("fa-kv-lengths-differ", lambda: fa(args=(q4, k4, v4[:, :3])), ValueError, "k, v"),
    # knobs
    ("fa-scale-nan", lambda: fa(scale=math.nan), ValueError, "scale"),
    ("fa-scale-inf", lambda: fa(scale=math.inf), ValueError, "scale"),
    ("fa-scale-neg-inf", lambda: fa(scale=-math.inf), ValueError, "scale"),
    ("fa-scale-huge-float32", lambda: fa(scale=1e39), ValueError, "scale: expected a magnitude"),
    ("fa-scale-bool", lambda: fa(scale=True), TypeError, "scale"),
    ("fa-scale-tensor", lambda: fa(scale=torch.tensor(0.3)), TypeError, "scale"),
    ("fa-window-neg", lambda: fa(window=(-2, 0)), ValueError, "window"),
    ("fa-window-float", lambda: fa(window=(1.5, 0)), TypeError, "window"),
    ("fa-window-not-pair", lambda: fa(window=3), ValueError, "window"),
    # varlen: malformed cu_seqlens
    ("fav-one-cu", lambda: fav(cu_seqlens_k=None), ValueError, "pass both"),
    ("fav-cu-int64", lambda: fav(cu_seqlens_q=cuq.long()), TypeError, "cu_seqlens_q: expected an int32"),
    ("fav-cu-float", lambda: fav(cu_seqlens_k=cuk.float()), TypeError, "cu_seqlens_k: expected an int32"),
    ("fav-cu-2d", lambda: fav(cu_seqlens_q=cuq[None]), ValueError, "cu_seqlens_q: expected a 1-D"),
    ("fav-cu-empty", lambda: fav(cu_seqlens_q=cuq[:0], cu_seqlens_k=cuk[:0]), ValueError, "cu_seqlens_q"),
    ("fav-cu-meta", lambda: fav(cu_seqlens_q=cuq.to(META)), ValueError, "cu_seqlens_q: expected a tensor on cpu"),
    ("fav-cu-batches-differ", lambda: fav(cu_seqlens_k=cu(0, 9)), ValueError, "same batch"),
    ("fav-cu-list", lambda: fav(cu_seqlens_q=[0, 3, 7]), TypeError, "cu_seqlens_q"),
    ("fav-q-rank4", lambda: pk.flash_attention(q4, k4, v4, cu_seqlens_q=cuq, cu_seqlens_k=cuk), ValueError,
     "q: expected 3 dims"),
    ("fav-cu-decreasing", lambda: fav(cu_seqlens_q=cu(0, 5, 3)), RuntimeError, "cu_seqlens_q: expected non-decreasing"),
    ("fav-cu-negative", lambda: fav(cu_seqlens_q=cu(0, -3, 7)), RuntimeError, "cu_seqlens_q: expected non-decreasing"),
    ("fav-cu-not-from-0", lambda: fav(cu_seqlens_k=cu(1, 4, 9)), RuntimeError, "cu_seqlens_k: expected to start at 0"),
    ("fav-cu-past-end", lambda: fav(cu_seqlens_k=cu(0, 4, 2**31 - 1)), RuntimeError, "cu_seqlens_k: expected to end"),
    ("fav-cu-short-of-end", lambda: fav(cu_seqlens_q=cu(0, 3, 6)), RuntimeError, "cu_seqlens_q: expected to end"),
    ("fav-max-seqlen-neg", lambda: fav(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    ("fav-max-seqlen-float", lambda: fav(max_seqlen_k=3.0), TypeError, "max_seqlen_k"),
    # flash_attention_with_kvcache
    ("kv-lens-list", lambda: kv_py(cache_seqlens=[2, 3]), TypeError, "cache_seqlens: expected an int32"),
    ("kv-lens-int64", lambda: kv_py(cache_seqlens=torch.tensor([2, 3])), TypeError, "cache_seqlens: expected an int32"),
    ("kv-lens-2d", lambda: kv_py(cache_seqlens=torch.tensor([[2, 3]], dtype=I32)), ValueError, "cache_seqlens"),
    ("kv-lens-meta", lambda: kv_py(cache_seqlens=torch.tensor([2, 3], dtype=I32, device=META)), ValueError,
     "cache_seqlens: expected a tensor on cpu"),
    ("kv-q-rank3", lambda: kv_py(q=lambda a: a["q"][0]), ValueError, "q: expected 4 dims"),
    ("kv-q-int", lambda: kv_py(q=lambda a: a["q"].int()), TypeError, "q: expected float32"),
    ("kv-cache-meta", lambda: kv_py(k_cache=lambda a: a["k_cache"].to(META)), ValueError, "one device"),
    ("kv-cache-dtype", lambda: kv_py(k_cache=lambda a: a["k_cache"].double(), v_cache=lambda a: a["v_cache"].double()),
     TypeError, "one dtype"),
    ("kv-new-without-v", lambda: kv_py(v_new=None), ValueError, "k_new, v_new: pass both"),
    ("kv-new-heads", lambda: kv_py(k_new=lambda a: a["k_new"][:, :, :1]), ValueError, "k_new: expected shape"),
    ("kv-new-dtype", lambda: kv_py(k_new=lambda a: a["k_new"].half(), v_new=lambda a: a["v_new"].half()),
     TypeError, "one dtype"),
    ("kv-new-too-long", lambda: kv_py(k_new=randn(2, 7, 2, 8), v_new=randn(2, 7, 2, 8)), RuntimeError,
     "do not fit"),
    ("kv-window-below-minus-1", lambda: kv_py(window=(-2, -1)), ValueError, "window: expected values >= -1"),
    ("kv-window-float", lambda: kv_py(window=(2.0, -1)), TypeError, "window: expected ints"),
    ("kv-window-scalar", lambda: kv_py(window=3), ValueError, "window: expected a pair"),
    ("kvp-table-int64", lambda: kvp_py(block_table=lambda a: a["block_table"].long()), TypeError,
     "block_table: expected an int32"),
    ("kvp-table-list", lambda: kvp_py(block_table=[[3, 1], [0, 4]]), TypeError, "block_table: expected an int32"),
    ("kvp-table-1d", lambda: kvp_py(block_table=lambda a: a["block_table"][0]), ValueError,
     "block_table: expected shape"),
    ("kvp-table-batch", lambda: kvp_py(block_table=lambda a: a["block_table"][:1]), ValueError,
     "block_table: expected shape"),
    ("kvp-table-meta", lambda: kvp_py(block_table=lambda a: a["block_table"].to(META)), ValueError,
     "block_table: expected a tensor on cpu"),
    ("kvp-page-size-0", lambda: kvp_py(k_cache=randn(5, 0, 2, 8), v_cache=randn(5, 0, 2, 8)), ValueError,
     "page size"),
    ("kvp-page-layouts-differ", lambda: kvp_py(v_cache=lambda a: a["v_cache"][:4]), ValueError,
     "v_cache: expected the page layout"),
    ("kvp-cache-rank3", lambda: kvp_py(k_cache=lambda a: a["k_cache"][0]), ValueError,
     "k_cache: expected 4 dims \\(num_blocks, page_size"),
    ("kvp-new-too-long", lambda: kvp_py(k_new=randn(2, 9, 2, 8), v_new=randn(2, 9, 2, 8)), RuntimeError,
     "9 new tokens do not fit a cache of 8"),
    ("kvp-block-id-out-of-range", lambda: kvp_py(block_table=torch.tensor([[3, 1], [5, 4]], dtype=I32)),
     RuntimeError, "block_table: row 1 uses block id 5 at index 0"),
    ("kvp-block-id-negative", lambda: kvp_py(block_table=torch.tensor([[-1, 1], [0, 4]], dtype=I32)),
     RuntimeError, "block_table: row 0 uses block id -1 at index 0"),
    ("kv-cache-expanded", lambda: kv_py(k_cache=lambda a: a["k_cache"][:1].expand(2, -1, -1, -1)), RuntimeError,
     "no two elements may share memory"),
    ("kv-caches-alias", lambda: kv_py(v_cache=lambda a: a["k_cache"]), RuntimeError, "must not overlap each other"),
    ("kv-new-aliases-cache", lambda: kv_py(k_new=lambda a: a["k_cache"][:, :1]), RuntimeError,
     "must not share memory"),
    ("kv-cache-last-dim-strided", lambda: kv_py(k_cache=randn(2, 6, 2, 16)[..., ::2]), RuntimeError,
     "contiguous last dimension"),
    ("kv-heads-not-multiple", lambda: kv_py(q=randn(2, 1, 3, 8)), ValueError, "multiple of the key/value heads"),
    ("kv-scale-nan", lambda: kv_py(scale=math.nan), ValueError, "scale"),
    ("kv-scale-huge", lambda: kv_py(scale=-1e300), ValueError, "scale"),
    # scaled_dot_product_attention
    ("sdpa-query-2d", lambda: pk.scaled_dot_product_attention(qs[0, 0], ks[0, 0], vs[0, 0]), ValueError, "query"),
    ("sdpa-key-rank", lambda: pk.scaled_dot_product_attention(qs, ks[0], vs), ValueError, "key"),
    ("sdpa-lead-dims", lambda: pk.scaled_dot_product_attention(qs[None], ks[None].expand(2, -1, -1, -1, -1),
                                                               vs[None]), ValueError, "key"),
    ("sdpa-int", lambda: pk.scaled_dot_product_attention(qs.int(), ks.int(), vs.int()), TypeError, "query"),
    ("sdpa-value-meta", lambda: pk.scaled_dot_product_attention(qs, ks, vs.to(META)), ValueError, "one device"),
    ("sdpa-value-length", lambda: pk.scaled_dot_product_attention(qs, ks, vs[:, :, :3]), ValueError, "value"),
    ("sdpa-gqa-off", lambda: pk.scaled_dot_product_attention(qs, ks[:, :2], vs[:, :2]), ValueError, "enable_gqa"),
    ("sdpa-gqa-not-multiple", lambda: pk.scaled_dot_product_attention(qs[:, :3], ks[:, :2], vs[:, :2],
                                                                      enable_gqa=True), ValueError, "heads"),
    ("sdpa-head-dim-0", lambda: pk.scaled_dot_product_attention(qs, ks, vs[..., :0]), ValueError, "value"),
    ("sdpa-mask-int", lambda: pk.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(5, 7, dtype=I32)),
     TypeError, "attn_mask"),
    ("sdpa-mask-meta", lambda: pk.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(5, 7, device=META)),
     ValueError, "attn_mask"),
    ("sdpa-mask-shape", lambda: pk.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(5, 6)), ValueError,
     "attn_mask"),
    ("sdpa-mask-and-causal", lambda: pk.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(5, 7),
                                                                     is_causal=True), ValueError, "at most one"),
    ("sdpa-mask-list", lambda: pk.scaled_dot_product_attention(qs, ks, vs, attn_mask=[[True]]), TypeError,
     "attn_mask"),
    ("sdpa-dropout-nan", lambda: pk.scaled_dot_product_attention(qs, ks, vs, dropout_p=math.nan), ValueError,
     "dropout_p"),
    ("sdpa-dropout-neg", lambda: pk.scaled_dot_product_attention(qs, ks, vs, dropout_p=-0.1), ValueError,
     "dropout_p"),
    ("sdpa-dropout-huge", lambda: pk.scaled_dot_product_attention(qs, ks, vs, dropout_p=1e9), ValueError,
     "dropout_p"),
    ("sdpa-dropout-str", lambda: pk.scaled_dot_product_attention(qs, ks, vs, dropout_p="0.1"), TypeError,
     "dropout_p"),
    ("sdpa-dropout-offset", lambda: pk.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.1,
                                                                    seed=torch.tensor([1, -1])), ValueError, "seed"),
    ("sdpa-scale-inf", lambda: pk.scaled_dot_product_attention(qs, ks, vs, scale=math.inf), ValueError, "scale"),
    # mlm_mask / span_mask
    ("mlm-ids-list", lambda: pk.mlm_mask([[5, 6]], **MKW), TypeError, "input_ids"),
    ("mlm-ids-float", lambda: pk.mlm_mask(ids_().float(), **MKW), TypeError, "input_ids"),
    ("mlm-ids-int16", lambda: pk.mlm_mask(ids_().short(), **MKW), TypeError, "input_ids"),
    ("mlm-ids-bool", lambda: pk.mlm_mask(ids_().bool(), **MKW), TypeError, "input_ids"),
    ("mlm-ids-1d", lambda: pk.mlm_mask(ids_()[0], **MKW), ValueError, "input_ids"),
    ("mlm-ids-3d", lambda: pk.mlm_mask(ids_()[None], **MKW), ValueError, "input_ids"),
    ("mlm-attn-shape", lambda: pk.mlm_mask(ids_(), attention_mask=torch.ones(3, 15), **MKW), ValueError,
     "attention_mask"),
    ("mlm-attn-meta", lambda: pk.mlm_mask(ids_(), attention_mask=torch.ones(3, 16, device=META), **MKW), ValueError,
     "attention_mask"),
    ("mlm-attn-list", lambda: pk.mlm_mask(ids_(), attention_mask=[[1] * 16] * 3, **MKW), TypeError, "attention_mask"),
    ("mlm-word-starts-shape", lambda: pk.mlm_mask(ids_(), word_starts=torch.ones(2, 16, dtype=torch.bool), **MKW),
     ValueError, "word_starts"),
    ("mlm-special-float", lambda: pk.mlm_mask(ids_(), special_token_ids=torch.tensor([1.0]), **MKW), TypeError,
     "special_token_ids"),
    ("mlm-special-meta", lambda: pk.mlm_mask(ids_(), special_token_ids=torch.tensor([1], device=META), **MKW),
     ValueError, "special_token_ids"),
    ("mlm-special-str", lambda: pk.mlm_mask(ids_(), special_token_ids="abc", **MKW), TypeError, "special_token_ids"),
    ("mlm-special-int", lambda: pk.mlm_mask(ids_(), special_token_ids=5, **MKW), TypeError, "special_token_ids"),
    ("mlm-vocab-0", lambda: pk.mlm_mask(ids_(), mask_token_id=0, vocab_size=0), ValueError, "vocab_size"),
    ("mlm-vocab-neg", lambda: pk.mlm_mask(ids_(), mask_token_id=0, vocab_size=-5), ValueError, "vocab_size"),
    ("mlm-vocab-huge", lambda: pk.mlm_mask(ids_(), mask_token_id=0, vocab_size=BIG), ValueError, "vocab_size"),
    ("mlm-vocab-float", lambda: pk.mlm_mask(ids_(), mask_token_id=0, vocab_size=100.0), TypeError, "vocab_size"),
    ("mlm-vocab-int32-ids", lambda: pk.mlm_mask(ids_(dtype=I32), mask_token_id=3, vocab_size=2**31 + 1), ValueError,
     "vocab_size: int32 input_ids"),
    ("mlm-mask-id-neg", lambda: pk.mlm_mask(ids_(), mask_token_id=-1, vocab_size=V), ValueError, "mask_token_id"),
    ("mlm-mask-id-huge", lambda: pk.mlm_mask(ids_(), mask_token_id=BIG, vocab_size=V), ValueError, "mask_token_id"),
    ("mlm-mask-id-is-vocab", lambda: pk.mlm_mask(ids_(), mask_token_id=V, vocab_size=V), ValueError, "mask_token_id"),
    ("mlm-prob-nan", lambda: pk.mlm_mask(ids_(), mask_prob=math.nan, **MKW), ValueError, "mask_prob"),
    ("mlm-prob-inf", lambda: pk.mlm_mask(ids_(), mask_prob=math.inf, **MKW), ValueError, "mask_prob"),
    ("mlm-prob-neg", lambda: pk.mlm_mask(ids_(), mask_prob=-0.1, **MKW), ValueError, "mask_prob"),
    ("mlm-prob-huge", lambda: pk.mlm_mask(ids_(), mask_prob=1e300, **MKW), ValueError, "mask_prob"),
    ("mlm-prob-str", lambda: pk.mlm_mask(ids_(), mask_prob="0.1", **MKW), TypeError, "mask_prob"),
    ("mlm-rows-int", lambda: pk.mlm_mask(ids_(), mask_prob=torch.tensor([1, 0, 1]), **MKW), TypeError, "mask_prob"),
    ("mlm-rows-shape", lambda: pk.mlm_mask(ids_(), mask_prob=torch.full((2,), 0.5), **MKW), ValueError, "mask_prob"),
    ("mlm-rows-2d", lambda: pk.mlm_mask(ids_(), mask_prob=torch.full((1, 3), 0.5), **MKW), ValueError, "mask_prob"),
    ("mlm-rows-meta", lambda: pk.mlm_mask(ids_(), mask_prob=torch.full((3,), 0.5, device=META), **MKW), ValueError,
     "mask_prob"),
    ("mlm-replace-nan", lambda: pk.mlm_mask(ids_(), replace_prob=math.nan, **MKW), ValueError, "replace_prob"),
    ("mlm-random-neg", lambda: pk.mlm_mask(ids_(), random_prob=-0.1, **MKW), ValueError, "random_prob"),
    ("mlm-replace-random-sum", lambda: pk.mlm_mask(ids_(), replace_prob=0.95, random_prob=0.1, **MKW), ValueError,
     "replace_prob"),
    ("mlm-max-pred-0", lambda: pk.mlm_mask(ids_(), exact_count=True, max_predictions=0, **MKW), ValueError,
     "max_predictions"),
    ("mlm-max-pred-neg", lambda: pk.mlm_mask(ids_(), exact_count=True, max_predictions=-3, **MKW), ValueError,
     "max_predictions"),
    ("mlm-max-pred-float", lambda: pk.mlm_mask(ids_(), exact_count=True, max_predictions=2.0, **MKW), TypeError,
     "max_predictions"),
    ("span-gp-0", lambda: pk.span_mask(ids_(), geometric_p=0.0, **MKW), ValueError, "geometric_p"),
    ("span-gp-nan", lambda: pk.span_mask(ids_(), geometric_p=math.nan, **MKW), ValueError, "geometric_p"),
    ("span-gp-neg", lambda: pk.span_mask(ids_(), geometric_p=-0.5, **MKW), ValueError, "geometric_p"),
    ("span-gp-inf", lambda: pk.span_mask(ids_(), geometric_p=math.inf, **MKW), ValueError, "geometric_p"),
    ("span-max-span-0", lambda: pk.span_mask(ids_(), max_span=0, **MKW), ValueError, "max_span"),
    ("span-max-span-neg", lambda: pk.span_mask(ids_(), max_span=-BIG, **MKW), ValueError, "max_span"),
    ("span-ids-float", lambda: pk.span_mask(ids_().double(), **MKW), TypeError, "input_ids"),
    # seeds
    ("seed-and-generator", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=1,
                                               generator=torch.Generator()), ValueError, "seed"),
    ("seed-float", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=1.5), TypeError, "seed"),
    ("seed-str", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed="1"), TypeError, "seed"),
    ("seed-2**64", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=2**64), ValueError, "seed"),
    ("seed-below-int64", lambda: pk.span_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=-(2**63) - 1),
     ValueError, "seed"),
    ("seed-tensor-float", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=torch.tensor([1.0])),
     TypeError, "seed"),
    ("seed-tensor-bool", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=torch.tensor([True])),
     TypeError, "seed"),
    ("seed-tensor-2", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, seed=torch.tensor([1, 2])),
     ValueError, "seed"),
    ("seed-tensor-empty", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V,
                                              seed=torch.tensor([], dtype=I64)), ValueError, "seed"),
    ("seed-tensor-meta", lambda: pk.span_mask(ids_(), mask_token_id=MASK, vocab_size=V,
                                              seed=torch.tensor([1], device=META)), ValueError, "seed"),
    ("generator-not-generator", lambda: pk.mlm_mask(ids_(), mask_token_id=MASK, vocab_size=V, generator=5),
     TypeError, "generator"),
    # MLMCollator
    ("coll-prob-nan", lambda: coll(mlm_probability=math.nan), ValueError, "mlm_probability"),
    ("coll-prob-str", lambda: coll(mlm_probability="0.1"), TypeError, "mlm_probability"),
    ("coll-replace-nan", lambda: coll(mask_replace_prob=math.nan), ValueError, "mask_replace_prob"),
    ("coll-random-neg", lambda: coll(random_replace_prob=-0.1), ValueError, "random_replace_prob"),
    ("coll-probs-sum", lambda: coll(mask_replace_prob=0.9, random_replace_prob=0.2), ValueError, "mask_replace_prob"),
    ("coll-vocab-0", lambda: coll(vocab_size=0), ValueError, "vocab_size"),
    ("coll-mask-id-out", lambda: coll(mask_token_id=V), ValueError, "mask_token_id"),
    ("coll-no-mask-id", lambda: coll(mask_token_id=None), ValueError, "mask_token_id"),
    ("coll-pad-str", lambda: coll(pad_token_id="x"), TypeError, "pad_token_id"),
    ("coll-pad-huge", lambda: coll(pad_token_id=BIG), ValueError, "pad_token_id"),
    ("coll-multiple-neg", lambda: coll(pad_to_multiple_of=-8), ValueError, "pad_to_multiple_of"),
    ("coll-multiple-float", lambda: coll(pad_to_multiple_of=2.5), TypeError, "pad_to_multiple_of"),
    ("coll-max-pred-0", lambda: coll(max_predictions=0), ValueError, "max_predictions"),
    ("coll-seed-huge", lambda: coll(seed=BIG), ValueError, "seed"),
    ("coll-seed-float", lambda: coll(seed=0.5), TypeError, "seed"),
    ("coll-special-str", lambda: coll(special_token_ids=["a"]), TypeError, "special_token_ids"),
    ("coll-return-tf", lambda: coll(return_tensors="tf"), ValueError, "return_tensors"),
    ("coll-padding-side", lambda: coll(padding_side="up"), ValueError, "padding_side"),
    ("coll-no-examples", lambda: coll()([]), ValueError, "examples"),
    ("coll-examples-int", lambda: coll()(5), TypeError, "examples"),
    ("coll-examples-dict", lambda: coll()({"input_ids": [5]}), TypeError, "examples"),
    ("coll-float-ids", lambda: coll()([[5.5, 6.7]]), TypeError, r"examples\[0\]"),
    ("coll-float-tensor-ids", lambda: coll()([torch.tensor([5.0, 6.0])]), TypeError, r"examples\[0\]"),
    ("coll-nested-ids", lambda: coll()([[5, 6], [[5], [6]]]), ValueError, r"examples\[1\]"),
    ("coll-str-ids", lambda: coll()([["a", "b"]]), ValueError, r"examples\[0\]"),
    ("coll-str-example", lambda: coll()(["hello"]), TypeError, r"examples\[0\]"),
    ("coll-huge-id", lambda: coll()([[5, BIG]]), ValueError, r"examples\[0\]"),
    ("coll-missing-input-ids", lambda: coll()([{"ids": [5]}]), ValueError, "input_ids"),
    ("coll-mixed-examples", lambda: coll()([{"input_ids": [5]}, [6]]), ValueError, r"examples\[1\]"),
    ("coll-missing-field", lambda: coll()([{"input_ids": [5], "attention_mask": [1]}, {"input_ids": [6]}]),
     ValueError, r"examples\[1\]: missing 'attention_mask'"),
    ("coll-attn-longer", lambda: coll()([{"input_ids": [5, 6], "attention_mask": [1, 1, 1]}]), ValueError,
     "attention_mask"),
    ("coll-attn-shorter", lambda: coll()([{"input_ids": [5, 6], "attention_mask": [1]}]), ValueError,
     "attention_mask"),
    ("coll-word-starts-longer", lambda: coll(whole_word_mask=True)([{"input_ids": [5, 6], "word_starts": [1, 0, 1]}]),
     ValueError, "word_starts"),
    ("coll-whole-word-no-starts", lambda: coll(whole_word_mask=True)([[5, 6]]), ValueError, "word_starts"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:], id=c[0]) for c in PY_ERRORS])
def test_python_api_rejects(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- invalid input: the raw ops ------------------------------------------------------------------
# (id, call(ops), message pattern, on CUDA: True (same message), False (not meaningful: meta tensors,
#  host-read values), or the message CUDA gives instead)

def meta(*ts):
    return [t.to(META) if isinstance(t, torch.Tensor) else t for t in ts]


RAW_ERRORS = [
    # flash_attn_fwd
    ("fwd-int", lambda o: fwd(o, *(t.int() for t in qkv())), "q: expected float32, float16, bfloat16", True),
    ("fwd-complex", lambda o: fwd(o, *(t.to(torch.complex64) for t in qkv())), "q: expected float32", True),
    ("fwd-mixed-dtypes", lambda o: fwd(o, q4, k4.half(), v4.half()), "q, k, v: expected one dtype", True),
    ("fwd-q-rank3", lambda o: fwd(o, q4[0], k4, v4), "q: expected 4 dims", True),
    ("fwd-v-rank5", lambda o: fwd(o, q4, k4, v4[None]), "v: expected 4 dims", True),
    ("fwd-k-meta", lambda o: fwd(o, q4, k4.to(META), v4), "k: expected a tensor on cpu", False),
    ("fwd-all-meta-int", lambda o: fwd(o, *meta(q4.int(), k4.int(), v4.int())), "q: expected float32", False),
    ("fwd-all-meta-rank3", lambda o: fwd(o, *meta(q4[0], k4, v4)), "q: expected 4 dims", False),
    ("fwd-all-meta-heads", lambda o: fwd(o, *meta(*qkv(H=3))), "multiple of the key/value heads", False),
    ("fwd-heads-not-multiple", lambda o: fwd(o, *qkv(H=3)), "multiple of the key/value heads", True),
    ("fwd-kv-heads-0", lambda o: fwd(o, q4, k4[:, :, :0], v4[:, :, :0]), "multiple of the key/value heads", True),
    ("fwd-kv-heads-differ", lambda o: fwd(o, q4, k4, v4[:, :, :1]), "k, v: expected the same number of heads", True),
    ("fwd-head-dim-0", lambda o: fwd(o, q4[..., :0], k4[..., :0], v4[..., :0]), "head_dim", True),
    ("fwd-head-dim-300", lambda o: fwd(o, *qkv(D=300)), "head_dim: expected 1 to 256", True),
    ("fwd-v-head-dim-0", lambda o: fwd(o, q4, k4, v4[..., :0]), "head_dim of v", True),
    ("fwd-batch-differs", lambda o: fwd(o, q4, k4[:1], v4[:1]), "batch", True),
    ("fwd-scale-nan", lambda o: fwd(o, scale=math.nan), "scale: expected a finite", True),
    ("fwd-scale-inf", lambda o: fwd(o, scale=-math.inf), "scale: expected a finite", True),
    ("fwd-scale-huge", lambda o: fwd(o, scale=1e39), "scale: expected a magnitude", True),
    ("fwd-window-left-neg", lambda o: fwd(o, left=-2), "window", True),
    ("fwd-window-right-neg", lambda o: fwd(o, right=-(2**63)), "window", True),
    ("fwd-one-cu", lambda o: fwd(o, qv3, kv3, vv3, cu_q=cuq), "pass both or neither", True),
    ("fwd-cu-int64", lambda o: fwd(o, qv3, kv3, vv3, cuq.long(), cuk), "cu_seqlens_q: expected an int32", True),
    ("fwd-cu-2d", lambda o: fwd(o, qv3, kv3, vv3, cuq, cuk[None]), "cu_seqlens_k: expected shape", True),
    ("fwd-cu-empty", lambda o: fwd(o, qv3, kv3, vv3, cuq[:0], cuk[:0]), "cu_seqlens_q: expected at least one", True),
    ("fwd-cu-batches-differ", lambda o: fwd(o, qv3, kv3, vv3, cuq, cu(0, 9)), "cu_seqlens_k: expected shape", True),
    ("fwd-cu-meta", lambda o: fwd(o, qv3, kv3, vv3, cuq.to(META), cuk), "cu_seqlens_q: expected a tensor on cpu",
     False),
    ("fwd-cu-decreasing", lambda o: fwd(o, qv3, kv3, vv3, cu(0, 5, 3), cuk), "cu_seqlens_q: expected non-decreasing",
     False),
    ("fwd-cu-int-min", lambda o: fwd(o, qv3, kv3, vv3, cuq, cu(0, -(2**31), 9)), "cu_seqlens_k: expected non-decr",
     False),
    ("fwd-cu-not-from-0", lambda o: fwd(o, qv3, kv3, vv3, cu(2, 3, 7), cuk), "cu_seqlens_q: expected to start at 0",
     False),
    ("fwd-cu-past-end", lambda o: fwd(o, qv3, kv3, vv3, cuq, cu(0, 4, 2**31 - 1)), "cu_seqlens_k: expected to end",
     False),
    ("fwd-varlen-q-rank4", lambda o: fwd(o, q4, k4, v4, cuq, cuk), "q: expected 3 dims", True),
    ("fwd-varlen-mask", lambda o: fwd(o, qv3, kv3, vv3, cuq, cuk, mask=torch.ones(2, 4, 3, 4, dtype=torch.bool)),
     "attn_mask: not supported with cu_seqlens", True),
    ("fwd-mask-half", lambda o: fwd(o, mask=torch.zeros(2, 4, 5, 7, dtype=torch.half)), "attn_mask: expected bool or",
     True),
    ("fwd-mask-int", lambda o: fwd(o, mask=torch.ones(2, 4, 5, 7, dtype=I32)), "attn_mask: expected bool or", True),
    ("fwd-mask-shape", lambda o: fwd(o, mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)), "attn_mask: expected shape",
     True),
    ("fwd-mask-3d", lambda o: fwd(o, mask=torch.ones(4, 5, 7, dtype=torch.bool)), "attn_mask: expected shape", True),
    ("fwd-mask-meta", lambda o: fwd(o, mask=torch.ones(2, 4, 5, 7, dtype=torch.bool, device=META)), "attn_mask",
     False),
    ("fwd-float64-on-cuda", lambda o: fwd(o, *(t.double() for t in qkv())), "float64 attention runs on the CPU only",
     "cuda-only"),
    # flash_attn_bwd
    ("bwd-dout-shape", lambda o: bwd(o, dout=lambda a: a["dout"][:, :4]), "out, dout: expected shape", True),
    ("bwd-dout-dtype", lambda o: bwd(o, dout=lambda a: a["dout"].half()), "out, dout: expected dtype", True),
    ("bwd-out-shape", lambda o: bwd(o, out=lambda a: a["out"][..., :4]), "out, dout: expected shape", True),
    ("bwd-lse-dtype", lambda o: bwd(o, lse=lambda a: a["lse"].half()), "lse: expected", True),
    ("bwd-lse-shape", lambda o: bwd(o, lse=lambda a: a["lse"][:, :, :4]), "lse: expected", True),
    ("bwd-lse-transposed-shape", lambda o: bwd(o, lse=lambda a: a["lse"].transpose(1, 2)), "lse: expected", True),
    ("bwd-dlse-shape", lambda o: bwd(o, dlse=lambda a: a["lse"][0]), "dlse: expected", True),
    ("bwd-dlse-dtype", lambda o: bwd(o, dlse=lambda a: a["lse"].double()), "dlse: expected", True),
    ("bwd-q-int", lambda o: bwd(o, q=lambda a: a["q"].int()), "q: expected float32", True),
    ("bwd-window-neg", lambda o: bwd(o, left=-3), "window", True),
    ("bwd-scale-nan", lambda o: bwd(o, scale=math.nan), "scale", True),
    ("bwd-lse-meta", lambda o: bwd(o, lse=lambda a: a["lse"].to(META)), "out, dout, lse: expected tensors on cpu",
     False),
    ("bwd-all-meta-dout-shape", lambda o: bwd(o, **{n: (lambda a, n=n: a[n].to(META)) for n in
                                                    ("q", "k", "v", "out", "lse")}, dout=randn(2, 4, 4, 8).to(META)),
     "out, dout: expected shape", False),
    # flash_attn_kvcache
    ("kv-lens-int64", lambda o: kvc(o, cache_seqlens=torch.tensor([2, 3])), "cache_seqlens: expected an int32", True),
    ("kv-lens-float", lambda o: kvc(o, cache_seqlens=torch.tensor([2.0, 3.0])), "cache_seqlens: expected an int32",
     True),
    ("kv-lens-2d", lambda o: kvc(o, cache_seqlens=torch.tensor([[2, 3]], dtype=I32)), "cache_seqlens: expected shape",
     True),
    ("kv-lens-scalar", lambda o: kvc(o, cache_seqlens=torch.tensor(2, dtype=I32)), "cache_seqlens: expected shape",
     True),
    ("kv-lens-short", lambda o: kvc(o, cache_seqlens=torch.tensor([2], dtype=I32)), "cache_seqlens: expected shape",
     True),
    ("kv-lens-meta", lambda o: kvc(o, cache_seqlens=torch.tensor([2, 3], dtype=I32, device=META)), "cache_seqlens",
     False),
    ("kv-q-rank3", lambda o: kvc(o, q=lambda a: a["q"][0]), "q: expected 4 dims", True),
    ("kv-q-int", lambda o: kvc(o, q=lambda a: a["q"].int()), "q: expected float32", True),
    ("kv-cache-rank3", lambda o: kvc(o, k_cache=lambda a: a["k_cache"][0]), "k_cache, v_cache: expected 4 dims",
     True),
    ("kv-cache-batch", lambda o: kvc(o, k_cache=lambda a: a["k_cache"][:1]), "k_cache, v_cache: expected batch",
     True),
    ("kv-cache-lengths", lambda o: kvc(o, v_cache=lambda a: a["v_cache"][:, :5]), "v_cache: expected max_seqlen",
     True),
    ("kv-cache-meta", lambda o: kvc(o, k_cache=lambda a: a["k_cache"].to(META)), "k: expected a tensor on cpu", False),
    ("kv-q-cache-dtypes", lambda o: kvc(o, q=lambda a: a["q"].half()), "q, k, v: expected one dtype", True),
    ("kv-heads-not-multiple", lambda o: kvc(o, q=randn(2, 1, 3, 8)), "multiple of the key/value heads", True),
    ("kv-head-dims-differ", lambda o: kvc(o, q=randn(2, 1, 4, 4)), "head_dim", True),
    ("kv-new-without-v", lambda o: kvc(o, v_new=None), "k_new, v_new: pass both or neither", True),
    ("kv-new-rank3", lambda o: kvc(o, k_new=lambda a: a["k_new"][0], v_new=lambda a: a["v_new"][0]),
     "k_new, v_new: expected 4 dims", True),
    ("kv-new-batch", lambda o: kvc(o, k_new=lambda a: a["k_new"][:1], v_new=lambda a: a["v_new"][:1]),
     "k_new, v_new: expected batch", True),
    ("kv-new-heads", lambda o: kvc(o, k_new=lambda a: a["k_new"][:, :, :1]), "k_new: expected \\(heads, head_dim\\)",
     True),
    ("kv-new-dtype", lambda o: kvc(o, k_new=lambda a: a["k_new"].double(), v_new=lambda a: a["v_new"].double()),
     "k_new, v_new: expected the dtype of the cache", True),
    ("kv-new-too-long", lambda o: kvc(o, k_new=randn(2, 7, 2, 8), v_new=randn(2, 7, 2, 8)), "do not fit a cache",
     True),
    ("kv-window-below-minus-1", lambda o: kvc(o, window=(-1, -2)), "window: expected values >= -1", True),
    ("kvp-table-int64", lambda o: kvp(o, block_table=lambda a: a["block_table"].long()),
     "block_table: expected an int32", True),
    ("kvp-table-1d", lambda o: kvp(o, block_table=lambda a: a["block_table"][0]), "block_table: expected shape",
     True),
    ("kvp-table-batch", lambda o: kvp(o, block_table=lambda a: a["block_table"][:1]), "block_table: expected shape",
     True),
    ("kvp-table-meta", lambda o: kvp(o, block_table=lambda a: a["block_table"].to(META)),
     "block_table: expected a tensor on", False),
    ("kvp-page-size-0", lambda o: kvp(o, k_cache=randn(5, 0, 2, 8), v_cache=randn(5, 0, 2, 8)), "page size", True),
    ("kvp-page-layouts-differ", lambda o: kvp(o, v_cache=lambda a: a["v_cache"][:, :3]),
     "v_cache: expected the page layout", True),
    ("kvp-cache-rank3", lambda o: kvp(o, k_cache=lambda a: a["k_cache"][0]),
     "k_cache, v_cache: expected 4 dims \\(num_blocks", True),
    ("kvp-heads-not-multiple", lambda o: kvp(o, q=randn(2, 1, 3, 8)), "multiple of the key/value heads", True),
    ("kvp-cache-dtype", lambda o: kvp(o, q=lambda a: a["q"].half()), "q, k, v: expected one dtype", True),
    ("kvp-new-too-long", lambda o: kvp(o, k_new=randn(2, 9, 2, 8), v_new=randn(2, 9, 2, 8)),
     "9 new tokens do not fit a cache of 8", True),
    ("kvp-table-aliases-cache", lambda o: kvp(o, block_table=lambda a: a["k_cache"].view(I32)[:2, 0, 0, :2]),
     "block_table: must not share memory", True),
    ("kvp-block-id-out-of-range", lambda o: kvp(o, block_table=torch.tensor([[3, 1], [5, 4]], dtype=I32)),
     "block_table: row 1 uses block id 5 at index 0", False),
    ("kvp-cache-expanded", lambda o: kvp(o, k_cache=lambda a: a["k_cache"][:1].expand(5, -1, -1, -1)),
     "no two elements may share memory", True),
    ("kvp-rows-too-long", lambda o: kvp(o, k_cache=torch.zeros(1, 1, 2, 8).expand(1, 2**20, 2, 8),
                                        v_cache=torch.zeros(1, 1, 2, 8).expand(1, 2**20, 2, 8),
                                        block_table=torch.zeros(2, 2048, dtype=I32)),
     "positions per row exceed 2147483647", True),
    ("kv-new-meta", lambda o: kvc(o, k_new=lambda a: a["k_new"].to(META), v_new=lambda a: a["v_new"].to(META)),
     "k_new, v_new: expected tensors on cpu", False),
    ("kv-cache-expanded", lambda o: kvc(o, k_cache=lambda a: a["k_cache"][:1].expand(2, -1, -1, -1)),
     "no two elements may share memory", True),
    ("kv-cache-stride0-heads", lambda o: kvc(o, v_cache=lambda a: a["v_cache"][:, :, :1].expand(-1, -1, 2, -1)),
     "no two elements may share memory", True),
    ("kv-caches-alias", lambda o: kvc(o, v_cache=lambda a: a["k_cache"]), "must not overlap each other", True),
    ("kv-new-aliases-cache", lambda o: kvc(o, v_new=lambda a: a["v_cache"][:, 4:5]), "must not share memory", True),
    ("kv-cache-last-dim-strided", lambda o: kvc(o, k_cache=randn(2, 6, 2, 16)[..., ::2]), "contiguous last dimension",
     True),
    ("kv-scale-nan", lambda o: kvc(o, scale=math.nan), "scale", True),
    ("kv-scale-huge", lambda o: kvc(o, scale=1e39), "scale", True),
    ("kv-all-meta-int", lambda o: kvc(o, **{n: (lambda a, n=n: a[n].to(META) if n != "q" else a[n].int().to(META))
                                           for n in kv_args()}), "q: expected float32", False),
    ("kv-float64-on-cuda", lambda o: o.flash_attn_kvcache(*kv_args(dtype=torch.float64).values(), SCALE, True, -1, -1, None),
     "float64 attention runs on the CPU only", "cuda-only"),
    # mlm_mask
    ("mlm-ids-float", lambda o: mlm(o, ids=ids_().float()), "input_ids: expected int32 or int64", True),
    ("mlm-ids-int16", lambda o: mlm(o, ids=ids_().short()), "input_ids: expected int32 or int64", True),
    ("mlm-ids-uint8", lambda o: mlm(o, ids=ids_().to(torch.uint8)), "input_ids: expected int32 or int64", True),
    ("mlm-ids-1d", lambda o: mlm(o, ids=ids_()[0]), "input_ids: expected a 2-D tensor", True),
    ("mlm-ids-3d", lambda o: mlm(o, ids=ids_()[None]), "input_ids: expected a 2-D tensor", True),
    ("mlm-all-meta-float", lambda o: mlm(o, ids=ids_().float().to(META)), "input_ids: expected int32", False),
    ("mlm-all-meta-1d", lambda o: mlm(o, ids=ids_()[0].to(META)), "input_ids: expected a 2-D", False),
    ("mlm-attn-shape", lambda o: mlm(o, attn=torch.ones(3, 15, dtype=torch.bool)), "attention_mask: expected shape",
     True),
    ("mlm-attn-meta", lambda o: mlm(o, attn=torch.ones(3, 16, dtype=torch.bool, device=META)),
     "attention_mask: expected device", False),
    ("mlm-ws-shape", lambda o: mlm(o, ws=torch.ones(16, 3, dtype=torch.bool)), "word_starts: expected shape", True),
    ("mlm-ws-meta", lambda o: mlm(o, ws=torch.ones(3, 16, dtype=torch.bool, device=META)),
     "word_starts: expected device", False),
    ("mlm-special-2d", lambda o: mlm(o, special=torch.tensor([[1, 2]])), "special_ids: expected a 1-D", True),
    ("mlm-special-float", lambda o: mlm(o, special=torch.tensor([1.0, 2.0])), "special_ids: expected an integer", True),
    ("mlm-special-bool", lambda o: mlm(o, special=torch.tensor([True])), "special_ids: expected an integer", True),
    ("mlm-special-unsorted", lambda o: mlm(o, special=torch.tensor([50, 7])), "special_ids: expected ids sorted",
     False),
    ("mlm-special-meta", lambda o: mlm(o, special=torch.tensor([1, 2], device=META)), "special_ids: expected device",
     False),
    ("mlm-rows-shape", lambda o: mlm(o, rows=torch.full((2,), 0.5)), "mask_prob: expected a per-row", True),
    ("mlm-rows-int", lambda o: mlm(o, rows=torch.tensor([1, 0, 1])), "mask_prob: expected a float tensor", True),
    ("mlm-rows-meta", lambda o: mlm(o, rows=torch.full((3,), 0.5, device=META)), "mask_prob: expected device", False),
    ("mlm-seed-int32", lambda o: mlm(o, seed=torch.tensor([1], dtype=I32)), "seed: expected a one-element int64",
     True),
    ("mlm-seed-float", lambda o: mlm(o, seed=torch.tensor([1.0])), "seed: expected a one-element int64", True),
    ("mlm-seed-empty", lambda o: mlm(o, seed=torch.tensor([], dtype=I64)), "seed: expected a one-element int64", True),
    ("mlm-seed-two", lambda o: mlm(o, seed=torch.tensor([1, 2])), "seed: expected a one-element int64", True),
    ("mlm-seed-meta", lambda o: mlm(o, seed=torch.tensor([1], device=META)), "seed: expected a CPU tensor", False),
    ("mlm-prob-nan", lambda o: mlm(o, mask_prob=math.nan), "mask_prob: expected a probability", True),
    ("mlm-prob-neg", lambda o: mlm(o, mask_prob=-1e-9), "mask_prob: expected a probability", True),
    ("mlm-prob-inf", lambda o: mlm(o, mask_prob=math.inf), "mask_prob: expected a probability", True),
    ("mlm-replace-nan", lambda o: mlm(o, replace=math.nan), "replace_prob", True),
    ("mlm-random-neg", lambda o: mlm(o, random=-0.1), "random_prob", True),
    ("mlm-random-inf", lambda o: mlm(o, replace=0.0, random=math.inf), "random_prob", True),
    ("mlm-vocab-0", lambda o: mlm(o, vocab=0, mask_id=0), "vocab_size", True),
    ("mlm-vocab-huge", lambda o: mlm(o, vocab=2**62), "vocab_size", True),
    ("mlm-vocab-int32-ids", lambda o: mlm(o, ids=ids_(dtype=I32), vocab=2**32 - 1, mask_id=2**31 + 5),
     "vocab_size: int32 input_ids hold ids below 2\\^31", True),
    ("mlm-mask-id-neg", lambda o: mlm(o, mask_id=-1), "mask_token_id", True),
    ("mlm-mask-id-vocab", lambda o: mlm(o, mask_id=V), "mask_token_id", True),
    ("mlm-mask-id-huge", lambda o: mlm(o, mask_id=2**63 - 1), "mask_token_id", True),
    # span_mask
    ("span-ids-float", lambda o: span(o, ids=ids_().double()), "input_ids: expected int32 or int64", True),
    ("span-gp-0", lambda o: span(o, gp=0.0), "geometric_p", True),
    ("span-gp-nan", lambda o: span(o, gp=math.nan), "geometric_p", True),
    ("span-gp-above-1", lambda o: span(o, gp=1.5), "geometric_p", True),
    ("span-max-span-0", lambda o: span(o, max_span=0), "max_span", True),
    ("span-max-span-neg", lambda o: span(o, max_span=-(2**63)), "max_span", True),
    ("span-seed-int32", lambda o: span(o, seed=torch.tensor([1], dtype=I32)), "seed", True),
    ("span-seed-meta", lambda o: span(o, seed=torch.tensor([1], device=META)), "seed", False),
    ("span-all-meta-gp", lambda o: span(o, ids=ids_().to(META), gp=math.nan), "geometric_p", False),
    ("span-attn-meta", lambda o: span(o, attn=torch.ones(3, 16, device=META)), "attention_mask", False),
    ("span-prob-nan", lambda o: span(o, mask_prob=math.nan), "mask_prob", True),
]


@pytest.mark.parametrize("call, match", [pytest.param(c[1], c[2], id=c[0]) for c in RAW_ERRORS
                                         if c[3] != "cuda-only"])
def test_raw_op_rejects(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(OPS)


@pytest.mark.emulated
@pytest.mark.parametrize("call, match", [pytest.param(c[1], c[3] if isinstance(c[3], str) and c[3] != "cuda-only"
                                                      else c[2], id=c[0]) for c in RAW_ERRORS if c[3]])
def test_raw_op_rejects_emulated_cuda(emu, call, match):
    """The CUDA entry points run the same shared checks, so the same error comes out."""
    with pytest.raises(RuntimeError, match=match):
        call(emu)


# ---- valid but unusual input: the result of the reference or of the plain call --------------------
# (id, got(), want(), how: "ref" float64 attention within float32 tolerance, "equal" bit for bit,
#  "close" float32 tolerance)

def flipped(t):
    """The same values laid out with every stride order reversed (a fully transposed storage)."""
    return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))


def transposed(t):
    """(B, S, H, D) values stored as (B, H, S, D)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def strided(t):
    """Every element two apart in the last dimension."""
    return torch.stack([t, torch.full_like(t, math.nan)], -1)[..., 0]


def ref(q, k, v, **kw):
    return attention_ref(q, k, v, **kw)[0]


def grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    out = fn(*ts)
    out.backward(torch.ones_like(out))  # an expanded (stride-0) gradient, as out.sum().backward() gives
    return [t.grad for t in ts]


def kv_expected(a, lens, s_new, causal=True):
    """Caches after the append and the output per row, following cache_rows_fit: rows whose tokens
    do not fit are not written and give NaN."""
    kc, vc, out = a["k_cache"].clone(), a["v_cache"].clone(), []
    S = kc.shape[1]
    for b, n in enumerate(lens):
        if n < 0 or n + s_new > S:
            out.append(torch.full_like(a["q"][b], math.nan, dtype=torch.float64))
            continue
        if s_new:
            kc[b, n:n + s_new], vc[b, n:n + s_new] = a["k_new"][b], a["v_new"][b]
        out.append(ref(a["q"][b:b + 1], kc[b:b + 1, :n + s_new], vc[b:b + 1, :n + s_new], causal=causal,
                       scale=SCALE)[0])
    return torch.stack(out), kc, vc


def kv_rule(ops, lens, s_new=2):
    a = kv_args(B=len(lens), S=6, H=2, Hk=1, sq=2, s_new=s_new, lens=lens)
    want, kc, vc = kv_expected(a, lens, s_new)
    got = ops.flash_attn_kvcache(*a.values(), SCALE, True, -1, -1, None)[0]
    return (got, a["k_cache"], a["v_cache"]), (want, kc, vc)


def kv_views(view, ops=None):
    """(result, expected) of a kv-cache call on views of valid data: the Python API, or the raw op
    of `ops`. The caches are checked too (the new keys land in the views)."""
    a = {n: view(n, t) for n, t in kv_args(lens=(2, 4)).items()}
    want, kc, vc = kv_expected(a, [2, 4], 1)
    if ops is None:
        got = pk.flash_attention_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"],
                                              k_new=a["k_new"], v_new=a["v_new"], scale=SCALE)
    else:
        got = ops.flash_attn_kvcache(*a.values(), SCALE, True, -1, -1, None)[0]
    return (got, a["k_cache"], a["v_cache"]), (want, kc, vc)


def big_cache(n, t):
    """The caches as a slice of a longer buffer (row stride bigger than the rows), the rest views."""
    if n in ("k_cache", "v_cache"):
        buf = torch.zeros(t.shape[0], t.shape[1] + 3, *t.shape[2:])
        buf[:, 2:2 + t.shape[1]] = t
        return buf[:, 2:2 + t.shape[1]]
    if n == "cache_seqlens":
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
    return transposed(t) if n == "q" else t


def sdpa_ref(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def clamped_sequences(c, total):
    """The CUDA rule for malformed cu_seqlens (seq_info, csrc/cuda/attention_common.cuh): sequence b
    spans [clamp(c[b], 0, total), clamp(c[b + 1], that start, total))."""
    c = c.tolist()
    out = []
    for b in range(len(c) - 1):
        lo = min(max(c[b], 0), total)
        out.append((lo, min(max(c[b + 1], lo), total)))
    return out


def mlm_py(ids, **kw):
    return pk.mlm_mask(ids, **{**MKW, "special_token_ids": [5, 7], **kw})


def span_py(ids, **kw):
    return pk.span_mask(ids, **{**MKW, "special_token_ids": [5, 7], **kw})


g_ids = ids_(B=4, L=24, seed=3)
g_attn = (torch.rand(4, 24, generator=torch.Generator().manual_seed(0)) < 0.8)
g_ws = (torch.rand(4, 24, generator=torch.Generator().manual_seed(1)) < 0.5)

VALID = [
    # flash_attention: views of valid data
    ("fa-transposed-layout", lambda: pk.flash_attention(*map(transposed, qkv()), scale=SCALE),
     lambda: ref(*qkv(), scale=SCALE), "ref"),
    ("fa-flipped-storage", lambda: pk.flash_attention(*map(flipped, qkv()), causal=True),
     lambda: ref(*qkv(), causal=True), "ref"),
    ("fa-flip-copies", lambda: pk.flash_attention(*(t.flip(1) for t in qkv())),
     lambda: ref(*(t.flip(1) for t in qkv())), "ref"),
    ("fa-last-dim-strided", lambda: pk.flash_attention(*map(strided, qkv()), window=(2, 1)),
     lambda: ref(*qkv(), window=(2, 1)), "ref"),
    ("fa-expanded-batch", lambda: pk.flash_attention(q4, k4[:1].expand(2, -1, -1, -1), v4[:1].expand(2, -1, -1, -1)),
     lambda: ref(q4, k4[:1].expand(2, -1, -1, -1), v4[:1].expand(2, -1, -1, -1)), "ref"),
    ("fa-expanded-head-dim", lambda: pk.flash_attention(q4[..., :1].expand(-1, -1, -1, 8), k4, v4),
     lambda: ref(q4[..., :1].expand(-1, -1, -1, 8), k4, v4), "ref"),
    ("fa-expanded-seq", lambda: pk.flash_attention(q4[:, :1].expand(-1, 5, -1, -1), k4, v4, causal=True),
     lambda: ref(q4[:, :1].expand(-1, 5, -1, -1), k4, v4, causal=True), "ref"),
    ("fa-float64-transposed", lambda: pk.flash_attention(*(transposed(t.double()) for t in qkv()), causal=True),
     lambda: ref(*qkv(), causal=True), "ref"),
    # empty dimensions
    ("fa-batch-0", lambda: pk.flash_attention(q4[:0], k4[:0], v4[:0]), lambda: torch.zeros(0, 5, 4, 8), "ref"),
    ("fa-sq-0", lambda: pk.flash_attention(q4[:, :0], k4, v4), lambda: torch.zeros(2, 0, 4, 8), "ref"),
    ("fa-sk-0", lambda: pk.flash_attention(q4, k4[:, :0], v4[:, :0], return_lse=True),
     lambda: (torch.zeros(2, 5, 4, 8), torch.full((2, 4, 5), -math.inf)), "ref"),
    ("fa-heads-0", lambda: pk.flash_attention(q4[:, :, :0], k4[:, :, :1], v4[:, :, :1]),
     lambda: torch.zeros(2, 5, 0, 8), "ref"),
    ("fav-empty-sequences", lambda: pk.flash_attention(qv3, kv3, vv3, cu_seqlens_q=cu(0, 0, 3, 3, 7),
                                                       cu_seqlens_k=cu(0, 2, 2, 9, 9)),
     lambda: attention_varlen_ref(qv3, kv3, vv3, cu(0, 0, 3, 3, 7), cu(0, 2, 2, 9, 9))[0], "ref"),
    ("fav-no-tokens", lambda: pk.flash_attention(qv3[:0], kv3[:0], vv3[:0], cu_seqlens_q=cu(0, 0),
                                                 cu_seqlens_k=cu(0, 0)), lambda: torch.zeros(0, 4, 8), "ref"),
    ("fav-cu-non-contiguous", lambda: pk.flash_attention(qv3, kv3, vv3, cu_seqlens_q=cu(0, 9, 3, 9, 7)[::2],
                                                         cu_seqlens_k=torch.stack([cuk, cuk], 1)[:, 1], causal=True),
     lambda: attention_varlen_ref(qv3, kv3, vv3, cuq, cuk, causal=True)[0], "ref"),
    ("fav-transposed-views", lambda: pk.flash_attention(*(t.transpose(0, 1).contiguous().transpose(0, 1)
                                                          for t in (qv3, kv3, vv3)), cu_seqlens_q=cuq,
                                                        cu_seqlens_k=cuk),
     lambda: attention_varlen_ref(qv3, kv3, vv3, cuq, cuk)[0], "ref"),
    # huge and unusual knobs
    ("fa-window-huge", lambda: pk.flash_attention(*qkv(), window=(BIG, BIG)), lambda: ref(*qkv()), "ref"),
    ("fa-window-huge-causal", lambda: pk.flash_attention(*qkv(sq=9), window=(BIG, 0)),
     lambda: ref(*qkv(sq=9), causal=True), "ref"),
    ("fa-window-int64-max-left", lambda: fwd(OPS, *qkv(sq=9), left=2**63 - 1, right=0)[0],
     lambda: ref(*qkv(sq=9), causal=True, scale=SCALE), "ref"),
    ("fa-window-int64-max-right", lambda: fwd(OPS, *qkv(sq=9), left=1, right=2**63 - 1)[0],
     lambda: ref(*qkv(sq=9), window=(1, -1), scale=SCALE), "ref"),
    ("fa-window-int64-max-top-left", lambda: fwd(OPS, *qkv(sq=9), left=2**63 - 1, right=2**63 - 1, br=False)[0],
     lambda: ref(*qkv(sq=9), scale=SCALE), "ref"),
    ("fa-scale-negative", lambda: pk.flash_attention(*qkv(), scale=-2.0), lambda: ref(*qkv(), scale=-2.0), "ref"),
    ("fa-scale-zero", lambda: pk.flash_attention(*qkv(), scale=0.0), lambda: ref(*qkv(), scale=0.0), "ref"),
    ("fa-scale-huge-float64", lambda: pk.flash_attention(*(t.double() for t in qkv()), scale=1e300),
     lambda: ref(*qkv(), scale=1e300), "ref"),
    ("fav-max-seqlen-huge", lambda: pk.flash_attention(qv3, kv3, vv3, cu_seqlens_q=cuq, cu_seqlens_k=cuk,
                                                       max_seqlen_q=BIG, max_seqlen_k=2**63 - 1),
     lambda: attention_varlen_ref(qv3, kv3, vv3, cuq, cuk)[0], "ref"),
    ("fav-max-seqlen-too-small", lambda: fwd(OPS, qv3, kv3, vv3, cuq, cuk, max_q=1, max_k=1)[0],
     lambda: attention_varlen_ref(qv3, kv3, vv3, cuq, cuk, scale=SCALE)[0], "ref"),
    # gradients of views (the backward gets an expanded dout)
    ("fa-grad-views", lambda: grads(lambda q, k, v: pk.flash_attention(transposed(q), flipped(k),
                                                                       v[:1].expand(2, -1, -1, -1), causal=True),
                                    *qkv()),
     lambda: grads(lambda q, k, v: pk.flash_attention(q, k, v[:1].expand(2, -1, -1, -1).contiguous(), causal=True),
                   *qkv()), "close"),
    # meta tensors: shapes only
    ("fa-all-meta", lambda: fwd(OPS, *meta(*qkv(sq=3, D=5)))[1].shape, lambda: (2, 4, 3), "equal"),
    ("fav-all-meta", lambda: fwd(OPS, *meta(qv3, kv3, vv3, cuq, cuk))[1].shape, lambda: (4, 7), "equal"),
    ("kv-all-meta", lambda: kvc(OPS, **{n: (lambda a, n=n: a[n].to(META)) for n in kv_args()})[0].shape,
     lambda: (2, 1, 4, 8), "equal"),
    ("kvp-all-meta", lambda: kvp(OPS, **{n: (lambda a, n=n: a[n].to(META)) for n in kvp_args()})[1].shape,
     lambda: (2, 4, 1), "equal"),
    ("kv-all-meta-lse", lambda: kvc(OPS, **{n: (lambda a, n=n: a[n].to(META)) for n in kv_args()})[1].shape,
     lambda: (2, 4, 1), "equal"),
    ("mlm-all-meta", lambda: mlm(OPS, ids=ids_().to(META))[1].shape, lambda: (3, 16), "equal"),
    ("fa-py-all-meta", lambda: pk.flash_attention(*meta(*qkv(sq=3)), return_lse=True)[1].shape, lambda: (2, 4, 3),
     "equal"),
    ("sdpa-py-all-meta", lambda: pk.scaled_dot_product_attention(*meta(qs[None], ks[None], vs[None])).shape,
     lambda: (1, 2, 4, 5, 8), "equal"),
    ("span-py-all-meta", lambda: span_py(g_ids.to(META), attention_mask=g_attn.to(META))[0].shape,
     lambda: (4, 24), "equal"),
    # flash_attention_with_kvcache
    ("kv-views", lambda: kv_views(big_cache), None, "ref"),
    ("kv-expanded-q-and-new", lambda: kv_views(lambda n, t: t[:1].expand_as(t) if n in ("q", "k_new") else t), None,
     "ref"),
    ("kv-expanded-cache-read-only", lambda: pk.flash_attention_with_kvcache(
        q4[:, :2], k4[:1].expand(2, -1, -1, -1), v4[:1].expand(2, -1, -1, -1), torch.tensor([3, 7], dtype=I32),
        causal=False), lambda: torch.cat([ref(q4[:1, :2], k4[:1, :3], v4[:1, :3]), ref(q4[1:, :2], k4[:1], v4[:1])]),
     "ref"),
    ("kv-batch-0", lambda: pk.flash_attention_with_kvcache(q4[:0, :1], k4[:0], v4[:0], torch.zeros(0, dtype=I32)),
     lambda: torch.zeros(0, 1, 4, 8), "ref"),
    ("kv-q-len-0", lambda: kv_py(q=lambda a: a["q"][:, :0]), lambda: torch.zeros(2, 0, 4, 8), "ref"),
    ("kv-new-len-0", lambda: kv_py(k_new=lambda a: a["k_new"][:, :0], v_new=lambda a: a["v_new"][:, :0]),
     lambda: kv_expected(dict(kv_args(), k_new=None), [2, 3], 0)[0], "ref"),
    ("kv-capacity-0", lambda: pk.flash_attention_with_kvcache(q4[:, :1], k4[:, :0], v4[:, :0],
                                                              torch.zeros(2, dtype=I32)),
     lambda: torch.zeros(2, 1, 4, 8), "ref"),
    # scaled_dot_product_attention
    ("sdpa-3d", lambda: pk.scaled_dot_product_attention(qs[0], ks[0], vs[0]), lambda: sdpa_ref(qs[0], ks[0], vs[0]),
     "ref"),
    ("sdpa-5d", lambda: pk.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True),
     lambda: sdpa_ref(qs[None], ks[None], vs[None], is_causal=True), "ref"),
    ("sdpa-lead-0", lambda: pk.scaled_dot_product_attention(qs[None][:0], ks[None][:0], vs[None][:0]),
     lambda: torch.zeros(0, 2, 4, 5, 8), "ref"),
    ("sdpa-L-0", lambda: pk.scaled_dot_product_attention(qs[:, :, :0], ks, vs), lambda: torch.zeros(2, 4, 0, 8),
     "ref"),
    ("sdpa-S-0", lambda: pk.scaled_dot_product_attention(qs, ks[:, :, :0], vs[:, :, :0]),
     lambda: torch.zeros(2, 4, 5, 8), "ref"),
    ("sdpa-views", lambda: pk.scaled_dot_product_attention(flipped(qs), ks.transpose(2, 3).contiguous().transpose(2, 3),
                                                           vs[:1].expand(2, -1, -1, -1)),
     lambda: sdpa_ref(qs, ks, vs[:1].expand(2, -1, -1, -1)), "ref"),
    ("sdpa-mask-broadcast-float64", lambda: pk.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=randn(5, 7, seed=16, dtype=torch.float64)),
     lambda: sdpa_ref(qs, ks, vs, attn_mask=randn(5, 7, seed=16, dtype=torch.float64)), "ref"),
    ("sdpa-mask-bool-dead-row", lambda: pk.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=torch.arange(5)[:, None].expand(5, 7) > 0),
     lambda: sdpa_ref(qs, ks, vs, attn_mask=torch.arange(5)[:, None].expand(5, 7) > 0).nan_to_num(0.0), "ref"),
    ("sdpa-gqa", lambda: pk.scaled_dot_product_attention(qs, ks[:, :2], vs[:, :2], enable_gqa=True),
     lambda: sdpa_ref(qs, ks[:, :2], vs[:, :2], enable_gqa=True), "ref"),
    # masking: views, empty dims, dtypes (bit for bit against the plain call)
    ("mlm-transposed-ids", lambda: mlm_py(g_ids.t().contiguous().t(), attention_mask=g_attn.t().contiguous().t()),
     lambda: mlm_py(g_ids, attention_mask=g_attn), "equal"),
    ("mlm-expanded-ids", lambda: mlm_py(g_ids[:1].expand(4, -1), word_starts=g_ws[:1].expand(4, -1)),
     lambda: mlm_py(g_ids[:1].expand(4, -1).contiguous(), word_starts=g_ws[:1].repeat(4, 1)), "equal"),
    ("mlm-flipped-ids", lambda: mlm_py(flipped(g_ids.flip(1)), exact_count=True),
     lambda: mlm_py(g_ids.flip(1).contiguous(), exact_count=True), "equal"),
    ("mlm-strided-ids", lambda: mlm_py(torch.stack([g_ids, -g_ids], 2)[..., 0], attention_mask=g_attn.float()),
     lambda: mlm_py(g_ids, attention_mask=g_attn), "equal"),
    ("mlm-int32-ids", lambda: tuple(t.long() for t in mlm_py(g_ids.int(), vocab_size=2**31, seed=4)),
     lambda: mlm_py(g_ids, vocab_size=2**31, seed=4), "equal"),
    ("mlm-rows-expanded-0d", lambda: mlm_py(g_ids, mask_prob=torch.tensor(0.3)),
     lambda: mlm_py(g_ids, mask_prob=torch.full((4,), 0.3)), "equal"),
    ("mlm-rows-float64-strided", lambda: mlm_py(g_ids, mask_prob=torch.tensor([0.1, 0, 0.9, 0, 0.5, 0, 1.0, 0],
                                                                               dtype=torch.float64)[::2]),
     lambda: mlm_py(g_ids, mask_prob=torch.tensor([0.1, 0.9, 0.5, 1.0])), "equal"),
    ("mlm-batch-0", lambda: mlm_py(g_ids[:0]), lambda: (g_ids[:0], g_ids[:0]), "equal"),
    ("mlm-len-0", lambda: mlm_py(g_ids[:, :0], exact_count=True), lambda: (g_ids[:, :0], g_ids[:, :0]), "equal"),
    ("span-len-0", lambda: span_py(g_ids[:, :0]), lambda: (g_ids[:, :0], g_ids[:, :0]), "equal"),
    ("span-transposed-ids", lambda: span_py(g_ids.t().contiguous().t(), word_starts=g_ws.t().contiguous().t()),
     lambda: span_py(g_ids, word_starts=g_ws), "equal"),
    # masking knobs
    ("mlm-max-pred-huge", lambda: mlm_py(g_ids, exact_count=True, max_predictions=BIG),
     lambda: mlm_py(g_ids, exact_count=True), "equal"),
    ("span-max-span-huge", lambda: span_py(g_ids, max_span=BIG), lambda: span_py(g_ids, max_span=24), "equal"),
    ("span-raw-max-span-2**32+1", lambda: span(OPS, ids=g_ids, gp=0.01, max_span=2**32 + 1),
     lambda: span(OPS, ids=g_ids, gp=0.01, max_span=24), "equal"),
    ("mlm-special-out-of-vocab", lambda: mlm_py(g_ids, special_token_ids=[5, 7, -1, V, BIG, -BIG]),
     lambda: mlm_py(g_ids, special_token_ids=[5, 7]), "equal"),
    ("mlm-special-tensor-unsorted-2d", lambda: mlm_py(g_ids, special_token_ids=torch.tensor([[7, -3], [5, 7]])),
     lambda: mlm_py(g_ids, special_token_ids=[5, 7]), "equal"),
    # seeds
    ("seed-2**64-1-is--1", lambda: mlm_py(g_ids, seed=2**64 - 1), lambda: mlm_py(g_ids, seed=-1), "equal"),
    ("seed-uint64-tensor", lambda: span_py(g_ids, seed=torch.tensor([2**63 + 5], dtype=torch.uint64)),
     lambda: span_py(g_ids, seed=2**63 + 5), "equal"),
    ("seed-int32-tensor-2d", lambda: mlm_py(g_ids, seed=torch.tensor([[-7]], dtype=I32)),
     lambda: mlm_py(g_ids, seed=-7), "equal"),
    ("seed-int8-tensor", lambda: mlm_py(g_ids, seed=torch.tensor(-3, dtype=torch.int8)),
     lambda: mlm_py(g_ids, seed=-3), "equal"),
    ("seed-generator", lambda: mlm_py(g_ids, seed=None, generator=torch.Generator().manual_seed(3)),
     lambda: mlm_py(g_ids, seed=None, generator=torch.Generator().manual_seed(3)), "equal"),
    # MLMCollator
    ("coll-empty-example", lambda: coll()([[], [5, 6]])["input_ids"], lambda: torch.tensor([[0, 0], [5, 6]]),
     "mask-free"),
    ("coll-tensor-examples", lambda: coll(mlm_probability=0.0)(torch.tensor([[5, 6], [7, 8]])),
     lambda: coll(mlm_probability=0.0)([[5, 6], [7, 8]]), "equal"),
    ("coll-2d-tensor-example", lambda: coll(seed=3)([torch.tensor([[5, 6, 9]]), torch.tensor([7], dtype=I32)]),
     lambda: coll(seed=3)([[5, 6, 9], [7]]), "equal"),
    ("coll-generator-examples", lambda: coll(seed=3)(iter([[5, 6, 9], [7]])),
     lambda: coll(seed=3)([[5, 6, 9], [7]]), "equal"),
    ("coll-bool-attention", lambda: coll(seed=3)([{"input_ids": [5, 6, 9], "attention_mask": [True, True, False]}]),
     lambda: coll(seed=3)([{"input_ids": [5, 6, 9], "attention_mask": [1, 1, 0]}]), "equal"),
    ("coll-ids-out-of-vocab", lambda: coll(mlm_probability=1.0)([[-5, V, 2**40]]),
     lambda: {"input_ids": torch.tensor([[-5, V, 2**40]]), "labels": torch.full((1, 3), -100)}, "equal-keys"),
    ("coll-seed-2**64-1-is--1", lambda: coll(seed=2**64 - 1)([[5, 6, 9, 11] * 4]),
     lambda: coll(seed=-1)([[5, 6, 9, 11] * 4]), "equal"),
]


def _assert_same(got, want, how):
    if isinstance(want, (tuple, list)) and not isinstance(want, torch.Size):
        assert isinstance(got, (tuple, list)) and len(got) == len(want)
        for g_, w in zip(got, want):
            _assert_same(g_, w, how)
        return
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            _assert_same(got[k], want[k], how)
        return
    if how == "equal" or not isinstance(want, torch.Tensor):
        assert (torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want), (got, want)
        return
    assert got.shape == want.shape, (got.shape, want.shape)
    tol = 3e-5 if got.dtype in (torch.float32, torch.float64) else 3e-3
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("got, want, how", [pytest.param(*c[1:], id=c[0]) for c in VALID])
def test_valid_unusual_inputs(got, want, how):
    g_, w = got() if want is None else (got(), want())
    if how == "mask-free":  # padding and shape only (no token is eligible to change the padded row)
        assert torch.equal(g_[0], w[0]) and g_.shape == w.shape
        return
    if how == "equal-keys":
        _assert_same({k: g_[k] for k in w}, w, "equal")
        return
    _assert_same(g_, w, "equal" if how == "equal" else "close")


# ---- the documented rules, through the CPU kernels and the emulated CUDA kernels -----------------


def test_kvcache_rows_that_do_not_fit_cpu():
    got, want = kv_rule(OPS, [2, -1, 5, 2**31 - 1, 4, -(2**31)])
    _assert_same(got, want, "close")


@pytest.mark.emulated
def test_kvcache_rows_that_do_not_fit_emulated_cuda(emu):
    got, want = kv_rule(emu, [2, -1, 5, 2**31 - 1, 4, -(2**31)])
    _assert_same(got, want, "close")


MALFORMED_CU = [((0, 5, 3), (0, 4, 9)), ((0, -3, 70), (0, 4, 9)), ((5, 3, 100), (0, 4, 9)),
                ((-(2**31), 2**31 - 1, 7), (0, 4, 9)), ((0, 3, 7), (9, 2, 0)), ((0, 3, 7), (0, 2**31 - 1, -5))]


@pytest.mark.parametrize("cq, ck", MALFORMED_CU, ids=str)
def test_malformed_cu_seqlens_raise_on_cpu(cq, ck):
    with pytest.raises(RuntimeError, match="cu_seqlens_"):
        fwd(OPS, qv3, kv3, vv3, cu(*cq), cu(*ck))
    with pytest.raises(RuntimeError, match="cu_seqlens_"):
        OPS.flash_attn_bwd(qv3, qv3, kv3, vv3, qv3, torch.zeros(4, 7), None, cu(*cq), cu(*ck), None, -1, -1, SCALE,
                           -1, -1, True, deterministic=True)


@pytest.mark.emulated
@pytest.mark.parametrize("cq, ck", MALFORMED_CU, ids=str)
def test_malformed_cu_seqlens_clamped_on_emulated_cuda(emu, cq, ck):
    """CUDA cannot read cu_seqlens without a host sync: it clamps every offset into the tensors'
    bounds, so the result is that of the clamped sequences (never a read outside the inputs);
    tokens outside every sequence give 0 and lse -inf."""
    out, lse = fwd(emu, qv3, kv3, vv3, cu(*cq), cu(*ck))
    want, want_lse = torch.zeros(7, 4, 8, dtype=torch.float64), torch.full((4, 7), -math.inf, dtype=torch.float64)
    for (q0, q1), (k0, k1) in zip(clamped_sequences(cu(*cq), 7), clamped_sequences(cu(*ck), 9)):
        o, l_ = attention_ref(qv3[None, q0:q1], kv3[None, k0:k1], vv3[None, k0:k1], scale=SCALE)
        want[q0:q1], want_lse[:, q0:q1] = o[0], l_[0]
    torch.testing.assert_close(out.double(), want, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=3e-5, rtol=3e-5)
    dout = randn(7, 4, 8, seed=17)
    for g_ in emu.flash_attn_bwd(dout, qv3, kv3, vv3, out, lse, None, cu(*cq), cu(*ck), None, -1, -1, SCALE, -1, -1,
                                 True, deterministic=True):
        assert torch.isfinite(g_).all()


EMU_VALID = [
    ("fwd-transposed", lambda o: fwd(o, *map(transposed, qkv()))[0], lambda: ref(*qkv(), scale=SCALE)),
    ("fwd-flipped-causal", lambda o: fwd(o, *map(flipped, qkv()), right=0)[0],
     lambda: ref(*qkv(), causal=True, scale=SCALE)),
    ("fwd-strided-and-expanded", lambda o: fwd(o, strided(q4), k4[:1].expand(2, -1, -1, -1),
                                               v4[:1].expand(2, -1, -1, -1))[0],
     lambda: ref(q4, k4[:1].expand(2, -1, -1, -1), v4[:1].expand(2, -1, -1, -1), scale=SCALE)),
    ("fwd-half-expanded-seq", lambda o: fwd(o, *(t[:, :1].expand(-1, 5, -1, -1) for t in qkv(sk=5, dtype=torch.half)),
                                            right=0)[0],
     lambda: ref(*(t[:, :1].expand(-1, 5, -1, -1) for t in qkv(sk=5, dtype=torch.half)), causal=True, scale=SCALE)),
    ("fwd-window-int64-max", lambda o: fwd(o, *qkv(sq=9), left=2**63 - 1, right=2**63 - 1)[0],
     lambda: ref(*qkv(sq=9), scale=SCALE)),
    ("fwd-window-int64-max-left-causal", lambda o: fwd(o, *qkv(sq=9), left=2**63 - 1, right=0, br=False)[0],
     lambda: ref(*qkv(sq=9), causal=True, bottom_right=False, scale=SCALE)),
    ("fwd-sk-0", lambda o: fwd(o, q4, k4[:, :0], v4[:, :0]), lambda: (torch.zeros(2, 5, 4, 8),
                                                                      torch.full((2, 4, 5), -math.inf))),
    ("fwd-varlen-empty-sequences", lambda o: fwd(o, qv3, kv3, vv3, cu(0, 0, 3, 3, 7), cu(0, 2, 2, 9, 9))[0],
     lambda: attention_varlen_ref(qv3, kv3, vv3, cu(0, 0, 3, 3, 7), cu(0, 2, 2, 9, 9), scale=SCALE)[0]),
    ("fwd-varlen-max-seqlen-too-small", lambda o: fwd(o, qv3, kv3, vv3, cuq, cuk, max_q=1, max_k=1)[0],
     lambda: attention_varlen_ref(qv3, kv3, vv3, cuq, cuk, scale=SCALE)[0]),
    ("bwd-expanded-dout", lambda o: bwd(o, dout=lambda a: torch.ones(1, 1, 1, 1).expand_as(a["out"]),
                                        q=lambda a: transposed(a["q"])),
     lambda: bwd(OPS, dout=lambda a: torch.ones_like(a["out"]))),
    ("kv-views", lambda o: kv_views(big_cache, o), None),
    ("kv-expanded-q-and-new", lambda o: kv_views(lambda n, t: t[:1].expand_as(t) if n in ("q", "k_new") else t, o),
     None),
    ("mlm-views", lambda o: mlm(o, ids=g_ids.t().contiguous().t(), attn=g_attn[:1].expand(4, -1), ws=flipped(g_ws),
                                exact=True),
     lambda: mlm(OPS, ids=g_ids, attn=g_attn[:1].repeat(4, 1), ws=g_ws, exact=True)),
    ("span-views", lambda o: span(o, ids=g_ids[:, :1].expand(-1, 24), attn=g_attn.t().contiguous().t()),
     lambda: span(OPS, ids=g_ids[:, :1].repeat(1, 24), attn=g_attn)),
    ("mlm-empty", lambda o: mlm(o, ids=g_ids[:, :0]), lambda: (g_ids[:, :0], g_ids[:, :0])),
    ("span-empty", lambda o: span(o, ids=g_ids[:0]), lambda: (g_ids[:0], g_ids[:0])),
]


@pytest.mark.emulated
@pytest.mark.parametrize("got, want", [pytest.param(*c[1:], id=c[0]) for c in EMU_VALID])
def test_valid_unusual_inputs_emulated_cuda(emu, got, want):
    g_, w = got(emu) if want is None else (got(emu), want())
    _assert_same(g_, w, "equal" if g_[0].dtype in (I32, I64) else "close")


def masking_rule_case(ops, fn):
    """Ids outside [0, vocab) never selected and unchanged; per-row rates clamped into [0, 1], NaN as 0."""
    ids = ids_(B=6, L=40, seed=5)
    bad_ids = torch.tensor([-1, V, 2**40, -(2**40), V + 7, -100])
    ids[:, ::3] = bad_ids.repeat(14)[:ids[:, ::3].numel()].view(6, -1)
    rates = torch.tensor([0.3, 1.7, -0.2, math.nan, 1.0, math.inf])
    clamped = rates.nan_to_num(0.0).clamp(0, 1)
    out, labels = fn(ops, ids=ids, rows=rates)
    want_out, want_labels = fn(OPS, ids=ids, rows=clamped)
    bad = (ids < 0) | (ids >= V)
    assert torch.equal(out[bad], ids[bad]) and (labels[bad] == -100).all()
    assert (labels[2:4] == -100).all()
    assert torch.equal(out, want_out) and torch.equal(labels, want_labels)


@pytest.mark.parametrize("fn", [mlm, lambda o, **kw: mlm(o, exact=True, **kw), span], ids=["mlm", "exact", "span"])
def test_masking_rules_cpu(fn):
    masking_rule_case(OPS, fn)


@pytest.mark.emulated
@pytest.mark.parametrize("fn", [mlm, lambda o, **kw: mlm(o, exact=True, **kw), span], ids=["mlm", "exact", "span"])
def test_masking_rules_emulated_cuda(emu, fn):
    masking_rule_case(emu, fn)


@pytest.mark.emulated
def test_span_mask_huge_max_span_emulated_cuda(emu):
    ids = ids_(B=2, L=64, seed=6)
    attn = torch.rand(2, 64, generator=torch.Generator().manual_seed(2)) < 0.3
    got = span(emu, ids=ids, attn=attn, gp=1e-30, max_span=2**63 - 1)
    assert all(torch.equal(a, b) for a, b in zip(got, span(OPS, ids=ids, attn=attn, gp=1e-30, max_span=64)))


def test_span_mask_tiny_geometric_p_and_huge_max_span_finish():
    """A sparse row, a span length that never ends (geometric_p rounds to 0 in float) and no cap:
    the spans grow unit by unit, so the row costs O(L) draws (it used to spin for minutes)."""
    L = 4000
    ids = ids_(B=2, L=L, seed=7)
    attn = torch.rand(2, L, generator=torch.Generator().manual_seed(3)) < 0.3
    t0 = time.perf_counter()
    out, labels = span(OPS, ids=ids, attn=attn, gp=1e-300, max_span=2**63 - 1, mask_prob=0.5)
    assert time.perf_counter() - t0 < 5.0
    n = attn.sum(1)
    assert torch.equal((labels != -100).sum(1), torch.round(0.5 * n.double()).long())


@pytest.mark.parametrize("op", ["fwd", "kvcache", "mlm", "span"])
def test_opcheck_after_the_new_checks(op):
    """The fake kernels now check their arguments: opcheck (fake vs real, schema, autograd
    registration) still passes on valid inputs, including views."""
    if op == "fwd":
        q, k, v = qkv(sq=3, sk=4, D=5)
        args = (transposed(q), k[:1].expand(2, -1, -1, -1), v, None, None, None, -1, -1, SCALE, 2**62, 0, True)
        torch.library.opcheck(OPS.flash_attn_fwd.default, args)
        args = (qv3, kv3, vv3, cuq, cuk, None, 2**62, 3, SCALE, -1, -1, True)
        torch.library.opcheck(OPS.flash_attn_fwd.default, args)
    elif op == "kvcache":
        a = kv_args()
        torch.library.opcheck(OPS.flash_attn_kvcache.default, (*a.values(), SCALE, True, -1, -1, None),
                              test_utils=("test_schema", "test_faketensor"))
    elif op == "mlm":
        torch.library.opcheck(OPS.mlm_mask.default, (g_ids.t().contiguous().t(), g_attn, torch.tensor([5, 7]), g_ws,
                                                     torch.tensor(0.3).expand(4), torch.tensor([2]), 0.0, MASK, V, 0.8,
                                                     0.1, True, 2**62))
    else:
        torch.library.opcheck(OPS.span_mask.default, (g_ids, None, None, None, None, torch.tensor([2]), 0.4, MASK, V,
                                                      0.8, 0.1, 1e-30, 2**62))
