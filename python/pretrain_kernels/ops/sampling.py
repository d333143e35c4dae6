"""Sampling ops: pk.sample (penalties, temperature, top-k, top-p, min-p and the draw in one
fused, sort-free pass per row), pk.top_k_top_p_filter, pk.speculative_accept (chain
speculative sampling) and pk.unmask_step (one step of masked-diffusion sampling). The LogitsProcessor for transformers' generate built on the filter,
TopKTopPLogitsWarper, lives in pretrain_kernels.integrations.logits.

Semantics, in order (every knob a Python number or a per-row tensor [B]):
  1. penalties over prev_tokens [B, T] (-1 = none): repetition as transformers'
     RepetitionPenaltyLogitsProcessor (each distinct id once: positive logits divided,
     negative ones multiplied), then presence and frequency as vLLM (minus
     frequency * count, minus presence when count > 0);
  2. temperature; 0 means greedy (argmax, lowest index on ties; logprob 0);
  3. top-k: a token is kept when fewer than k tokens are strictly greater (ties kept);
  4. top-p: kept when the probability mass strictly above it, within the top-k set, is
     below top_p;
  5. min-p: kept when its probability is >= min_p * the largest probability;
  6. one draw from the renormalised kept set.
Computation is in float32, on the values v = (x - max x) / temperature, so no temperature is
too small and no logit too large (T -> 0 tends to the argmax, uniform over exact ties); sums
are exact integer sums of fixed-point masses (floor(2^36 * exp(v))), so results do not depend on thread counts or launch shapes and
CPU and CUDA draw the same token for the same seed. Tokens less likely than ~1.5e-11 times the
most likely token have mass 0 and are never drawn.

Non-finite logits (defined behaviour, never a crash or a hang):
  * NaN counts as -inf (never drawn, -inf in the filtered logits);
  * if any value is +inf after penalties and temperature, the row's distribution is the limit
    of softmax: uniform over its +inf entries;
  * a row without any finite or +inf value gives token -1 and logprob -inf (the filter returns
    a row of -inf).

Seeds: row i draws with (seed, i), so a row's token does not depend on the other rows; with a
per-row seed tensor [B], row i draws with (seed[i], 0), exactly like a one-row call with
seed[i]. Without a seed, one is drawn from `generator` or torch's default generator.

Knob checks: a Python-number knob that is NaN or out of range raises ValueError (the raw ops
raise RuntimeError), and so do per-row tensors and prev_tokens on the CPU. temperature=+inf
is valid: the limit of softmax(x / T), uniform over the +inf logits if any, else over the
finite ones. Per-row tensors and prev_tokens in device memory are not checked (that would
need a host sync); the kernels of both backends apply one rule to what reaches them:
  * temperature < 0 or NaN: greedy (as 0);      top_k < 0: off (as 0);
  * top_p NaN or > 1: off (as 1);               top_p <= 0: only the most likely value;
  * min_p NaN or < 0: off (as 0);               min_p > 1: as 1 (the most likely values);
  * repetition_penalty NaN, <= 0 or +inf: off (as 1);
  * presence_penalty / frequency_penalty NaN or +-inf: off (as 0);
  * prev_tokens ids outside [0, V) (other than -1): ignored.
Float knobs are used in float32: finite values beyond its range saturate to +-3.4e38 and
non-zero values below its smallest subnormal become +-1.4e-45 (numbers and float64 tensors
alike), so a valid 1e300 stays huge and 1e-300 stays non-zero instead of turning into a value
that the rule above reads as "off".
speculative_accept takes any draft id: one outside [0, V) is rejected at its position, on
every backend (see its docstring).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._common import is_compiling, not_differentiable, raw_op, resolve_seed

__all__ = ["sample", "top_k_top_p_filter", "speculative_accept", "unmask_step"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_MAX_VOCAB = 2**27  # kMaxVocab of csrc/common/sampling.h: keeps every fixed-point mass sum below 2^63


def _check_device(name, t, device, ref="logits"):
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {ref}), got {t.device}")


def _check_vocab(name, shape):
    if shape[0] > 0 and shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary dimension is empty (shape {tuple(shape)})")
    if shape[-1] > _MAX_VOCAB:
        raise ValueError(f"{name}: vocabularies up to 2^27 entries are supported, got {shape[-1]}")


def _check_logits(logits, name="logits"):
    if logits.__class__ is torch.Tensor and logits.dtype in _FLOAT_DTYPES and logits.dim() == 2:
        if 0 < logits.shape[1] <= _MAX_VOCAB:  # the common case, in one test
            return
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{name}: expected shape [batch, vocab], got {tuple(logits.shape)}")
    _check_vocab(name, logits.shape)


def _number(name, value, *, integer=False):
    if value.__class__ is int or (value.__class__ is float and not integer):  # the common case, cheaply
        return value if integer else float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an int" if integer else "a float"
        raise TypeError(f"{name}: expected {kind} or a per-row tensor, got {type(value).__name__}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int or a per-row integer tensor, got {type(value).__name__}")
        return int(value)
    return float(value)


# name -> (predicate on a float, description): the valid values of each knob.
_RANGES = {
    "temperature": (lambda x: x >= 0, ">= 0 (0 means greedy)"),
    "top_k": (lambda x: x >= 0, ">= 0 (0 means off)"),
    "top_p": (lambda x: 0 < x <= 1, "a value in (0, 1]"),
    "min_p": (lambda x: 0 <= x <= 1, "a value in [0, 1]"),
    "repetition_penalty": (lambda x: x > 0 and math.isfinite(x), "a finite value > 0"),
    "presence_penalty": (lambda x: math.isfinite(x), "a finite value"),
    "frequency_penalty": (lambda x: math.isfinite(x), "a finite value"),
}
_NEUTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}
_TENSOR_RANGES = {
    "temperature": lambda t: t >= 0,
    "top_k": lambda t: t >= 0,
    "top_p": lambda t: (t > 0) & (t <= 1),
    "min_p": lambda t: (t >= 0) & (t <= 1),
    "repetition_penalty": lambda t: (t > 0) & torch.isfinite(t),
    "presence_penalty": torch.isfinite,
    "frequency_penalty": torch.isfinite,
}


def _knob(name, value, batch, device, *, integer=False):
    """(scalar, per-row tensor or None) for one knob; with a tensor the scalar is neutral."""
    if value.__class__ is int or (value.__class__ is float and not integer):  # a plain number: the common case
        v = value if integer else float(value)
        if not _RANGES[name][0](v):
            raise ValueError(f"{name}: expected {_RANGES[name][1]}, got {value}")
        return v, None
    if isinstance(value, torch.Tensor):
        if integer:
            if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"{name}: expected an integer per-row tensor, got {value.dtype}")
        elif not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point per-row tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.expand(batch)
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name}: expected a number or a per-row tensor of shape [{batch}], got shape "
                             f"{tuple(value.shape)}")
        _check_device(name, value, device)
        if value.device.type == "cpu" and not is_compiling() and value.numel():
            bad = ~_TENSOR_RANGES[name](value)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}: expected {_RANGES[name][1]}, got {value[row].item()} in row {row}")
        return _NEUTRAL[name], value
    v = _number(name, value, integer=integer)
    ok, desc = _RANGES[name]
    if not ok(v):
        raise ValueError(f"{name}: expected {desc}, got {value}")
    return v, None


def _seed_tensor(seed, generator, batch, device):
    """A one-element seed (row i uses (seed, i)) or per-row seeds [batch] (row i uses (seed[i], 0))."""
    if seed.__class__ is not torch.Tensor and not isinstance(seed, torch.Tensor):  # an int or None
        return resolve_seed(seed, generator, device)
    if isinstance(seed, torch.Tensor) and seed.dim() == 1 and seed.numel() == batch and batch > 1:
        if generator is not None:
            raise ValueError("seed and generator: pass at most one of them")
        if seed.dtype.is_floating_point or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"seed: expected integer per-row seeds, got {seed.dtype}")
        return seed.to(device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor) and seed.numel() != 1:
        raise ValueError(f"seed: expected one seed or one per row [{batch}], got shape {tuple(seed.shape)}")
    return resolve_seed(seed, generator, device)


def _check_prev_tokens(prev_tokens, B, V, device):
    if prev_tokens is None:
        return
    if not isinstance(prev_tokens, torch.Tensor):
        raise TypeError(f"prev_tokens: expected a tensor [batch, n], got {type(prev_tokens).__name__}")
    if prev_tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prev_tokens: expected int32 or int64 ids, got {prev_tokens.dtype}")
    if prev_tokens.dim() != 2 or prev_tokens.shape[0] != B:
        raise ValueError(f"prev_tokens: expected shape [{B}, n], got {tuple(prev_tokens.shape)}")
    _check_device("prev_tokens", prev_tokens, device)
    if device.type == "cpu" and not is_compiling() and prev_tokens.numel():
        bad = (prev_tokens < -1) | (prev_tokens >= V)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"prev_tokens: expected ids in [0, {V}) or -1 (none), got "
                             f"{int(prev_tokens[r, c])} at row {r}, position {c}")


_NO_ROWS = (None,) * 7


def _sample_knobs(B, device, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                  frequency_penalty):
    """(per-row tensors, scalars) of the knobs of pk.sample, in the order of the op schemas."""
    if (temperature.__class__ is float and top_k.__class__ is int and top_p.__class__ is float
            and min_p.__class__ is float and repetition_penalty.__class__ is float
            and presence_penalty.__class__ is float and frequency_penalty.__class__ is float
            and temperature >= 0 and 0 <= top_k <= 2**62 and 0 < top_p <= 1 and 0 <= min_p <= 1
            and 0 < repetition_penalty < math.inf and -math.inf < presence_penalty < math.inf
            and -math.inf < frequency_penalty < math.inf):
        # plain numbers in range (what _knob checks one by one): the common case in one test
        return _NO_ROWS, (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    temperature, t_rows = _knob("temperature", temperature, B, device)
    top_k, k_rows = _knob("top_k", top_k, B, device, integer=True)
    top_p, p_rows = _knob("top_p", top_p, B, device)
    min_p, m_rows = _knob("min_p", min_p, B, device)
    repetition_penalty, r_rows = _knob("repetition_penalty", repetition_penalty, B, device)
    presence_penalty, pr_rows = _knob("presence_penalty", presence_penalty, B, device)
    frequency_penalty, f_rows = _knob("frequency_penalty", frequency_penalty, B, device)
    if k_rows is None and top_k > 2**62:
        top_k = 2**62
    return ((t_rows, k_rows, p_rows, m_rows, r_rows, pr_rows, f_rows),
            (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty))


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
           presence_penalty=0.0, frequency_penalty=0.0, prev_tokens: torch.Tensor | None = None, seed=None,
           generator: torch.Generator | None = None, return_logprobs: bool = False):
    """Draw one token per row of logits [B, V] (float32/float16/bfloat16/float64).

    Returns tokens [B] int64, or (tokens, logprobs [B] float32) with return_logprobs: the
    log-probability of each token under the final (penalised, tempered, filtered,
    renormalised) distribution. See the module docstring for the semantics.
    """
    _check_logits(logits)
    B, device = logits.shape[0], logits.device
    rows, scalars = _sample_knobs(B, device, temperature, top_k, top_p, min_p, repetition_penalty,
                                  presence_penalty, frequency_penalty)
    _check_prev_tokens(prev_tokens, B, logits.shape[1], device)
    seed_t = _seed_tensor(seed, generator, B, device)
    tokens, logprobs = _SAMPLE(logits, prev_tokens, seed_t, *rows, *scalars)
    return (tokens, logprobs) if return_logprobs else tokens


def top_k_top_p_filter(logits: torch.Tensor, *, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """logits [B, V] with -inf outside the kept set of top-k, then top-p, then min-p (same
    rules as pk.sample at temperature 1); same shape and dtype. Kept entries are copied
    unchanged; NaN becomes -inf."""
    _check_logits(logits)
    B, device = logits.shape[0], logits.device
    top_k, k_rows = _knob("top_k", top_k, B, device, integer=True)
    top_p, p_rows = _knob("top_p", top_p, B, device)
    min_p, m_rows = _knob("min_p", min_p, B, device)
    if k_rows is None and top_k > 2**62:
        top_k = 2**62
    return _FILTER(logits, k_rows, p_rows, m_rows, top_k, top_p, min_p)


def speculative_accept(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor, *,
                       seed=None, generator: torch.Generator | None = None):
    """Chain speculative sampling (Leviathan et al. 2023, Chen et al. 2023; FlashInfer's
    chain_speculative_sampling).

    draft_probs [B, n, V]: the draft model's distributions at the n draft positions;
    draft_token_ids [B, n]: the drafted tokens; target_probs [B, n+1, V]: the target model's
    distributions at the same positions plus one. Draft token j is accepted with probability
    min(1, target/draft) while all earlier ones were; at the first rejection a corrected
    token is drawn from normalise(max(0, target - draft)), and when all n are accepted a
    bonus token is drawn from the target at position n. The emitted tokens then follow the
    target distribution exactly.

    Returns (output_token_ids [B, n+1] int64: the accepted drafts, then the corrected or
    bonus token, then -1; num_accepted [B] int64). A zero residual (target == draft) falls
    back to the target distribution; a row whose target has no mass gives -1 there.

    Out-of-vocabulary draft ids are not an error: a draft id outside [0, V) (negative, or V
    and above) is rejected at its position, so num_accepted stops there and the correction
    token is drawn at that position from normalise(max(0, target - draft)), as for any
    rejection. One rule on every backend: CPU and CUDA return the same tokens for the same
    seed (the acceptance walk is shared code, csrc/common/sampling.h).
    """
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")
    if draft_probs.dim() != 3:
        raise ValueError(f"draft_probs: expected shape [batch, n, vocab], got {tuple(draft_probs.shape)}")
    _check_vocab("draft_probs", draft_probs.shape)
    B, n, V = draft_probs.shape
    if tuple(target_probs.shape) != (B, n + 1, V):
        raise ValueError(f"target_probs: expected shape [{B}, {n + 1}, {V}] (one more position than draft_probs), "
                         f"got {tuple(target_probs.shape)}")
    if target_probs.dtype != draft_probs.dtype:
        raise TypeError(f"target_probs: expected the dtype of draft_probs ({draft_probs.dtype}), got {target_probs.dtype}")
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("draft_token_ids: expected an int32 or int64 tensor")
    if tuple(draft_token_ids.shape) != (B, n):
        raise ValueError(f"draft_token_ids: expected shape [{B}, {n}], got {tuple(draft_token_ids.shape)}")
    device = draft_probs.device
    _check_device("target_probs", target_probs, device, "draft_probs")
    _check_device("draft_token_ids", draft_token_ids, device, "draft_probs")
    seed_t = _seed_tensor(seed, generator, B, device)
    return _SPECULATIVE_ACCEPT(draft_probs, draft_token_ids, target_probs, seed_t)


_STRATEGIES = ("confidence", "random")


def _unmask_args(logits, tokens, mask_token_id, num_reveal, strategy, temperature, top_k, top_p, min_p,
                 repetition_penalty, presence_penalty, frequency_penalty, prev_tokens, seed, generator):
    """The arguments of torch.ops.pretrain_kernels.unmask_step, checked."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits: expected float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [batch, length, vocab], got {tuple(logits.shape)}")
    B, L, V = logits.shape
    if B * L > 0 and V == 0:
        raise ValueError(f"logits: the vocabulary dimension is empty (shape {tuple(logits.shape)})")
    if V > _MAX_VOCAB:
        raise ValueError(f"logits: vocabularies up to 2^27 entries are supported, got {V}")
    device = logits.device
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected a torch.Tensor [batch, length], got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens: expected int32 or int64 ids, got {tokens.dtype}")
    if tuple(tokens.shape) != (B, L):
        raise ValueError(f"tokens: expected shape [{B}, {L}] (the batch and length of logits), got "
                         f"{tuple(tokens.shape)}")
    _check_device("tokens", tokens, device)
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, numbers.Integral):
        raise TypeError(f"mask_token_id: expected an int, got {type(mask_token_id).__name__}")
    mask_token_id = int(mask_token_id)
    if not 0 <= mask_token_id < V:
        raise ValueError(f"mask_token_id: expected an id in [0, {V}) (the vocabulary of logits), got {mask_token_id}")
    if not isinstance(strategy, str):
        raise TypeError(f"strategy: expected a str, got {type(strategy).__name__}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy: expected 'confidence' or 'random', got {strategy!r}")
    if isinstance(num_reveal, torch.Tensor):
        if num_reveal.dtype.is_floating_point or num_reveal.dtype == torch.bool or num_reveal.is_complex():
            raise TypeError(f"num_reveal: expected an integer per-row tensor, got {num_reveal.dtype}")
        if num_reveal.dim() == 0:
            num_reveal = num_reveal.expand(B)
        if tuple(num_reveal.shape) != (B,):
            raise ValueError(f"num_reveal: expected an int or a per-row tensor of shape [{B}], got shape "
                             f"{tuple(num_reveal.shape)}")
        _check_device("num_reveal", num_reveal, device)
        if num_reveal.device.type == "cpu" and not is_compiling() and num_reveal.numel():
            bad = num_reveal < 0
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"num_reveal: expected >= 0, got {int(num_reveal[row])} in row {row}")
        n_rows, n = num_reveal, 0
    else:
        n_rows, n = None, _number("num_reveal", num_reveal, integer=True)
        if n < 0:
            raise ValueError(f"num_reveal: expected >= 0, got {n}")
        n = min(n, 2**62)
    rows, scalars = _sample_knobs(B, device, temperature, top_k, top_p, min_p, repetition_penalty,
                                  presence_penalty, frequency_penalty)
    _check_prev_tokens(prev_tokens, B, V, device)
    seed_t = _seed_tensor(seed, generator, B, device)
    return (logits, tokens, n_rows, prev_tokens, seed_t, *rows, mask_token_id, n, strategy, *scalars)


