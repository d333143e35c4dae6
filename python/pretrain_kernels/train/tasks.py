"""The objectives the loop trains: each task owns its model, data and loss.

A task provides
  batch(gen, n)   one global batch drawn from the generator (CPU tensors, leading dim n)
  split(b, k)     k micro-batches of it
  count(mb)       the items the loss of mb is summed over (tokens, masked tokens, images)
  items(b)        the items of a batch for the throughput figure
  loss(model, mb) the summed loss of a micro-batch (the loop normalises it)
  evaluate(model, device) and optionally final_evaluate(model, device): metric dicts
  config()        a JSON-able dict from which build_task() rebuilds the task and model

  GPTTask        next-token prediction on random windows; eval: validation nats per byte
  HybridTask     the GPT decoder on a mixture of next-token and span-infilling examples (GLM /
                 UL2, prefix-LM mask); eval: the GPT's nats per byte and masked-token accuracy
  MLMTask        variable-length windows, masked by pk.mlm_mask, packed for varlen attention;
                 eval: masked-token accuracy beside the most-frequent-token baseline
  MDLMTask       masked diffusion LM on the same encoder: per-row rates t (low-discrepancy),
                 every selected token masked, loss the 1/t-weighted MDLM bound; eval: the bound
                 in nats per byte on the GPT's validation windows (fixed stratified t)
  MaskSchedule   --mask-schedule of mlm / mdlm: constant, linear or cosine from a to b over the
                 run, read through set_step(step, steps), which the loop calls before each batch
  DenoisingTask  "diffusion": pk.add_noise (epsilon or v target) + pk.diffusion_loss with
                 Min-SNR weighting; "flow": flow matching (pk.add_noise target="flow") with
                 noise paired to images by mini-batch optimal transport (coupling "ot");
                 eval: held-out loss, then samples judged by a digit classifier (judge.py)

Text tasks take tokenizer="byte" (the default: bytes are tokens) or "bpe" (a byte-level BPE
trained on the train split, data.BPETokenizer; the model's vocab_size follows it), or a
tokenizer object. The corpus is encoded once into a 1-D id tensor and windows are drawn
from it; for bytes this draws exactly the windows data.byte_windows draws. With bpe,
save_files() writes tokenizer.json and the encoded corpus (tokens.pt) into the run folder,
and build_task(cfg, run_dir=...) rebuilds the same tokenizer from there. Text metrics stay
comparable across tokenizers: val_loss is nats per byte of the predicted (GPT) or masked
(MLM) text, i.e. the summed loss over the tokens divided by the bytes they stand for; with
bpe the per-token figures and the bytes per token are reported beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import torch

import pretrain_kernels as pk
from pretrain_kernels.models import (BertConfig, BertMLM, DiT, DiTConfig, GPT, GPTConfig, UNet, UNetConfig,
                                     pack)

from . import data as D


def _split_dict(batch: dict, k: int) -> list[dict]:
    keys = [key for key, v in batch.items() if isinstance(v, torch.Tensor)]
    n = batch[keys[0]].shape[0]
    if n % k:
        raise ValueError(f"batch of {n} cannot be split into {k} equal micro-batches")
    chunks = {key: batch[key].chunk(k) for key in keys}
    return [{key: chunks[key][i] for key in keys} for i in range(k)]


def _text(data_path: str | None, split: str) -> bytes:
    return D.stdlib_corpus(split) if data_path is None else D.folder_corpus(data_path, split)


TOKENIZER_FILE = "tokenizer.json"
TOKEN_CACHE_FILE = "tokens.pt"


class _TextTask:
    """Shared by GPTTask and MLMTask: the tokenizer, the encoded corpus, the run-folder files."""

    def _setup_text(self, tokenizer, vocab_size, data, load_data, run_dir):
        """Sets self.tok (and with load_data self.train_ids); returns the validation ids or None."""
        self.data_path = data
        train = _text(data, "train") if load_data or tokenizer == "bpe" else None
        self.tok = D.make_tokenizer(tokenizer, train, vocab_size) if isinstance(tokenizer, str) else tokenizer
        self.bpe = isinstance(self.tok, D.BPETokenizer)
        self._cache_dir = None
        if not load_data:
            return None
        if self.bpe and run_dir is not None and D.load_token_cache(os.path.join(run_dir, TOKEN_CACHE_FILE),
                                                                   self.tok):
            self._cache_dir = os.path.abspath(run_dir)
        val = _text(data, "validation")
        self._corpora = [train, val]
        self.train_ids = self._ids(train)
        return self._ids(val)

    def _ids(self, corpus: bytes) -> torch.Tensor:
        if self.bpe:
            return self.tok.encode_corpus(corpus)
        return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)

    def _windows(self, ids, n, length, gen):
        return D.token_windows(ids, n, length, generator=gen, unit="tokens" if self.bpe else "bytes")

    def _model_cfg(self, model_cfg):
        """The model's vocabulary follows a bpe tokenizer."""
        if self.bpe and model_cfg.vocab_size != self.tok.vocab_size:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.tok.vocab_size)
        return model_cfg

    def tokenizer_config(self) -> dict:
        if self.bpe:
            return {"kind": "bpe", "vocab_size": self.tok.vocab_size, "sha1": self.tok.sha1}
        return {"kind": "byte", "vocab_size": self.tok.vocab_size}

    def save_files(self, out_dir: str) -> None:
        """bpe: tokenizer.json (when missing or different) and the encoded corpus, tokens.pt
        (once per run folder), so that a resumed run or an evaluation skips both steps."""
        if not self.bpe:
            return
        path = os.path.join(out_dir, TOKENIZER_FILE)
        same = False
        if os.path.isfile(path):
            with open(path, "rb") as f:
                same = hashlib.sha1(f.read()).hexdigest() == self.tok.sha1
        if not same:
            self.tok.save(path)
        if getattr(self, "_corpora", None) and self._cache_dir != os.path.abspath(out_dir):
            D.save_token_cache(os.path.join(out_dir, TOKEN_CACHE_FILE), self.tok, self._corpora)
            self._cache_dir = os.path.abspath(out_dir)


# ---- GPT ---------------------------------------------------------------------------------------


class GPTTask(_TextTask):
    name = "gpt"
    unit = "tokens"

    def __init__(self, model_cfg: GPTConfig, *, seq_len: int = 256, data: str | None = None,
                 eval_windows: int = 256, load_data: bool = True, tokenizer="byte", vocab_size: int | None = None,
                 run_dir: str | None = None):
        if seq_len > model_cfg.block_size:
            raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {model_cfg.block_size}")
        self.seq_len, self.eval_windows = seq_len, eval_windows
        val = self._setup_text(tokenizer, vocab_size, data, load_data, run_dir)
        self.model_cfg = self._model_cfg(model_cfg)
        self.model = GPT(self.model_cfg)
        if load_data:
            self.val = self._windows(val, eval_windows, seq_len + 1, torch.Generator().manual_seed(1234))

    def config(self) -> dict:
        return {"kind": "gpt", "model": self.model_cfg.to_dict(), "seq_len": self.seq_len, "data": self.data_path,
                "eval_windows": self.eval_windows, "tokenizer": self.tokenizer_config()}

    def batch(self, gen, n):
        w = self._windows(self.train_ids, n, self.seq_len + 1, gen)
        return {"x": w[:, :-1], "y": w[:, 1:]}

    split = staticmethod(_split_dict)

    def count(self, mb):
        return mb["y"].numel()

    def items(self, b):
        return b["y"].numel()

    def loss(self, model, mb):
        # positions: the global positions of a context-parallel shard's tokens (train/parallel.py);
        # return_logits=False: the fused LM head + cross-entropy
        _, loss = model(mb["x"], mb["y"], positions=mb.get("positions"), return_logits=False)
        return loss * mb["y"].numel()

    def evaluate(self, model, device):
        tot, n, nbytes = 0.0, 0, 0
        for w in self.val.split(32):
            if self.bpe:
                nbytes += int(self.tok.token_nbytes[w[:, 1:]].sum())
            w = w.to(device)
            _, loss = model(w[:, :-1], w[:, 1:], return_logits=False)
            tot += float(loss) * w[:, 1:].numel()
            n += w[:, 1:].numel()
        if not self.bpe:
            nats = tot / n
            return {"val_loss": nats, "val_bits_per_byte": nats / math.log(2)}
        nats = tot / nbytes
        return {"val_loss": nats, "val_bits_per_byte": nats / math.log(2), "val_nats_per_token": tot / n,
                "val_bytes_per_token": nbytes / n}


