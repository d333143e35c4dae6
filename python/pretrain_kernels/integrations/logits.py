"""transformers' generate on pk.top_k_top_p_filter: TopKTopPLogitsWarper, a LogitsProcessor
that replaces the TopK, TopP and MinP warpers with one fused, sort-free call. transformers is
not imported: generate only calls the processor."""
from __future__ import annotations

import torch

from ..ops.sampling import _knob, top_k_top_p_filter

__all__ = ["TopKTopPLogitsWarper"]


class TopKTopPLogitsWarper:
    """A transformers LogitsProcessor built on pk.top_k_top_p_filter: pass it to
    model.generate(..., logits_processor=LogitsProcessorList([TopKTopPLogitsWarper(...)]))
    with do_sample=True (and top_k=0, top_p=1.0 so the built-in warpers stay off). One call
    replaces transformers' TopK, TopP and MinP warpers; scores are [batch, vocab]."""

    def __init__(self, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
        _knob("top_k", top_k, 1, torch.device("cpu"), integer=True)
        _knob("top_p", top_p, 1, torch.device("cpu"))
        _knob("min_p", min_p, 1, torch.device("cpu"))
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return top_k_top_p_filter(scores, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)

    def __repr__(self) -> str:
        return f"TopKTopPLogitsWarper(top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p})"
