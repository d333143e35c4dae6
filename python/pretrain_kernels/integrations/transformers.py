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

from ..ops.attention import _NO_WINDOW, flash_attention, scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward", "attention_mask", "apply_kernels"]

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
        return _NO_WINDOW
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


# ---- the package's kernels patched into a model instance -------------------------------------------
#
# apply_kernels(model) swaps, on the modules of one model instance (never on transformers'
# classes, so other models in the process are untouched), the eager composites of a Llama-style
# decoder for the package's fused ops, as Liger-Kernel's apply_liger_kernel_to_* do. Each patch
# is an instance attribute `forward` (nn.Module.__call__ finds it before the class's; a
# _PatchedForward with the class forward's signature), so deleting it restores transformers'
# code. A module is patched
# only when its class is one of the known ones below; everything else is left alone.

# RMSNorm classes and their rounding convention: Llama's rounds the normalised value to the
# input dtype before the weight multiply; Gemma's computes (1 + w) * n in float32, rounds once.
_RMS_NORM_LLAMA = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_RMS_NORM_GEMMA = ("GemmaRMSNorm",)
_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP")
# attention classes -> where their forward reads the sliding window: "none" (not passed),
# "config" (config.sliding_window, Mistral), "module" (module.sliding_window, Qwen2/3)
_ATTENTION = {"LlamaAttention": "none", "MistralAttention": "config", "Qwen2Attention": "module",
              "Qwen3Attention": "module", "GemmaAttention": "none"}
_CAUSAL_LM = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM")


def apply_kernels(model: torch.nn.Module, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True,
                  cross_entropy: bool = True) -> torch.nn.Module:
    """Patch a transformers model instance so that its decoder runs on the package's fused kernels.

        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
        apply_kernels(model)

    On the modules of `model` (Llama, Mistral, Qwen2, Qwen3; Gemma's norms and rotary):
      * rms_norm: every LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm runs
        pk.rms_norm with transformers' rounding (the normalised value cast to the input dtype,
        then times the weight); GemmaRMSNorm runs it with offset=1.0 and one rounding at the end,
        as Gemma's own. A Llama-style norm whose weight dtype differs from its input's (where
        transformers would promote the output) keeps transformers' forward for that call.
      * swiglu: the MLP's act_fn(gate_proj(x)) * up_proj(x) becomes pk.swiglu when the act is
        silu (config.hidden_act "silu"/"swish"); other activations (Gemma's gelu) are left alone.
      * rope: the attention modules rotate the query and key heads with pk.rotary_embedding in
        the projections' [batch, seqlen, heads, head_dim] layout, from transformers' own cos/sin
        (rotate-half layout: the first half of each cos/sin row is the table; per token when
        position_ids differ by row). Partial rotary (cos narrower than head_dim) falls back to
        transformers' apply_rotary_pos_emb. The rest of the attention forward (cache, the
        attention implementation, sliding window) is transformers' code, copied.
      * cross_entropy: the causal-LM forward computes the loss with pk.linear_cross_entropy
        from the final hidden states when labels are given, without the [tokens, vocab] logits:
        same shift (labels padded with ignore_index and shifted left, or shift_labels),
        ignore_index (-100 unless passed) and num_items_in_batch (sum / num_items) as
        transformers' ForCausalLMLoss. Then logits are None unless the call passes
        return_logits=True. Without labels (generate, evaluation), with logits_to_keep, or with
        a loss other than ForCausalLMLoss (loss_type, loss_function) the forward is
        transformers'.
    Modules of other classes (and the options passed as False) are left alone. Calling it again
    is harmless (patched modules are skipped; a later call can add what an earlier one left
    out). Returns the model.
    """
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name in _RMS_NORM_LLAMA + _RMS_NORM_GEMMA and not hasattr(module, "_pk_kernel"):
            if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
                module.forward = _PatchedForward(module, _rms_norm_forward)
                module._pk_kernel = "rms_norm"
        elif swiglu and name in _MLP and not hasattr(module, "_pk_kernel"):
            if _is_silu(module):
                module.forward = _PatchedForward(module, _swiglu_mlp_forward)
                module._pk_kernel = "swiglu"
        elif rope and name in _ATTENTION and not hasattr(module, "_pk_kernel"):
            if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                module.forward = _PatchedForward(module, _rope_attention_forward)
                module._pk_kernel = "rope"
    if cross_entropy and type(model).__name__ in _CAUSAL_LM and not hasattr(model, "_pk_kernel"):
        head = getattr(model, "lm_head", None)
        if isinstance(head, torch.nn.Linear) and hasattr(model, "model") and \
                getattr(model.config, "final_logit_softcapping", None) is None:
            model.forward = _PatchedForward(model, _causal_lm_forward, extra=("return_logits",))
            model._pk_kernel = "cross_entropy"
    return model


