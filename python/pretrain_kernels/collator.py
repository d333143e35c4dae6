"""pk.MLMCollator: a drop-in for transformers' DataCollatorForLanguageModeling whose masking
is one call of the fused pk.mlm_mask op.

It needs no tokenizer download: pass the ids explicitly (mask_token_id, pad_token_id,
vocab_size, special_token_ids) or any tokenizer-like object that has `mask_token_id`,
`pad_token_id`, `all_special_ids` and `len()` / `vocab_size`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .ops._common import check_int, check_prob
from .ops.masking import mlm_mask, span_mask

_FIELDS = ("attention_mask", "special_tokens_mask", "token_type_ids", "word_starts")


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
        # Every knob is checked here, under its own name, rather than at the first call.
        pad_token_id = check_int("pad_token_id", pad_token_id, low=-(2**63), high=2**63)
        mlm_probability = check_prob("mlm_probability", mlm_probability)
        mask_replace_prob = check_prob("mask_replace_prob", mask_replace_prob)
        random_replace_prob = check_prob("random_replace_prob", random_replace_prob)
        if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
            raise ValueError("mask_replace_prob + random_replace_prob: expected a sum of at most 1, "
                             f"got {mask_replace_prob} + {random_replace_prob}")
        if mlm:
            vocab_size = check_int("vocab_size", vocab_size, low=1, high=2**32)
            mask_token_id = check_int("mask_token_id", mask_token_id, low=0)
            if mask_token_id >= vocab_size:
                raise ValueError(f"mask_token_id: expected an id in [0, vocab_size={vocab_size}), got {mask_token_id}")
        if pad_to_multiple_of is not None:
            pad_to_multiple_of = check_int("pad_to_multiple_of", pad_to_multiple_of, low=1)
        if max_predictions is not None:
            max_predictions = check_int("max_predictions", max_predictions, low=1)
        if seed is not None:
            seed = check_int("seed", seed, low=-(2**63), high=2**64)
        if isinstance(special_token_ids, torch.Tensor):
            special_token_ids = special_token_ids.reshape(-1).tolist()
        if isinstance(special_token_ids, (str, bytes)) or not isinstance(special_token_ids or [], Iterable):
            raise TypeError(f"special_token_ids: expected a list of ints, got {type(special_token_ids).__name__}")
        self.mlm = mlm
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        specials = set(check_int("special_token_ids", i) for i in (special_token_ids or []))
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
    def _as_row(x, what: str) -> torch.Tensor:
        """One example's field as a 1-D int64 tensor (tensors of any shape are flattened, as
        a tokenizer's [1, L] output); anything but integer (or bool) values raises."""
        if isinstance(x, torch.Tensor):
            t = x.detach().reshape(-1)
        else:
            if isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
                raise TypeError(f"{what}: expected a list or tensor of token ids, got {type(x).__name__}")
            try:
                t = torch.as_tensor(x if isinstance(x, Sequence) else list(x))
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise ValueError(f"{what}: expected a flat list of int64 ids, could not read it ({e})") from None
            if t.dim() > 1:
                raise ValueError(f"{what}: expected a flat list of ids, got nested lists of shape {tuple(t.shape)}")
        if (t.dtype.is_floating_point or t.is_complex()) and t.numel() > 0:  # [] reads as float32
            raise TypeError(f"{what}: expected integer ids, got {t.dtype} values")
        if t.dtype == torch.uint64 and t.numel() > 0 and int(t.max()) >= 2**63:
            raise ValueError(f"{what}: expected ids below 2**63, got {int(t.max())}")
        return t.reshape(-1).to(torch.int64)

    def _pad(self, rows: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.int64)
        for i, r in enumerate(rows):
            n = r.numel()
            if n == 0:
                continue
            if self.padding_side == "right":
                out[i, :n] = r
            else:
                out[i, length - n:] = r
        return out

    def __call__(self, examples):
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Iterable):
            raise TypeError(f"examples: expected a list of examples, got {type(examples).__name__}")
        examples = list(examples)
        if len(examples) == 0:
            raise ValueError("examples: expected at least one example")
        if isinstance(examples[0], Mapping):
            present = [k for k in _FIELDS if k in examples[0]]
            for i, e in enumerate(examples):
                if not isinstance(e, Mapping):
                    raise ValueError(f"examples[{i}]: expected a dict like examples[0], got {type(e).__name__}")
                if "input_ids" not in e:
                    raise ValueError(f"examples[{i}]: expected a dict with 'input_ids', got keys {sorted(map(str, e))}")
                for k in present:
                    if k not in e:
                        raise ValueError(f"examples[{i}]: missing '{k}' (examples[0] has it)")
            ids = [self._as_row(e["input_ids"], f"examples[{i}]['input_ids']") for i, e in enumerate(examples)]
            extra = {k: [self._as_row(e[k], f"examples[{i}]['{k}']") for i, e in enumerate(examples)] for k in present}
            for k, rows in extra.items():
                for i, (r, r_ids) in enumerate(zip(rows, ids)):
                    if r.numel() != r_ids.numel():
                        raise ValueError(f"examples[{i}]['{k}']: expected {r_ids.numel()} entries (one per input id), "
                                         f"got {r.numel()}")
        else:
            for i, e in enumerate(examples):
                if isinstance(e, Mapping):
                    raise ValueError(f"examples[{i}]: expected a list of ids like examples[0], got a dict")
            ids = [self._as_row(e, f"examples[{i}]") for i, e in enumerate(examples)]
            extra = {}
        length = max(r.numel() for r in ids)
        m = self.pad_to_multiple_of
        if m:
            length = ((length + m - 1) // m) * m
        batch = {"input_ids": self._pad(ids, self.pad_token_id, length)}
        lens = [r.numel() for r in ids]
        attn = self._pad([torch.ones(n, dtype=torch.int64) for n in lens], 0, length)
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
