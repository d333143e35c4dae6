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