class _PatchedForward:
    """A module's patched forward: fn(module, *args, **kwargs), with the signature of the
    module class's own forward (plus the keyword-only `extra` arguments), since transformers
    reads it (generate asks whether forward takes attention_mask, position_ids,
    logits_to_keep). A plain object, so that deepcopy binds the copy to the copied module and
    the model still pickles."""

    def __init__(self, module, fn, extra=()):
        self.module, self.fn, self.extra = module, fn, tuple(extra)

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        params = list(inspect.signature(type(self.module).forward).parameters.values())[1:]
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params[at:at] = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in self.extra]
        return inspect.Signature(params)

    def positional_names(self):
        import inspect

        return [p.name for p in list(inspect.signature(type(self.module).forward).parameters.values())[1:]
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _is_silu(mlp) -> bool:
    from torch import nn

    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    act = mlp.act_fn
    if isinstance(act, nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - older transformers
        return False
    return type(act) is SiLUActivation


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from ..ops.layers import rms_norm as pk_rms_norm

    if type(self).__name__ in _RMS_NORM_GEMMA:
        w = self.weight
        if w.dtype not in (hidden_states.dtype, torch.float32):
            w = w.float()
        return pk_rms_norm(hidden_states, w, self.eps, offset=1.0, round_before_weight=False)
    if self.weight.dtype != hidden_states.dtype:
        return type(self).forward(self, hidden_states)  # transformers promotes the output dtype here
    return pk_rms_norm(hidden_states, self.weight, self.variance_epsilon, round_before_weight=True)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from ..ops.layers import swiglu as pk_swiglu

    return self.down_proj(pk_swiglu(self.gate_proj(x), self.up_proj(x)))


def _rope_tables(cos: torch.Tensor, batch: int):
    """transformers' rotate-half cos (or sin) [B or 1, T, D] -> pk.rotary_embedding's table:
    [T, D / 2] shared by the batch, or per token [B, T, D / 2]."""
    half = cos[..., : cos.shape[-1] // 2]
    if half.dim() == 3 and half.shape[0] == 1:
        half = half[0]
    elif half.dim() == 3 and half.shape[0] != batch:
        half = half.expand(batch, *half.shape[1:])
    # once in the kernels' table dtype, for both the query and the key call
    return half.to(torch.float64 if cos.dtype == torch.float64 else torch.float32).contiguous()


def _rope_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                            cache=None, **kwargs):
    """transformers' Llama-family attention forward with the rotary embedding through
    pk.rotary_embedding, in the projections' [batch, seqlen, heads, head_dim] layout."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..ops.rotary import rotary_embedding

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    else:
        kwargs.pop("past_key_values", None)
    modeling = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(hidden_shape)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    if cos.shape[-1] == self.head_dim and q.dim() == 4:
        cos_t, sin_t = _rope_tables(cos, q.shape[0]), _rope_tables(sin, q.shape[0])
        query_states = rotary_embedding(q, cos_t, sin_t).transpose(1, 2)
        key_states = rotary_embedding(k, cos_t, sin_t).transpose(1, 2)
    else:  # partial rotary or another layout: transformers' own function
        query_states, key_states = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                modeling.eager_attention_forward)
    window = _ATTENTION[type(self).__name__]
    if window == "config":
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif window == "module":
        kwargs["sliding_window"] = self.sliding_window
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _default_loss(model) -> bool:
    """Whether the model's loss is transformers' ForCausalLMLoss (the one the fused loss
    replaces); a custom loss_function or loss_type keeps transformers' forward."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - older transformers
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss


def _causal_lm_forward(self, *args, **kwargs):
    """transformers' causal-LM forward; with labels, the loss through pk.linear_cross_entropy
    from the hidden states (no logits unless return_logits=True)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..ops.loss import linear_cross_entropy

    original = type(self).forward
    return_logits = kwargs.pop("return_logits", None)
    names = self.forward.positional_names() if isinstance(self.forward, _PatchedForward) else []
    if len(args) > len(names):
        return original(self, *args, **kwargs)
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward: got multiple values for argument '{name}'")
        kwargs[name] = value
    labels = kwargs.pop("labels", None)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    if labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0) or not _default_loss(self):
        return original(self, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.get("num_items_in_batch")
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(h.device)
    if num_items_in_batch is not None:
        loss = linear_cross_entropy(h, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                    ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    else:
        loss = linear_cross_entropy(h, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                    ignore_index=ignore_index, reduction="mean")
    logits = self.lm_head(hidden) if return_logits else None
    out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions)
    if return_dict is False:
        return out.to_tuple()
    return out
