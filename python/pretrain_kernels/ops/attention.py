"""Flash attention: fused, tiled, memory-linear attention with online softmax.

Public functions:
  flash_attention               FlashAttention-style API, layout (batch, seqlen, heads, head_dim)
                                or packed varlen (total_tokens, heads, head_dim) + cu_seqlens;
                                differentiable (the backward recomputes from the saved lse)
  flash_attention_with_kvcache  decode / chunked prefill against a KV cache (contiguous or paged),
                                written in place; sliding windows; optional lse
  scaled_dot_product_attention  drop-in for torch.nn.functional.scaled_dot_product_attention

They call the ops torch.ops.pretrain_kernels.flash_attn_fwd / flash_attn_bwd /
flash_attn_kvcache (schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/attention*.cpp).
"""
from __future__ import annotations

import math
import numbers

import torch
from .. import _C

from ._common import (BelowAutograd, apply_function, call_below_autograd, call_boxed, is_compiling, needs_autograd,
                      not_differentiable, op_handle, plain_call, register_autograd_function, resolve_seed)

# the defaults of window and dropout_p, compared by identity on the fast path of flash_attention;
# the rest of the Python layer passes _NO_WINDOW for "no window" too
_NO_WINDOW = (-1, -1)
_NO_DROPOUT = 0.0
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
MAX_FLOAT_SCALE = 1e38  # |scale| for float32/16/bf16 inputs (kMaxFloatScale, csrc/common/attention_checks.h)
_INT64_MAX = 2**63 - 1
_MAX_CACHE_POSITIONS = 2**31 - 1  # positions per kv-cache row (kMaxCachePositions, csrc/common/attention_checks.h)


# ---- argument checks -----------------------------------------------------------------------


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_same(q, k, v, names=("q", "k", "v")) -> None:
    for name, t in zip(names, (q, k, v)):
        _check_float(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{', '.join(names)}: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{', '.join(names)}: expected one device, got {q.device}, {k.device}, {v.device}")


def _check_heads(H: int, Hk: int, Hv: int, names=("q", "k", "v")) -> None:
    if Hv != Hk:
        raise ValueError(f"{names[1]}, {names[2]}: expected the same number of heads, got {Hk} and {Hv}")
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"heads: the query heads ({H}) must be a multiple of the key/value heads ({Hk})")


