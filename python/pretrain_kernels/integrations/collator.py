"""pk.MLMCollator: a drop-in for transformers' DataCollatorForLanguageModeling whose masking
is one call of the fused pk.mlm_mask op (or pk.span_mask).

It needs no tokenizer download: pass the ids explicitly (mask_token_id, pad_token_id,
vocab_size, special_token_ids) or any tokenizer-like object that has `mask_token_id`,
`pad_token_id`, `all_special_ids` and `len()` / `vocab_size` (a transformers
PreTrainedTokenizerFast, or the byte and BPE tokenizers of pretrain_kernels.train.data).

What a transformers user can rely on:
  * examples: lists/tensors of ids, or dicts as a tokenizer returns them (BatchEncoding rows);
    every key is kept: attention_mask and token_type_ids are padded with 0, other per-token
    numeric fields (as long as input_ids) with 0, equal-shape numeric fields (a per-example
    label) are stacked, anything else comes back as a list. special_tokens_mask,
    offset_mapping, word_ids and word_starts are read and dropped, as transformers pops
    special_tokens_mask and offset_mapping.
  * whole_word_mask=True reads the words from what the fast tokenizer gives, no hand-made
    boundaries: "offset_mapping" (tokenizer(..., return_offsets_mapping=True), what
    transformers 5 reads; a token starts a word unless it begins where the previous non-special
    token ended) or "word_ids" (BatchEncoding.word_ids(i), None for special tokens; a token
    starts a word when its word id differs from the previous token's). "word_starts" (1 where
    a word begins) is still read first when present. A word is selected as a unit with
    probability mlm_probability; each of its pieces then gets its own mask/random/keep draw
    (transformers 5 forces mask_replace_prob=1 with whole words; pass it to get the same).
  * seed: each DataLoader worker draws from its own stream, seeded with seed + worker id
    (torch.utils.data.get_worker_info()), exactly the rule of transformers; a single-process
    loader uses seed itself. Like transformers, a seeded collator called in a child process
    that is not a DataLoader worker raises instead of repeating the parent's stream.
  * return_tensors "pt" (torch tensors) or "np" (numpy arrays), at construction or per call.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..ops._common import check_int, check_prob
from ..ops.masking import mlm_mask, span_mask

_RETURN_TENSORS = ("pt", "np")
_PADDED = {"attention_mask": 0, "token_type_ids": 0}     # per-token fields of the output, padding value
_WORDS = ("word_starts", "word_ids", "offset_mapping")   # word boundaries, read in this order
_CONSUMED = ("special_tokens_mask",) + _WORDS            # read, not returned


def _check_return_tensors(value) -> str:
    if value not in _RETURN_TENSORS:
        raise ValueError(f"return_tensors: expected 'pt' or 'np', got {value!r}")
    return value


def _numeric(x):
    """x as a tensor when it is a number, a numeric tensor/array or a (nested) list of numbers;
    None otherwise."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x) if x.dtype.kind in "biuf" else None
    if isinstance(x, (str, bytes)) or x is None:
        return None
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return None if t.is_complex() else t