# ---- masking schedules -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """A value that moves from `start` to `end` over training, written `constant`,
    `constant:v`, `linear:a:b` or `cosine:a:b` (a, b, v in (0, 1]).

    mlm: the masking rate (`constant`: the task's mask_prob). mdlm: the upper end of the
    range t is drawn from, t in (0, t_max] (`constant`: t_max = 1, the full MDLM bound).
    linear goes straight from a to b; cosine starts and ends slowly, a + (b - a)(1 - cos(pi p))/2,
    with p = step / steps. The task turns the value into a per-row rate tensor for pk.mlm_mask,
    so the rate changes every step without a recompile or a host sync."""

    kind: str = "constant"
    start: float | None = None
    end: float | None = None

    @classmethod
    def parse(cls, spec: "str | MaskSchedule | None") -> "MaskSchedule":
        if spec is None:
            return cls()
        if isinstance(spec, MaskSchedule):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"mask_schedule: expected a string such as 'linear:0.3:0.15', got {type(spec).__name__}")
        parts = spec.strip().split(":")
        kind, nums = parts[0], parts[1:]
        want = {"constant": (0, 1), "linear": (2,), "cosine": (2,)}.get(kind)
        if want is None or len(nums) not in want:
            raise ValueError(f"mask_schedule: expected 'constant', 'constant:v', 'linear:a:b' or 'cosine:a:b', "
                             f"got {spec!r}")
        vals = []
        for x in nums:
            try:
                v = float(x)
            except ValueError:
                raise ValueError(f"mask_schedule: {x!r} in {spec!r} is not a number") from None
            if not 0.0 < v <= 1.0:
                raise ValueError(f"mask_schedule: expected rates in (0, 1], got {x} in {spec!r}")
            vals.append(v)
        if kind == "constant":
            return cls("constant", *(vals * 2)) if vals else cls()
        return cls(kind, vals[0], vals[1])

    def spec(self) -> str:
        if self.start is None:
            return self.kind
        if self.kind == "constant":
            return f"constant:{self.start:g}"
        return f"{self.kind}:{self.start:g}:{self.end:g}"

    def value(self, progress: float, default: float) -> float:
        """The scheduled value at progress in [0, 1] (`default` for a bare `constant`)."""
        if self.start is None:
            return default
        p = min(1.0, max(0.0, float(progress)))
        if self.kind == "linear":
            w = p
        elif self.kind == "cosine":
            w = 0.5 * (1.0 - math.cos(math.pi * p))
        else:
            w = 0.0
        return self.start + (self.end - self.start) * w


class _ScheduledTask:
    """The training step a task's masking schedule reads: the loop calls set_step(step, steps)
    before it draws each batch (a task built without it stays at progress 0)."""

    _step, _steps = 0, 1

    def set_step(self, step: int, steps: int) -> None:
        self._step, self._steps = int(step), max(1, int(steps))

    @property
    def progress(self) -> float:
        return self._step / self._steps


# ---- MLM ---------------------------------------------------------------------------------------


class MLMTask(_ScheduledTask, _TextTask):
    """mask_schedule (MaskSchedule or its string): the training masking rate over the run; the
    validation set is always masked at mask_prob, so runs with different schedules compare."""
    name = "mlm"
    unit = "tokens"

    def __init__(self, model_cfg: BertConfig, *, seq_len: int = 256, min_len: int = 64, mask_prob: float = 0.15,
                 data: str | None = None, eval_windows: int = 256, load_data: bool = True, tokenizer="byte",
                 vocab_size: int | None = None, run_dir: str | None = None, mask_schedule=None):
        if seq_len > model_cfg.max_len:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_len {model_cfg.max_len}")
        if not 1 <= min_len <= seq_len:
            raise ValueError(f"min_len: expected 1 <= min_len <= seq_len ({seq_len}), got {min_len}")
        self.seq_len, self.min_len, self.mask_prob = seq_len, min_len, mask_prob
        self.mask_schedule = MaskSchedule.parse(mask_schedule)
        self.eval_windows = eval_windows
        val = self._setup_text(tokenizer, vocab_size, data, load_data, run_dir)
        self.model_cfg = self._model_cfg(model_cfg)
        self.model = BertMLM(self.model_cfg)
        if load_data:
            counts = torch.bincount(self.train_ids.long(), minlength=self.tok.vocab_size)
            self.most_frequent = int(counts.argmax())
            g = torch.Generator().manual_seed(1234)
            self.val = self._masked(val, g, eval_windows)

    def config(self) -> dict:
        return {"kind": "mlm", "model": self.model_cfg.to_dict(), "seq_len": self.seq_len, "min_len": self.min_len,
                "mask_prob": self.mask_prob, "data": self.data_path, "eval_windows": self.eval_windows,
                "tokenizer": self.tokenizer_config(), "mask_schedule": self.mask_schedule.spec()}

    def mask_rates(self, n: int) -> "float | torch.Tensor":
        """The training masking rate at the current step: mask_prob itself for a bare `constant`,
        else a per-row float32 tensor [n] holding the scheduled rate."""
        if self.mask_schedule.start is None:
            return self.mask_prob
        return torch.full((n,), self.mask_schedule.value(self.progress, self.mask_prob), dtype=torch.float32)

    def _masked(self, corpus_ids: torch.Tensor, gen: torch.Generator, n: int, mask_prob=None) -> dict:
        """n windows of random length in [min_len, seq_len], right padded, masked by pk.mlm_mask
        (at mask_prob, a float or per-row rates [n]; default: the task's mask_prob)."""
        ids = self._windows(corpus_ids, n, self.seq_len, gen)
        lens = torch.randint(self.min_len, self.seq_len + 1, (n,), generator=gen)
        am = (torch.arange(self.seq_len)[None, :] < lens[:, None]).long()
        ids = ids.masked_fill(am == 0, self.tok.pad_token_id)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        masked, labels = pk.mlm_mask(ids, mask_token_id=self.tok.mask_token_id, vocab_size=self.tok.vocab_size,
                                     mask_prob=self.mask_prob if mask_prob is None else mask_prob,
                                     special_token_ids=self.tok.all_special_ids, attention_mask=am, seed=seed)
        return {"input_ids": masked, "attention_mask": am, "labels": labels}

    def batch(self, gen, n):
        return self._masked(self.train_ids, gen, n, self.mask_rates(n))

    split = staticmethod(_split_dict)

    def count(self, mb):
        return int((mb["labels"] != -100).sum())

    def items(self, b):
        return int(b["attention_mask"].sum())

    def loss(self, model, mb):
        ids, cu, pos, max_len, labels = pack(mb["input_ids"], mb["attention_mask"], mb["labels"])
        _, _, loss_sum = model(ids, cu, pos, max_len, labels, return_logits=False)  # fused MLM head
        return loss_sum

    def evaluate(self, model, device):
        correct = base = n = nbytes = 0
        tot = 0.0
        nb = self.tok.token_nbytes.to(device) if self.bpe else None
        for mb in _split_dict(self.val, max(1, self.eval_windows // 32)):
            mb = {k: v.to(device) for k, v in mb.items()}
            ids, cu, pos, max_len, labels = pack(mb["input_ids"], mb["attention_mask"], mb["labels"])
            logits, y, loss_sum = model(ids, cu, pos, max_len, labels)
            tot += float(loss_sum)
            correct += int((logits.argmax(-1) == y).sum())
            base += int((y == self.most_frequent).sum())
            n += y.numel()
            if self.bpe:
                nbytes += int(nb[y].sum())
        if not self.bpe:
            return {"val_loss": tot / n, "masked_accuracy": correct / n, "baseline_accuracy": base / n,
                    "baseline_byte": self.most_frequent}
        return {"val_loss": tot / max(nbytes, 1), "val_nats_per_token": tot / n, "masked_token_accuracy": correct / n,
                "most_frequent_token_accuracy": base / n,
                "most_frequent_token": repr(self.tok.token_bytes(self.most_frequent).decode("utf-8", errors="replace")),
                "masked_bytes_per_token": nbytes / n}


# ---- hybrid: next-token prediction and span infilling ---------------------------------------------


def span_infill_example(text: torch.Tensor, masked: torch.Tensor, *, mask_id: int, bos_id: int, eos_id: int,
                        length: int | None = None, mask_targets: bool = False):
    """One infilling example (GLM's layout) from a token row text [n] and a bool mask [n] of the
    positions to hide. The stream is
        prefix = text with each run of masked positions replaced by one mask_id, then bos_id
        spans  = the runs' tokens in order, each followed by eos_id
    and the example is x = stream[:-1], y = stream[1:] with the prefix's own targets ignored
    (-100): the token at bos predicts the first span's first token, and every span ends with an
    eos (its length is not given away). The prefix (bos included) is attended both ways.
    Returns (x [L], y [L], prefix_len, span_target bool [L]: the targets that are hidden tokens,
    the eos ends excluded). L = n + 2 * runs (the stream less one); with `length`, x is padded
    with eos_id and y with -100 up to it (a ValueError when the stream is longer).

    mask_targets: each mask token of the prefix also predicts its hole's first hidden token (its
    target in y instead of -100). The prefix attends only to itself, so nothing hidden leaks: a
    masked-token prediction from the bidirectional context at every hole, on top of the holes'
    left-to-right tokens (span_target still marks the spans' targets only)."""
    masked = masked.bool()
    prev = torch.cat([masked.new_zeros(1), masked[:-1]])
    nxt = torch.cat([masked[1:], masked.new_zeros(1)])
    starts, ends = masked & ~prev, masked & ~nxt
    kept = ~masked | starts
    prefix = torch.where(starts, torch.full_like(text, mask_id), text)[kept]
    hidden = text[masked]
    spans = torch.stack([hidden, torch.full_like(hidden, eos_id)], 1).flatten()
    spans = spans[torch.stack([torch.ones_like(ends[masked]), ends[masked]], 1).flatten()]
    stream = torch.cat([prefix, text.new_full((1,), bos_id), spans])
    plen = prefix.numel() + 1
    x, y = stream[:-1].clone(), stream[1:].clone()
    y[:plen - 1] = -100
    if mask_targets:
        y[:plen - 1][starts[kept]] = text[starts]
    span_target = torch.zeros_like(y, dtype=torch.bool)
    span_target[plen - 1:] = y[plen - 1:] != eos_id
    if length is not None:
        if x.numel() > length:
            raise ValueError(f"length: the infilling stream has {x.numel()} tokens, more than {length}")
        pad = length - x.numel()
        x = torch.cat([x, x.new_full((pad,), eos_id)])
        y = torch.cat([y, y.new_full((pad,), -100)])
        span_target = torch.cat([span_target, span_target.new_zeros(pad)])
    return x, y, plen, span_target


SPAN_STEP = 1.0 / 16


def infill_positions(x: torch.Tensor, prefix_len: int, *, mask_id: int, eos_id: int,
                     step: float = SPAN_STEP) -> torch.Tensor:
    """GLM's span positions, in one rotary dimension, for a row x [L] of span_infill_example's
    layout (padding included): the prefix's tokens keep their indices, and the k-th hole's
    block, the token that starts it (bos for the first, the previous hole's eos after) and its
    tokens, takes the positions m_k, m_k + step, m_k + 2 step, ... from the position m_k of the
    k-th mask token in the prefix. The query that predicts a hole's first token then sits where
    its mask sits, next to the text around it (rotary attention sees relative positions),
    instead of far to the right after the prefix, where it would have to count masks to know
    which hole it fills; a fractional step keeps the hole's later tokens between its mask and
    the text after it (GLM keeps them apart with a second position). Padding after the last
    hole keeps its indices. Returns float32 positions [L]."""
    L = x.numel()
    pos = torch.arange(L, dtype=torch.float32)
    if prefix_len < 1 or prefix_len > L:
        return pos
    holes = (x[:prefix_len - 1] == mask_id).nonzero().flatten()
    region = torch.arange(prefix_len - 1, L)
    start = torch.zeros(region.numel(), dtype=torch.bool)
    start[0] = True
    start[1:] = x[prefix_len:] == eos_id
    block = torch.cumsum(start.long(), 0) - 1                      # the hole each token belongs to
    first = region[start][block]                                   # the index its block starts at
    inside = block < holes.numel()
    pos[region[inside]] = holes[block[inside]].float() + (region - first)[inside].float() * step
    return pos


def infill_decode_positions(stream: list[int], prefix_len: int, max_new_tokens: int, *, mask_id: int, eos_id: int,
                            step: float = SPAN_STEP) -> list[float]:
    """The positions GPT.generate needs to decode a hole after stream (the prefix, the holes
    before, and the bos or eos that starts this hole): infill_positions of the stream, then
    max_new_tokens more, step apart, inside the hole."""
    pos = infill_positions(torch.tensor(stream), prefix_len, mask_id=mask_id, eos_id=eos_id, step=step)
    return pos.tolist() + (float(pos[-1]) + step * torch.arange(1, max_new_tokens + 1, dtype=torch.float32)).tolist()


def infill_prefix(tok, pieces: list[list[int]]) -> list[int]:
    """The prefix of span_infill_example's layout for text given as the token pieces around its
    holes: the pieces joined by one mask token per hole, then bos (what a hybrid model reads
    both ways before decoding the holes in order, each ending with eos)."""
    out = list(pieces[0])
    for piece in pieces[1:]:
        out += [tok.mask_token_id] + list(piece)
    return out + [tok.bos_token_id]


def random_spans(n: int, n_masked: int, n_spans: int, gen: torch.Generator) -> torch.Tensor:
    """A bool mask [n] with n_masked positions in exactly n_spans runs (T5's random segmentation):
    the masked count is cut at random into n_spans runs of >= 1, the rest into n_spans + 1 gaps,
    the inner ones >= 1 so that runs do not merge."""
    if not 1 <= n_spans <= n_masked or n - n_masked < n_spans - 1:
        raise ValueError(f"spans: cannot place {n_masked} hidden tokens in {n_spans} runs among {n}")
    cuts = torch.randperm(n_masked - 1, generator=gen)[:n_spans - 1].sort().values + 1
    runs = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n_masked])]))
    free = n - n_masked - (n_spans - 1)
    g = torch.randint(0, free + 1, (n_spans,), generator=gen).sort().values
    gaps = torch.diff(torch.cat([torch.tensor([0]), g, torch.tensor([free])]))
    gaps[1:-1] += 1
    lens = torch.stack([gaps[:-1], runs], 1).flatten()
    vals = torch.tensor([False, True]).repeat(n_spans)
    return torch.cat([vals.repeat_interleave(lens), torch.zeros(int(gaps[-1]), dtype=torch.bool)])