def _check_head_dim(name: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: expected a head_dim from 1 to {MAX_HEAD_DIM}, got {d}")


def _check_qkv_shapes(q, k, v, varlen: bool, tokens: str = "total_tokens") -> int:
    """Ranks, heads and head_dim of q, k, v in the (batch, seqlen, heads, head_dim) layout, or
    (tokens, heads, head_dim) when varlen; returns head_dim."""
    nd, layout = (3, f"({tokens}, heads, head_dim)") if varlen else (4, "(batch, seqlen, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != nd:
            raise ValueError(f"{name}: expected {nd} dims {layout}, got shape {tuple(t.shape)}")
    _check_heads(q.shape[-2], k.shape[-2], v.shape[-2])
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"head_dim: q, k, v must match, got {D}, {k.shape[-1]}, {v.shape[-1]}")
    _check_head_dim("q", D)
    return D


def _resolve_scale(scale, head_dim: int, dtype: torch.dtype) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    if dtype != torch.float64 and abs(scale) > MAX_FLOAT_SCALE:
        raise ValueError(f"scale: expected a magnitude of at most {MAX_FLOAT_SCALE:g} for {dtype} inputs (their "
                         f"scores are float32), got {scale}")
    return scale


def _check_window(window) -> tuple[int, int]:
    if window is _NO_WINDOW or (window.__class__ is tuple and window == _NO_WINDOW):  # the default, unchecked
        return -1, -1
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window: expected a pair (left, right), got {window!r}") from None
    out = []
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window: expected ints, got {type(w).__name__} for {name}")
        if w < -1:
            raise ValueError(f"window: expected values >= -1 (-1: unbounded), got {w} for {name}")
        out.append(min(int(w), _INT64_MAX))  # wider than any sequence: unbounded, whatever the value
    return out[0], out[1]


_FLOAT32_MIN = 1.1754943508222875e-38  # smallest normal float32: softcap range for float32/16/bf16 inputs


def _check_softcap(softcap, dtype: torch.dtype) -> float:
    """softcap (None: off) as the op takes it (0.0: off)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap: expected a finite number > 0 (None: off), got {softcap}")
    if dtype != torch.float64 and not _FLOAT32_MIN <= softcap <= MAX_FLOAT_SCALE:
        raise ValueError(f"softcap: expected a value in [{_FLOAT32_MIN:g}, {MAX_FLOAT_SCALE:g}] for {dtype} inputs "
                         f"(their scores are float32), got {softcap}")
    return softcap


def _check_alibi(slopes, device, batch: int, heads: int) -> None:
    if slopes is None:
        return
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes: expected a float32 tensor or None, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: expected a float32 tensor, got {slopes.dtype}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes: expected a tensor on {device} (the device of q), got one on {slopes.device}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes: expected shape [{heads}] or [{batch}, {heads}], got {list(slopes.shape)}")
    if slopes.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(slopes).all()):
        raise ValueError("alibi_slopes: expected finite values")


def _check_cu(name: str, cu, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected an int32 tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor [batch + 1], got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {cu.device}")


def _check_prefix_lens(prefix_lens, q, batch: int, key_lens) -> None:
    """prefix_lens: int32 [batch] on the device of q. On the CPU the values are read and checked
    (row b within [0, keys of sequence b]; key_lens() gives those counts); on other devices they
    are not read (no host sync) and the kernels clamp them into that range."""
    if not isinstance(prefix_lens, torch.Tensor):
        raise TypeError(f"prefix_lens: expected an int32 tensor [batch] or None, got {type(prefix_lens).__name__}")
    if prefix_lens.dtype != torch.int32:
        raise TypeError(f"prefix_lens: expected an int32 tensor, got {prefix_lens.dtype}")
    if prefix_lens.device != q.device:
        raise ValueError(f"prefix_lens: expected a tensor on {q.device} (the device of q), got {prefix_lens.device}")
    if tuple(prefix_lens.shape) != (batch,):
        raise ValueError(f"prefix_lens: expected shape ({batch},) (one length per sequence), got "
                         f"{tuple(prefix_lens.shape)}")
    if prefix_lens.device.type == "cpu" and not torch.compiler.is_compiling():
        for b, (n, sk) in enumerate(zip(prefix_lens.tolist(), key_lens())):
            if not 0 <= n <= sk:
                raise ValueError(f"prefix_lens: expected values in [0, {sk}] (the keys of sequence {b}), got {n} at "
                                 f"row {b}")


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:  # NaN fails too
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {dropout_p}")
    return p


def _dropout_seed(dropout_p: float, seed, generator, device: torch.device):
    """The dropout_seed tensor of the raw ops: int64 [2] = (seed, offset), or None without dropout.

    seed: an int or a one-element integer tensor (offset 0), or an int64 tensor [2] (seed,
    offset with offset in [0, 2**32)), on the CPU or on the device of q; None draws the seed from
    `generator` or torch's default generator (resolve_seed), so torch.manual_seed makes runs
    reproducible.
    """
    if dropout_p == 0.0:
        if seed is not None and generator is not None:
            raise ValueError("seed and generator: pass at most one of them")
        return None
    if isinstance(seed, torch.Tensor) and seed.numel() == 2:
        if generator is not None:
            raise ValueError("seed and generator: pass at most one of them")
        if seed.dtype != torch.int64:
            raise TypeError(f"seed: expected an int64 tensor (seed, offset), got {seed.dtype}")
        if seed.device.type != "cpu" and seed.device != device:
            raise ValueError(f"seed: expected a CPU tensor or one on {device}, got {seed.device}")
        if seed.device.type == "cpu" and not torch.compiler.is_compiling():
            off = int(seed.reshape(2)[1])
            if not 0 <= off < 2**32:
                raise ValueError(f"seed: expected an offset in [0, 2**32), got {off}")
        return seed.reshape(2)
    s = resolve_seed(seed, generator, device)
    return torch.cat([s, torch.zeros(1, dtype=torch.int64, device=s.device)])


def _max_seqlen(name: str, value) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a non-negative int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative int or None, got {value!r}")
    return min(int(value), _INT64_MAX)  # an upper bound of the lengths: a larger one bounds nothing more


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


# ---- flash_attention -----------------------------------------------------------------------


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale=None,
                    window=_NO_WINDOW, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                    max_seqlen_k: int | None = None, return_lse: bool = False, softcap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None, prefix_lens: torch.Tensor | None = None,
                    deterministic: bool = False, dropout_p: float = _NO_DROPOUT, seed=None,
                    generator: torch.Generator | None = None):
    """Exact attention softmax(q k^T * scale) v, computed tile by tile (memory linear in the
    sequence length), differentiable.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim) with
    heads a multiple of kv_heads (GQA / MQA: query head h uses kv head h // (heads // kv_heads)).
    Varlen: q (total_q, heads, head_dim), k/v (total_k, kv_heads, head_dim) and int32
    cu_seqlens_q / cu_seqlens_k [batch + 1] of sequence offsets, as flash_attn_varlen_func;
    max_seqlen_* are optional (the CPU kernel reads the lengths).
    causal: aligned bottom-right when the lengths differ (the last query sees the last key).
    window=(left, right): query i sees keys j with i + Sk - Sq - left <= j <= i + Sk - Sq + right
    (-1: unbounded; a side wider than the sequences is unbounded too, however large); causal sets
    right = 0. Rows that see no key give 0 and lse -inf.
    prefix_lens: int32 tensor [batch] on the device of q (prefix-LM, UL2, GLM): in sequence b,
    every query also sees the keys j < prefix_lens[b], so the prefix attends both ways and causal
    order holds after it; a left window still bounds what a query sees (the prefix widens only
    the right end of its keys). With varlen, prefix_lens[b] counts keys of sequence b. Without
    causal or a right window it changes nothing. Values must lie in [0, keys of sequence b]: on
    the CPU others raise a ValueError; on a GPU they are not read (no host sync) and are clamped
    into that range.
    scale: default 1 / sqrt(head_dim), any finite value (|scale| <= 1e38 unless float64: the
    scores are float32). head_dim up to 256; float32, bfloat16, float16 (float32 accumulation)
    and float64.
    softcap: logit soft-capping (Gemma-2, FlashAttention's softcap): the scaled scores
    s = scale * q.k become softcap * tanh(s / softcap) before the causal/window mask; None is
    off, otherwise a finite number > 0. Differentiable.
    alibi_slopes: ALiBi, float32 [heads] or [batch, heads] on the device of q: after the cap,
    score(i, j) += -slope[b, h] * |i + Sk - Sq - j| (FlashAttention's convention, with the same
    bottom-right alignment as causal; for varlen, Sq and Sk of each sequence). The slopes get
    no gradient (as in FlashAttention). Slopes must be finite; on the CPU that is checked, on
    CUDA (where it cannot be without a host sync) a NaN or infinite slope gives NaN rows.
    dropout_p: attention dropout (BERT / GPT-2 pretraining), in [0, 1]: each entry of the
    attention matrix is dropped with probability dropout_p and the kept ones are scaled by
    1 / (1 - dropout_p) (torch's semantics; p is quantised to 1/65536, dropout_p = 1 gives 0).
    The softmax statistics and the returned lse are those without dropout. The keep mask is a
    pure function of (seed, offset, sequence, head, query, key) (csrc/common/attention_dropout.h):
    the same seed gives the same result on every device, thread count and tile shape, and the
    backward regenerates it. seed: an int, a one-element integer tensor, or an int64 tensor [2]
    (seed, offset); None draws one from `generator` or torch's default generator (so
    torch.manual_seed makes runs reproducible). Apply dropout only while training.
    Returns out shaped like q, and with return_lse=True also lse (float32; float64 for
    float64 inputs): (batch, heads, seqlen_q), or (heads, total_q) for varlen; differentiable.
    deterministic: the backward only. True: gradients reproducible bit for bit on CUDA (dQ in
    a pass of its own, no atomics). False (default, as FlashAttention): the CUDA tensor-core
    backward may add dQ with float atomics (fewer tile products; the order of the additions,
    hence the last bits, varies from run to run); torch.use_deterministic_algorithms(True)
    overrides it. The CPU backward is deterministic either way.
    Reverse mode only (backward, torch.func.grad / vjp / jacrev, and vmap over them); double
    backward and forward mode (torch.func.jvp, forward_ad) raise NotImplementedError.

    Names: `scale` is torch SDPA's name (this function is also the engine of the SDPA drop-in)
    where FlashAttention says softmax_scale, and `window` takes FlashAttention's window_size
    tuple under a shorter name; code written against flash-attn's own signatures belongs with
    its names, not with this function's.
    """
    if ((window is _NO_WINDOW or (window.__class__ is tuple and window == _NO_WINDOW))
            and (dropout_p is _NO_DROPOUT or (dropout_p.__class__ is float and dropout_p == 0.0))
            and scale is None and cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None
            and max_seqlen_k is None and softcap is None and alibi_slopes is None and prefix_lens is None
            and seed is None and generator is None and (causal is False or causal is True)
            and (deterministic is False or deterministic is True) and plain_call(q, k, v)):
        # The common call (decode steps, plain prefill) when no derivative is recorded
        # (plain_call): the op's own checks (csrc/common/attention_checks.h) are those below but
        # for one, made here; when the op raises, the full path below runs and raises the error
        # that names the argument. The op is called through the dispatcher below autograd
        # (call_boxed, ops/_common.py).
        try:
            D = q.shape[-1]
            if v.shape[-1] == D:
                r = _fwd_plain(q, k, v, 1.0 / math.sqrt(D), 0 if causal else -1, True, False)
                if r is NotImplemented:
                    with BelowAutograd():
                        r = call_boxed(_FWD_HANDLE, q, k, v, None, None, None, -1, -1, 1.0 / math.sqrt(D), -1,
                                       0 if causal else -1, True)
                return r if return_lse else r[0]
        except Exception:  # noqa: BLE001 - the full path below raises the precise error
            pass
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_same(q, k, v)
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q, cu_seqlens_k: pass both for varlen attention")
        _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
        _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q, cu_seqlens_k: expected the same batch, got {cu_seqlens_q.numel() - 1} "
                             f"and {cu_seqlens_k.numel() - 1}")
    D = _check_qkv_shapes(q, k, v, varlen)
    if varlen:
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k, v: expected the same token count, got {k.shape[0]} and {v.shape[0]}")
    else:
        if not q.shape[0] == k.shape[0] == v.shape[0]:
            raise ValueError(f"batch: q, k, v must match, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k, v: expected the same sequence length, got {k.shape[1]} and {v.shape[1]}")
    scale = _resolve_scale(scale, D, q.dtype)
    left, right = _check_window(window)
    if causal:
        right = 0
    softcap = _check_softcap(softcap, q.dtype)
    _check_alibi(alibi_slopes, q.device, cu_seqlens_q.numel() - 1 if varlen else q.shape[0], q.shape[-2])
    if prefix_lens is not None:
        if varlen:
            _check_prefix_lens(prefix_lens, q, cu_seqlens_k.numel() - 1, lambda: cu_seqlens_k.diff().tolist())
        else:
            _check_prefix_lens(prefix_lens, q, q.shape[0], lambda: [k.shape[1]] * q.shape[0])
    dropout_p = _check_dropout_p(dropout_p)
    dropout_seed = _dropout_seed(dropout_p, seed, generator, q.device)
    out, lse = _attention_fwd(
        q, k, v, cu_seqlens_q if varlen else None, cu_seqlens_k if varlen else None, None,
        _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k), scale, left, right, True,
        softcap, alibi_slopes, prefix_lens, dropout_p, dropout_seed,
        deterministic=_check_bool("deterministic", deterministic))
    return (out, lse) if return_lse else out


# ---- KV cache ------------------------------------------------------------------------------


def flash_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_seqlens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                                 v_new: torch.Tensor | None = None, causal: bool = True, scale=None,
                                 window=_NO_WINDOW, block_table: torch.Tensor | None = None, return_lse: bool = False,
                                 softcap: float | None = None, alibi_slopes: torch.Tensor | None = None):
    """Decode / chunked prefill against a KV cache, forward only (as flash_attn_with_kvcache).

    q: (batch, seqlen_q, heads, head_dim); k_cache, v_cache: (batch, max_seqlen, kv_heads,
    head_dim); cache_seqlens: int32 [batch], the tokens already in each row of the cache.
    k_new, v_new (batch, seqlen_new, kv_heads, head_dim), when given, are written into the
    caches in place at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new (the caller
    advances cache_seqlens). q then attends to the first cache_seqlens[b] + seqlen_new keys,
    causally aligned bottom-right when causal. Returns (batch, seqlen_q, heads, head_dim), and
    with return_lse=True also the logsumexp of the scores, (batch, heads, seqlen_q) float32
    (float64 for float64 inputs), as flash_attention.

    window=(left, right): sliding-window attention (Mistral) as in flash_attention, aligned
    bottom-right: query i of row b sees cache positions t with
    i + n_b - seqlen_q - left <= t <= i + n_b - seqlen_q + right, n_b = cache_seqlens[b] +
    seqlen_new (-1: unbounded); causal sets right = 0. A row that sees no key gives 0 (lse -inf).

    Paged cache (vLLM, FlashAttention): with block_table int32 [batch, max_blocks], the caches
    are (num_blocks, page_size, kv_heads, head_dim) and position t of row b lives in block
    block_table[b, t // page_size], slot t % page_size; a row holds max_blocks * page_size
    tokens. Any page size >= 1 works. Only the entries covering a row's first cache_seqlens[b] +
    seqlen_new positions are read (the rest may hold padding such as -1). Results equal those of
    the same data in a contiguous cache, bit for bit on the CPU. Two rows whose tables name the
    same block share its memory: the caller's business (rows that append into a shared block
    race on CUDA); nothing crashes.

    A row whose tokens do not fit (cache_seqlens[b] < 0 or cache_seqlens[b] + seqlen_new >
    capacity), or, paged, whose table names a block id outside [0, num_blocks) among the pages
    it uses, follows one rule on every device, since a GPU cannot raise without a host sync:
    nothing is written into that row of the caches and its output (and lse) is NaN. (The CPU
    checks the block ids on the host and raises instead, naming the row.) The caches are
    written in place, so they must not be expanded (stride-0) views or overlap each other, and
    q, k_new, v_new and block_table must not be views of them.

    softcap and alibi_slopes ([heads] or [batch, heads]) as in flash_attention; the ALiBi
    distance of query i to key j is |i + K - Sq - j| with K = cache_seqlens[b] + seqlen_new.
    """
    if (k_new is None and v_new is None and block_table is None and scale is None and softcap is None
            and alibi_slopes is None and (causal is False or causal is True)
            and (window is _NO_WINDOW or (window.__class__ is tuple and window == _NO_WINDOW))
            and cache_seqlens.__class__ is torch.Tensor and plain_call(q, k_cache, v_cache)):
        # The common decode call, nothing written in place: as in flash_attention, the op's checks
        # are those below but for one (one head_dim), made here; when the op raises, the full path
        # below runs and raises the error that names the argument.
        try:
            D = q.shape[-1]
            if k_cache.shape[-1] == D and v_cache.shape[-1] == D:
                out, lse = call_boxed(_KVCACHE_HANDLE, q, k_cache, v_cache, cache_seqlens, None, None,
                                       1.0 / math.sqrt(D), causal, -1, -1, None)
                return (out, lse) if return_lse else out
        except Exception:  # noqa: BLE001 - the full path below raises the precise error
            pass
    _check_same(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    paged = block_table is not None
    cache_layout = "(num_blocks, page_size, kv_heads, head_dim)" if paged else "(batch, max_seqlen, kv_heads, head_dim)"
    for name, t, layout in (("q", q, "(batch, seqlen, heads, head_dim)"), ("k_cache", k_cache, cache_layout),
                            ("v_cache", v_cache, cache_layout)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims {layout}, got shape {tuple(t.shape)}")
    B = q.shape[0]
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            got = block_table.dtype if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise TypeError(f"block_table: expected an int32 tensor [batch, max_blocks], got {got}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected shape ({B}, max_blocks), got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table: expected a tensor on {q.device}, got {block_table.device}")
        if k_cache.shape[1] < 1:
            raise ValueError(f"k_cache: expected a page size (dim 1) >= 1 with block_table, got shape "
                             f"{tuple(k_cache.shape)}")
        if v_cache.shape[:2] != k_cache.shape[:2]:
            raise ValueError(f"v_cache: expected the page layout (num_blocks, page_size) = {tuple(k_cache.shape[:2])} "
                             f"of k_cache, got {tuple(v_cache.shape[:2])}")
    elif k_cache.shape[0] != B or v_cache.shape[0] != B:
        raise ValueError(f"k_cache, v_cache: expected batch {B}, got {k_cache.shape[0]} and {v_cache.shape[0]}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new, v_new: pass both or neither")
    if k_new is not None:
        _check_same(q, k_new, v_new, ("q", "k_new", "v_new"))
        for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != cache.shape[2:]:
                raise ValueError(f"{name}: expected shape (batch={B}, seqlen_new, "
                                 f"{cache.shape[2]}, {cache.shape[3]}), got {tuple(t.shape)}")
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new, v_new: expected one length, got {k_new.shape[1]} and {v_new.shape[1]}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise TypeError(f"cache_seqlens: expected an int32 tensor [batch], got {got}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens: expected shape ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected a tensor on {q.device}, got {cache_seqlens.device}")
    _check_heads(q.shape[2], k_cache.shape[2], v_cache.shape[2], ("q", "k_cache", "v_cache"))
    D = q.shape[-1]
    if k_cache.shape[-1] != D or v_cache.shape[-1] != D:
        raise ValueError(f"head_dim: q, k_cache, v_cache must match, got {D}, {k_cache.shape[-1]}, {v_cache.shape[-1]}")
    _check_head_dim("q", D)
    scale = _resolve_scale(scale, D, q.dtype)
    left, right = _check_window(window)
    softcap = _check_softcap(softcap, q.dtype)
    _check_alibi(alibi_slopes, q.device, q.shape[0], q.shape[2])
    out, lse = torch.ops.pretrain_kernels.flash_attn_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale,
                                                             bool(causal), left, right, block_table, softcap,
                                                             alibi_slopes)
    return (out, lse) if return_lse else out


# ---- SDPA drop-in --------------------------------------------------------------------------


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, enable_gqa: bool = False, *,
                                 deterministic: bool = False, seed=None,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention: same signature, layout
    (..., heads, L, E) and results, computed by the flash kernel (no L x S matrix).

    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
    (..., heads, L, S); applied inside the kernel tile by tile. is_causal: top-left aligned
    lower triangle, as torch. Rows that see no key give 0, as torch's fused CPU kernels.
    dropout_p: attention dropout as torch's (applied whenever > 0; pass 0 outside training),
    with the RNG contract of flash_attention: keyword-only seed / generator (not in torch's
    signature), else a seed from torch's default generator. The keep mask differs from torch's
    (another RNG). Differences: the mask gets no gradient; no double backward or forward mode
    (NotImplementedError). Extra, keyword-only: deterministic, as in flash_attention (False: the
    CUDA backward may add dQ with atomics), seed and generator.
    """
    if (attn_mask is None and scale is None and seed is None and generator is None and dropout_p.__class__ is float
            and dropout_p == 0.0 and (is_causal is False or is_causal is True)
            and (deterministic is False or deterministic is True) and plain_call(query, key, value)):
        # (batch, heads, L, E) without a mask: as in flash_attention, the op's checks are those
        # below but for grouped-query heads without enable_gqa, made here; when the op raises, the
        # full path below runs and raises the error that names the argument.
        try:
            if query.dim() == 4 and (enable_gqa is True or query.shape[1] == key.shape[1]):
                s, wr = 1.0 / math.sqrt(query.shape[-1]), 0 if is_causal else -1
                r = _fwd_plain(query, key, value, s, wr, False, True)
                if r is not NotImplemented:
                    return r[0]
                with BelowAutograd():
                    out, _ = call_boxed(_FWD_HANDLE, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        None, None, None, -1, -1, s, -1, wr, False)
                return out.transpose(1, 2)
        except Exception:  # noqa: BLE001 - the full path below raises the precise error
            pass
    deterministic = _check_bool("deterministic", deterministic)
    dropout_p = _check_dropout_p(dropout_p)
    _check_same(query, key, value, ("query", "key", "value"))
    if query.dim() < 3:
        raise ValueError(f"query: expected at least 3 dims (..., L, E), got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name}: expected {query.dim()} dims like query, got shape {tuple(t.shape)}")
    if query.dim() == 3:  # (N, L, E): one head
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        lead = None
    else:
        lead = query.shape[:-3]
        for name, t in (("key", key), ("value", value)):
            if t.shape[:-3] != lead:
                raise ValueError(f"{name}: expected the batch dims {tuple(lead)} of query, got {tuple(t.shape[:-3])}")
        if len(lead) != 1:
            query, key, value = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    B, H, L, E = query.shape
    Hk, S = key.shape[1], key.shape[2]
    if value.shape[1] != Hk or value.shape[2] != S:
        raise ValueError(f"value: expected (heads, S) = ({Hk}, {S}) of key, got {tuple(value.shape[1:3])}")
    if H != Hk and not enable_gqa:
        raise ValueError(f"key: expected {H} heads like query (pass enable_gqa=True for grouped-query attention), "
                         f"got {Hk}")
    _check_heads(H, Hk, value.shape[1], ("query", "key", "value"))
    if key.shape[-1] != E:
        raise ValueError(f"head_dim: query and key must match, got {E} and {key.shape[-1]}")
    _check_head_dim("query", E)
    _check_head_dim("value", value.shape[-1])
    scale = _resolve_scale(scale, E, query.dtype)
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask, is_causal: pass at most one (as torch's SDPA)")
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a tensor, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected a tensor on {query.device}, got {attn_mask.device}")
        if attn_mask.dtype != torch.bool:
            if not attn_mask.dtype.is_floating_point:
                raise TypeError(f"attn_mask: expected bool or a float dtype, got {attn_mask.dtype}")
            if attn_mask.requires_grad and torch.is_grad_enabled():
                raise NotImplementedError("attn_mask: gradients with respect to the mask are not supported")
            attn_mask = attn_mask.to(torch.float32)
        target = (B, L, S) if lead is None else (*lead, H, L, S)
        try:
            mask = torch.broadcast_to(attn_mask, target)
        except RuntimeError:
            raise ValueError(f"attn_mask: expected a shape broadcastable to {target}, got "
                             f"{tuple(attn_mask.shape)}") from None
        mask = mask.unsqueeze(1) if lead is None else mask.reshape(B, H, L, S)
    dropout_seed = _dropout_seed(dropout_p, seed, generator, query.device)
    out, _ = _attention_fwd(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, None, mask, -1, -1, scale,
        -1, 0 if is_causal else -1, False, 0.0, None, None, dropout_p, dropout_seed, deterministic=deterministic)
    out = out.transpose(1, 2)  # (B, H, L, Ev)
    if lead is None:
        return out.squeeze(1)
    return out.reshape(*lead, *out.shape[1:]) if len(lead) != 1 else out


# ---- fake kernels and autograd -------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The fake kernels check what csrc/common/attention_checks.h checks (check_layout,
# check_backward_inputs, check_kvcache): a direct op call on meta tensors, or on meta tensors
# mixed with CPU ones (the dispatcher then picks the fake kernel), must raise as the CPU and
# CUDA kernels do, instead of returning tensors of a made-up shape (on the CPU: uninitialised
# memory). torch._check raises RuntimeError, as TORCH_CHECK does.


def _check_op_layout(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, prefix_lens=None):
    dev = q.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check(t.device == dev,
                     lambda: f"{name}: expected a tensor on {dev} (the device of q), got one on {t.device}")
        torch._check(t.dtype in _FLOAT_DTYPES,
                     lambda: f"{name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype,
                 lambda: f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check((cu_q is None) == (cu_k is None), lambda: "cu_seqlens_q, cu_seqlens_k: pass both or neither")
    varlen = cu_q is not None
    nd, layout = (3, "(total_tokens, heads, head_dim)") if varlen else (4, "(batch, seqlen, heads, head_dim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check(t.dim() == nd, lambda: f"{name}: expected {nd} dims {layout}, got shape {tuple(t.shape)}")
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"window: expected values >= -1 (-1: unbounded), got ({window_left}, {window_right})")
    torch._check(math.isfinite(scale), lambda: f"scale: expected a finite number, got {scale}")
    torch._check(q.dtype == torch.float64 or abs(scale) <= MAX_FLOAT_SCALE,
                 lambda: f"scale: expected a magnitude of at most {MAX_FLOAT_SCALE:g} for {q.dtype} inputs, got "
                         f"{scale}")
    H, Hk, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    torch._check(v.shape[-2] == Hk, lambda: f"k, v: expected the same number of heads, got {Hk} and {v.shape[-2]}")
    torch._check(Hk >= 1 and H % Hk == 0,
                 lambda: f"heads: the query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    torch._check(k.shape[-1] == D, lambda: f"head_dim: q and k must match, got {D} and {k.shape[-1]}")
    torch._check(1 <= D <= MAX_HEAD_DIM, lambda: f"head_dim: expected 1 to {MAX_HEAD_DIM}, got {D}")
    torch._check(1 <= Dv <= MAX_HEAD_DIM, lambda: f"head_dim of v: expected 1 to {MAX_HEAD_DIM}, got {Dv}")
    if varlen:
        torch._check(mask is None, lambda: "attn_mask: not supported with cu_seqlens (varlen)")
        torch._check(cu_q.numel() >= 1, lambda: "cu_seqlens_q: expected at least one element")
        batch = cu_q.numel() - 1
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            torch._check(cu.dtype == torch.int32, lambda: f"{name}: expected an int32 tensor, got {cu.dtype}")
            torch._check(cu.device == dev,
                         lambda: f"{name}: expected a tensor on {dev} (the device of q), got one on {cu.device}")
            torch._check(cu.dim() == 1 and cu.shape[0] == batch + 1,
                         lambda: f"{name}: expected shape [{batch + 1}], got {tuple(cu.shape)}")
        torch._check(v.shape[0] == k.shape[0],
                     lambda: f"k, v: expected the same token count, got {k.shape[0]} and {v.shape[0]}")
    else:
        batch = q.shape[0]
        torch._check(k.shape[0] == batch and v.shape[0] == batch,
                     lambda: f"batch: q, k, v must match, got {batch}, {k.shape[0]}, {v.shape[0]}")
        torch._check(v.shape[1] == k.shape[1],
                     lambda: f"k, v: expected the same sequence length, got {k.shape[1]} and {v.shape[1]}")
    if mask is not None:
        torch._check(mask.device == dev, lambda: f"attn_mask: expected a tensor on {dev}, got one on {mask.device}")
        torch._check(mask.dtype in (torch.bool, torch.float32),
                     lambda: f"attn_mask: expected bool or float32 (convert float masks first), got {mask.dtype}")
        want = (batch, H, q.shape[1], k.shape[1])
        torch._check(tuple(mask.shape) == want,
                     lambda: f"attn_mask: expected shape {list(want)} (expand it), got {list(mask.shape)}")
    if prefix_lens is not None:  # set_prefix_lens
        torch._check(prefix_lens.dtype == torch.int32,
                     lambda: f"prefix_lens: expected an int32 tensor, got {prefix_lens.dtype}")
        torch._check(prefix_lens.device == dev, lambda: f"prefix_lens: expected a tensor on {dev} (the device of q), "
                                                        f"got one on {prefix_lens.device}")
        torch._check(prefix_lens.dim() == 1 and prefix_lens.shape[0] == batch,
                     lambda: f"prefix_lens: expected shape [{batch}] (one length per sequence), got "
                             f"{list(prefix_lens.shape)}")
    return varlen, batch, H, Dv


def _check_op_score_mods(softcap, slopes, dtype, dev, batch, H):
    torch._check(math.isfinite(softcap) and softcap >= 0,
                 lambda: f"softcap: expected a finite number > 0 (0 = off), got {softcap}")
    torch._check(softcap == 0 or dtype == torch.float64 or _FLOAT32_MIN <= softcap <= MAX_FLOAT_SCALE,
                 lambda: f"softcap: expected a value in [{_FLOAT32_MIN:g}, {MAX_FLOAT_SCALE:g}] for {dtype} inputs "
                         f"(their scores are float32), got {softcap}")
    if slopes is not None:
        torch._check(slopes.dtype == torch.float32,
                     lambda: f"alibi_slopes: expected a float32 tensor, got {slopes.dtype}")
        torch._check(slopes.device == dev,
                     lambda: f"alibi_slopes: expected a tensor on {dev} (the device of q), got one on {slopes.device}")
        torch._check(tuple(slopes.shape) in ((H,), (batch, H)),
                     lambda: f"alibi_slopes: expected shape [{H}] or [{batch}, {H}], got {list(slopes.shape)}")


def _check_op_dropout(dropout_p, seed, dev):  # set_dropout
    torch._check(math.isfinite(dropout_p) and 0.0 <= dropout_p <= 1.0,
                 lambda: f"dropout_p: expected a probability in [0, 1], got {dropout_p}")
    if dropout_p > 0:
        torch._check(seed is not None, lambda: "dropout_seed: required when dropout_p > 0 (int64 [2]: seed, offset)")
        torch._check(seed.dtype == torch.int64 and seed.dim() == 1 and seed.shape[0] == 2,
                     lambda: f"dropout_seed: expected an int64 tensor of shape [2] (seed, offset), got {seed.dtype} "
                             f"of shape {list(seed.shape)}")
        torch._check(seed.device.type == "cpu" or seed.device == dev,
                     lambda: f"dropout_seed: expected a CPU tensor or one on {dev}, got one on {seed.device}")


def _lse_shape(q, varlen, batch, H):
    return (H, q.shape[0]) if varlen else (batch, H, q.shape[1])


@torch.library.register_fake("pretrain_kernels::flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, bottom_right, softcap=0.0, alibi_slopes=None, prefix_lens=None,
                         dropout_p=0.0, dropout_seed=None):
    varlen, batch, H, Dv = _check_op_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask, scale, window_left,
                                            window_right, prefix_lens)
    _check_op_score_mods(softcap, alibi_slopes, q.dtype, q.device, batch, H)
    _check_op_dropout(dropout_p, dropout_seed, q.device)
    out = q.new_empty((*q.shape[:-1], Dv))
    lse = q.new_empty(_lse_shape(q, varlen, batch, H), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("pretrain_kernels::flash_attn_bwd")
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, attn_mask, max_seqlen_q,
                         max_seqlen_k, scale, window_left, window_right, bottom_right, softcap=0.0,
                         alibi_slopes=None, prefix_lens=None, dropout_p=0.0, dropout_seed=None, deterministic=False):
    varlen, batch, H, Dv = _check_op_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask, scale, window_left,
                                            window_right, prefix_lens)
    _check_op_score_mods(softcap, alibi_slopes, q.dtype, q.device, batch, H)
    _check_op_dropout(dropout_p, dropout_seed, q.device)
    o_shape = (*q.shape[:-1], Dv)
    torch._check(tuple(out.shape) == o_shape and tuple(dout.shape) == o_shape,
                 lambda: f"out, dout: expected shape {list(o_shape)}, got {list(out.shape)} and {list(dout.shape)}")
    torch._check(out.dtype == q.dtype and dout.dtype == q.dtype,
                 lambda: f"out, dout: expected dtype {q.dtype}, got {out.dtype} and {dout.dtype}")
    dev = q.device
    torch._check(out.device == dev and dout.device == dev and lse.device == dev,
                 lambda: f"out, dout, lse: expected tensors on {dev}, got {out.device}, {dout.device}, {lse.device}")
    lse_shape, lse_dtype = _lse_shape(q, varlen, batch, H), _lse_dtype(q.dtype)
    torch._check(lse.dtype == lse_dtype and tuple(lse.shape) == lse_shape,
                 lambda: f"lse: expected {lse_dtype} of shape {list(lse_shape)}, got {lse.dtype} of shape "
                         f"{list(lse.shape)}")
    if dlse is not None:
        torch._check(dlse.dtype == lse_dtype and dlse.shape == lse.shape and dlse.device == dev,
                     lambda: f"dlse: expected {lse_dtype} of shape {list(lse.shape)} on {dev}, got {dlse.dtype} of "
                             f"shape {list(dlse.shape)} on {dlse.device}")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _check_op_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, window_left, window_right, block_table):
    torch._check(q.dim() == 4, lambda: f"q: expected 4 dims (batch, seqlen, heads, head_dim), got shape "
                                       f"{tuple(q.shape)}")
    paged = block_table is not None
    layout = "(num_blocks, page_size, kv_heads, head_dim)" if paged else "(batch, max_seqlen, kv_heads, head_dim)"
    torch._check(k_cache.dim() == 4 and v_cache.dim() == 4,
                 lambda: f"k_cache, v_cache: expected 4 dims {layout}, got shapes "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, dev = q.shape[0], q.device
    if paged:
        torch._check(block_table.dtype == torch.int32,
                     lambda: f"block_table: expected an int32 tensor, got {block_table.dtype}")
        torch._check(block_table.device == dev,
                     lambda: f"block_table: expected a tensor on {dev} (the device of q), got one on "
                             f"{block_table.device}")
        torch._check(block_table.dim() == 2 and block_table.shape[0] == B,
                     lambda: f"block_table: expected shape [{B}, max_blocks], got {list(block_table.shape)}")
        torch._check(k_cache.shape[1] > 0,
                     lambda: f"k_cache: expected a page size (dim 1) > 0 with block_table, got shape "
                             f"{list(k_cache.shape)}")
        torch._check(v_cache.shape[0] == k_cache.shape[0] and v_cache.shape[1] == k_cache.shape[1],
                     lambda: f"v_cache: expected the page layout (num_blocks, page_size) = "
                             f"({k_cache.shape[0]}, {k_cache.shape[1]}) of k_cache, got "
                             f"({v_cache.shape[0]}, {v_cache.shape[1]})")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        torch._check(k_cache.shape[0] == B and v_cache.shape[0] == B,
                     lambda: f"k_cache, v_cache: expected batch {B}, got {k_cache.shape[0]} and {v_cache.shape[0]}")
        torch._check(v_cache.shape[1] == k_cache.shape[1],
                     lambda: f"v_cache: expected max_seqlen {k_cache.shape[1]} (that of k_cache), got "
                             f"{v_cache.shape[1]}")
        capacity = k_cache.shape[1]
    torch._check(capacity <= _MAX_CACHE_POSITIONS,
                 lambda: f"k_cache: {capacity} positions per row exceed {_MAX_CACHE_POSITIONS} (int32 cache_seqlens)")
    torch._check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
                 lambda: "k_cache, v_cache: expected a contiguous last dimension (they are written in place)")
    torch._check((k_new is None) == (v_new is None), lambda: "k_new, v_new: pass both or neither")
    if k_new is not None:
        torch._check(k_new.dim() == 4 and v_new.dim() == 4,
                     lambda: "k_new, v_new: expected 4 dims (batch, seqlen_new, kv_heads, head_dim), got shapes "
                             f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
        torch._check(k_new.device == dev and v_new.device == dev,
                     lambda: f"k_new, v_new: expected tensors on {dev} (the device of q), got {k_new.device} and "
                             f"{v_new.device}")
        torch._check(k_new.shape[0] == B and v_new.shape[0] == B and v_new.shape[1] == k_new.shape[1],
                     lambda: f"k_new, v_new: expected batch {B} and one length, got shapes {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
        torch._check(k_new.shape[2:] == k_cache.shape[2:],
                     lambda: f"k_new: expected (heads, head_dim) of k_cache {tuple(k_cache.shape[2:])}, got "
                             f"{tuple(k_new.shape[2:])}")
        torch._check(v_new.shape[2:] == v_cache.shape[2:],
                     lambda: f"v_new: expected (heads, head_dim) of v_cache {tuple(v_cache.shape[2:])}, got "
                             f"{tuple(v_new.shape[2:])}")
        torch._check(k_new.dtype == k_cache.dtype and v_new.dtype == v_cache.dtype,
                     lambda: f"k_new, v_new: expected the dtype of the cache {k_cache.dtype}, got {k_new.dtype} and "
                             f"{v_new.dtype}")
        torch._check(k_new.shape[1] <= capacity,
                     lambda: f"k_new: {k_new.shape[1]} new tokens do not fit a cache of {capacity}")
    torch._check(cache_seqlens.dtype == torch.int32,
                 lambda: f"cache_seqlens: expected an int32 tensor, got {cache_seqlens.dtype}")
    torch._check(cache_seqlens.device == dev,
                 lambda: f"cache_seqlens: expected a tensor on {dev} (the device of q), got {cache_seqlens.device}")
    torch._check(cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == B,
                 lambda: f"cache_seqlens: expected shape [{B}], got {list(cache_seqlens.shape)}")
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"window: expected values >= -1 (-1: unbounded), got ({window_left}, {window_right})")


@torch.library.register_fake("pretrain_kernels::flash_attn_kvcache")
def _flash_attn_kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, window_left,
                             window_right, block_table, softcap=0.0, alibi_slopes=None):
    _check_op_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, window_left, window_right, block_table)
    if block_table is not None:  # q against the caches' dtype, heads and head dims (kvcache_layout_view)
        k_cache = k_cache.new_empty((q.shape[0], 0, *k_cache.shape[2:]))
        v_cache = v_cache.new_empty((q.shape[0], 0, *v_cache.shape[2:]))
    _check_op_layout(q, k_cache, v_cache, None, None, None, scale, -1, 0 if causal else -1)
    _check_op_score_mods(softcap, alibi_slopes, q.dtype, q.device, q.shape[0], q.shape[2])
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q.dtype))
    return out, lse


