"""FlashAttention 2's Python API (flash_attn.flash_attn_interface) on the pretrain_kernels kernels.

    from pretrain_kernels.flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    # instead of: from flash_attn import flash_attn_func, flash_attn_varlen_func

The functions keep FlashAttention 2's names, argument names, order and defaults, layouts
(batch, seqlen, heads, head_dim) / packed (total_tokens, heads, head_dim) with int32 cu_seqlens,
and return values, so code written for flash-attn runs unchanged on the CPU and on CUDA:

  flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
  flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func
      -> out, or (out, softmax_lse, None) with return_attn_probs=True (lse (batch, heads,
         seqlen_q) or (heads, total_q), float32; FlashAttention's third value, the dropout
         pattern, is returned only by its test builds: here always None). Differentiable.
  flash_attn_with_kvcache
      -> out, or (out, softmax_lse) with return_softmax_lse=True. k/v (new tokens) are written
         into k_cache/v_cache in place at cache_seqlens; rotary_cos/rotary_sin (seqlen_ro,
         rotary_dim / 2) rotate the first rotary_dim features of q and k as FlashAttention
         does (k at cache_seqlens + i; q likewise when causal or windowed, otherwise every
         query at cache_seqlens), interleaved (GPT-J, pairs 2i, 2i+1; the default) or not
         (GPT-NeoX, halves); cache_seqlens an int or int32 [batch] (None: the whole cache);
         cache_batch_idx picks the cache rows of each batch element.

The semantics are pk.flash_attention's (identical to FlashAttention's: bottom-right causal
alignment, window_size (left, right) with -1 unbounded, softcap 0.0 = off, ALiBi slopes
float32 [heads] or [batch, heads] with bias -slope * |i + Sk - Sq - j|, GQA when k/v have fewer
heads). Arguments the kernels of this build do not serve raise NotImplementedError naming them:
dropout_p > 0 and deterministic=True where pk.flash_attention has no dropout_p / deterministic,
block_table where the kernels have no paged cache, cache_leftpad always; window_size,
softcap, alibi_slopes and return_softmax_lse of flash_attn_with_kvcache where
pk.flash_attention_with_kvcache lacks them. num_splits is a performance hint and is ignored.
The backward is deterministic (recomputed from the saved lse), whatever `deterministic` says.
"""
from __future__ import annotations

import numbers

import torch

from .ops.attention import _NO_WINDOW, flash_attention, flash_attention_with_kvcache
from .ops.rotary import rotary_embedding

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]



def _softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float (0.0: off), got {type(softcap).__name__}")
    return None if softcap == 0.0 else float(softcap)


def _unsupported(name: str, why: str):
    raise NotImplementedError(f"{name}: {why}")


def _score_kwargs(dropout_p, softcap, alibi_slopes, deterministic) -> dict:
    """The keyword arguments of the pk call for the score modifiers and dropout."""
    kw = {}
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        kw["dropout_p"] = float(dropout_p)
    if deterministic:
        kw["deterministic"] = True
    kw.update(_score_mod_kwargs(softcap, alibi_slopes))
    return kw


def _score_mod_kwargs(softcap, alibi_slopes) -> dict:
    """softcap (0.0 or None: off) and alibi_slopes as keyword arguments of the pk call."""
    kw = {}
    cap = _softcap(softcap)
    if cap is not None:
        kw["softcap"] = cap
    if alibi_slopes is not None:
        kw["alibi_slopes"] = alibi_slopes
    return kw


def _finish(out_lse, return_attn_probs):
    out, lse = out_lse
    return (out, lse, None) if return_attn_probs else out


