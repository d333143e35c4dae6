"""GPT: a decoder-only transformer trained on next-token prediction.

Read top to bottom: rotary position embedding, causal self-attention (pk.flash_attention
for training and prefill-free forward passes, pk.flash_attention_with_kvcache for cached
decoding), the MLP (GPT-2's tanh GELU, pk.gelu), the RMS norm (pk.rms_norm), the block, the
model, and generate().

Layout follows the attention kernels: activations (batch, seqlen, heads, head_dim), so q, k
and v are views of one projection and never transposed. Keys and values may have fewer heads
than queries (grouped-query attention, n_kv_head). Positions are rotary (RoPE), computed from
an explicit position tensor, so a cached decode step at position cache_seqlens[b] rotates its
query and key exactly as the full forward pass does.

generate() decodes a batch of prompts of different lengths at once: the prompts are right
padded and prefilled into the KV cache in one call (causal attention makes the padding after a
prompt invisible to it), each row's cache length is then set to its own prompt length, and
every following step writes one key/value per row at that row's position. Tokens are drawn by
pk.sample with per-row seeds, so a row's continuation does not depend on the other rows.

Prefix-LM (UL2, GLM; the hybrid task): forward(..., prefix_lens=int32 [B]) lets every query of
row b also see the keys below prefix_lens[b] (pk.flash_attention's prefix-LM mask), so that
prefix attends both ways and causal order holds after it; generate(..., prefix_lens=[...])
prefills each prompt that way (its keys and values go into the cache as computed) and then
decodes causally after it. Without prefix_lens the model is the plain causal GPT.
generate(..., positions=[...]) takes the rotary positions of the prompts and of the tokens to
come (the hybrid's span positions, GLM-style: a hole's tokens at its mask's position).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_kernels as pk


@dataclass
class GPTConfig:
    vocab_size: int = 260
    block_size: int = 256      # longest sequence (training windows, prompt + generated)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4         # < n_head: grouped-query attention
    n_embd: int = 256
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- rotary position embedding ----------------------------------------------------------------


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for integer positions [...]: shaped [..., 1, head_dim / 2] (a heads axis to broadcast)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.to(torch.float32)[..., None] * inv_freq  # [..., head_dim / 2]
    return ang.cos()[..., None, :], ang.sin()[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, heads, head_dim] (or packed [N, heads, head_dim])
    by the angles in cos/sin (rope_tables' [T | B, T | N, 1, head_dim / 2]): one fused
    pk.rotary_embedding, in float32, the result in x's dtype."""
    cos, sin = cos.squeeze(-2), sin.squeeze(-2)
    if cos.dim() == 3 and cos.shape[0] == 1 and x.dim() == 4 and x.shape[0] != 1:  # positions [1, T]
        cos, sin = cos[0], sin[0]
    return pk.rotary_embedding(x, cos, sin, interleaved=True)


# ---- layers ----------------------------------------------------------------------------------