def parse_span_len(spec) -> tuple[float, float]:
    """The hybrid's span_len: a mean span length (a number >= 1) or a range "lo:hi" (1 <= lo <= hi)
    from which each infilling example draws its own mean uniformly; returns (lo, hi)."""
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        try:
            lo, hi = (float(x) for x in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            lo = hi = None
        if lo is None or not 1.0 <= lo <= hi:
            raise ValueError(f"span_len: expected a mean span length >= 1 or a range 'lo:hi' with 1 <= lo <= hi, "
                             f"got {spec!r}")
        return lo, hi
    try:
        v = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"span_len: expected a mean span length >= 1 or a range 'lo:hi', got {spec!r}") from None
    if not v >= 1.0:
        raise ValueError(f"span_len: expected a mean span length >= 1, got {spec}")
    return v, v


class HybridTask(GPTTask):
    """A GPT-family decoder trained on a mixture of next-token prediction and span infilling
    (GLM / UL2). Every training window of seq_len + 1 tokens is, with probability `mix`, an
    infilling example: the first seq_len - 2 * n_spans tokens are masked by random_spans (about
    mask_prob of them, in n_spans = round(mask_prob * seq_len / span_len) runs) and laid out by
    span_infill_example, the prefix attended both ways through pk.flash_attention's prefix-LM
    mask (prefix_lens) and the hidden spans predicted left to right after it; otherwise it is
    the GPT's plain next-token example (prefix_lens 0). Both kinds are exactly seq_len tokens, so
    batches have a fixed shape and no padding. The loss is the mean over the predicted tokens.

    span_len: the mean span length, or a range "lo:hi" from which each infilling example draws
    its own mean uniformly (a mix of short runs, as single masked tokens, and long ones, as
    infilled lines). n_spans, n_text and n_masked hold the layout of a fixed span_len (with a
    range, of its lower end: the most runs).

    span_positions: "glm" (the default) gives each hole's tokens the rotary positions of its mask
    (infill_positions, GLM's span positions in one dimension); "sequential" numbers the stream
    0, 1, ... as a plain GPT does (runs saved before the option existed). Batches carry the
    positions [B, seq_len] (float32; 0, 1, ... in the next-token rows); generation and
    evaluation use the same (self.positions, self.decode_positions).

    mask_targets (the default): each mask token of an infilling prefix also predicts its hole's
    first token from the bidirectional prefix (span_infill_example), a masked-token target per
    hole besides the holes' left-to-right tokens. With it and a higher hidden share (mask_prob
    0.25: more left-to-right span tokens per infilling row), fewer windows need to infill (mix
    0.3): measured at pk-compare's default budget this gave both a next-token loss within 5% of
    the GPT's and a masked-token accuracy above the MLM's (see the README). Runs saved before the
    option existed rebuild without it.

    Evaluation: val_loss is the next-token nats per byte on the GPT task's own validation
    windows (the same windows, the same computation: exactly comparable with a GPT run); on
    infilling examples built from those windows (a fixed mask draw), masked_accuracy is the
    share of hidden tokens predicted by argmax with the earlier hidden tokens given (teacher
    forcing), infill_loss their mean loss per token (the eos ends included; never the mask
    targets, so runs with and without them compare)."""

    name = "hybrid"

    def __init__(self, model_cfg: GPTConfig, *, seq_len: int = 256, mix: float = 0.3, mask_prob: float = 0.25,
                 span_len: "float | str" = 3.0, span_positions: str = "glm", mask_targets: bool = True, **kw):
        if span_positions not in ("glm", "sequential"):
            raise ValueError(f"span_positions: expected 'glm' or 'sequential', got {span_positions!r}")
        self.span_positions = span_positions
        self.mask_targets = bool(mask_targets)
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix: expected a fraction in [0, 1], got {mix}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob: expected a value in (0, 1), got {mask_prob}")
        self.span_lo, self.span_hi = parse_span_len(span_len)
        self.mix, self.mask_prob = float(mix), float(mask_prob)
        self.span_len = self.span_lo if self.span_lo == self.span_hi else f"{self.span_lo:g}:{self.span_hi:g}"
        self._seq_len = seq_len
        for mean in (self.span_lo, self.span_hi):
            n_spans, n_text, n_masked = self.layout(mean)
            if n_text < 2 or n_text - n_masked < n_spans - 1:
                raise ValueError(f"seq_len {seq_len} is too short for spans of mean length {mean:g} at mask_prob "
                                 f"{mask_prob}")
        self.n_spans, self.n_text, self.n_masked = self.layout(self.span_lo)
        super().__init__(model_cfg, seq_len=seq_len, **kw)
        if hasattr(self, "val"):
            self.val_infill = self._infill_batch(self.val, torch.Generator().manual_seed(4321),
                                                 torch.ones(self.val.shape[0], dtype=torch.bool), mask_targets=False)

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(kind="hybrid", mix=self.mix, mask_prob=self.mask_prob, span_len=self.span_len,
                   span_positions=self.span_positions, mask_targets=self.mask_targets)
        return cfg

    def positions(self, x: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """The rotary positions [L] (float32) of an infilling row x [L] (prefix_len 0: a next-token row)."""
        if self.span_positions == "sequential" or prefix_len == 0:
            return torch.arange(x.numel(), dtype=torch.float32)
        return infill_positions(x, prefix_len, mask_id=self.tok.mask_token_id, eos_id=self.tok.eos_token_id)

    def decode_positions(self, stream: list[int], prefix_len: int, max_new_tokens: int) -> list[float] | None:
        """GPT.generate's positions= for decoding the hole after stream (None: sequential)."""
        if self.span_positions == "sequential":
            return None
        return infill_decode_positions(stream, prefix_len, max_new_tokens, mask_id=self.tok.mask_token_id,
                                       eos_id=self.tok.eos_token_id)

    def layout(self, mean: float) -> tuple[int, int, int]:
        """(runs, text tokens, hidden tokens) of an infilling example with spans of this mean length:
        the text and two tokens per run (its mask in the prefix, its eos) fill seq_len."""
        n_spans = max(1, round(self.mask_prob * self._seq_len / mean))
        n_text = self._seq_len - 2 * n_spans
        return n_spans, n_text, max(n_spans, round(self.mask_prob * n_text))

    def infill_row(self, text: torch.Tensor, masked: torch.Tensor, length: int | None = None,
                   mask_targets: bool | None = None):
        tok = self.tok
        mask_targets = self.mask_targets if mask_targets is None else mask_targets
        return span_infill_example(text, masked, mask_id=tok.mask_token_id, bos_id=tok.bos_token_id,
                                   eos_id=tok.eos_token_id, length=length, mask_targets=mask_targets)

    def _infill_batch(self, w: torch.Tensor, gen: torch.Generator, infill: torch.Tensor,
                      mask_targets: bool | None = None) -> dict:
        """Windows w [B, seq_len + 1]: rows with infill[b] become infilling examples (mask_targets:
        None, the task's)."""
        x, y = w[:, :-1].clone(), w[:, 1:].clone()
        plen = torch.zeros(w.shape[0], dtype=torch.int32)
        span = torch.zeros_like(y, dtype=torch.bool)
        pos = torch.arange(x.shape[1], dtype=torch.float32).repeat(x.shape[0], 1)
        for b in infill.nonzero().flatten().tolist():
            n_spans, n_text, n_masked = self.n_spans, self.n_text, self.n_masked
            if self.span_hi > self.span_lo:      # this example's own mean span length
                u = float(torch.rand((), generator=gen, dtype=torch.float64))
                n_spans, n_text, n_masked = self.layout(self.span_lo + (self.span_hi - self.span_lo) * u)
            masked = random_spans(n_text, n_masked, n_spans, gen)
            x[b], y[b], plen[b], span[b] = self.infill_row(w[b, :n_text], masked, mask_targets=mask_targets)
            pos[b] = self.positions(x[b], int(plen[b]))
        return {"x": x, "y": y, "prefix_lens": plen, "positions": pos, "span": span}

    def batch(self, gen, n):
        w = self._windows(self.train_ids, n, self.seq_len + 1, gen)
        infill = torch.rand(n, generator=gen) < self.mix
        b = self._infill_batch(w, gen, infill)
        del b["span"]
        return b

    def count(self, mb):
        return int((mb["y"] != -100).sum())

    def items(self, b):
        return b["x"].numel()

    def loss(self, model, mb):
        # the fused LM head + cross-entropy, as the GPT task (the prefix's targets are -100)
        _, loss = model(mb["x"], mb["y"], positions=mb["positions"], prefix_lens=mb["prefix_lens"],
                        return_logits=False)
        return loss * (mb["y"] != -100).sum()

    def evaluate(self, model, device):
        out = super().evaluate(model, device)    # next-token, exactly as GPTTask
        correct = n = 0
        tot, n_loss = 0.0, 0
        for mb in _split_dict(self.val_infill, max(1, self.val_infill["x"].shape[0] // 32)):
            mb = {k: v.to(device) for k, v in mb.items()}
            logits, loss = model(mb["x"], mb["y"], positions=mb["positions"], prefix_lens=mb["prefix_lens"])
            k = int((mb["y"] != -100).sum())
            tot, n_loss = tot + float(loss) * k, n_loss + k
            span = mb["span"]
            correct += int((logits.argmax(-1)[span] == mb["y"][span]).sum())
            n += int(span.sum())
        out.update(masked_accuracy=correct / max(n, 1), infill_loss=tot / max(n_loss, 1))
        return out


# ---- masked diffusion LM -----------------------------------------------------------------------


def low_discrepancy_t(u: float, n: int, *, t_max: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """n rates for one batch, t_i = max(eps, t_max * ((u + i / n) mod 1)) for u in [0, 1):
    one per stratum of (0, t_max], so a batch covers the whole range (float32 [n])."""
    frac = torch.remainder(u + torch.arange(n, dtype=torch.float64) / n, 1.0)
    return (frac * t_max).clamp_min(eps).float()


def dense_pack(ids: torch.Tensor):
    """Equal-length rows [B, L] -> the packed inputs of BertMLM (ids [B*L], cu_seqlens,
    positions, max_seqlen), without pack()'s data-dependent lengths (no host sync)."""
    B, L = ids.shape
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=ids.device)
    pos = torch.arange(L, device=ids.device).repeat(B)
    return ids.reshape(-1), cu, pos, L


class MDLMTask(_ScheduledTask, _TextTask):
    """Masked diffusion language model (MDLM, Sahoo et al. 2024) on the BertMLM encoder.

    Forward process: a sequence x of L tokens is masked at rate t, every token independently
    replaced by the mask token with probability t (the linear schedule alpha_t = 1 - t). Each
    sequence of a batch gets its own t, drawn low-discrepancy across the batch (one per
    stratum, low_discrepancy_t), and pk.mlm_mask masks with these per-row rates
    (replace_prob 1, random_prob 0). The model, which does not see t, predicts the masked
    tokens; the loss is the continuous-time bound
        -log p(x) <= E_t [ (1/t) sum over the masked tokens of -log p(x_l | x_t) ],
    summed per sequence and normalised per token (so the training loss is the bound in nats
    per token of a Monte-Carlo t).

    Validation: the GPT task's windows (same split, same seed, seq_len + 1 tokens), scored on
    the tokens the GPT predicts (w[:, 1:]), each at eval_t fixed stratified rates
    t_k = max(eps, (k + u_k) / eval_t): an unbiased (up to eps) estimate of the bound, the
    same draws every evaluation; val_loss is it in nats per byte, comparable with the GPT's.

    mask_schedule: the upper end t_max of the training range (0, t_max] over the run
    (`constant`: t_max = 1, the bound itself).

    subs: MDLM's SUBS parametrisation: the model never predicts the special tokens (the mask
    among them) at a masked position, its logits there are -inf (BertMLM.never_predict), in
    training, in the bound and in sampling; the targets are never special, so this is exact.

    weighting: the training loss's weight of a masked token. "t": 1/t, the bound as written. "count":
    (n + 1) / k for a row with k of its n tokens masked, the mean of 1/t given k when t is
    uniform in (0, 1] (t | k is Beta(k + 1, n - k + 1)): the same expected loss, the bound (up to
    the eps clamp), with the noise of the 1/t weight averaged out (Rao-Blackwell); a row with
    t = 0.002 and one masked token no longer weighs 500. Needs mask_schedule constant. The
    validation bound is the same for both."""

    name = "mdlm"
    unit = "tokens"
    EPS = 1e-3

    def __init__(self, model_cfg: BertConfig, *, seq_len: int = 256, data: str | None = None, eval_windows: int = 256,
                 eval_t: int = 4, load_data: bool = True, tokenizer="byte", vocab_size: int | None = None,
                 run_dir: str | None = None, mask_schedule=None, subs: bool = False, weighting: str = "t"):
        if seq_len > model_cfg.max_len:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_len {model_cfg.max_len}")
        if weighting not in ("t", "count"):
            raise ValueError(f"weighting: expected 't' or 'count', got {weighting!r}")
        if not isinstance(eval_t, int) or eval_t < 1:
            raise ValueError(f"eval_t: expected an integer >= 1, got {eval_t!r}")
        self.seq_len, self.eval_windows, self.eval_t = seq_len, eval_windows, eval_t
        self.mask_schedule = MaskSchedule.parse(mask_schedule)
        if weighting == "count" and self.mask_schedule.spec() not in ("constant", "constant:1"):
            raise ValueError(f"weighting 'count' needs t uniform in (0, 1] (mask_schedule constant), got "
                             f"mask_schedule {self.mask_schedule.spec()!r}")
        self.weighting = weighting
        val = self._setup_text(tokenizer, vocab_size, data, load_data, run_dir)
        self.model_cfg = self._model_cfg(model_cfg)
        self.model = BertMLM(self.model_cfg)
        self.subs = bool(subs)
        if self.subs:
            self.model.never_predict(self.tok.all_special_ids)
        if load_data:
            g = torch.Generator().manual_seed(1234)
            windows = self._windows(val, eval_windows, seq_len + 1, g)[:, 1:]   # the GPT's predicted tokens
            strata = (torch.arange(eval_t, dtype=torch.float64)[None, :] + torch.rand(eval_windows, eval_t,
                                                                                       generator=g,
                                                                                       dtype=torch.float64)) / eval_t
            t = strata.clamp_min(self.EPS).float().reshape(-1)                  # [eval_windows * eval_t]
            ids = windows.repeat_interleave(eval_t, dim=0)
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            masked, labels = self._mask(ids, t, seed)
            self.val = {"input_ids": masked, "labels": labels, "t": t}
            self.val_nbytes = (int(self.tok.token_nbytes[windows].sum()) if self.bpe else windows.numel())

    def config(self) -> dict:
        return {"kind": "mdlm", "model": self.model_cfg.to_dict(), "seq_len": self.seq_len, "data": self.data_path,
                "eval_windows": self.eval_windows, "eval_t": self.eval_t, "tokenizer": self.tokenizer_config(),
                "mask_schedule": self.mask_schedule.spec(), "subs": self.subs, "weighting": self.weighting}

    def _mask(self, ids, t, seed):
        return pk.mlm_mask(ids, mask_token_id=self.tok.mask_token_id, vocab_size=self.tok.vocab_size, mask_prob=t,
                           replace_prob=1.0, random_prob=0.0, special_token_ids=self.tok.all_special_ids, seed=seed)

    def t_max(self) -> float:
        return self.mask_schedule.value(self.progress, 1.0)

    def draw_t(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """The batch's rates: low-discrepancy in (0, t_max] from one uniform draw of gen."""
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        return low_discrepancy_t(u, n, t_max=self.t_max(), eps=self.EPS)

    def batch(self, gen, n):
        ids = self._windows(self.train_ids, n, self.seq_len, gen)
        t = self.draw_t(gen, n)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        masked, labels = self._mask(ids, t, seed)
        return {"input_ids": masked, "labels": labels, "t": t}

    split = staticmethod(_split_dict)

    def count(self, mb):
        return mb["input_ids"].numel()

    def items(self, b):
        return b["input_ids"].numel()

    def _bound(self, model, mb, return_logits=True):
        """(logits at the masked tokens, their labels, the summed 1/t-weighted cross-entropy there);
        return_logits=False: the fused head, no logits (None in their place)."""
        B, L = mb["input_ids"].shape
        ids, cu, pos, max_len = dense_pack(mb["input_ids"])
        w = (1.0 / mb["t"].float())[:, None].expand(B, L).reshape(-1)
        return model(ids, cu, pos, max_len, mb["labels"].reshape(-1), weights=w, return_logits=return_logits)

    def count_weights(self, mb) -> torch.Tensor:
        """weighting "count": each row's weight (n + 1) / k [B] for its k masked tokens out of n
        maskable ones (the row's non-special tokens), E[1/t | k] for t uniform in (0, 1]."""
        labels, ids = mb["labels"], mb["input_ids"]
        special = torch.as_tensor(self.tok.all_special_ids, device=ids.device)
        n = (~(torch.isin(ids, special) & (labels == -100))).sum(1).float()
        k = (labels != -100).sum(1).clamp_min(1).float()
        return (n + 1) / k

    def loss(self, model, mb):
        if self.weighting == "t":
            return self._bound(model, mb, return_logits=False)[2]
        B, L = mb["input_ids"].shape
        ids, cu, pos, max_len = dense_pack(mb["input_ids"])
        w = self.count_weights(mb)[:, None].expand(B, L).reshape(-1)
        return model(ids, cu, pos, max_len, mb["labels"].reshape(-1), weights=w, return_logits=False)[2]

    def evaluate(self, model, device):
        tot, correct, n = 0.0, 0, 0
        for mb in _split_dict(self.val, max(1, self.val["t"].shape[0] // 32)):
            logits, y, loss_sum = self._bound(model, {k: v.to(device) for k, v in mb.items()})
            tot += float(loss_sum)
            correct += int((logits.argmax(-1) == y).sum())
            n += y.numel()
        tot /= self.eval_t                                 # the mean over the eval_t rates of each window
        ntok = self.eval_windows * self.seq_len
        out = {"val_loss": tot / self.val_nbytes, "val_bits_per_byte": tot / self.val_nbytes / math.log(2),
               "masked_accuracy": correct / max(n, 1)}
        if self.bpe:
            out.update(val_nats_per_token=tot / ntok, val_bytes_per_token=self.val_nbytes / ntok)
        return out


INFILL_MARK = "___"


def mdlm_rows(tok, *, prompts=None, infills=None, max_new_tokens=200, infill_length=16, num_samples=1):
    """The rows an mdlm run fills: (token lists holding tok.mask_token_id where text is to be
    drawn, the kind of each: "prompt", "infill" or "unconditional"). A prompt keeps its text and
    is followed by max_new_tokens masks; an infill replaces each ___ with infill_length masks;
    with neither, one row of max_new_tokens masks. Each row is repeated num_samples times."""
    mask = tok.mask_token_id
    rows, kinds = [], []
    for text in prompts or []:
        rows.append(tok.encode(text) + [mask] * max_new_tokens)
        kinds.append("prompt")
    for text in infills or []:
        parts = text.split(INFILL_MARK)
        if len(parts) < 2:
            raise ValueError(f"infill {text!r}: expected at least one {INFILL_MARK} to fill")
        row = []
        for i, part in enumerate(parts):
            if i:
                row += [mask] * infill_length
            row += tok.encode(part) if part else []
        rows.append(row)
        kinds.append("infill")
    if not rows:
        rows, kinds = [[mask] * max_new_tokens], ["unconditional"]
    rows = [r for r in rows for _ in range(num_samples)]
    kinds = [k for k in kinds for _ in range(num_samples)]
    return rows, kinds


def mdlm_generate(task, rows, *, steps=None, strategy="confidence", seed=0, **knobs):
    """Fill the masks of rows (token lists, see mdlm_rows) with task.model.unmask; returns the
    filled token lists. steps defaults to the largest masked count (one token per step)."""
    tok = task.tok
    B, L = len(rows), max(len(r) for r in rows)
    if L > task.model.cfg.max_len:
        raise ValueError(f"a row of {L} tokens exceeds the model's max_len {task.model.cfg.max_len}")
    x = torch.full((B, L), tok.pad_token_id, dtype=torch.int64)
    am = torch.zeros(B, L, dtype=torch.int64)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        am[i, :len(r)] = 1
    if steps is None:
        steps = max(1, max(sum(1 for t in r if t == tok.mask_token_id) for r in rows))
    out = task.model.unmask(x, mask_token_id=tok.mask_token_id, steps=steps, attention_mask=am, strategy=strategy,
                            seed=seed, banned_ids=tok.all_special_ids, **knobs).cpu()
    return [out[i, :len(r)].tolist() for i, r in enumerate(rows)]


# ---- denoising ---------------------------------------------------------------------------------


class DenoisingTask:
    unit = "images"
    # images in the optimal-transport pools of coupling "ot": the unconditional rows, each class
    OT_POOL_UNCOND, OT_POOL_CLASS = 256, 64

    def __init__(self, objective: str = "diffusion", *, arch: str = "unet", model_cfg: dict | None = None,
                 class_cond: bool = True, p_uncond: float = 0.5, prediction: str = "v_prediction",
                 schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000, data: str | None = None,
                 eval_samples: int = 500, guidance: float = 1.0, load_data: bool = True, image_shape=None,
                 num_classes: int | None = None, coupling: str | None = None):
        if objective not in ("diffusion", "flow"):
            raise ValueError(f"objective: expected 'diffusion' or 'flow', got {objective!r}")
        if arch not in ("unet", "dit"):
            raise ValueError(f"arch: expected 'unet' or 'dit', got {arch!r}")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction: expected 'epsilon' or 'v_prediction', got {prediction!r}")
        coupling = coupling or ("ot" if objective == "flow" else "independent")
        if coupling not in ("independent", "ot"):
            raise ValueError(f"coupling: expected 'independent' or 'ot', got {coupling!r}")
        if coupling == "ot" and objective != "flow":
            raise ValueError("coupling 'ot' pairs noise with images for flow matching; use objective='flow'")
        self.coupling = coupling
        self._class_rows = None   # with coupling "ot": the training images of each class
        self.name = objective
        self.objective, self.arch, self.prediction, self.schedule = objective, arch, prediction, schedule
        self.num_train_timesteps, self.p_uncond, self.data_path = num_train_timesteps, p_uncond, data
        self.eval_samples, self.guidance = eval_samples, guidance
        self.data = None
        if load_data:
            self.data = D.digits() if data is None else D.load_images(data)
            image_shape, num_classes = self.data.shape, self.data.num_classes
            if coupling == "ot" and class_cond and self.data.train_labels is not None:
                labels = self.data.train_labels
                self._class_rows = [(labels == c).nonzero().flatten() for c in range(self.data.num_classes)]
        self.image_shape = tuple(image_shape)
        self.class_cond = bool(class_cond and num_classes)
        self.num_classes = int(num_classes or 0)
        C, H, W = self.image_shape
        if H != W:
            raise ValueError(f"images must be square, got {H}x{W}")
        cfg = dict(model_cfg or {})
        cfg.update(image_size=H, in_channels=C, num_classes=self.num_classes if self.class_cond else 0)
        self.model_cfg = cfg
        self.model = UNet(UNetConfig(**cfg)) if arch == "unet" else DiT(DiTConfig(**cfg))
        self.acp = pk.noise_schedule(schedule, num_train_timesteps) if objective == "diffusion" else None
        self._judge = None
        if load_data:
            g = torch.Generator().manual_seed(1234)
            n = self.data.test.shape[0]
            self.val = {"x0": self.data.test, "noise": torch.randn(self.data.test.shape, generator=g),
                        "t": self._timesteps(n, g),
                        "y": (self.data.test_labels if self.class_cond else torch.zeros(n, dtype=torch.long))}

    def config(self) -> dict:
        return {"kind": self.objective, "arch": self.arch, "model": self.model_cfg, "class_cond": self.class_cond,
                "p_uncond": self.p_uncond, "prediction": self.prediction, "schedule": self.schedule,
                "num_train_timesteps": self.num_train_timesteps, "data": self.data_path,
                "eval_samples": self.eval_samples, "guidance": self.guidance, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "coupling": self.coupling}

    def _timesteps(self, n, gen):
        if self.objective == "diffusion":
            return pk.sample_timesteps(n, kind="uniform", num_train_timesteps=self.num_train_timesteps, generator=gen)
        return pk.sample_timesteps(n, kind="logit_normal", generator=gen)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees as its timestep: DDPM steps, or flow sigma * num_train_timesteps."""
        return t.float() if self.objective == "diffusion" else t.float() * self.num_train_timesteps

    def batch(self, gen, n):
        idx = torch.randint(0, self.data.train.shape[0], (n,), generator=gen)
        x0 = self.data.train[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = self._timesteps(n, gen)
        if self.class_cond:
            y = self.data.train_labels[idx]
            drop = torch.rand(n, generator=gen) < self.p_uncond
            y = y.masked_fill(drop, self.num_classes)     # "no class": learns the unconditional model too
        else:
            y = torch.zeros(n, dtype=torch.long)
        if self.coupling == "ot":
            noise = self._ot_noise(x0, y, gen)
        return {"x0": x0, "noise": noise, "t": t, "y": y}

    def _ot_noise(self, x0, y, gen):
        """Noise for the rows of each label, paired by ot_pair within a pool: the rows' own images
        plus random training images of the same label (any image for "no class"), with fresh
        noise for the whole pool. A batch holds only a few rows per label, and the OT plan of a
        larger pool is closer to the full-data one (straighter paths). Every pool image, the
        rows' included, is a uniform draw of its label's images and the pairing does not look at
        which ones are the rows, so each row's noise is still marginally standard normal."""
        n = x0.shape[0]
        noise = torch.empty_like(x0)
        train = self.data.train
        for label in torch.unique(y).tolist():
            rows = (y == label).nonzero().flatten()
            uncond = not self.class_cond or label == self.num_classes
            size = max(rows.numel(), self.OT_POOL_UNCOND if uncond else self.OT_POOL_CLASS)
            src = None if uncond else self._class_rows[label]
            k = size - rows.numel()
            extra = (torch.randint(0, train.shape[0], (k,), generator=gen) if src is None
                     else src[torch.randint(0, src.numel(), (k,), generator=gen)])
            pool = torch.cat([x0[rows], train[extra]])
            paired = ot_pair(pool, torch.randn(pool.shape, generator=gen), torch.zeros(size, dtype=torch.long))
            noise[rows] = paired[:rows.numel()]
        return noise

    split = staticmethod(_split_dict)

    def count(self, mb):
        return mb["x0"].shape[0]

    def items(self, b):
        return b["x0"].shape[0]

    def _losses(self, model, mb):
        x0, noise, t = mb["x0"], mb["noise"], mb["t"]
        if self.objective == "diffusion":
            acp = self.acp
            x_t, target = pk.add_noise(x0, noise, t, acp, target=self.prediction)
            pred = model(x_t, self.model_time(t), mb["y"] if self.class_cond else None)
            return pk.diffusion_loss(pred.float(), target, t, acp, weighting="min_snr", gamma=5.0,
                                     prediction_type=self.prediction, reduction="none")
        x_t, target = pk.add_noise(x0, noise, t, target="flow")
        pred = model(x_t, self.model_time(t), mb["y"] if self.class_cond else None)
        return pk.diffusion_loss(pred.float(), target, reduction="none")

    def loss(self, model, mb):
        return self._losses(model, mb).sum()

    def evaluate(self, model, device):
        v = {k: t.to(device) for k, t in self.val.items()}
        return {"val_loss": float(self._losses(model, v).mean())}

    # -- sampling and the sample-quality evaluation --
    def judge(self):
        from .judge import Judge

        if self._judge is None:
            self._judge = Judge(self.data)
        return self._judge

    def default_samplers(self) -> list[tuple[str, int]]:
        return [("flow", 4), ("flow", 50)] if self.objective == "flow" else [("ddim", 50), ("dpm", 4)]

    def final_evaluate(self, model, device) -> dict:
        if self.data is None or self.data.train_labels is None:
            return {}
        judge = self.judge()
        out = {"judge_test_accuracy": judge.test_accuracy, "reference_fd": judge.reference_fd}
        n = self.eval_samples
        for sampler, steps in self.default_samplers():
            key = f"{sampler}{steps}"
            x = sample_images(self, model, n, sampler=sampler, steps=steps, seed=1, device=device)
            for k, v in judge.unconditional(x).items():
                out[f"{key}_uncond_{k}"] = v
            if self.class_cond:
                y = torch.arange(n) % self.num_classes
                x = sample_images(self, model, n, sampler=sampler, steps=steps, labels=y, seed=2, device=device,
                                  guidance=self.guidance)
                for k, v in judge.conditional(x, y).items():
                    out[f"{key}_cond_{k}"] = v
        return out


def ot_pair(x0: torch.Tensor, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mini-batch optimal-transport coupling for flow matching: reorders the noise so that the
    pairs (noise_i, x0_i) minimise the summed squared distance, separately within each label
    (so class-conditional and "no class" examples keep their own marginals). The batch's noise
    is still a set of independent normal draws, only matched to nearby images: the straight
    lines between pairs cross less, the learned velocity field bends less, and few-step Euler
    sampling blurs less. The assignment is exact (scipy's Hungarian solver) and deterministic."""
    from scipy.optimize import linear_sum_assignment

    out = noise.clone()
    a, b = x0.flatten(1).double(), noise.flatten(1).double()
    for label in torch.unique(y).tolist():
        idx = (y == label).nonzero().flatten()
        if idx.numel() < 2:
            continue
        cost = torch.cdist(a[idx], b[idx]).pow(2).numpy()
        rows, cols = linear_sum_assignment(cost)
        out[idx[torch.from_numpy(rows)]] = noise[idx[torch.from_numpy(cols)]]
    return out


SAMPLERS = ("ddpm", "ddim", "dpm", "flow")


def make_scheduler(task: DenoisingTask, sampler: str):
    S = pk.schedulers
    if task.objective == "flow":
        if sampler != "flow":
            raise ValueError(f"sampler: a flow-matching model samples with 'flow', got {sampler!r}")
        return S.FlowMatchEulerDiscreteScheduler(num_train_timesteps=task.num_train_timesteps, shift=1.0)
    common = dict(num_train_timesteps=task.num_train_timesteps, beta_schedule=task.schedule,
                  prediction_type=task.prediction)
    if sampler == "ddpm":
        return S.DDPMScheduler(**common, clip_sample=True)
    if sampler == "ddim":
        return S.DDIMScheduler(**common, clip_sample=True, timestep_spacing="trailing")
    if sampler == "dpm":
        return S.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                             timestep_spacing="trailing")
    raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS[:3])} for a diffusion model, got {sampler!r}")


@torch.no_grad()
def sample_images(task: DenoisingTask, model, n: int, *, sampler: str, steps: int, labels=None, guidance=1.0,
                  seed: int = 0, device="cpu", batch: int = 500) -> torch.Tensor:
    """n images from noise with a pk.schedulers scheduler (every solver step a fused pk op).
    labels [n] for a class-conditional model (None: unconditional, the "no class" index);
    guidance > 1: classifier-free guidance. Returns [n, C, H, W] on the CPU, in about [-1, 1]."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if labels is not None and not task.class_cond:
        raise ValueError("labels: this model is not class-conditional")
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        sched = make_scheduler(task, sampler)
        sched.set_timesteps(steps)
        x = torch.randn((m,) + task.image_shape, generator=g).to(device) * sched.init_noise_sigma
        y = None
        if task.class_cond:
            y = (labels[start:start + m].to(device) if labels is not None
                 else torch.full((m,), task.num_classes, dtype=torch.long, device=device))
        cfg = labels is not None and guidance != 1.0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            tt = torch.full((m,), float(t), device=device)
            tt = tt if task.objective == "flow" else tt.round()
            if cfg:
                both = model(torch.cat([inp, inp]), torch.cat([tt, tt]),
                             torch.cat([y, torch.full_like(y, task.num_classes)])).float()
                cond, unc = both.chunk(2)
                pred = unc + guidance * (cond - unc)
            else:
                pred = model(inp, tt, y).float()
            x = sched.step(pred, t, x, generator=g).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out)


# ---- presets and rebuilding ----------------------------------------------------------------------

SIZES = {
    "gpt": {"tiny": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=32, block_size=64),
            "small": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=192, block_size=256)},
    "mlm": {"tiny": dict(n_layer=2, n_head=2, n_embd=32, max_len=64),
            "small": dict(n_layer=4, n_head=4, n_embd=192, max_len=256)},
    "mdlm": {"tiny": dict(n_layer=2, n_head=2, n_embd=32, max_len=64),        # the MLM's encoder
             "small": dict(n_layer=4, n_head=4, n_embd=192, max_len=256)},
    "unet": {"tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          head_dim=16, groups=4),
             "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4, 2),
                           head_dim=32, groups=8)},
    "dit": {"tiny": dict(dim=32, depth=2, heads=2, patch_size=2),
            "small": dict(dim=192, depth=6, heads=6, patch_size=2)},
}


def load_tokenizer(cfg: dict, run_dir: str | None):
    """The tokenizer a text task's config names: "byte", or the bpe tokenizer saved in run_dir
    (checked against the fingerprint the config recorded)."""
    tc = cfg.get("tokenizer") or {"kind": "byte"}
    if tc["kind"] == "byte":
        return "byte"
    if tc["kind"] != "bpe":
        raise ValueError(f"tokenizer: expected 'byte' or 'bpe', got {tc['kind']!r}")
    if run_dir is None:
        raise ValueError("tokenizer: a bpe task is rebuilt from its run folder (tokenizer.json); pass run_dir")
    path = os.path.join(run_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: {run_dir!r} was trained with a bpe tokenizer but has no "
                                f"{TOKENIZER_FILE}")
    tok = D.BPETokenizer.from_file(path)
    if tc.get("sha1") not in (None, tok.sha1):
        raise ValueError(f"checkpoint: {path!r} is not the tokenizer this run was trained with")
    return tok


def build_task(cfg: dict, *, load_data: bool = True, run_dir: str | None = None):
    """Rebuild a task (and its freshly initialised model) from task.config(); run_dir: the run
    folder, where a bpe text task finds its tokenizer (and its encoded corpus)."""
    kind = cfg["kind"]
    if kind == "gpt":
        return GPTTask(GPTConfig(**cfg["model"]), seq_len=cfg["seq_len"], data=cfg.get("data"),
                       eval_windows=cfg.get("eval_windows", 256), load_data=load_data,
                       tokenizer=load_tokenizer(cfg, run_dir), run_dir=run_dir)
    if kind == "hybrid":
        return HybridTask(GPTConfig(**cfg["model"]), seq_len=cfg["seq_len"], mix=cfg["mix"], mask_prob=cfg["mask_prob"],
                          span_len=cfg["span_len"], span_positions=cfg.get("span_positions", "sequential"),
                          mask_targets=cfg.get("mask_targets", False),
                          data=cfg.get("data"), eval_windows=cfg.get("eval_windows", 256),
                          load_data=load_data, tokenizer=load_tokenizer(cfg, run_dir), run_dir=run_dir)
    if kind == "mlm":
        return MLMTask(BertConfig(**cfg["model"]), seq_len=cfg["seq_len"], min_len=cfg["min_len"],
                       mask_prob=cfg["mask_prob"], data=cfg.get("data"), eval_windows=cfg.get("eval_windows", 256),
                       load_data=load_data, tokenizer=load_tokenizer(cfg, run_dir), run_dir=run_dir,
                       mask_schedule=cfg.get("mask_schedule"))
    if kind == "mdlm":
        return MDLMTask(BertConfig(**cfg["model"]), seq_len=cfg["seq_len"], data=cfg.get("data"),
                        eval_windows=cfg.get("eval_windows", 256), eval_t=cfg.get("eval_t", 4), load_data=load_data,
                        tokenizer=load_tokenizer(cfg, run_dir), run_dir=run_dir,
                        mask_schedule=cfg.get("mask_schedule"), subs=cfg.get("subs", False),
                        weighting=cfg.get("weighting", "t"))
    if kind in ("diffusion", "flow"):
        model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("image_size", "in_channels", "num_classes")}
        for k in ("channel_mult", "attn_resolutions"):
            if k in model_cfg:
                model_cfg[k] = tuple(model_cfg[k])
        return DenoisingTask(kind, arch=cfg["arch"], model_cfg=model_cfg, class_cond=cfg["class_cond"],
                             p_uncond=cfg["p_uncond"], prediction=cfg["prediction"], schedule=cfg["schedule"],
                             num_train_timesteps=cfg["num_train_timesteps"], data=cfg.get("data"),
                             eval_samples=cfg.get("eval_samples", 500), guidance=cfg.get("guidance", 1.0),
                             load_data=load_data, image_shape=cfg["image_shape"], num_classes=cfg["num_classes"],
                             coupling=cfg.get("coupling", "independent"))
    raise ValueError(f"task kind: expected gpt, hybrid, mlm, mdlm, diffusion or flow, got {kind!r}")
