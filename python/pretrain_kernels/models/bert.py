"""BERT-style masked language model over packed variable-length sequences.

Sequences of different lengths are packed end to end into one (total_tokens,) stream with
int32 offsets cu_seqlens [batch + 1], as FlashAttention's varlen API: every token is real (no
padding waste) and pk.flash_attention(..., cu_seqlens_q=cu, cu_seqlens_k=cu) keeps each
sequence's attention inside the sequence. Positions are rotary (RoPE), restarting at 0 for
each sequence. The MLM head (dense, GELU, LayerNorm, decoder tied to the input embedding, bias)
is evaluated only at the positions that carry a label, which is all the loss needs.

Masking happens outside the model, with pk.mlm_mask / pk.MLMCollator on the padded batch;
pack() then drops the padding.

The same encoder trained as a masked diffusion LM (pk-train mdlm) generates text by iterative
unmasking (unmask()): start from mask tokens, run the encoder, let pk.unmask_step draw tokens
at the masked positions and reveal a scheduled number of them, repeat.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_kernels as pk

from .gpt import MLP, apply_rope, rope_tables


@dataclass
class BertConfig:
    vocab_size: int = 260
    max_len: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor):
    """Padded [B, L] ids with a 0/1 attention mask (real tokens first in each row) -> packed
    (ids [N], cu_seqlens int32 [B + 1], positions [N], max_seqlen, *others packed [N])."""
    keep = attention_mask.bool()
    lens = keep.sum(dim=1)
    cu = torch.zeros(input_ids.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = torch.cumsum(lens, 0)
    positions = (torch.cumsum(keep.long(), dim=1) - 1)[keep]
    max_seqlen = int(lens.max()) if lens.numel() else 0
    return (input_ids[keep], cu, positions, max_seqlen, *(o[keep] for o in others))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} must divide by n_head {cfg.n_head}")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        N, C = x.shape  # packed tokens
        H, D = self.n_head, self.head_dim
        qkv = self.qkv(x).view(N, 3, H, D)
        # query and key heads rotated in one call: [N, 2, H, D] viewed as [N, 2H, D]
        q, k = apply_rope(qkv[:, :2].reshape(N, 2 * H, D), cos, sin).view(N, 2, H, D).unbind(1)
        v = qkv[:, 2]
        y = pk.flash_attention(q, k, v.contiguous(), cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                               max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return self.proj(y.reshape(N, C))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, cfg.mlp_ratio)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.attn(self.ln1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.ln2(x))


class BertMLM(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # MLM head: transform, then the decoder tied to the embedding
        self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.head_ln = nn.LayerNorm(cfg.n_embd)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # -inf at the ids the head never predicts (never_predict()); not saved with the weights
        self.register_buffer("logit_mask", None, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, ids, cu_seqlens, positions, max_seqlen):
        """Packed ids [N] -> hidden states [N, n_embd]."""
        if max_seqlen > self.cfg.max_len:
            raise ValueError(f"max_seqlen: {max_seqlen} exceeds max_len {self.cfg.max_len}")
        cos, sin = rope_tables(positions, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_base)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens, max_seqlen)
        return self.ln_f(x)

    def never_predict(self, ids) -> "BertMLM":
        """The head gives these ids the logit -inf (probability 0) everywhere, in the logits and in
        the loss: MDLM's SUBS parametrisation, where the mask and the other special tokens are
        never the answer at a masked position, so no probability is spent on them (exact: it can
        only lower the loss of the targets, which are never these ids). Empty: off."""
        ids = torch.as_tensor(list(ids), dtype=torch.int64)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.cfg.vocab_size):
            raise ValueError(f"ids: expected token ids in [0, {self.cfg.vocab_size}), got {ids.tolist()}")
        if not ids.numel():
            self.logit_mask = None
            return self
        mask = torch.zeros(self.cfg.vocab_size, device=self.decoder_bias.device)
        mask[ids.to(mask.device)] = float("-inf")
        self.logit_mask = mask
        return self

    def _bias(self):
        return self.decoder_bias if self.logit_mask is None else self.decoder_bias + self.logit_mask

    def head_hidden(self, h):
        """The MLM head's transform (dense, GELU, LayerNorm): the input of the tied decoder."""
        return self.head_ln(F.gelu(self.head_dense(h)))

    def head(self, h):
        """Hidden states [..., n_embd] -> logits [..., vocab]."""
        return F.linear(self.head_hidden(h), self.embed.weight, self._bias())

    def loss(self, h, labels, reduction: str = "sum"):
        """Cross-entropy of the MLM head on encoder states h [..., n_embd] for labels [...]
        (-100 = no label), by pk.linear_cross_entropy: the [tokens, vocab] logits are never
        held. Pass only the labelled rows when most are unlabelled (the head's transform runs
        on every row given)."""
        return pk.linear_cross_entropy(self.head_hidden(h), self.embed.weight, labels, bias=self._bias(),
                                       ignore_index=-100, reduction=reduction)

    def forward(self, ids, cu_seqlens, positions, max_seqlen, labels=None, weights=None,
                return_logits: bool = True):
        """Packed inputs (see pack()). Without labels: logits [N, vocab] at every token. With
        labels [N] (-100 = no label): (logits at the labelled tokens [M, vocab], labels [M],
        summed cross-entropy over them), each token's term times weights [N] when given (the
        1/t of a masked diffusion LM); return_logits=False (training): (None, labels [M], the
        summed loss) from the fused head (self.loss), without the logits."""
        h = self.encode(ids, cu_seqlens, positions, max_seqlen)
        if labels is None:
            return self.head(h)
        sel = labels != -100
        y = labels[sel]
        if not return_logits:
            if weights is None:
                return None, y, self.loss(h[sel], y, reduction="sum")
            return None, y, (self.loss(h[sel], y, reduction="none") * weights[sel].float()).sum()
        logits = self.head(h[sel])
        if weights is None:
            return logits, y, F.cross_entropy(logits.float(), y, reduction="sum")
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        return logits, y, (ce * weights[sel].float()).sum()

    @torch.no_grad()
    def unmask(self, tokens: torch.Tensor, *, mask_token_id: int, steps: int, attention_mask=None,
               strategy: str = "confidence", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
               presence_penalty=0.0, frequency_penalty=0.0, seed=0, banned_ids=()) -> torch.Tensor:
        """Masked-diffusion sampling (MDLM; LLaDA's low-confidence remasking by default).

        tokens [B, L]: the positions holding mask_token_id are filled, the others kept (a
        prompt, the text around an infill); attention_mask [B, L] (1 = real token, real tokens
        first) for rows of different lengths. Step s of `steps` goes from t = 1 - s/steps to
        t = 1 - (s+1)/steps: the encoder reads the whole sequence and pk.unmask_step draws a
        token at every masked position (the knobs of pk.sample, penalties counting the row's
        tokens that are already there) and reveals, per row, as many as take its masked count
        M from floor(M (steps - s) / steps) to floor(M (steps - s - 1) / steps): the count
        falls linearly in t, as the forward process masks at rate t, and the last step reveals
        the rest. strategy "confidence" reveals the most probable draws first, "random" a
        uniformly random subset. seed: an int (row i uses seed + i) or per-row seeds; step s
        of row i draws with a seed derived from (its seed, s), so a row does not depend on the
        others. banned_ids: ids never drawn (the special tokens). Returns the filled tokens."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected a [batch, length] tensor, got shape {tuple(tokens.shape)}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        device = self.embed.weight.device
        B, L = tokens.shape
        if L > self.cfg.max_len:
            raise ValueError(f"tokens: length {L} exceeds max_len {self.cfg.max_len}")
        x = tokens.to(device=device, dtype=torch.int64).clone()
        if isinstance(seed, int):
            row_seeds = torch.arange(B, dtype=torch.int64) + seed
        else:
            row_seeds = torch.as_tensor(seed, dtype=torch.int64).reshape(-1)
            if row_seeds.numel() != B:
                raise ValueError(f"seed: expected an int or {B} per-row seeds, got {row_seeds.numel()}")
        row_seeds = row_seeds.to(device)
        if attention_mask is None:
            keep = torch.ones(B, L, dtype=torch.bool, device=device)
        else:
            keep = attention_mask.to(device).bool()
        lens = keep.sum(1)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        positions = (torch.cumsum(keep.long(), 1) - 1)[keep]
        max_len = int(lens.max()) if B else 0
        banned = torch.as_tensor(list(banned_ids), dtype=torch.int64, device=device)
        n_masked = ((x == mask_token_id) & keep).sum(1)                      # M per row
        logits = torch.zeros(B, L, self.cfg.vocab_size, device=device)
        for s in range(steps):
            before = torch.div(n_masked * (steps - s), steps, rounding_mode="floor")
            after = torch.div(n_masked * (steps - s - 1), steps, rounding_mode="floor")
            logits[keep] = self(x[keep], cu, positions, max_len).float()
            if banned.numel():
                logits[..., banned] = float("-inf")
            step_seeds = (row_seeds * 1_000_003 + s * 7919 + 1) & 0x7FFFFFFFFFFFFFFF
            x = pk.unmask_step(logits, x, mask_token_id=mask_token_id, num_reveal=before - after, strategy=strategy,
                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty,
                               prev_tokens=x.masked_fill((x == mask_token_id) | ~keep, -1),
                               seed=step_seeds if B > 1 else int(step_seeds[0]))
        return x
