"""pk.mlm_mask against what a user would run instead, on the same batch:
transformers' DataCollatorForLanguageModeling.torch_mask_tokens, a plain torch composite
(bernoulli / where), a numba parallel kernel (CPU), and the torch composite on the GPU and the
same composite in CuPy (GPU).

Run: pk-bench masking [--device cpu|cuda] [--quick]. Each test records group, impl and the bytes
the op must move (ids read, masked ids and labels written) in extra_info. Shapes 64x512 and
256x2048 (64x512 only under --quick).
"""
import numpy as np
import pytest
import torch

import pretrain_kernels as pk

from pretrain_kernels.bench.common import cuda_sync_fn, quick, require

VOCAB = 30522
MASK_ID, PAD_ID, CLS_ID, SEP_ID, UNK_ID = 103, 0, 101, 102, 100
SPECIAL = [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID]
SHAPES = quick([(64, 512), (256, 2048)], [(64, 512)])


def make_ids(B, L, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(999, VOCAB, (B, L), generator=g)
    ids[:, 0] = CLS_ID
    ids[:, -1] = SEP_ID
    return ids.to(device)


def torch_composite(ids, special, p=0.15):
    probs = torch.full(ids.shape, p, device=ids.device)
    probs.masked_fill_(torch.isin(ids, special), 0.0)
    sel = torch.bernoulli(probs).bool()
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & sel
    out = ids.masked_fill(replaced, MASK_ID)
    rnd = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & sel & ~replaced
    out = torch.where(rnd, torch.randint(VOCAB, ids.shape, device=ids.device), out)
    return out, labels


def cupy_composite(cp, ids, special, p=0.15):
    """torch_composite in CuPy, on the same device array (DLPack, no copy)."""
    sel = (cp.random.random(ids.shape, dtype=cp.float32) < p) & ~(ids[..., None] == special).any(-1)
    labels = cp.where(sel, ids, -100)
    u = cp.random.random(ids.shape, dtype=cp.float32)
    out = cp.where(sel & (u < 0.8), MASK_ID, ids)
    out = cp.where(sel & (u >= 0.8) & (u < 0.9), cp.random.randint(0, VOCAB, ids.shape), out)
    return out, labels


def hf_collator():
    transformers = require("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    for name, i in (("[PAD]", PAD_ID), ("[UNK]", UNK_ID), ("[CLS]", CLS_ID), ("[SEP]", SEP_ID), ("[MASK]", MASK_ID)):
        vocab.pop(f"t{i}")
        vocab[name] = i
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return transformers.DataCollatorForLanguageModeling(fast, mlm_probability=0.15)


_numba_fn = None


def numba_mask():
    global _numba_fn
    if _numba_fn is None:
        numba = require("numba")

        @numba.njit(parallel=True, cache=False)
        def mask(ids, special, p, mask_id, vocab, seed):
            B, L = ids.shape
            out = ids.copy()
            labels = np.full_like(ids, -100)
            for b in numba.prange(B):
                np.random.seed(seed + b)
                for pos in range(L):
                    t = ids[b, pos]
                    sp = False
                    for s in special:
                        if t == s:
                            sp = True
                    if sp or np.random.random() >= p:
                        continue
                    labels[b, pos] = t
                    u = np.random.random()
                    if u < 0.8:
                        out[b, pos] = mask_id
                    elif u < 0.9:
                        out[b, pos] = np.random.randint(0, vocab)
            return out, labels

        _numba_fn = mask
    return _numba_fn


def _info(benchmark, group, impl, B, L, device, elem=8, variant="special int64"):
    benchmark.group = f"mlm_mask {B}x{L} {variant} {device}"
    benchmark.extra_info.update(family="masking", op="mlm_mask", impl=impl, device=device, shape=f"{B}x{L}",
                                baseline=(impl == "pk"), bytes=B * L * elem * 3, tokens=B * L)


# pk.mlm_mask by id dtype, with and without special ids and an attention mask (int64 like a
# tokenizer's, padding in the last eighth of every row), against the memory floor below.
VARIANTS = [(dt, sp, am) for dt in ("int64", "int32") for sp, am in ((False, False), (True, False), (True, True))]


def _variant_name(v):
    dt, sp, am = v
    return " ".join(["special" if sp else "plain"] + (["attn"] if am else []) + [dt])


def _variant_inputs(B, L, device, v):
    dt, sp, am = v
    ids = make_ids(B, L, device).to(getattr(torch, dt))
    attn = None
    if am:
        attn = torch.ones(B, L, dtype=torch.int64, device=device)
        attn[:, L - L // 8:] = 0
    return ids, (torch.tensor(SPECIAL, device=device) if sp else None), attn


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pk_mlm_mask(benchmark, bench_device, shape, variant):
    B, L = shape
    ids, special, attn = _variant_inputs(B, L, bench_device, variant)
    _info(benchmark, "mlm_mask", "pk", B, L, bench_device, ids.element_size(), _variant_name(variant))
    fn = cuda_sync_fn(lambda: pk.mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=special,
                                          attention_mask=attn, seed=1), bench_device)
    benchmark(fn)


@pytest.mark.parametrize("preallocated", [False, True], ids=["alloc", "out"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memory_floor(benchmark, bench_device, shape, variant, preallocated):
    """The memory floor of the op: an elementwise pass that reads two tensors of the ids' dtype
    and writes two, the bytes mlm_mask moves with an attention mask of that dtype (and more than
    without one).

    The floor allocates its two outputs as the op does (torch.add(ids, other) and ids.clone()),
    because allocation is part of what the op costs: freed outputs of a few MiB go back to the OS
    when glibc trims the heap (or unmaps them), and the next call faults every page in again. In
    a long benchmark process that happens on every call at 256x2048 int64 (two 4 MiB outputs:
    2048 page faults, about 2.5 ms on a 2-core VM, against 0.7 ms of work), and whether it
    happens depends on the allocator's history, not on the op (it can hit the op's row and not
    this one, or the reverse; MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=67108864
    in the environment keep freed outputs mapped, and both rows steady). The second row,
    "outputs preallocated" (torch.add(..., out=a) and b.copy_(ids)), is the floor without
    any allocation: the gap between the two rows is the allocator's share."""
    B, L = shape
    ids, _, _ = _variant_inputs(B, L, bench_device, variant)
    other = ids.clone()
    impl = "memory floor, outputs preallocated (add + copy_)" if preallocated else "memory floor (add + clone)"
    _info(benchmark, "mlm_mask", impl, B, L, bench_device, ids.element_size(), _variant_name(variant))
    if preallocated:
        a, b = torch.empty_like(ids), torch.empty_like(ids)
        fn = lambda: (torch.add(ids, other, out=a), b.copy_(ids))  # noqa: E731
    else:
        fn = lambda: (torch.add(ids, other), ids.clone())  # noqa: E731
    benchmark(cuda_sync_fn(fn, bench_device))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_composite(benchmark, bench_device, shape):
    B, L = shape
    ids = make_ids(B, L, bench_device)
    special = torch.tensor(SPECIAL, device=bench_device)
    _info(benchmark, "mlm_mask", "torch composite", B, L, bench_device)
    benchmark(cuda_sync_fn(lambda: torch_composite(ids, special), bench_device))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_transformers_collator(benchmark, shape):
    B, L = shape
    coll = hf_collator()
    ids = make_ids(B, L)
    _info(benchmark, "mlm_mask", "transformers collator", B, L, "cpu")
    benchmark.pedantic(lambda: coll.torch_mask_tokens(ids.clone()), rounds=3 if B * L > 100000 else 5, iterations=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_numba_parallel(benchmark, shape):
    B, L = shape
    fn = numba_mask()
    ids = make_ids(B, L).numpy()
    special = np.array(SPECIAL, dtype=np.int64)
    fn(ids, special, 0.15, MASK_ID, VOCAB, 0)  # compile outside the timing
    _info(benchmark, "mlm_mask", "numba parallel", B, L, "cpu")
    benchmark(lambda: fn(ids, special, 0.15, MASK_ID, VOCAB, 0))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cupy_composite(benchmark, shape):
    cp = require("CuPy")
    B, L = shape
    ids = cp.from_dlpack(make_ids(B, L, "cuda"))
    special = cp.asarray(SPECIAL, dtype=ids.dtype)
    _info(benchmark, "mlm_mask", "cupy composite", B, L, "cuda")

    def run():
        out = cupy_composite(cp, ids, special)
        cp.cuda.get_current_stream().synchronize()
        return out

    benchmark(run)
