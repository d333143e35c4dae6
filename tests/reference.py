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
