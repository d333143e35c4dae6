"""diffusers adapter: run the attention of diffusers' models on the flash kernels.

    from pretrain_kernels.integrations.diffusers import AttnProcessor, set_attn_processor
    unet.set_attn_processor(AttnProcessor())   # UNet2DConditionModel and the models that have the method
    set_attn_processor(model)                  # any model: UNet2DModel and DiTTransformer2DModel lack it

AttnProcessor is diffusers' AttnProcessor2_0 (the default processor of the `Attention` class
in diffusers.models.attention_processor) with the attention itself computed by
pk.flash_attention (no mask: the projections already have the kernel's layout (batch, seq,
heads, head_dim), nothing is transposed) or pk.scaled_dot_product_attention (with a mask,
applied tile by tile inside the kernel). Everything around it is AttnProcessor2_0's: spatial
norm (with temb), 4-D (batch, channels, height, width) inputs, attention_mask through
attn.prepare_attention_mask, group norm, cross-attention on encoder_hidden_states (with
norm_cross), the per-head q/k norms, the output projection and dropout, the residual
connection and rescale_output_factor. Two differences, both where AttnProcessor2_0 is wrong
or limited:
  * the softmax scale is attn.scale (AttnProcessor2_0 ignores it and always uses
    1/sqrt(head_dim), so diffusers falls back to the slow AttnProcessor when scale_qk=False;
    this processor serves both);
  * key/value with fewer heads than the query (Attention(kv_heads=...)) run as grouped-query
    attention.
Head dims above the kernels' limit (256; e.g. the single-head attention of a VAE's mid block)
run through torch's scaled_dot_product_attention, as the default processor does, unless
AttnProcessor(fallback=False), which raises instead. Like AttnProcessor2_0, the processor
ignores attn.is_causal and attention dropout (dropout_p is 0), and serves neither the added-KV
projections (AttnAddedKVProcessor's job) nor norms across heads ("layer_norm_across_heads").

Attention backends: diffusers 0.42 has a registry of attention functions
(diffusers.models.attention_dispatch), but not one open to other libraries: the registry
class is private (_AttentionBackendRegistry), its keys are members of the closed enum
AttentionBackendName, and every public entry point (attention_backend(),
ModelMixin.set_attention_backend(), dispatch_attention_fn) converts the name through that
enum, so a backend named "pretrain_kernels" cannot be selected without patching diffusers.
This module therefore registers no backend (there is no register()); the processor above is
the supported way in, and it serves the models built on the `Attention` class.

diffusers is imported only when set_attn_processor needs its Attention class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import MAX_HEAD_DIM, flash_attention, scaled_dot_product_attention
from .schedulers import _register_with_diffusers

__all__ = ["AttnProcessor", "set_attn_processor"]

_register_with_diffusers()  # if diffusers' pipelines are imported: our schedulers can be saved in pipelines


class AttnProcessor:
    """Attention processor for diffusers' `Attention` modules, computed by the flash kernels.

    fallback: head dims above 256 (the kernels' limit) go to torch's scaled_dot_product_attention
    when True (the default), raise a ValueError naming head_dim when False.
    """

    def __init__(self, fallback: bool = True):
        if not isinstance(fallback, bool):
            raise TypeError(f"fallback: expected a bool, got {type(fallback).__name__}")
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        # extra arguments (diffusers' deprecated `scale`) are ignored, as AttnProcessor2_0 does
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            # (B * heads, 1 or L, S) -> (B, heads, 1 or L, S), broadcast over the queries by the kernel
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = query.shape[-1] // heads
        kv_heads = key.shape[-1] // head_dim
        # (B, L, heads, head_dim): the flash kernels' layout, a view of the projections
        query = query.view(batch_size, -1, heads, head_dim)
        key = key.view(batch_size, -1, kv_heads, head_dim)
        value = value.view(batch_size, -1, kv_heads, head_dim)
        if attn.norm_q is not None:  # per-head norms over head_dim: the layout does not matter
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attention(query, key, value, attention_mask, attn.scale)
        hidden_states = hidden_states.reshape(batch_size, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attention(self, query, key, value, mask, scale):
        """softmax(q k^T scale + mask) v on (B, L, heads, head_dim) tensors; the same layout out."""
        head_dim = query.shape[-1]
        gqa = key.shape[2] != query.shape[2]
        if head_dim > MAX_HEAD_DIM:
            if not self.fallback:
                raise ValueError(f"head_dim: the flash kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim} "
                                 f"(AttnProcessor(fallback=True) runs these through torch's SDPA)")
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            if gqa:  # torch's enable_gqa is not on every backend: expand the key/value heads
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
        if mask is None:
            return flash_attention(query, key, value, scale=scale)
        out = scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)


def set_attn_processor(model: torch.nn.Module, processor: AttnProcessor | None = None) -> int:
    """Put `processor` (default: a new AttnProcessor) on every `Attention` module of `model` that
    runs one of diffusers' two default processors (AttnProcessor2_0, AttnProcessor), for the
    models that have no set_attn_processor method (UNet2DModel, DiTTransformer2DModel) or to
    leave other processors (added-KV, IP-Adapter, LoRA, custom ones) in place. Returns how
    many modules it changed."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if processor is None:
        processor = AttnProcessor()
    elif not callable(processor):
        raise TypeError(f"processor: expected an attention processor, got {type(processor).__name__}")
    from diffusers.models.attention_processor import Attention, AttnProcessor as _Default, AttnProcessor2_0

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, (AttnProcessor2_0, _Default)):
            module.set_processor(processor)
            changed += 1
    return changed
