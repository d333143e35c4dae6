"""Plain-PyTorch references the kernels are tested against (float64 where it matters).

One section per op family; each function is written for clarity, not speed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
# ---- sampling --------------------------------------------------------------------------------


def penalized_logits(logits, prev_tokens=None, repetition_penalty=1.0, presence_penalty=0.0,
                     frequency_penalty=0.0):
    """Penalties over prev_tokens [B, T] (-1 = none), float64: repetition as transformers'
    RepetitionPenaltyLogitsProcessor (each distinct id once; positive logits divided, negative
    multiplied), then minus frequency * count and presence * (count > 0) as vLLM. Each knob a
    number or a per-row tensor."""
    x = logits.double().clone()
    if prev_tokens is None:
        return x
    B, V = x.shape
    knobs = [torch.as_tensor(k, dtype=torch.float64).expand(B) for k in
             (repetition_penalty, presence_penalty, frequency_penalty)]
    for b in range(B):
        ids = prev_tokens[b].long()
        ids = ids[ids >= 0]
        if ids.numel() == 0:
            continue
        counts = torch.bincount(ids, minlength=V).double()
        seen = counts > 0
        rep, pres, freq = (float(k[b]) for k in knobs)
        row = x[b]
        pen = torch.where(row > 0, row / rep, row * rep)
        row = torch.where(seen, pen, row)
        x[b] = row - freq * counts - pres * seen.double()
    return x


def sampling_values(logits, temperature=1.0):
    """Values after temperature, float64: NaN -> -inf; a row with +inf entries becomes 0 there
    and -inf elsewhere (the limit of softmax)."""
    B = logits.shape[0]
    t = torch.as_tensor(temperature, dtype=torch.float64).expand(B).reshape(B, 1)
    v = logits.double() / t
    v = torch.where(torch.isnan(v), torch.full_like(v, -torch.inf), v)
    has_inf = torch.isposinf(v).any(dim=1, keepdim=True)
    inf_mode = torch.where(torch.isposinf(v), torch.zeros_like(v), torch.full_like(v, -torch.inf))
    return torch.where(has_inf, inf_mode, v)


def kept_mask(values, top_k=0, top_p=1.0, min_p=0.0):
    """Kept set of top-k, then top-p (mass strictly above, within the top-k set, below p),
    then min-p (prob >= min_p * max prob), on float64 values [B, V]. Knobs: numbers or per-row."""
    B, V = values.shape
    k = torch.as_tensor(top_k).expand(B).long()
    p = torch.as_tensor(top_p, dtype=torch.float64).expand(B)
    mp = torch.as_tensor(min_p, dtype=torch.float64).expand(B)
    keep = torch.ones_like(values, dtype=torch.bool)
    for b in range(B):
        v = values[b]
        kb = int(k[b])
        if 0 < kb < V:
            kth = torch.topk(v, kb).values[-1]
            keep[b] &= v >= kth
        if float(p[b]) < 1.0:
            vv = torch.where(keep[b], v, torch.full_like(v, -torch.inf))
            probs = torch.softmax(vv, dim=0)
            sv, order = torch.sort(vv, descending=True, stable=True)
            sp = probs[order]
            excl = torch.cumsum(sp, 0) - sp
            starts = torch.ones_like(sv, dtype=torch.bool)
            starts[1:] = sv[1:] != sv[:-1]
            first = torch.cummax(torch.where(starts, torch.arange(V), torch.zeros(V, dtype=torch.long)), 0).values
            above = torch.empty_like(excl)
            above[order] = excl[first]
            keep[b] &= above < float(p[b])
        if float(mp[b]) > 0.0:
            keep[b] &= torch.exp(v - v.max()) >= float(mp[b])
    keep &= values > -torch.inf
    return keep


def sampling_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, prev_tokens=None,
                   repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """The distribution pk.sample draws from (float64 [B, V]), for temperature > 0."""
    x = penalized_logits(logits, prev_tokens, repetition_penalty, presence_penalty, frequency_penalty)
    v = sampling_values(x, temperature)
    keep = kept_mask(v, top_k, top_p, min_p)
    w = torch.where(keep, torch.exp(v - v.max(dim=1, keepdim=True).values), torch.zeros_like(v))
    return w / w.sum(dim=1, keepdim=True)


def top_k_top_p_filter(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Logits with -inf outside the kept set (at temperature 1)."""
    keep = kept_mask(sampling_values(logits), top_k, top_p, min_p)
    return torch.where(keep, logits, torch.full_like(logits, -torch.inf))