class MLMCollator:
    """Pads a list of examples and masks them (see the module docstring for the rules).

    Examples are lists/tensors of token ids, or dicts with "input_ids" and any other keys
    (those a tokenizer returns: attention_mask, token_type_ids, special_tokens_mask,
    offset_mapping; or word_ids, word_starts, or fields of your own). Returns a dict with
    input_ids, attention_mask, labels and the examples' other keys, as torch tensors
    (return_tensors="pt") or numpy arrays ("np").

    Arguments shared with DataCollatorForLanguageModeling: tokenizer, mlm, mlm_probability,
    mask_replace_prob, random_replace_prob, pad_to_multiple_of, return_tensors, seed,
    whole_word_mask. Extras: exact_count, span_masking (SpanBERT spans, in words when the
    examples carry word boundaries), max_predictions, padding_side, device.
    """

    def __init__(self, tokenizer=None, mlm: bool = True, mlm_probability: float = 0.15,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                 pad_to_multiple_of: int | None = None, return_tensors: str = "pt", seed: int | None = None, *,
                 mask_token_id: int | None = None, pad_token_id: int | None = None, vocab_size: int | None = None,
                 special_token_ids=None, exact_count: bool = False, whole_word_mask: bool = False,
                 span_masking: bool = False, max_predictions: int | None = None, padding_side: str = "right",
                 device: str | torch.device | None = None):
        return_tensors = _check_return_tensors(return_tensors)
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
        if whole_word_mask and not mlm:
            raise ValueError("whole_word_mask: needs mlm=True (whole words are a masking unit)")
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
        self.seed = seed
        self._generator = None      # made on first use, once per process (see _rng)
        self._generator_pid = None

    def __getstate__(self):
        # A copy sent to another process (a spawned DataLoader worker) makes its own generator.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_pid"] = None
        return state

    def _rng(self) -> torch.Generator | None:
        """The generator of this process: seed in the main process, seed + worker id in a
        DataLoader worker (transformers' rule), made again whenever the process changes."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            if info is not None:
                seed = self.seed + info.id
            elif multiprocessing.current_process().name == "MainProcess":
                seed = self.seed
            else:
                raise ValueError("seed: this seeded collator runs in a child process that is not a DataLoader "
                                 "worker, where it cannot tell its stream from the other processes'; use a "
                                 "DataLoader with num_workers, a single process, or seed=None")
            if seed >= 2**64:
                seed -= 2**64
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_pid = os.getpid()
        return self._generator

    # -- padding ---------------------------------------------------------------------------
    @staticmethod
    def _as_row(x, what: str) -> torch.Tensor:
        """One example's field as a 1-D int64 tensor (tensors of any shape are flattened, as
        a tokenizer's [1, L] output); anything but integer (or bool) values raises."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x) if x.dtype.kind in "biuf" else x.tolist()
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

    @classmethod
    def _word_ids_row(cls, x, what: str) -> torch.Tensor:
        """BatchEncoding.word_ids(i): ints, None for special tokens (read as -1)."""
        if isinstance(x, (list, tuple)):
            x = [-1 if v is None else v for v in x]
        return cls._as_row(x, what)

    @staticmethod
    def _offsets_row(x, n: int, what: str) -> torch.Tensor:
        """offset_mapping of one example: n (start, end) pairs -> int64 [n, 2]."""
        t = _numeric(x)
        if t is None or (t.numel() > 0 and t.dtype.is_floating_point) or t.numel() != 2 * n:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if t is not None else type(x).__name__
            raise ValueError(f"{what}: expected {n} (start, end) integer pairs (one per input id), got {got}")
        return t.reshape(n, 2).to(torch.int64)

    def _pad(self, rows: Sequence[torch.Tensor], value, length: int, dtype=torch.int64) -> torch.Tensor:
        """Rows [n_i, *rest] -> [len(rows), length, *rest], padded on the padding side."""
        rows = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=dtype) for r in rows]
        rest = next((tuple(r.shape[1:]) for r in rows if r.numel()), ())
        out = torch.full((len(rows), length, *rest), value, dtype=dtype)
        for i, r in enumerate(rows):
            n = r.shape[0] if r.dim() else 0
            if r.numel() == 0:
                continue
            if self.padding_side == "right":
                out[i, :n] = r
            else:
                out[i, length - n:] = r
        return out

    def _collate_extra(self, key: str, values: list, lens: list[int], length: int):
        """A field of the examples' own: padded with 0 when it has one entry per input id, stacked
        when numeric and of one shape, else the list of values as given."""
        ts = [_numeric(v) for v in values]
        if any(t is None for t in ts):
            return list(values)
        full = [t for t in ts if t.numel()] or ts   # [] reads as float32: no say in the dtype
        dtype = full[0].dtype
        for t in full[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        shaped = [t for t, n in zip(ts, lens) if n > 0]
        if shaped and all(t.dim() >= 1 and t.shape[0] == n for t, n in zip(ts, lens) if n > 0) \
                and len({tuple(t.shape[1:]) for t in shaped}) == 1 \
                and all(t.numel() == 0 for t, n in zip(ts, lens) if n == 0):
            return self._pad([t.to(dtype) for t in ts], 0, length, dtype)
        if len({tuple(t.shape) for t in ts}) == 1:
            return torch.stack([t.to(dtype) for t in ts])
        return list(values)

    @staticmethod
    def _word_starts(row_fields: dict, special: torch.Tensor) -> torch.Tensor:
        """One example's word starts (True where a word begins; special tokens are words of
        their own) from word_starts, word_ids or offset_mapping, the first present."""
        if "word_starts" in row_fields:
            return row_fields["word_starts"].bool()
        if "word_ids" in row_fields:
            w = row_fields["word_ids"]
            prev = torch.cat([w.new_full((1,), -2), w[:-1]])
            return (w < 0) | (w != prev) | special
        # transformers 5 (DataCollatorForLanguageModeling._calc_word_ids_and_prob_mask): a token
        # starts a word unless it begins where the previous token ended and that one was not special.
        off = row_fields["offset_mapping"]
        prev_end = torch.cat([off.new_full((1,), -1), off[:-1, 1]])
        prev_special = torch.cat([special.new_zeros(1), special[:-1]])
        return (~special & ((off[:, 0] != prev_end) | prev_special)) | special

    def __call__(self, examples, return_tensors: str | None = None):
        rt = self.return_tensors if return_tensors is None else _check_return_tensors(return_tensors)
        if rt == "np" and self.device is not None and self.device.type != "cpu":
            raise ValueError(f"return_tensors: 'np' arrays live on the CPU, but device={self.device}")
        if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Iterable):
            raise TypeError(f"examples: expected a list of examples, got {type(examples).__name__}")
        examples = list(examples)
        if len(examples) == 0:
            raise ValueError("examples: expected at least one example")
        keys: list = []
        fields: dict[str, list] = {}     # per-token fields we read: one row per example
        if isinstance(examples[0], Mapping):
            keys = [k for k in examples[0] if k != "input_ids"]
            for i, e in enumerate(examples):
                if not isinstance(e, Mapping):
                    raise ValueError(f"examples[{i}]: expected a dict like examples[0], got {type(e).__name__}")
                if "input_ids" not in e:
                    raise ValueError(f"examples[{i}]: expected a dict with 'input_ids', got keys {sorted(map(str, e))}")
                for k in keys:
                    if k not in e:
                        raise ValueError(f"examples[{i}]: missing '{k}' (examples[0] has it)")
                for k in e:
                    if k != "input_ids" and k not in keys:
                        raise ValueError(f"examples[{i}]: has '{k}', which examples[0] lacks")
            ids = [self._as_row(e["input_ids"], f"examples[{i}]['input_ids']") for i, e in enumerate(examples)]
            for k in keys:
                if k not in _PADDED and k not in _CONSUMED:
                    continue
                rows = []
                for i, (e, r_ids) in enumerate(zip(examples, ids)):
                    what = f"examples[{i}]['{k}']"
                    if k == "offset_mapping":
                        rows.append(self._offsets_row(e[k], r_ids.numel(), what))
                        continue
                    r = self._word_ids_row(e[k], what) if k == "word_ids" else self._as_row(e[k], what)
                    if r.numel() != r_ids.numel():
                        raise ValueError(f"{what}: expected {r_ids.numel()} entries (one per input id), got {r.numel()}")
                    rows.append(r)
                fields[k] = rows
        else:
            for i, e in enumerate(examples):
                if isinstance(e, Mapping):
                    raise ValueError(f"examples[{i}]: expected a list of ids like examples[0], got a dict")
            ids = [self._as_row(e, f"examples[{i}]") for i, e in enumerate(examples)]
        lens = [r.numel() for r in ids]
        length = max(lens)
        m = self.pad_to_multiple_of
        if m:
            length = ((length + m - 1) // m) * m
        batch = {"input_ids": self._pad(ids, self.pad_token_id, length)}
        if "attention_mask" in fields:
            batch["attention_mask"] = self._pad(fields["attention_mask"], 0, length)
        else:
            batch["attention_mask"] = self._pad([torch.ones(n, dtype=torch.int64) for n in lens], 0, length)
        for k in keys:
            if k in _CONSUMED or k == "attention_mask":
                continue
            if k in _PADDED:
                batch[k] = self._pad(fields[k], _PADDED[k], length)
            else:
                batch[k] = self._collate_extra(k, [e[k] for e in examples], lens, length)
        word_starts = None
        words = [k for k in _WORDS if k in fields]
        if self.mlm and (self.whole_word_mask or (self.span_masking and words)):
            if not words:
                raise ValueError("whole_word_mask: the examples need 'word_ids' (BatchEncoding.word_ids()), "
                                 "'offset_mapping' (return_offsets_mapping=True) or 'word_starts' (1 where a word "
                                 "begins)")
            specials = torch.tensor(self.special_token_ids, dtype=torch.int64)
            starts = []
            for i, r in enumerate(ids):
                row = {k: fields[k][i] for k in words}
                special = (fields["special_tokens_mask"][i].bool() if "special_tokens_mask" in fields
                           else torch.isin(r, specials))
                starts.append(self._word_starts(row, special))
            word_starts = self._pad(starts, True, length, torch.bool)
        if self.device is not None:
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        input_ids = batch["input_ids"]
        if not self.mlm:
            labels = input_ids.clone()
            labels[input_ids == self.pad_token_id] = -100
            batch["labels"] = labels
            return self._convert(batch, rt)
        eligible = batch["attention_mask"].bool()
        if "special_tokens_mask" in fields:
            stm = self._pad(fields["special_tokens_mask"], 1, length).to(eligible.device).bool()
            eligible = eligible & ~stm
        if word_starts is not None:
            word_starts = word_starts.to(eligible.device)
        common = dict(mask_token_id=self.mask_token_id, vocab_size=self.vocab_size, mask_prob=self.mlm_probability,
                      replace_prob=self.mask_replace_prob, random_prob=self.random_replace_prob,
                      special_token_ids=self.special_token_ids, attention_mask=eligible, word_starts=word_starts,
                      generator=self._rng())
        if self.span_masking:
            masked, labels = span_mask(input_ids, **common)
        else:
            masked, labels = mlm_mask(input_ids, exact_count=self.exact_count, max_predictions=self.max_predictions,
                                      **common)
        batch["input_ids"] = masked
        batch["labels"] = labels
        return self._convert(batch, rt)

    @staticmethod
    def _convert(batch: dict, return_tensors: str) -> dict:
        if return_tensors == "np":
            return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return batch