def unmask_step(logits: torch.Tensor, tokens: torch.Tensor, *, mask_token_id: int, num_reveal,
                strategy: str = "confidence", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, prev_tokens: torch.Tensor | None = None, seed=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of masked-diffusion sampling (MDLM, LLaDA): reveal some masked positions.

    logits [B, L, V] (float32/float16/bfloat16/float64; any strides, copied unless the vocabulary
    dimension has unit stride), tokens [B, L] int32/int64; only the logits of positions holding
    mask_token_id are read. Every masked position draws a token as pk.sample does (same knobs,
    each a number or a per-row tensor [B]; prev_tokens [B, T] for the penalties), position l of
    row b with the counter (b, l) under one seed, or (0, l) under seed[b] with per-row seeds,
    so a row never depends on the others; mask_token_id itself is never drawn (its logit counts
    as -inf). Then each row reveals
    min(num_reveal, its masked count) of its masked positions (num_reveal an int or a per-row
    integer tensor [B]):
      * strategy "confidence" (LLaDA's low-confidence remasking): the most confident first, the
        confidence being the drawn token's probability under the final (penalised, tempered,
        filtered) distribution; at temperature 0 (greedy: the argmax is drawn) the confidence
        comes from that filtered distribution at temperature 1; ties: lower position first;
      * strategy "random": a uniformly random subset (the smallest of per-position random keys
        from a separate Philox stream; ties by position).
    The others keep mask_token_id; unmasked positions are unchanged. A position whose logits
    hold nothing drawable (all -inf or NaN) ranks last and stays masked even when chosen.

    Returns the new tokens (dtype and shape of tokens). No host sync and no data-dependent
    shapes: capturable in a CUDA graph, traceable by torch.compile(fullgraph=True).
    """
    args = _unmask_args(logits, tokens, mask_token_id, num_reveal, strategy, temperature, top_k, top_p, min_p,
                        repetition_penalty, presence_penalty, frequency_penalty, prev_tokens, seed, generator)
    return _unmask_op(*args)[0]


# The fake (meta) kernels run whenever one argument is on the meta device, even when the others
# are real tensors: they check the devices as the real kernels do, so such a call raises instead
# of returning uninitialised memory on the other device.
def _fake_device(name, t, ref_name, ref, *, cpu_ok=False):
    if t is None:
        return
    where = f"a CPU tensor or one on {ref.device}" if cpu_ok else f"a tensor on {ref.device}"
    torch._check(t.device == ref.device or (cpu_ok and t.device.type == "cpu"),
                 lambda: f"{name}: expected {where} (the device of {ref_name}), got {t.device}")


def _fake_seed(seed, ref_name, ref):
    # one seed may live on the CPU; per-row seeds live on the device of the data
    _fake_device("seed", seed, ref_name, ref, cpu_ok=seed.numel() == 1)


def _fake_sample(logits, prev_tokens, seed, *rest):
    torch._check(logits.dim() == 2, lambda: "logits: expected a 2-D tensor")
    B = logits.shape[0]
    _fake_device("prev_tokens", prev_tokens, "logits", logits)
    for name, t in zip(("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                        "frequency_penalty"), rest[:7]):
        _fake_device(name, t, "logits", logits)
    _fake_seed(seed, "logits", logits)
    return (torch.empty((B,), dtype=torch.int64, device=logits.device),
            torch.empty((B,), dtype=torch.float32, device=logits.device))


def _fake_filter(logits, *rest):
    torch._check(logits.dim() == 2, lambda: "logits: expected a 2-D tensor")
    for name, t in zip(("top_k", "top_p", "min_p"), rest[:3]):
        _fake_device(name, t, "logits", logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_speculative(draft_probs, draft_token_ids, target_probs, seed):
    torch._check(draft_probs.dim() == 3, lambda: "draft_probs: expected a 3-D tensor")
    B, n = draft_probs.shape[0], draft_probs.shape[1]
    _fake_device("target_probs", target_probs, "draft_probs", draft_probs)
    _fake_device("draft_token_ids", draft_token_ids, "draft_probs", draft_probs)
    _fake_seed(seed, "draft_probs", draft_probs)
    return (torch.empty((B, n + 1), dtype=torch.int64, device=draft_probs.device),
            torch.empty((B,), dtype=torch.int64, device=draft_probs.device))


def _fake_unmask(logits, tokens, num_reveal_rows, prev_tokens, seed, *rest):
    torch._check(logits.dim() == 3, lambda: "logits: expected a 3-D tensor")
    torch._check(tokens.dim() == 2, lambda: "tokens: expected a 2-D tensor")
    _fake_device("tokens", tokens, "logits", logits)
    _fake_device("num_reveal", num_reveal_rows, "logits", logits)
    _fake_device("prev_tokens", prev_tokens, "logits", logits)
    for name, t in zip(("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                        "frequency_penalty"), rest[:7]):
        _fake_device(name, t, "logits", logits)
    _fake_seed(seed, "logits", logits)
    shape = tokens.shape
    return (torch.empty(shape, dtype=tokens.dtype, device=logits.device),
            torch.empty(shape, dtype=torch.int64, device=logits.device),
            torch.empty(shape, dtype=torch.float32, device=logits.device))


torch.library.register_fake("pretrain_kernels::sample")(_fake_sample)
torch.library.register_fake("pretrain_kernels::top_k_top_p_filter")(_fake_filter)
torch.library.register_fake("pretrain_kernels::speculative_accept")(_fake_speculative)
torch.library.register_fake("pretrain_kernels::unmask_step")(_fake_unmask)
# The confidences (a float output) have no derivative: differentiating them raises instead of
# giving zeros.
_SAMPLE = raw_op("pretrain_kernels::sample")
_FILTER = raw_op("pretrain_kernels::top_k_top_p_filter")
_SPECULATIVE_ACCEPT = raw_op("pretrain_kernels::speculative_accept")
_unmask_op = not_differentiable("pretrain_kernels::unmask_step", "pk.unmask_step", "sampling is not differentiable")