# Autograd (see ops/_common.py): flash_attn_fwd differentiates through flash_attn_bwd, which
# itself has no derivative. The public functions pass `deterministic` (an argument of the
# backward op only) to the Function; a direct call of flash_attn_fwd gets the default, False.

_PUBLIC = "pk.flash_attention / pk.scaled_dot_product_attention"


class _FlashAttention(torch.autograd.Function):
    """flash_attn_fwd and its gradients. apply takes flash_attn_fwd's arguments, then
    `deterministic`; the backward calls flash_attn_bwd(dout, q, k, v, out, lse, dlse, <the rest
    of flash_attn_fwd's arguments>, deterministic)."""
    generate_vmap_rule = True
    forward_mode_name = f"{_PUBLIC} (pretrain_kernels::flash_attn_fwd)"

    @staticmethod
    def forward(*args):
        return torch.ops.pretrain_kernels.flash_attn_fwd(*args[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        *args, deterministic = inputs
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*output, *(args[i] for i in ctx.tensor_at))
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.deterministic = deterministic
        ctx.set_materialize_grads(False)  # dlse stays None when the lse is not used

    @staticmethod
    def backward(ctx, dout, dlse):
        out, lse, *saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_at, saved):
            args[i] = t
        q, k, v = args[:3]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, dlse, *args[3:], ctx.deterministic)
        return (dq, dk, dv) + (None,) * (len(args) - 2)  # nothing for the other arguments and deterministic