class KVCache:
    """Per-layer key/value caches (batch, max_len, kv_heads, head_dim) and the int32 lengths."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        hd = cfg.n_embd // cfg.n_head
        shape = (batch, max_len, cfg.n_kv_head, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.seqlens = torch.zeros(batch, device=device, dtype=torch.int32)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_embd {cfg.n_embd} must divide by n_head {cfg.n_head}, and n_head by "
                             f"n_kv_head {cfg.n_kv_head}")
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def attend(self, q, k, v):
        """Causal attention over (B, T, heads, head_dim); a method, so a subclass or an instance can
        replace it."""
        return pk.flash_attention(q, k, v, causal=True)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, prefix_lens=None):
        B, T, C = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.qkv(x).view(B, T, H + 2 * Hk, D).split([H + Hk, Hk], dim=2)
        q, k = apply_rope(qk, cos, sin).split([H, Hk], dim=2)  # query and key heads rotated in one call
        if prefix_lens is not None:  # prefix-LM; with a cache, the prefill of an empty cache
            y = pk.flash_attention(q, k, v, causal=True, prefix_lens=prefix_lens)
            if cache is not None:
                cache.k[layer][:, :T] = k.to(cache.k[layer].dtype)
                cache.v[layer][:, :T] = v.to(cache.v[layer].dtype)
        elif cache is None:
            y = self.attend(q, k, v)
        else:  # writes k, v at cache.seqlens[b] and attends to everything before, causally
            kc, vc = cache.k[layer], cache.v[layer]
            y = pk.flash_attention_with_kvcache(q, kc, vc, cache.seqlens, k_new=k.to(kc.dtype),
                                                v_new=v.to(vc.dtype), causal=True)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.out(pk.gelu(self.fc(x), approximate="tanh"))  # F.gelu(..., approximate="tanh"), fused


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters, state dict and eps rule) computed by pk.rms_norm: one fused
    pass forward and one backward per row instead of eager torch's pow, mean, rsqrt and muls."""

    def forward(self, x):
        eps = self.eps
        if eps is None:  # torch's rule: the epsilon of the math type (float32 for half inputs)
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        return pk.rms_norm(x, self.weight, eps=eps)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = RMSNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, cfg.mlp_ratio)

    def forward(self, x, cos, sin, cache=None, layer=0, prefix_lens=None):
        x = x + self.attn(self.ln1(x), cos, sin, cache, layer, prefix_lens)
        return x + self.mlp(self.ln2(x))