def unmask_probs(logits, tokens, mask_token_id, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 prev_tokens=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """pk.unmask_step's distribution at every position (float64 [B, L, V]; rows of zeros at
    unmasked positions and where nothing is drawable): pk.sample's for row b's knobs, with
    mask_token_id never drawn; at temperature 0 the filtered distribution at temperature 1
    (the one the confidence of the argmax comes from). Knobs: numbers or per-row tensors [B]."""
    B, L, V = logits.shape
    out = torch.zeros(B, L, V, dtype=torch.float64)

    def row(k, b):
        return k[b] if isinstance(k, torch.Tensor) and k.dim() == 1 else k

    for b in range(B):
        x = logits[b].double().cpu()
        prev = None if prev_tokens is None else prev_tokens[b:b + 1].cpu().expand(L, -1)
        x = penalized_logits(x, prev, row(repetition_penalty, b), row(presence_penalty, b),
                             row(frequency_penalty, b))
        x[:, mask_token_id] = -torch.inf
        t = float(row(temperature, b))
        v = sampling_values(x, t if t > 0 else 1.0)
        keep = kept_mask(v, int(row(top_k, b)), float(row(top_p, b)), float(row(min_p, b)))
        vmax = v.max(dim=1, keepdim=True).values
        w = torch.where(keep, torch.exp(v - torch.where(torch.isfinite(vmax), vmax, torch.zeros_like(vmax))),
                        torch.zeros_like(v))
        z = w.sum(dim=1, keepdim=True)
        p = torch.where(z > 0, w / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(w))
        masked = tokens[b].cpu() == mask_token_id
        out[b] = torch.where(masked[:, None], p, torch.zeros_like(p))
    return out


def unmask_reveal(tokens, mask_token_id, drawn, keys, num_reveal):
    """The tokens after pk.unmask_step's selection, given the drawn tokens [B, L] (-1: none) and
    ordering keys [B, L] (smaller first; ties by position): each row reveals its min(n, masked)
    masked positions of smallest (key, position), with their drawn tokens (a position without
    one stays masked). num_reveal: an int or [B]."""
    B, L = tokens.shape
    out = tokens.clone().cpu()
    n_rows = torch.as_tensor(num_reveal).expand(B)
    for b in range(B):
        pos = [l for l in range(L) if int(tokens[b, l]) == mask_token_id]
        pos.sort(key=lambda l: (keys[b][l], l))
        n = max(0, min(int(n_rows[b]), len(pos)))
        for l in pos[:n]:
            if int(drawn[b, l]) >= 0:
                out[b, l] = int(drawn[b, l])
    return out


def speculative_first_token_probs(draft_probs, draft_token_ids, target_probs):
    """Distribution of the first emitted token of chain speculative sampling for one row:
    accept d0 with min(1, q/p), else draw from normalise(max(0, q - p)). It equals q (the
    target at position 0) whenever the draft was drawn from p; here d0 is fixed, so the
    distribution is a(d0) * onehot(d0) + (1 - a(d0)) * residual."""
    p0, q0 = draft_probs[0].double(), target_probs[0].double()
    d = int(draft_token_ids[0])
    a = min(1.0, float(q0[d] / p0[d])) if float(p0[d]) > 0 else (1.0 if float(q0[d]) > 0 else 0.0)
    res = torch.clamp(q0 - p0, min=0)
    res = res / res.sum() if float(res.sum()) > 0 else q0 / q0.sum()
    out = (1 - a) * res
    out[d] += a
    return out
# ---- diffusion -----------------------------------------------------------------------------
# Written from the papers' formulas (and diffusers' discretisations), in float64.
import math  # noqa: E402


def diffusion_betas(kind, n, beta_start=1e-4, beta_end=0.02):
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        return torch.tensor([min(1.0 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=torch.float64)
    if kind == "sigmoid":
        x = torch.linspace(-6.0, 6.0, n, dtype=torch.float64)
        return beta_start + (beta_end - beta_start) / (1.0 + torch.exp(-x))
    raise ValueError(kind)


def diffusion_alphas_cumprod(kind, n, beta_start=1e-4, beta_end=0.02, rescale=False):
    abar = torch.cumprod(1.0 - diffusion_betas(kind, n, beta_start, beta_end), 0)
    if rescale:  # Lin et al. 2023: shift and scale sqrt(abar) so that it ends at 0
        s = abar.sqrt()
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        abar = s**2
    return abar


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def diffusion_add_noise(x0, noise, t, acp, target):
    x0, noise = x0.double(), noise.double()
    if target == "flow":
        s = _bcast(torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0]), x0)
        return (1 - s) * x0 + s * noise, noise - x0
    a = _bcast(acp.double()[torch.as_tensor(t).long().expand(x0.shape[0])], x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    tgt = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[target]
    return xt, tgt


def diffusion_loss(pred, target, t=None, acp=None, weighting="none", gamma=5.0, prediction_type="epsilon",
                   reduction="mean"):
    per = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    if weighting == "min_snr":
        a = acp.double()[torch.as_tensor(t).long().expand(pred.shape[0])]
        snr = a / (1 - a)
        m = torch.minimum(snr, torch.full_like(snr, gamma))
        if prediction_type == "epsilon":
            w = torch.where(snr == 0, torch.ones_like(snr), m / snr)
        elif prediction_type == "v_prediction":
            w = m / (snr + 1)
        else:
            w = m
        per = per * w
    return per.mean() if reduction == "mean" else per


# ---- loss -----------------------------------------------------------------------------------


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", softcap=None):
    """F.linear then F.cross_entropy, in float64 (differentiable in hidden, weight and bias):
    the [tokens, vocab] logits the fused op never holds."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    logits = F.linear(h, weight.double(), None if bias is None else bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets.reshape(-1).long(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss


# ---- attention -----------------------------------------------------------------------------


def attention_visible(sq, sk, *, causal=False, window=(-1, -1), bottom_right=True, prefix=0, device=None):
    """Bool (sq, sk): query i sees key j (FlashAttention's causal/window semantics). prefix
    (prefix-LM): every query also sees the keys j < prefix that its left window allows."""
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
        vis &= (j <= i + right) | (j < prefix)
    return vis


def alibi_bias(slopes, batch, heads, sq, sk, *, bottom_right=True, device=None):
    """ALiBi in float64, (batch, heads, sq, sk): -slope[b, h] * |i + offset - j|, offset = sk - sq
    when aligned bottom-right (FlashAttention's convention) else 0; slopes [heads] or [batch, heads]."""
    slopes = slopes.detach().to(device=device, dtype=torch.float64)
    if slopes.dim() == 1:
        slopes = slopes[None].expand(batch, heads)
    offset = sk - sq if bottom_right else 0
    i = torch.arange(sq, device=device)[:, None] + offset
    j = torch.arange(sk, device=device)[None, :]
    return -slopes[:, :, None, None] * (i - j).abs().to(torch.float64)


_U32 = 0xFFFFFFFF


def _mulhilo32(m, c):
    """High and low 32 bits of m * c (m a Python constant < 2**32, c an int64 tensor of uint32
    values), in int64 arithmetic (16-bit limbs of m, so nothing overflows)."""
    t1 = (m & 0xFFFF) * c
    t2 = (m >> 16) * c
    u = t1 + ((t2 & 0xFFFF) << 16)
    return (t2 >> 16) + (u >> 32), u & _U32


def philox4x32_10_tensor(c0, c1, c2, c3, seed):
    """Philox4x32-10 (philox4x32_10 above) on int64 tensors of uint32 counter words, broadcast
    together; key = the 64-bit seed. Returns the four output words as int64 tensors."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _U32, seed >> 32
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & _U32, (k1 + W1) & _U32
        hi0, lo0 = _mulhilo32(M0, c0)
        hi1, lo1 = _mulhilo32(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p):
    """round(p * 65536): keep an element when its 16-bit value is >= this (attention_dropout.h)."""
    return min(int(p * 65536.0 + 0.5), 65536)


def attention_dropout_mult(p, seed, offset, batch, heads, sq, sk, *, batch0=0, device=None):
    """The attention dropout factor of csrc/common/attention_dropout.h, float64 [batch, heads, sq, sk]:
    65536 / (65536 - t) where element (b, h, i, j) is kept, 0 where dropped (t = round(p * 65536);
    everything dropped and factor 0 when t = 65536). Sequence b of the call is batch0 + b (varlen:
    the sequence's index). Element (b, h, i, j) takes the 16-bit half j % 2 of word (j % 8) // 2 of
    philox(seed; counter = (i, b * heads + h, offset, j // 8)) and is kept when it is >= t."""
    b = torch.arange(batch0, batch0 + batch, dtype=torch.int64, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, dtype=torch.int64, device=device).view(1, -1, 1, 1)
    i = torch.arange(sq, dtype=torch.int64, device=device).view(1, 1, -1, 1)
    j = torch.arange(sk, dtype=torch.int64, device=device).view(1, 1, 1, -1)
    words = philox4x32_10_tensor(i, b * heads + h, torch.tensor(offset & _U32, device=device), j >> 3, seed)
    w = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [..., 4]
    word = torch.gather(w, -1, ((j & 7) >> 1).expand(w.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    bits = torch.where((j & 1).bool(), word >> 16, word & 0xFFFF)
    t = dropout_threshold(p)
    rscale = 0.0 if t >= 65536 else 65536.0 / (65536 - t)
    return (bits >= t).to(torch.float64) * rscale


def attention_ref(q, k, v, *, causal=False, scale=None, window=(-1, -1), bottom_right=True, attn_mask=None,
                  softcap=None, alibi_slopes=None, prefix_lens=None, compute_dtype=torch.float64, dropout=None,
                  dropout_batch0=0):
    """Plain attention in float64, layout (batch, seqlen, heads, head_dim); k/v may have fewer
    heads (GQA). attn_mask: bool (True = attend) or float (added), broadcastable to
    (batch, heads, sq, sk). softcap: scores s become softcap * tanh(s / softcap) before any
    mask; alibi_slopes ([heads] or [batch, heads]): alibi_bias added after the cap. prefix_lens:
    per-sequence prefix-LM lengths (a tensor or a list, used as given: no clamping). Returns
    (out (B, Sq, H, Dv), lse (B, H, Sq)), float64; rows that see no key give 0 and lse -inf.
    compute_dtype: another dtype gives the eager composite a user would write in that dtype
    (a yardstick of the rounding error, not a reference).
    dropout: (p, seed, offset): the output is (P * attention_dropout_mult) V, the lse without
    dropout; dropout_batch0: the index of this call's first sequence in the mask."""
    q, k, v = (t.detach().to(compute_dtype) if not t.requires_grad else t.to(compute_dtype) for t in (q, k, v))
    B, sq, H, D = q.shape
    sk, Hk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    s = qh @ kh.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, B, H, sq, sk, bottom_right=bottom_right, device=q.device).to(s.dtype)
    if prefix_lens is None:
        vis = attention_visible(sq, sk, causal=causal, window=window, bottom_right=bottom_right, device=q.device)
    else:
        pl = prefix_lens.tolist() if isinstance(prefix_lens, torch.Tensor) else list(prefix_lens)
        assert len(pl) == B
        vis = torch.stack([attention_visible(sq, sk, causal=causal, window=window, bottom_right=bottom_right,
                                             prefix=n, device=q.device) for n in pl])[:, None]
    s = s.masked_fill(~vis, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)  # rows that see no key
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(dead[..., 0], float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    if dropout is not None and dropout[0] > 0:
        p = p * attention_dropout_mult(dropout[0], dropout[1], dropout[2], B, H, sq, sk, batch0=dropout_batch0,
                                       device=q.device).to(p.dtype)
    return (p @ vh).transpose(1, 2), lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens=None, **kw):
    """attention_ref per sequence of packed (tokens, heads, head_dim) inputs; returns
    (out (total_q, H, Dv), lse (H, total_q)). prefix_lens[b]: the prefix of sequence b."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    slopes = kw.pop("alibi_slopes", None)
    for b in range(len(cq) - 1):
        if slopes is not None:  # [heads] or [batch, heads]: this sequence's
            kw["alibi_slopes"] = slopes if slopes.dim() == 1 else slopes[b]
        pl = None if prefix_lens is None else [int(prefix_lens[b])]
        o, l = attention_ref(q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None],
                             prefix_lens=pl, dropout_batch0=b, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ---- shared by the CPU and CUDA attention tests ----


def rotary_ref(x, theta, positions, interleaved):
    """Rotary embedding in float64 as a complex product: x (B, S, H, D); theta (seqlen_ro,
    rotary_dim / 2) angles, so cos/sin = theta.cos()/theta.sin(); positions (B, S) rows of theta.
    Feature pairs (2i, 2i+1) when interleaved (GPT-J), (i, i + rotary_dim / 2) otherwise
    (GPT-NeoX); the features past rotary_dim are unchanged."""
    x = x.detach().to(torch.float64)
    half = theta.shape[-1]
    rd = 2 * half
    rot = torch.polar(torch.ones(1, dtype=torch.float64), theta.to(torch.float64)[positions])[:, :, None, :]
    if interleaved:
        z = torch.view_as_complex(x[..., :rd].reshape(*x.shape[:-1], half, 2).contiguous()) * rot
        y = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(x[..., :half], x[..., half:rd]) * rot
        y = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([y, x[..., rd:]], dim=-1)



def rotary_embedding_ref(x, cos, sin, interleaved, conjugate=False):
    """pk.rotary_embedding in float64: x (B, T, H, D) with cos/sin (T, rd / 2) or per token
    (B, T, rd / 2), or varlen x (N, H, D) with cos/sin (N, rd / 2). Pairs (2i, 2i+1) when
    interleaved, (i, i + rd / 2) otherwise, rotated by theta (by -theta when conjugate); the
    features past rd unchanged. Differentiable in x."""
    xd = x.to(torch.float64)
    c, s = cos.to(torch.float64), sin.to(torch.float64)
    if conjugate:
        s = -s
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # a heads axis
    half = c.shape[-1]
    rd = 2 * half
    if interleaved:
        a, b = xd[..., 0:rd:2], xd[..., 1:rd:2]
        y = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = xd[..., :half], xd[..., half:rd]
        y = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((y, xd[..., rd:]), dim=-1)

def diffusers_attention_ref(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
    """diffusers' `Attention` forward (the steps of its AttnProcessor2_0) in float64, on a float64
    copy of the module, with attention_ref for the attention itself: key/value heads fewer than
    the query heads are grouped-query attention, and the softmax scale is attn.scale.
    Returns float64, shaped like hidden_states."""
    import copy

    attn = copy.deepcopy(attn).double()
    h = hidden_states.double()
    enc = None if encoder_hidden_states is None else encoder_hidden_states.double()
    residual = h
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb.double())
    four_d = h.ndim == 4
    if four_d:
        B, C, Hh, W = h.shape
        h = h.reshape(B, C, Hh * W).transpose(1, 2)
    B, S = (h if enc is None else enc).shape[:2]
    mask = None
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask.double() if attention_mask.is_floating_point()
                                           else attention_mask, S, B)
        mask = mask.reshape(B, attn.heads, -1, mask.shape[-1])
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    q = attn.to_q(h)
    if enc is None:
        enc = h
    elif attn.norm_cross:
        enc = attn.norm_encoder_hidden_states(enc)
    k, v = attn.to_k(enc), attn.to_v(enc)
    D = q.shape[-1] // attn.heads
    q = q.reshape(B, -1, attn.heads, D)
    k = k.reshape(B, -1, k.shape[-1] // D, D)
    v = v.reshape(B, -1, v.shape[-1] // D, D)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out, _ = attention_ref(q, k, v, scale=attn.scale, attn_mask=mask)
    out = attn.to_out[1](attn.to_out[0](out.reshape(B, -1, attn.heads * D)))
    if four_d:
        out = out.transpose(-1, -2).reshape(B, C, Hh, W)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def span_infill_ref(text, masked, mask_id, bos_id, eos_id):
    """GLM's infilling layout in plain Python: the text with each run of masked positions as one
    mask_id, then bos_id, then each run's tokens followed by eos_id. Returns (stream, prefix_len
    (bos included), the stream indices of the hidden tokens)."""
    prefix, spans, hidden_at = [], [], []
    i, n = 0, len(text)
    while i < n:
        if not masked[i]:
            prefix.append(text[i])
            i += 1
            continue
        prefix.append(mask_id)
        run = []
        while i < n and masked[i]:
            run.append(text[i])
            i += 1
        spans.append(run)
    stream = prefix + [bos_id]
    for run in spans:
        hidden_at += range(len(stream), len(stream) + len(run))
        stream += run + [eos_id]
    return stream, len(prefix) + 1, hidden_at


def infill_mask_targets_ref(text, masked, ignore=-100):
    """The prefix targets of span_infill_ref's layout with mask targets: each run's mask predicts
    the run's first token, every other prefix token nothing (ignore)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if not masked[i]:
            out.append(ignore)
            i += 1
            continue
        out.append(text[i])
        while i < n and masked[i]:
            i += 1
    return out


def infill_positions_ref(stream, prefix_len, mask_id, eos_id, length, step):
    """GLM's span positions of span_infill_ref's stream[:-1] padded to length: prefix indices, then
    hole k's block (bos or the previous eos, then its tokens) from the index of the k-th mask,
    step apart."""
    holes = [i for i, t in enumerate(stream[:prefix_len - 1]) if t == mask_id]
    pos, k, j = list(range(prefix_len - 1)), 0, 0
    for i in range(prefix_len - 1, len(stream) - 1):
        if i > prefix_len - 1 and stream[i] == eos_id:
            k, j = k + 1, 0
        pos.append(holes[k] + j * step)
        j += 1
    return pos + list(range(len(stream) - 1, length))


def rel_err(x, ref):
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    den = ref.norm()
    return ((x - ref).norm() / den).item() if den > 0 else (x - ref).norm().item()


def torch_sdpa(q, k, v, *, causal=False, window=(-1, -1), bottom_right=True, scale=None, prefix_lens=None):
    """torch's SDPA on (B, S, H, D) inputs with the same visibility (explicit mask; prefix_lens
    as in attention_ref)."""
    sq, sk = q.shape[1], k.shape[1]
    kw = dict(causal=causal, window=window, bottom_right=bottom_right, device=q.device)
    if prefix_lens is None:
        vis = attention_visible(sq, sk, **kw)[None]
    else:
        pl = prefix_lens.tolist() if isinstance(prefix_lens, torch.Tensor) else list(prefix_lens)
        vis = torch.stack([attention_visible(sq, sk, prefix=n, **kw) for n in pl])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=vis[:, None], scale=scale, enable_gqa=True)
    out = out.transpose(1, 2)
    # torch returns NaN (math path) or 0 for rows without a visible key: compare as 0.
    dead = ~vis.any(-1)
    return torch.where(dead[:, :, None, None], torch.zeros_like(out), out)


# Relative-error floors per dtype (below them, twice torch's error is noise) and lse tolerances.
ATTN_ERR_FLOOR = {torch.float32: 2e-7, torch.bfloat16: 2e-3, torch.float16: 3e-4, torch.float64: 1e-14}
# lse: float32 for half inputs (float32 arithmetic on exact half products: a few float32 ulps
# of values up to ~20), float64 for float64 inputs (double arithmetic).
ATTN_LSE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}


def assert_attention_matches(out, lse, ref, ref_lse, sdpa_err, dtype):
    """out within twice torch SDPA's own error (floored per dtype) of the float64 reference;
    lse finite exactly where the reference's is (-inf where no key is visible) and close there;
    rows that see no key give 0. (B, Sq, H, Dv) outputs, (B, H, Sq) lse, any devices."""
    ours = rel_err(out, ref)
    assert ours <= 2 * max(sdpa_err, ATTN_ERR_FLOOR[dtype]), (ours, sdpa_err)
    out, lse, ref_lse = out.cpu(), lse.cpu(), ref_lse.cpu()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=ATTN_LSE_ATOL[dtype], rtol=0)
    assert (out[~finite.transpose(1, 2)] == 0).all()


# (B, Sq, Sk, H, Hk, D, causal, window)
ATTN_FWD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 1, 1, 1, 1, 1, False, (-1, -1)),
    (2, 128, 128, 4, 1, 8, True, (-1, -1)),
    (1, 1000, 1000, 2, 1, 64, True, (-1, -1)),
    (1, 17, 1000, 4, 2, 40, True, (-1, -1)),
    (1, 1000, 17, 2, 2, 96, True, (-1, -1)),
    (1, 128, 129, 2, 2, 128, False, (32, 0)),
    (1, 129, 128, 2, 1, 256, False, (16, 8)),
    (2, 63, 63, 3, 1, 1, True, (5, -1)),
    (1, 1, 1000, 2, 2, 128, True, (-1, -1)),
    (1, 1000, 1000, 1, 1, 256, False, (100, 100)),
    (3, 7, 129, 6, 3, 40, False, (-1, 3)),
]


# ---- kv cache (contiguous and paged) ----


def paged_from_contiguous(k_cache, v_cache, page_size, *, extra_blocks=3, gen=None):
    """The same data as a paged cache: (k_pages, v_pages, block_table). Row b of (B, S, Hk, D)
    caches (S a multiple of page_size) becomes S / page_size blocks, placed at a random
    permutation of num_blocks = B * S / page_size + extra_blocks blocks (the spare blocks hold noise)."""
    B, S = k_cache.shape[:2]
    assert S % page_size == 0
    per_row = S // page_size
    nb = B * per_row + extra_blocks
    table = torch.randperm(nb, generator=gen)[:B * per_row].view(B, per_row).to(torch.int32)
    dev = k_cache.device
    k_pages = torch.randn(nb, page_size, *k_cache.shape[2:], generator=gen).to(device=dev, dtype=k_cache.dtype)
    v_pages = torch.randn(nb, page_size, *v_cache.shape[2:], generator=gen).to(device=dev, dtype=v_cache.dtype)
    table = table.to(dev)
    k_pages[table.flatten().long()] = k_cache.reshape(B * per_row, page_size, *k_cache.shape[2:])
    v_pages[table.flatten().long()] = v_cache.reshape(B * per_row, page_size, *v_cache.shape[2:])
    return k_pages, v_pages, table


def contiguous_from_paged(pages, block_table):
    """The logical (B, max_blocks * page_size, Hk, D) rows of a paged cache (block ids must be valid)."""
    B, nblk = block_table.shape
    return pages[block_table.long().flatten()].reshape(B, nblk * pages.shape[1], *pages.shape[2:])


def kvcache_ref(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, causal=True, scale=None,
                window=(-1, -1), block_table=None, softcap=None, alibi_slopes=None):
    """What flash_attn_kvcache computes, in float64: (out (B, Sq, H, D), lse (B, H, Sq), k_rows, v_rows)
    with k_rows / v_rows the logical rows of the caches after the append (contiguous layout).
    A row that does not fit, or (paged) uses a block id outside [0, num_blocks), is not written
    and gives NaN out and lse. softcap and alibi_slopes ([heads] or [batch, heads]) as in
    attention_ref, the ALiBi distance aligned bottom-right on each row's key count."""
    if block_table is not None:
        nb, ps = k_cache.shape[:2]
        safe = block_table.clamp(0, max(nb - 1, 0))
        k_rows, v_rows = contiguous_from_paged(k_cache, safe).clone(), contiguous_from_paged(v_cache, safe).clone()
    else:
        k_rows, v_rows = k_cache.clone(), v_cache.clone()
    B, sq, H, D = q.shape
    cap = k_rows.shape[1]
    s_new = 0 if k_new is None else k_new.shape[1]
    left, right = window
    if causal:
        right = 0
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])
        fits = 0 <= n and n + s_new <= cap
        if fits and block_table is not None:
            used = -(-(n + s_new) // ps)
            ids = block_table[b, :used]
            fits = bool(((ids >= 0) & (ids < nb)).all())
        if not fits:
            outs.append(torch.full((1, sq, H, v_rows.shape[-1]), float("nan"), dtype=torch.float64))
            lses.append(torch.full((1, H, sq), float("nan"), dtype=torch.float64))
            continue
        if s_new:
            k_rows[b, n:n + s_new], v_rows[b, n:n + s_new] = k_new[b], v_new[b]
        slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = attention_ref(q[b:b + 1], k_rows[b:b + 1, :n + s_new], v_rows[b:b + 1, :n + s_new], scale=scale,
                               window=(left, right), softcap=softcap, alibi_slopes=slopes)
        outs.append(o.cpu())
        lses.append(lse.cpu())
    return torch.cat(outs), torch.cat(lses), k_rows, v_rows


def zigzag_shard_ref(x, rank, world, dim=1, lengths=None):
    """Context parallelism's zigzag layout, written out: every sequence packed along dim (one
    of the full length, or one per entry of lengths) cut into 2 * world equal chunks, of which
    rank keeps chunk rank and chunk 2 * world - 1 - rank, in that order."""
    lengths = [x.shape[dim]] if lengths is None else list(lengths)
    parts = []
    for seq in torch.split(x, lengths, dim):
        chunks = torch.chunk(seq, 2 * world, dim) if seq.shape[dim] else [seq] * (2 * world)
        parts += [chunks[rank], chunks[2 * world - 1 - rank]]
    return torch.cat(parts, dim)


def rms_norm_ref(x, weight=None, eps=1e-6, offset=0.0):
    """pk.rms_norm in float64 (no intermediate rounding): x * rsqrt(mean(x^2, -1) + eps) * (offset
    + weight), weight None meaning no scale. Differentiable in x and weight."""
    xd = x.to(torch.float64)
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (offset + weight.to(torch.float64))


def llama_rms_norm_ref(x, weight, eps=1e-6):
    """transformers' LlamaRMSNorm.forward, verbatim: float32 statistics, the normalised value cast
    back to x's dtype, then times the weight."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def gemma_rms_norm_ref(x, weight, eps=1e-6):
    """transformers' GemmaRMSNorm.forward, verbatim: float32 throughout, (1 + w), one cast at the end."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def swiglu_ref(gate, up):
    """pk.swiglu in float64: silu(gate) * up. Differentiable in both."""
    g = gate.to(torch.float64)
    return torch.nn.functional.silu(g) * up.to(torch.float64)


def gelu_ref(x, approximate="none"):
    """pk.gelu in float64: torch's F.gelu on the float64 input. Differentiable. (F.gelu computes
    1 + erf(x / sqrt 2), resp. 1 + tanh(u), which cancels to 0 below about x = -8, resp. -5, even
    in float64: fine for norm-wise comparisons, not for the lower tail; see gelu_tail_ref.)"""
    return F.gelu(x.to(torch.float64), approximate=approximate)


def gelu_tail_ref(x, approximate="none"):
    """gelu in float64 with the lower tail kept to float64 accuracy: 0.5 x erfc(-x / sqrt 2), resp.
    x * sigmoid(2u) (1 + tanh(u) = 2 sigmoid(2u)). Differentiable."""
    x = x.to(torch.float64)
    if approximate == "tanh":
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        return x * torch.sigmoid(2 * u)
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2))
