"""Masked-modeling ops: pk.mlm_mask (80/10/10 masking, exact counts, whole words, per-row
rates) and pk.span_mask (SpanBERT spans), both one fused pass over the batch.

Semantics follow transformers' DataCollatorForLanguageModeling: each eligible token is
selected with probability mask_prob; a selected token becomes the mask token with
probability replace_prob, a random token with probability random_prob, and stays
otherwise; labels hold the original id where selected and -100 elsewhere. Eligible means
attention_mask != 0, inside [0, vocab_size) and not a special id.

One deliberate difference: random replacements are drawn uniformly from the vocab ids that
are *not* special (transformers can draw [CLS], [PAD], ... as "random" tokens).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import _C
from ._common import check_int, check_prob, check_same_device, is_compiling, raw_op, resolve_seed

_INT64_MAX = 2**63 - 1
_ID_DTYPES = (torch.int64, torch.int32)
# the overloads through call_boxed (ops/_common.py: raw_op); calling the packet
# (torch.ops.pretrain_kernels.mlm_mask) would resolve the overload on every call. CPU calls go
# straight to the kernels (csrc/module.cpp) where the dispatcher would send them there.
_MLM_MASK = raw_op("pretrain_kernels::mlm_mask", getattr(_C, "mlm_mask_direct", None))
_SPAN_MASK = raw_op("pretrain_kernels::span_mask", getattr(_C, "span_mask_direct", None))
_special_cache: dict = {}  # special ids given as a list: (sorted ids, device) -> tensor, (the list, its types,
# vocab_size, device) -> (that tensor or None,)


def _special_tensor(special_token_ids, device: torch.device, vocab_size: int | None = None):
    """special_token_ids as a sorted int64 tensor on `device` (lists are cached per device,
    so steady-state calls do no host-to-device copies). Ids of a list outside [0, vocab_size)
    are dropped: they can never match an eligible token (nor fit an int64)."""
    if special_token_ids is None:
        return None
    if isinstance(special_token_ids, torch.Tensor):
        # The ops want them sorted; sort once per tensor and version, not once per call. The
        # sorted copy lives on the tensor itself, so it goes when the tensor goes and can never be
        # mistaken for another tensor's (a new tensor at a freed address); an in-place change
        # bumps _version (shared by every view of the storage) and forces a new sort. A hit is
        # looked up before anything else (it costs less than the checks below, which it passed
        # when it was made); dtype and device are compared again, since `.data =` can change them
        # without a new version.
        compiling = is_compiling()
        hit = None if compiling else getattr(special_token_ids, "_pk_sorted_special", None)
        if (hit is not None and hit[0] == special_token_ids._version and hit[1] == device
                and hit[3] is special_token_ids.dtype and special_token_ids.device == device):
            return hit[2]
        if special_token_ids.dtype.is_floating_point or special_token_ids.dtype == torch.bool:
            raise TypeError(f"special_token_ids: expected integer ids, got {special_token_ids.dtype}")
        check_same_device("special_token_ids", special_token_ids, device)
        t = special_token_ids.reshape(-1)
        if compiling:
            return torch.sort(t.to(torch.int64)).values
        ids = torch.sort(t.to(torch.int64)).values
        try:
            special_token_ids._pk_sorted_special = (special_token_ids._version, device, ids,
                                                    special_token_ids.dtype)
        except (AttributeError, RuntimeError):  # tensor subclasses that refuse attributes
            pass
        return ids
    given = special_token_ids.__class__ is list or special_token_ids.__class__ is tuple
    if given:
        # the same list call after call (a collator's): one lookup. The key holds the types too,
        # since True == 1 and 1.0 == 1 hash alike but are not valid ids.
        given = tuple(special_token_ids)
        given = (given, tuple(map(type, given)), vocab_size, device)
        try:
            hit = _special_cache.get(given)
        except TypeError:  # unhashable items: the checks below name them
            hit = given = None
        if hit is not None:
            return hit[0]
    if not isinstance(special_token_ids, Iterable):
        raise TypeError(f"special_token_ids: expected a list of ints or a tensor, got {type(special_token_ids).__name__}")
    ids = tuple(sorted({i for i in (check_int("special_token_ids", x) for x in special_token_ids)
                        if vocab_size is None or 0 <= i < vocab_size}))
    if len(_special_cache) > 128:
        _special_cache.clear()
    t = None
    if ids:
        key = (ids, device)
        t = _special_cache.get(key)
        if t is None:
            t = torch.tensor(ids, dtype=torch.int64, device=device)
            _special_cache[key] = t
    if given:
        _special_cache[given] = (t,)
    return t


def _check_common(input_ids, mask_token_id, vocab_size, mask_prob, replace_prob, random_prob, attention_mask,
                  word_starts, special_token_ids):
    if (input_ids.__class__ is torch.Tensor and mask_token_id.__class__ is int and vocab_size.__class__ is int
            and mask_prob.__class__ is float and replace_prob.__class__ is float and random_prob.__class__ is float
            and 0 <= mask_token_id < vocab_size <= 2**31 and 0.0 <= mask_prob <= 1.0 and 0.0 <= replace_prob <= 1.0
            and 0.0 <= random_prob <= 1.0 and replace_prob + random_prob <= 1.0 + 1e-9
            and input_ids.dim() == 2 and input_ids.dtype in _ID_DTYPES):
        # plain numbers in range, what the checks below make one by one: the common case in one test
        device = input_ids.device
        ok = True
        for t in (attention_mask, word_starts):
            if t is not None:
                ok = ok and t.__class__ is torch.Tensor and t.shape == input_ids.shape and t.device == device
        if ok:
            return (mask_token_id, vocab_size, mask_prob, None, replace_prob, random_prob,
                    _special_tensor(special_token_ids, device, vocab_size))
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids: expected int32 or int64 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [batch, seq_len], got {tuple(input_ids.shape)}")
    vocab_size = check_int("vocab_size", vocab_size, low=1, high=2**32)
    if input_ids.dtype == torch.int32 and vocab_size > 2**31:
        raise ValueError(f"vocab_size: int32 input_ids hold ids below 2**31, got vocab_size {vocab_size} "
                         "(pass int64 input_ids)")
    mask_token_id = check_int("mask_token_id", mask_token_id, low=0)
    if mask_token_id >= vocab_size:
        raise ValueError(f"mask_token_id: expected an id in [0, vocab_size={vocab_size}), got {mask_token_id}")
    replace_prob = check_prob("replace_prob", replace_prob)
    random_prob = check_prob("random_prob", random_prob)
    if replace_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"replace_prob + random_prob: expected at most 1, got {replace_prob} + {random_prob}")
    device = input_ids.device
    prob_rows = None
    if isinstance(mask_prob, torch.Tensor):
        if not mask_prob.dtype.is_floating_point:
            raise TypeError(f"mask_prob: expected a float tensor of per-row rates, got {mask_prob.dtype}")
        if mask_prob.dim() == 0:
            mask_prob = mask_prob.expand(input_ids.shape[0])
        if tuple(mask_prob.shape) != (input_ids.shape[0],):
            raise ValueError(f"mask_prob: expected a float or a per-row tensor of shape [{input_ids.shape[0]}], "
                             f"got shape {tuple(mask_prob.shape)}")
        check_same_device("mask_prob", mask_prob, device)
        prob_rows, mask_prob = mask_prob, 0.0
    else:
        mask_prob = check_prob("mask_prob", mask_prob)
    for name, t in (("attention_mask", attention_mask), ("word_starts", word_starts)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} (that of input_ids), got {tuple(t.shape)}")
        check_same_device(name, t, device)
    special = _special_tensor(special_token_ids, device, vocab_size)
    return mask_token_id, vocab_size, mask_prob, prob_rows, replace_prob, random_prob, special


def mlm_mask(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, mask_prob=0.15,
             replace_prob: float = 0.8, random_prob: float = 0.1, special_token_ids=None,
             attention_mask: torch.Tensor | None = None, exact_count: bool = False,
             max_predictions: int | None = None, word_starts: torch.Tensor | None = None, seed=None,
             generator: torch.Generator | None = None):
    """Fused BERT masking. Returns (masked_ids, labels), both shaped and typed like input_ids.

    input_ids: [B, L] int32/int64 (int32 needs vocab_size <= 2**31). mask_prob: a float, or a
    per-row float tensor [B] (e.g. a masked-diffusion rate per sequence; changing it never
    recompiles or syncs).
    exact_count: select exactly round(mask_prob * n_eligible) units per row (at least one
    when any is eligible, at most max_predictions), a uniformly random subset.
    word_starts: bool [B, L], True where a word begins: whole words are selected together
    (the unit is a word, eligible when its first piece is); each piece then gets its own
    mask/random/keep draw, as transformers' whole-word collator does.
    seed / generator: see pretrain_kernels.ops._common.resolve_seed.
    Names: transformers' collator calls the three rates mlm_probability, mask_replace_prob and
    random_replace_prob; pk.MLMCollator takes those names, this tensor op the shorter ones of
    its schema.
    What a GPU cannot check without a host sync follows one rule on every device: ids outside
    [0, vocab_size) are never selected and stay unchanged (label -100), and per-row rates are
    clamped into [0, 1], NaN counting as 0.
    """
    (mask_token_id, vocab_size, mask_prob, prob_rows, replace_prob, random_prob,
     special) = _check_common(input_ids, mask_token_id, vocab_size, mask_prob, replace_prob, random_prob,
                              attention_mask, word_starts, special_token_ids)
    # a cap beyond int64 caps nothing (a row has fewer tokens)
    max_predictions = 0 if max_predictions is None else min(check_int("max_predictions", max_predictions, low=1),
                                                            _INT64_MAX)
    seed_t = resolve_seed(seed, generator, input_ids.device)
    return _MLM_MASK(input_ids, attention_mask, special, word_starts, prob_rows, seed_t,
                     mask_prob, mask_token_id, vocab_size, replace_prob, random_prob,
                     bool(exact_count), max_predictions)


def span_mask(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, mask_prob=0.15,
              replace_prob: float = 0.8, random_prob: float = 0.1, special_token_ids=None,
              attention_mask: torch.Tensor | None = None, word_starts: torch.Tensor | None = None,
              geometric_p: float = 0.2, max_span: int = 10, seed=None, generator: torch.Generator | None = None):
    """SpanBERT masking: spans of geometric(geometric_p) length clipped to max_span (in words
    when word_starts is given) until exactly round(mask_prob * n_eligible) tokens are
    selected; one mask/random/keep action per span. Same outputs as mlm_mask. A span grows one
    unit at a time, so any geometric_p in (0, 1] and any max_span >= 1 (a huge one: no cap)
    cost O(seq_len) per row."""
    (mask_token_id, vocab_size, mask_prob, prob_rows, replace_prob, random_prob,
     special) = _check_common(input_ids, mask_token_id, vocab_size, mask_prob, replace_prob, random_prob,
                              attention_mask, word_starts, special_token_ids)
    geometric_p = check_prob("geometric_p", geometric_p, low_open=True)
    max_span = min(check_int("max_span", max_span, low=1), _INT64_MAX)  # longer than any row: the same
    seed_t = resolve_seed(seed, generator, input_ids.device)
    return _SPAN_MASK(input_ids, attention_mask, special, word_starts, prob_rows, seed_t,
                      mask_prob, mask_token_id, vocab_size, replace_prob, random_prob,
                      geometric_p, max_span)


# ---- fake kernels ----------------------------------------------------------------------------


def _check_op_args(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed, mask_prob,
                   mask_token_id, vocab_size, replace_prob, random_prob):
    """check_inputs of csrc/common/masking_checks.h, for the fake (meta) kernels. A direct op call
    on meta tensors, or on meta tensors mixed with CPU ones (the dispatcher then picks the fake
    kernel), must raise as the CPU and CUDA kernels do instead of returning tensors that were
    never computed (on the CPU: uninitialised memory)."""
    dev = input_ids.device
    torch._check(input_ids.dim() == 2,
                 lambda: f"input_ids: expected a 2-D tensor [batch, seq_len], got {input_ids.dim()}-D")
    torch._check(input_ids.dtype in (torch.int32, torch.int64),
                 lambda: f"input_ids: expected int32 or int64, got {input_ids.dtype}")
    torch._check(0.0 <= mask_prob <= 1.0, lambda: f"mask_prob: expected a probability in [0, 1], got {mask_prob}")
    torch._check(1 <= vocab_size < 2**32, lambda: f"vocab_size: expected 1 <= vocab_size < 2^32, got {vocab_size}")
    torch._check(input_ids.dtype == torch.int64 or vocab_size <= 2**31,
                 lambda: f"vocab_size: int32 input_ids hold ids below 2^31, got vocab_size {vocab_size}")
    torch._check(0 <= mask_token_id < vocab_size,
                 lambda: f"mask_token_id: expected an id in [0, {vocab_size}), got {mask_token_id}")
    torch._check(replace_prob >= 0 and random_prob >= 0 and replace_prob + random_prob <= 1.0 + 1e-9,
                 lambda: "replace_prob/random_prob: expected non-negative with replace_prob + random_prob <= 1, "
                         f"got {replace_prob} and {random_prob}")
    torch._check(seed.numel() == 1 and seed.dtype == torch.int64,
                 lambda: f"seed: expected a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
    torch._check(seed.device.type == "cpu" or seed.device == dev,
                 lambda: f"seed: expected a CPU tensor or one on {dev}, got {seed.device}")
    for name, t in (("attention_mask", attention_mask), ("word_starts", word_starts)):
        if t is not None:
            torch._check(t.shape == input_ids.shape,
                         lambda: f"{name}: expected shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
            torch._check(t.device == dev, lambda: f"{name}: expected device {dev}, got {t.device}")
    if special_ids is not None:
        torch._check(special_ids.dim() == 1, lambda: f"special_ids: expected a 1-D tensor, got {special_ids.dim()}-D")
        torch._check(special_ids.device == dev, lambda: f"special_ids: expected device {dev}, got {special_ids.device}")
        torch._check(not special_ids.dtype.is_floating_point and not special_ids.is_complex()
                     and special_ids.dtype != torch.bool,
                     lambda: f"special_ids: expected an integer tensor, got {special_ids.dtype}")
    if mask_prob_rows is not None:
        torch._check(mask_prob_rows.dim() == 1 and mask_prob_rows.shape[0] == input_ids.shape[0],
                     lambda: f"mask_prob: expected a per-row tensor of shape [{input_ids.shape[0]}], got "
                             f"{tuple(mask_prob_rows.shape)}")
        torch._check(mask_prob_rows.device == dev,
                     lambda: f"mask_prob: expected device {dev}, got {mask_prob_rows.device}")
        torch._check(mask_prob_rows.dtype.is_floating_point,
                     lambda: f"mask_prob: expected a float tensor of per-row rates, got {mask_prob_rows.dtype}")


def _fake_outputs(input_ids):
    out = torch.empty(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    return out, torch.empty_like(out)


@torch.library.register_fake("pretrain_kernels::mlm_mask")
def _fake_mlm_mask(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed, mask_prob,
                   mask_token_id, vocab_size, replace_prob, random_prob, exact_count, max_predictions):
    _check_op_args(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed, mask_prob,
                   mask_token_id, vocab_size, replace_prob, random_prob)
    return _fake_outputs(input_ids)


@torch.library.register_fake("pretrain_kernels::span_mask")
def _fake_span_mask(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed, mask_prob,
                    mask_token_id, vocab_size, replace_prob, random_prob, geometric_p, max_span):
    _check_op_args(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed, mask_prob,
                   mask_token_id, vocab_size, replace_prob, random_prob)
    torch._check(0.0 < geometric_p <= 1.0, lambda: f"geometric_p: expected a probability in (0, 1], got {geometric_p}")
    torch._check(max_span >= 1, lambda: f"max_span: expected >= 1, got {max_span}")
    return _fake_outputs(input_ids)