# ---- the model -------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for b in self.blocks:  # GPT-2: residual projections scaled by depth
            nn.init.normal_(b.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(b.mlp.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, positions=None,
                cache: KVCache | None = None, prefix_lens: torch.Tensor | None = None,
                return_logits: bool = True):
        """idx [B, T] -> logits [B, T, vocab]; with targets [B, T] (-100 = ignore) also the
        mean cross-entropy. positions [B, T] or [T] default to 0..T-1. prefix_lens: int32 [B],
        the prefix-LM mask (row b's first prefix_lens[b] tokens attend to each other both ways);
        with a cache only for the prefill of an empty one (cache.seqlens all 0).
        return_logits=False (training, with targets): (None, loss) from the fused LM head
        (self.loss), without the [B, T, vocab] logits."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        if T > self.cfg.block_size and cache is None:
            raise ValueError(f"idx: sequence length {T} exceeds block_size {self.cfg.block_size}")
        cos, sin = rope_tables(positions, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_base)
        x = self.wte(idx)
        if prefix_lens is not None:
            prefix_lens = prefix_lens.to(device=idx.device, dtype=torch.int32)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, prefix_lens)
        h = self.ln_f(x)
        if targets is not None and not return_logits:
            return None, self.loss(h, targets)
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the LM head on final hidden states h [..., n_embd] (after ln_f) for
        targets [...] (-100 = ignore), by pk.linear_cross_entropy: the logits are never held."""
        return pk.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-100, reduction=reduction)

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=0,
                 stop_tokens=(), use_cache: bool = True, keep_stop_token: bool = False,
                 prefix_lens=None, suppress_tokens=(), positions=None) -> list[list[int]]:
        """Continue each prompt (a list of token-id lists, lengths may differ) by up to
        max_new_tokens tokens. Sampling knobs are those of pk.sample (numbers, or per-row
        tensors [B]); penalties count the prompt and the generated tokens. seed: an int (row i
        uses seed + i) or a list/tensor of per-row seeds; step s of row i draws with a seed
        derived from (its seed, s). A row stops after emitting any of stop_tokens (not returned
        unless keep_stop_token: a BPE token may carry text before its stop character).
        use_cache=False recomputes the whole prefix every step (same tokens, slower).
        prefix_lens: per-row ints (a list or tensor), the first prefix_lens[i] tokens of prompt i
        attend to each other both ways (the prefix-LM mask, as the hybrid task trains its
        infilling prefix); the rest of the prompt and the new tokens follow causally.
        suppress_tokens: ids never drawn (their logits set to -inf; transformers' name), e.g. the
        special tokens a model trained on infilling has learnt to emit.
        positions: per-row lists of rotary positions (numbers, e.g. the hybrid task's span
        positions) for the prompt and the tokens to come, each len(prompt) + max_new_tokens long
        (default: 0, 1, 2, ...).
        Returns the new tokens of each row."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: expected a non-empty list of non-empty token lists")
        device = self.wte.weight.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        P = int(lens.max())
        total = P + max_new_tokens
        if total > self.cfg.block_size:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds block_size "
                             f"{self.cfg.block_size}")
        if isinstance(seed, int):
            row_seeds = torch.arange(B, dtype=torch.int64) + seed
        else:
            row_seeds = torch.as_tensor(seed, dtype=torch.int64).reshape(-1)
            if row_seeds.numel() != B:
                raise ValueError(f"seed: expected an int or {B} per-row seeds, got {row_seeds.numel()}")
        stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.int64, device=device)
        banned = torch.tensor(sorted(set(int(t) for t in suppress_tokens)), dtype=torch.int64, device=device)
        # tokens: prompt + generated, right padded with -1 (which pk.sample's penalties ignore)
        tokens = torch.full((B, total), -1, dtype=torch.int64, device=device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.int64, device=device)
        cur = lens.clone()                       # current length of each row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = [[] for _ in range(B)]
        rows = torch.arange(B, device=device)

        pos_all = None                           # [B, total] rotary positions, when not 0, 1, ...
        if positions is not None:
            want = [len(p) + max_new_tokens for p in prompts]
            if len(positions) != B or [len(q) for q in positions] != want:
                raise ValueError(f"positions: expected one list per prompt, len(prompt) + max_new_tokens long "
                                 f"({want}), got {[len(q) for q in positions]}")
            pos_all = torch.empty((B, total), dtype=torch.float32)
            for i, q in enumerate(positions):
                q = torch.as_tensor(q, dtype=torch.float32)
                pos_all[i, :q.numel()] = q
                pos_all[i, q.numel():] = q[-1] + 1 + torch.arange(total - q.numel())   # never read
            pos_all = pos_all.to(device)
        plen = None
        if prefix_lens is not None:
            plen = torch.as_tensor(prefix_lens, dtype=torch.int64).reshape(-1)
            if plen.numel() != B or bool((plen < 0).any()) or bool((plen > lens.cpu()).any()):
                raise ValueError(f"prefix_lens: expected {B} per-row lengths within the prompts' lengths "
                                 f"{lens.tolist()}, got {plen.tolist()}")
            plen = plen.to(device=device, dtype=torch.int32)
        cache = None
        if use_cache:
            dtype = self.wte.weight.dtype
            cache = KVCache(self.cfg, B, total, device, dtype)
            logits = self(tokens[:, :P].clamp_min(0), cache=cache, prefix_lens=plen,   # prefill (seqlens 0)
                          positions=None if pos_all is None else pos_all[:, :P])
            last = logits[rows, cur - 1]
            cache.seqlens.copy_(lens.to(torch.int32))
        for step in range(max_new_tokens):
            if not use_cache:
                T = int(cur.max())
                logits = self(tokens[:, :T].clamp_min(0), prefix_lens=plen,
                              positions=None if pos_all is None else pos_all[:, :T])
                last = logits[rows, cur - 1]
            # per-row, per-step seeds (a multiplicative hash keeps streams apart)
            step_seeds = (row_seeds * 1_000_003 + step * 7919 + 1) & 0x7FFFFFFFFFFFFFFF
            last = last.float()
            if banned.numel():
                last = last.index_fill(-1, banned, float("-inf"))
            nxt = pk.sample(last, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, prev_tokens=tokens[:, :int(cur.max())],
                            seed=step_seeds.to(device) if B > 1 else int(step_seeds[0]))
            hit_stop = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(done)
            take = ~done if keep_stop_token else ~done & ~hit_stop
            for i in torch.nonzero(take).flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= hit_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            tokens[rows, cur] = nxt
            if use_cache:
                logits = self(nxt[:, None], positions=(cur if pos_all is None else pos_all[rows, cur])[:, None],
                              cache=cache)
                cache.seqlens += 1
                last = logits[:, 0]
            cur += 1
        return out
