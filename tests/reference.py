"""Plain-PyTorch references the kernels are tested against (float64 where it matters).

One section per op family; each function is written for clarity, not speed."""
from __future__ import annotations

import torch

# ---- masking -------------------------------------------------------------------------------


def mlm_eligible(input_ids, vocab_size, special_ids=(), attention_mask=None):
    """Positions the masking ops may select: attended, inside the vocab, not special."""
    elig = (input_ids >= 0) & (input_ids < vocab_size)
    for s in special_ids:
        elig &= input_ids != s
    if attention_mask is not None:
        elig &= attention_mask.bool()
    return elig


def philox4x32_10(ctr, key):
    """Philox4x32-10 in Python integers (Salmon et al. 2011), for cross-checking the C++."""
    M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
    return c0, c1, c2, c3


def mlm_selection_reference(input_ids, seed, mask_prob, vocab_size, special_ids=(), attention_mask=None):
    """Which tokens the Bernoulli mlm_mask selects for a given seed, from the documented key
    layout: selection word of (row, pos) = word pos % 4 of the Philox block with counter
    (pos // 4, row, 0x4d4c4d00, 0) and key = seed; selected when its float < mask_prob."""
    B, L = input_ids.shape
    elig = mlm_eligible(input_ids, vocab_size, special_ids, attention_mask)
    seed &= (1 << 64) - 1
    key = (seed & 0xFFFFFFFF, seed >> 32)
    sel = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for pos in range(L):
            if not elig[b, pos]:
                continue
            w0 = philox4x32_10((pos // 4, b, 0x4D4C4D00, 0), key)[pos % 4]
            sel[b, pos] = (w0 >> 8) * 2.0**-24 < torch.tensor(mask_prob, dtype=torch.float32).item()
    return sel


# ---- attention -----------------------------------------------------------------------------


def attention_visible(sq, sk, *, causal=False, window=(-1, -1), bottom_right=True, device=None):
    """Bool (sq, sk): query i sees key j (FlashAttention's causal/window semantics)."""
    left, right = window
    if causal:
        right = 0
    offset = sk - sq if bottom_right else 0
    i = torch.arange(sq, device=device)[:, None] + offset
    j = torch.arange(sk, device=device)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def attention_ref(q, k, v, *, causal=False, scale=None, window=(-1, -1), bottom_right=True, attn_mask=None):
    """Plain attention in float64, layout (batch, seqlen, heads, head_dim); k/v may have fewer
    heads (GQA). attn_mask: bool (True = attend) or float (added), broadcastable to
    (batch, heads, sq, sk). Returns (out (B, Sq, H, Dv), lse (B, H, Sq)), float64; rows that see
    no key give 0 and lse -inf."""
    q, k, v = (t.detach().to(torch.float64) if not t.requires_grad else t.to(torch.float64) for t in (q, k, v))
    B, sq, H, D = q.shape
    sk, Hk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    s = qh @ kh.transpose(-1, -2) * scale
    vis = attention_visible(sq, sk, causal=causal, window=window, bottom_right=bottom_right, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(torch.float64)
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)  # rows that see no key
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(dead[..., 0], float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    return (p @ vh).transpose(1, 2), lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
    """attention_ref per sequence of packed (tokens, heads, head_dim) inputs; returns
    (out (total_q, H, Dv), lse (H, total_q))."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, l = attention_ref(q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None], **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
