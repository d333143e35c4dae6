"""pk.MLMCollator: a drop-in for transformers' DataCollatorForLanguageModeling whose masking
is one call of the fused pk.mlm_mask op.

It needs no tokenizer download: pass the ids explicitly (mask_token_id, pad_token_id,
vocab_size, special_token_ids) or any tokenizer-like object that has `mask_token_id`,
`pad_token_id`, `all_special_ids` and `len()` / `vocab_size`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .ops.masking import mlm_mask, span_mask


class MLMCollator:
    """Pads a list of examples and masks them.

    Examples are lists/tensors of token ids, or dicts with "input_ids" (and optionally
    "attention_mask", "special_tokens_mask", "token_type_ids", "word_starts"). Returns a dict
    with input_ids, attention_mask and labels (plus token_type_ids when given) as torch
    tensors.

    Arguments shared with DataCollatorForLanguageModeling: tokenizer, mlm, mlm_probability,
    mask_replace_prob, random_replace_prob, pad_to_multiple_of, return_tensors ("pt" only),
    seed. Extras: exact_count, whole_word_mask (uses "word_starts" of the examples),
    span_masking (SpanBERT spans), max_predictions, padding_side, device.
    """

    def __init__(self, tokenizer=None, mlm: bool = True, mlm_probability: float = 0.15,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                 pad_to_multiple_of: int | None = None, return_tensors: str = "pt", seed: int | None = None, *,
                 mask_token_id: int | None = None, pad_token_id: int | None = None, vocab_size: int | None = None,
                 special_token_ids=None, exact_count: bool = False, whole_word_mask: bool = False,
                 span_masking: bool = False, max_predictions: int | None = None, padding_side: str = "right",
                 device: str | torch.device | None = None):
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
        tok = tokenizer
        if tok is not None:
            mask_token_id = mask_token_id if mask_token_id is not None else getattr(tok, "mask_token_id", None)
            pad_token_id = pad_token_id if pad_token_id is not None else getattr(tok, "pad_token_id", None)
            if vocab_size is None:
                vocab_size = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", None)
            if special_token_ids is None:
                special_token_ids = list(getattr(tok, "all_special_ids", []) or [])
            padding_side = getattr(tok, "padding_side", padding_side) or padding_side
        if mlm and mask_token_id is None:
            raise ValueError("mask_token_id: needed for masked language modeling (pass it or a tokenizer with one)")
        if mlm and vocab_size is None:
            raise ValueError("vocab_size: needed for random replacements (pass it or a tokenizer)")
        if pad_token_id is None:
            raise ValueError("pad_token_id: needed for padding (pass it or a tokenizer with one)")
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability: expected a probability in [0, 1], got {mlm_probability}")
        if mask_replace_prob + random_replace_prob > 1.0 + 1e-9 or min(mask_replace_prob, random_replace_prob) < 0:
            raise ValueError("mask_replace_prob + random_replace_prob: expected non-negative with a sum of at most 1, "
                             f"got {mask_replace_prob} + {random_replace_prob}")
        self.mlm = mlm
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors
        self.mask_token_id = mask_token_id
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = vocab_size
        specials = set(int(i) for i in (special_token_ids or []))
        specials.add(self.pad_token_id)
        self.special_token_ids = sorted(specials)
        self.exact_count = exact_count
        self.whole_word_mask = whole_word_mask
        self.span_masking = span_masking
        self.max_predictions = max_predictions
        self.padding_side = padding_side
        self.device = torch.device(device) if device is not None else None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    # -- padding ---------------------------------------------------------------------------
    @staticmethod
    def _as_list(x):
        if isinstance(x, torch.Tensor):
            return x.reshape(-1).tolist()
        return list(x)

    def _pad(self, rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.int64)
        for i, r in enumerate(rows):
            if len(r) == 0:
                continue
            t = torch.as_tensor(r, dtype=torch.int64)
            if self.padding_side == "right":
                out[i, : len(r)] = t
            else:
                out[i, length - len(r):] = t
        return out

    def __call__(self, examples):
        if len(examples) == 0:
            raise ValueError("examples: expected at least one example")
        if isinstance(examples[0], Mapping):
            ids = [self._as_list(e["input_ids"]) for e in examples]
            extra = {k: [self._as_list(e[k]) for e in examples] for k in
                     ("attention_mask", "special_tokens_mask", "token_type_ids", "word_starts") if k in examples[0]}
        else:
            ids = [self._as_list(e) for e in examples]
            extra = {}
        length = max(len(r) for r in ids)
        m = self.pad_to_multiple_of
        if m:
            length = ((length + m - 1) // m) * m
        batch = {"input_ids": self._pad(ids, self.pad_token_id, length)}
        lens = [len(r) for r in ids]
        attn = self._pad([[1] * n for n in lens], 0, length)
        if "attention_mask" in extra:
            attn = self._pad(extra["attention_mask"], 0, length)
        batch["attention_mask"] = attn
        if "token_type_ids" in extra:
            batch["token_type_ids"] = self._pad(extra["token_type_ids"], 0, length)
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        input_ids = batch["input_ids"]
        if not self.mlm:
            labels = input_ids.clone()
            labels[input_ids == self.pad_token_id] = -100
            batch["labels"] = labels
            return batch
        eligible = batch["attention_mask"].bool()
        if "special_tokens_mask" in extra:
            stm = self._pad(extra["special_tokens_mask"], 1, length).to(eligible.device).bool()
            eligible = eligible & ~stm
        word_starts = None
        if self.whole_word_mask or (self.span_masking and "word_starts" in extra):
            if "word_starts" not in extra:
                raise ValueError("whole_word_mask: the examples need a 'word_starts' field (1 where a word begins)")
            word_starts = self._pad(extra["word_starts"], 1, length).to(eligible.device).bool()
        common = dict(mask_token_id=self.mask_token_id, vocab_size=self.vocab_size, mask_prob=self.mlm_probability,
                      replace_prob=self.mask_replace_prob, random_prob=self.random_replace_prob,
                      special_token_ids=self.special_token_ids, attention_mask=eligible, word_starts=word_starts,
                      generator=self.generator)
        if self.span_masking:
            masked, labels = span_mask(input_ids, **common)
        else:
            masked, labels = mlm_mask(input_ids, exact_count=self.exact_count, max_predictions=self.max_predictions,
                                      **common)
        batch["input_ids"] = masked
        batch["labels"] = labels
        return batch