def _attention_fwd(*args, deterministic: bool):
    """flash_attn_fwd(*args), differentiable when it has to be. Trailing arguments left out take
    the op's defaults here, so that the backward receives every argument in its place."""
    args = (*args, *_FWD_DEFAULTS[len(args):])
    # q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask and alibi_slopes: the arguments that can
    # require grad (the others are numbers or integer tensors)
    if needs_autograd(*args[:6], args[13]):
        return apply_function(_FlashAttention, *args, deterministic)
    return call_below_autograd(_FWD_OP, *args)


# vmap (torch.func.vmap, and vmap over grad / vjp / jacrev): dense calls fold the vmapped dim into
# the batch dim (every tensor argument of a dense call leads with the batch), so one op call
# serves all samples; varlen calls, whose tokens are packed along dim 0 and located by
# cu_seqlens, run once per sample.


_FWD_OP = torch.ops.pretrain_kernels.flash_attn_fwd.default
_FWD_DEFAULTS = [a.default_value for a in _FWD_OP._schema.arguments]
# the fast paths' calls (call_boxed: never while torch.compile traces)
_FWD_HANDLE = op_handle("pretrain_kernels::flash_attn_fwd")
# flash_attn_fwd's plain CPU call past the dispatcher (csrc/module.cpp): NotImplemented for any
# call the dispatcher would not send straight to the CPU kernel, and from a build without it.
_fwd_plain = getattr(_C, "attention_fwd_plain", None) or (lambda *args: NotImplemented)
_KVCACHE_HANDLE = op_handle("pretrain_kernels::flash_attn_kvcache")