# ---- dense --------------------------------------------------------------------------------


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=_NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim) ->
    out (batch, seqlen_q, heads, head_dim) [, softmax_lse (batch, heads, seqlen_q), None]."""
    kw = _score_kwargs(dropout_p, softcap, alibi_slopes, deterministic)
    res = flash_attention(q, k, v, causal=causal, scale=softmax_scale, window=window_size, return_lse=True, **kw)
    return _finish(res, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=_NO_WINDOW,
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, heads, head_dim)."""
    _check_packed("qkv", qkv, 5, 3, "(batch, seqlen, 3, heads, head_dim)")
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=_NO_WINDOW,
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, head_dim), kv (batch, seqlen_k, 2, kv_heads, head_dim)."""
    _check_packed("kv", kv, 5, 2, "(batch, seqlen_k, 2, kv_heads, head_dim)")
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def _check_packed(name, t, nd, n, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != nd or t.shape[-3] != n:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(t.shape)}")


# ---- varlen -------------------------------------------------------------------------------


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=_NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, heads, head_dim), k/v (total_k, kv_heads, head_dim), cu_seqlens_* int32
    [batch + 1] -> out (total_q, heads, head_dim) [, softmax_lse (heads, total_q), None]."""
    if block_table is not None:
        _unsupported("block_table", "a paged key/value cache is not supported by the varlen kernel "
                                    "(use flash_attn_with_kvcache)")
    kw = _score_kwargs(dropout_p, softcap, alibi_slopes, deterministic)
    res = flash_attention(q, k, v, causal=causal, scale=softmax_scale, window=window_size,
                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, return_lse=True, **kw)
    return _finish(res, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=_NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, heads, head_dim), cu_seqlens int32 [batch + 1]."""
    _check_packed("qkv", qkv, 4, 3, "(total_tokens, 3, heads, head_dim)")
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=_NO_WINDOW, softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, heads, head_dim), kv (total_k, 2, kv_heads, head_dim)."""
    _check_packed("kv", kv, 4, 2, "(total_tokens, 2, kv_heads, head_dim)")
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# ---- KV cache -----------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """FlashAttention's rotary embedding (flash_attn.layers.rotary.apply_rotary_emb): x (batch,
    seqlen, heads, head_dim); cos/sin (seqlen_ro, rotary_dim / 2); positions (batch, seqlen) the
    row of cos/sin for each token. The first rotary_dim features are rotated (in float32),
    the rest pass through."""
    rd = 2 * cos.shape[-1]
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_cos: rotary_dim {rd} (2 * its last dim) exceeds head_dim {x.shape[-1]}")
    if rd == 0:
        return x
    # per-token tables (batch, seqlen, rd / 2) for the fused op
    return rotary_embedding(x, cos.float()[positions], sin.float()[positions], interleaved=bool(interleaved))


def _check_rotary(rotary_cos, rotary_sin, device):
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor (seqlen_ro, rotary_dim / 2), got {type(t).__name__}")
        if t.dim() != 2 or not t.dtype.is_floating_point or t.device != device:
            raise ValueError(f"{name}: expected a float tensor (seqlen_ro, rotary_dim / 2) on {device}, got "
                             f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos, rotary_sin: expected one shape, got {tuple(rotary_cos.shape)} and "
                         f"{tuple(rotary_sin.shape)}")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=_NO_WINDOW, softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decode / chunked prefill against a KV cache (FlashAttention 2's flash_attn_with_kvcache):
    q (batch, seqlen_q, heads, head_dim); k_cache/v_cache (batch_cache, seqlen_cache, kv_heads,
    head_dim), or (num_blocks, page_size, kv_heads, head_dim) with block_table (batch,
    max_blocks) int32; k/v (batch, seqlen_new, kv_heads, head_dim) appended in place at
    cache_seqlens. Returns out (batch, seqlen_q, heads, head_dim) [, softmax_lse]. Forward only."""
    if cache_leftpad is not None:
        _unsupported("cache_leftpad", "left-padded caches are not supported (keep each row's tokens at the start)")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both or neither")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (batch, seqlen_q, heads, head_dim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache: expected a 4-D tensor")
    B, Sq = q.shape[0], q.shape[1]
    kw = {}
    if block_table is not None:
        if cache_batch_idx is not None:
            _unsupported("cache_batch_idx", "not supported together with block_table")
        kw["block_table"] = block_table
    window_size = tuple(window_size)
    if window_size != _NO_WINDOW:
        kw["window"] = window_size
    kw.update(_score_mod_kwargs(softcap, alibi_slopes))
    if return_softmax_lse:
        kw["return_lse"] = True
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int, got {type(num_splits).__name__}")

    # cache_seqlens: int, int32 [batch], or None (every row holds seqlen_cache tokens)
    if cache_seqlens is None:
        if block_table is not None:
            raise ValueError("cache_seqlens: required with block_table")
        cache_seqlens = torch.full((B,), k_cache.shape[1], dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    elif not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an int, an int32 tensor [batch] or None, got "
                        f"{type(cache_seqlens).__name__}")
    seqlens_in = cache_seqlens

    if rotary_cos is not None:
        _check_rotary(rotary_cos, rotary_sin, q.device)
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,):
            raise ValueError(f"cache_seqlens: expected an int32 tensor of shape ({B},) with rotary_cos")
        base = cache_seqlens.to(torch.long)[:, None]
        if causal or window_size != _NO_WINDOW:
            q_pos = base + torch.arange(Sq, device=q.device)[None]
        else:  # FlashAttention: every query at the position cache_seqlens
            q_pos = base.expand(B, Sq)
        q_pos = q_pos.clamp(0, rotary_cos.shape[0] - 1)
        q = apply_rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if k is not None:
            k_pos = (base + torch.arange(k.shape[1], device=q.device)[None]).clamp(0, rotary_cos.shape[0] - 1)
            k = apply_rotary(k, rotary_cos, rotary_sin, k_pos, rotary_interleaved)

    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError("cache_batch_idx: expected an int32 tensor [batch]")
        if cache_batch_idx.shape != (B,) or cache_batch_idx.device != q.device:
            raise ValueError(f"cache_batch_idx: expected shape ({B},) on {q.device}, got "
                             f"{tuple(cache_batch_idx.shape)} on {cache_batch_idx.device}")
        idx = cache_batch_idx.to(torch.long)
        if idx.device.type == "cpu" and idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < k_cache.shape[0]:
            raise ValueError(f"cache_batch_idx: expected values in [0, {k_cache.shape[0]}) (the rows of k_cache)")
        kc, vc = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
        res = flash_attention_with_kvcache(q, kc, vc, seqlens_in, k_new=k, v_new=v, causal=causal,
                                           scale=softmax_scale, **kw)
        if k is not None:  # the appended tokens go back into the caller's cache rows
            k_cache.index_copy_(0, idx, kc)
            v_cache.index_copy_(0, idx, vc)
        return res
    return flash_attention_with_kvcache(q, k_cache, v_cache, seqlens_in, k_new=k, v_new=v, causal=causal,
                                        scale=softmax_scale, **kw)
