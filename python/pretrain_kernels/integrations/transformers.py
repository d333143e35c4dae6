"""transformers adapter: the flash kernels as an attention implementation of transformers' models.

    import pretrain_kernels.integrations.transformers as pk_transformers
    model = AutoModelForCausalLM.from_config(config, attn_implementation=pk_transformers.register())

register() adds the name "pretrain_kernels" to transformers' AttentionInterface (the attention
function every model built on it calls) and AttentionMaskInterface (the function that turns the
2-D padding mask into what that attention function receives). Both are needed: a name known to
AttentionInterface alone gets no mask at all from transformers' masking_utils, so padding would
be silently ignored.

The mask function (`attention_mask`) returns, like FlashAttention 2's:
  * None when the pattern is plain (causal, sliding-window causal, bidirectional, or the
    bidirectional sliding window) and no token is padding: the attention then runs
    pk.flash_attention on the whole batch with causal / window from the module;
  * the 2-D bool padding mask (batch, kv_length), True = real token, when the pattern is plain
    and some tokens are padding: the attention runs the varlen kernel (cu_seqlens from the mask,
    as flash_attn_varlen_func). Where each row's real tokens are one block (left or right
    padding) and the queries are the keys, the padded batch itself is the varlen input, cut
    where the padding starts and stops (padding rows attend only among themselves, no real
    token sees them); otherwise the real tokens are gathered and scattered back. Padded query
    rows give 0 either way. With one query per row (decoding with the cache), where gathering the cached
    keys would cost more than the attention, the padding is applied as a (batch, 1, 1, keys)
    mask inside the kernel (pk.scaled_dot_product_attention) instead;
  * packed sequences (padding-free batches, as transformers' DataCollatorWithFlattening makes
    them: several sequences in one row, found from position_ids restarting) under a plain
    pattern: the sequence boundaries as int32 cu_seqlens over the flattened (batch * length)
    tokens, a 1-D tensor; the attention then runs the varlen kernel on them, so the sequences
    neither see each other nor cost a dense mask;
  * otherwise (or/and mask functions, chunked attention, a static cache whose queries are not
    the last keys, a window over padding holes) transformers' own dense 4-D bool mask, which
    the attention applies through pk.scaled_dot_product_attention.
A 4-D mask the caller built is passed through as transformers does.

The attention function takes transformers' arguments: scaling, dropout (the module passes its
attention dropout when training), is_causal (default module.is_causal), sliding_window (query i
sees the keys i - sliding_window + 1 .. i, transformers' convention), softcap. Dropout runs in
the kernels (dropout_p, seeded from torch's generator, so torch.manual_seed makes a run
reproducible). Attention sinks (s_aux) and output_attentions are not supported.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..ops.attention import flash_attention, scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward", "attention_mask"]

NAME = "pretrain_kernels"



def register() -> str:
    """Register the attention with transformers (idempotent); returns its name, "pretrain_kernels",
    for `attn_implementation=` (from_pretrained, from_config, model.set_attn_implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


# ---- mask ----------------------------------------------------------------------------------


def _plain_pattern(mask_function) -> str | None:
    """The pattern of one of transformers' plain mask functions: "causal", "bidirectional",
    "sliding_causal", "sliding_bidirectional", or None for anything else (packed sequences,
    chunks, user overlays), which then gets a dense mask."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    # sliding_window_{causal,bidirectional}_mask_function: and_masks(<sliding overlay>, <base>)
    if getattr(mask_function, "__qualname__", "").startswith("and_masks.") and mask_function.__closure__:
        parts = next((c.cell_contents for c in mask_function.__closure__ if isinstance(c.cell_contents, tuple)), ())
        if len(parts) == 2:
            overlay = getattr(parts[0], "__qualname__", "")
            if overlay.startswith("sliding_window_overlay.") and parts[1] is mu.causal_mask_function:
                return "sliding_causal"
            if overlay.startswith("sliding_window_bidirectional_overlay.") and \
                    parts[1] is mu.bidirectional_mask_function:
                return "sliding_bidirectional"
    return None


def _closure(fn) -> dict:
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def _packed_pattern(mask_function):
    """(pattern, packed_sequence_mask) when mask_function is transformers' packed-sequence form of
    a plain pattern: and_masks(remap_positions_for_packed_sequence(<plain>, position_ids),
    packed_sequence_mask_function(<sequence index per token>)); else None."""
    if not getattr(mask_function, "__qualname__", "").startswith("and_masks.") or not mask_function.__closure__:
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    remap, packed = (getattr(f, "__qualname__", "") for f in parts)
    if not (remap.startswith("remap_positions_for_packed_sequence.")
            and packed.startswith("packed_sequence_mask_function.")):
        return None
    pattern = _plain_pattern(_closure(parts[0]).get("mask_function"))
    seq = _closure(parts[1]).get("packed_sequence_mask")
    if pattern is None or not isinstance(seq, torch.Tensor) or seq.dim() != 2:
        return None
    return pattern, seq


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask interface for "pretrain_kernels": None, the 2-D padding mask or a 4-D
    bool mask (see the module docstring)."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    pattern = _plain_pattern(mask_function)
    packed = _packed_pattern(mask_function) if pattern is None else None
    if packed is not None and attention_mask is None and isinstance(q_offset, int) and q_offset == 0 \
            and isinstance(kv_offset, int) and kv_offset == 0 and q_length == kv_length \
            and tuple(packed[1].shape) == (batch_size, q_length):
        seq = packed[1]
        starts = torch.ones_like(seq, dtype=torch.bool)
        starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
        return F.pad(starts.reshape(-1).nonzero().squeeze(1).to(torch.int32), (0, 1), value=seq.numel())
    offsets_are_ints = isinstance(q_offset, int) and isinstance(kv_offset, int)
    plain = pattern is not None and offsets_are_ints
    if plain and pattern.endswith("causal"):
        plain = q_offset + q_length == kv_offset + kv_length  # the queries are the last keys (bottom-right)
    if plain:
        if attention_mask is None:
            return None
        pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if bool(pad.all()):
            return None
        if pattern.startswith("sliding"):
            # a window counts keys by position: unpadding keeps the distances only where the real
            # tokens of each row are one contiguous block (left or right padding)
            starts = pad & ~F.pad(pad, (1, 0))[:, :-1]
            plain = bool((starts.sum(1) <= 1).all())
        if plain:
            return pad.to(torch.bool)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                        use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))


# ---- attention -----------------------------------------------------------------------------


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    if causal:  # transformers: kv_idx > q_idx - sliding_window
        return (int(sliding_window) - 1, 0)
    return (int(sliding_window), int(sliding_window))  # |q_idx - kv_idx| <= sliding_window


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, L, head_dim), key/value
    (batch, kv_heads, S, head_dim) -> ((batch, L, heads, head_dim), None)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported by the pretrain_kernels attention")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("position_bias: not supported by the pretrain_kernels attention")
    if kwargs.get("output_attentions", False):
        warnings.warn("pretrain_kernels attention does not return attention weights (output_attentions)",
                      stacklevel=2)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    B, H, L, D = query.shape
    S = key.shape[2]
    window = _window(sliding_window, causal)
    dropout = float(dropout or 0.0)
    if key.dtype != query.dtype:  # layers kept in float32 (PEFT) next to bf16 projections
        key, value = key.to(query.dtype), value.to(query.dtype)
    extra = {}
    if dropout > 0:
        extra["dropout_p"] = dropout
    if softcap is not None:
        extra["softcap"] = softcap

    if attention_mask is not None and attention_mask.dim() == 4:
        # dense mask (already holds causality and windows): the SDPA drop-in applies it tile by tile
        if softcap is not None:
            raise NotImplementedError("softcap: not supported with a dense attention mask")
        mask = attention_mask[..., :S]
        out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                           enable_gqa=key.shape[1] != H)
        return out.transpose(1, 2), None

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L|S, heads, D)
    if attention_mask is None:
        return flash_attention(q, k, v, causal=causal, scale=scaling, window=window, **extra), None

    if attention_mask.dim() == 1 and attention_mask.dtype == torch.int32 and L == S:
        # packed sequences: cu_seqlens over the flattened tokens (attention_mask above)
        cu = attention_mask
        out = flash_attention(q.reshape(B * S, H, D), k.reshape(B * S, k.shape[2], D),
                              v.reshape(B * S, v.shape[2], v.shape[3]), causal=causal, scale=scaling, window=window,
                              cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S, **extra)
        return out.view(B, S, H, out.shape[-1]), None

    if attention_mask.dim() != 2 or attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask: expected a 2-D padding mask of shape {(B, S)} or a 4-D mask, got "
                         f"{tuple(attention_mask.shape)}")
    pad_k = attention_mask.to(torch.bool)
    if L == 1 and softcap is None and dropout == 0:
        # one query per row (decoding): the padding as a (B, 1, 1, S) mask, applied inside the kernel,
        # costs less than gathering the cache's real keys on every step; the query is the last
        # key's position, so causality holds already and only a left window remains
        vis = pad_k[:, None, None, :]
        if window[0] >= 0:
            vis = vis & (torch.arange(S, device=pad_k.device) >= S - 1 - window[0])
        out = scaled_dot_product_attention(query, key, value, attn_mask=vis, scale=scaling,
                                           enable_gqa=key.shape[1] != H)
        return out.transpose(1, 2), None

    if L == S:
        # each row's real tokens one block (left or right padding): the padded batch itself is
        # the varlen input, cut into segments where the padding starts and stops, so nothing is
        # gathered or scattered; padding segments attend among themselves, no real token sees
        # them, and their rows are set to 0 afterwards
        starts = pad_k & ~F.pad(pad_k, (1, 0))[:, :-1]
        if bool((starts.sum(1) <= 1).all()):
            change = torch.ones_like(pad_k)
            change[:, 1:] = pad_k[:, 1:] != pad_k[:, :-1]
            cu = F.pad(change.reshape(-1).nonzero().squeeze(1).to(torch.int32), (0, 1), value=B * S)
            out = flash_attention(q.reshape(B * S, H, D), k.reshape(B * S, k.shape[2], D),
                                  v.reshape(B * S, v.shape[2], v.shape[3]), causal=causal, scale=scaling,
                                  window=window, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S,
                                  **extra)
            return out.view(B, S, H, out.shape[-1]).masked_fill(~pad_k[:, :, None, None], 0.0), None

    # padding anywhere: gather the real tokens, varlen kernel, scatter back (padded query rows
    # give 0); the queries are the last L positions of the keys
    pad_q = pad_k[:, S - L:]
    bk, sk = pad_k.nonzero(as_tuple=True)
    bq, sq = pad_q.nonzero(as_tuple=True)
    cu_k = F.pad(pad_k.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(pad_q.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attention(q[bq, sq], k[bk, sk], v[bk, sk], causal=causal, scale=scaling, window=window,
                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=L, max_seqlen_k=S, **extra)
    full = out.new_zeros(B, L, H, out.shape[-1]).index_put((bq, sq), out)
    return full, None