def _vmap_rule(op, cu_seqlens_q_at, q_at, alibi_at, dropout_p_at):
    def rule(info, in_dims, *args):
        n = info.batch_size
        # with dropout each sample runs alone: the keep mask is keyed by the sequence index, so a
        # folded batch would draw other masks than the per-sample calls vmap stands for
        dropout = len(args) > dropout_p_at and args[dropout_p_at] > 0  # trailing defaults may be left out
        if args[cu_seqlens_q_at] is None and not dropout:
            folded = list(args)
            q, dq = args[q_at], in_dims[q_at]
            batch = q.movedim(dq, 0).shape[1] if dq is not None else q.shape[0]
            for i, (x, d) in enumerate(zip(args, in_dims)):
                if isinstance(x, torch.Tensor):
                    x = x.movedim(d, 0) if d is not None else x.expand(n, *x.shape)
                    if i == alibi_at and x.dim() == 2:  # [heads] slopes: one row per sequence first
                        x = x[:, None].expand(n, batch, x.shape[1])
                    folded[i] = x.reshape(n * x.shape[1], *x.shape[2:])
            outs = tuple(o.reshape(n, o.shape[0] // n, *o.shape[1:]) for o in op(*folded))
        else:
            per_sample = [op(*[a.select(d, j) if d is not None else a for a, d in zip(args, in_dims)])
                          for j in range(n)]
            outs = tuple(torch.stack(o) for o in zip(*per_sample))
        return outs, (0,) * len(outs)

    return rule


# argument positions: cu_seqlens_q, q, alibi_slopes, dropout_p
torch.library.register_vmap("pretrain_kernels::flash_attn_fwd",
                            _vmap_rule(torch.ops.pretrain_kernels.flash_attn_fwd, 3, 0, 13, 15))
torch.library.register_vmap("pretrain_kernels::flash_attn_bwd",
                            _vmap_rule(torch.ops.pretrain_kernels.flash_attn_bwd, 7, 1, 17, 19))
register_autograd_function("pretrain_kernels::flash_attn_fwd", _FlashAttention, extra_args=(False,), public=_PUBLIC)
_attention_bwd = not_differentiable("pretrain_kernels::flash_attn_bwd", _PUBLIC)
