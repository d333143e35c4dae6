"""pk.mlm_mask, pk.span_mask and pk.MLMCollator: invariants on every draw, statistics at
fixed seeds, determinism across calls/threads/devices, opcheck, compile, bad input."""
import math

import pytest
import torch
from scipy import stats

import pretrain_kernels as pk
from reference import mlm_eligible, mlm_selection_reference, philox4x32_10

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True

V = 1000
MASK = 4
SPECIAL = [0, 1, 2, 3, 4]  # pad, cls, sep, unk, mask


def make_batch(B, L, device, dtype=torch.int64, pad_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g, dtype=torch.int64)
    lens = torch.randint(max(1, int(L * (1 - pad_frac))), L + 1, (B,), generator=g)
    attn = (torch.arange(L)[None, :] < lens[:, None]).long()
    ids[:, 0] = 1  # [CLS]
    ids = torch.where(attn.bool(), ids, torch.zeros_like(ids))
    return ids.to(device=device, dtype=dtype), attn.to(device)


def check_invariants(ids, attn, out, labels, specials=SPECIAL, vocab=V, mask_id=MASK):
    ids, attn, out, labels = (t.cpu().long() for t in (ids, attn, out, labels))
    elig = mlm_eligible(ids, vocab, specials, attn)
    sel = labels != -100
    assert not (sel & ~elig).any(), "an ineligible (pad/special) position was selected"
    assert torch.equal(labels[sel], ids[sel]), "labels must hold the original ids where selected"
    assert torch.equal(out[~sel], ids[~sel]), "unselected positions must not change"
    changed = sel & (out != ids)
    rnd = changed & (out != mask_id)
    for s in specials:
        assert not (rnd & (out == s)).any(), "a random replacement drew a special id"
    assert ((out >= 0) & (out < vocab)).all()
    return sel


def test_unsorted_special_tensor_is_sorted_by_the_wrapper(device):
    ids, attn = make_batch(4, 50, device)
    unsorted = torch.tensor([4, 0, 3, 1, 2, 2], device=device)
    a = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=unsorted, attention_mask=attn, seed=3,
                    random_prob=0.5, replace_prob=0.5)
    b = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn, seed=3,
                    random_prob=0.5, replace_prob=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    unsorted[0] = 7  # a new version of the tensor is sorted again, not served from the cache
    c = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=unsorted, attention_mask=attn, seed=3)
    check_invariants(ids, attn, c[0], c[1], specials=[0, 1, 2, 3, 7])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (2, 1000)])
def test_invariants_and_non_contiguous(device, dtype, shape):
    ids, attn = make_batch(*shape, device, dtype)
    out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn,
                              mask_prob=0.4, seed=7)
    assert out.dtype == dtype and labels.dtype == dtype and out.shape == ids.shape
    check_invariants(ids, attn, out, labels)
    # A non-contiguous view gives the same result as its contiguous copy.
    wide = torch.zeros(shape[0], 2 * shape[1], dtype=dtype, device=device)
    wide[:, ::2] = ids
    view = wide[:, ::2]
    assert not view.is_contiguous() or shape[1] == 1
    out2, labels2 = pk.mlm_mask(view, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                                attention_mask=attn, mask_prob=0.4, seed=7)
    assert torch.equal(out, out2) and torch.equal(labels, labels2)


def test_selection_matches_documented_philox_keys():
    ids, attn = make_batch(3, 40, "cpu")
    _, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn,
                            mask_prob=0.3, seed=12345678901)
    ref = mlm_selection_reference(ids, 12345678901, 0.3, V, SPECIAL, attn)
    assert torch.equal(labels != -100, ref)


def _mask_of(attn, dtype):
    """attn (0/1) in `dtype` with other non-zero values than 1."""
    big = {torch.bool: True, torch.uint8: 7, torch.int32: -5, torch.int64: 2**40, torch.float32: 0.5}[dtype]
    return torch.where(attn.bool(), torch.tensor(big, dtype=dtype), torch.tensor(0, dtype=dtype))


@pytest.mark.parametrize("L", [1, 63, 1024, 1025, 2500])
def test_attention_mask_dtypes_and_many_special_ids(L):
    """The CPU's Bernoulli path reads bool, uint8, int32 and int64 attention masks as they are
    (other dtypes become bool): any non-zero value attends, in every dtype. Few special ids are
    compared lane by lane, more than 16 are binary-searched; both select what the documented
    Philox keys say, across segment boundaries (1024 tokens) and ragged tails."""
    ids, attn = make_batch(3, L, "cpu")
    g = torch.Generator().manual_seed(L)
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.2, torch.randint(0, 45, ids.shape, generator=g), ids)
    for specials in (SPECIAL, list(range(0, 40, 2)) + [7, 7, -2, 5000]):
        ref = mlm_selection_reference(ids, 99, 0.3, V, [s for s in specials if 0 <= s < V], attn)
        first = None
        for dtype in (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32):
            got = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=specials, mask_prob=0.3,
                              attention_mask=_mask_of(attn, dtype), replace_prob=0.5, random_prob=0.3, seed=99)
            assert torch.equal(got[1] != -100, ref), (dtype, len(specials))
            check_invariants(ids, attn, got[0], got[1], specials=[s for s in specials if 0 <= s < V])
            if first is None:
                first = got
            assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1]), dtype


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import pretrain_kernels as pk
from test_masking import isa_cases
torch.save(isa_cases(), {out!r})
"""


def isa_cases():
    """mlm_mask outputs over shapes, id dtypes, mask dtypes, special-id counts, per-row rates
    and action mixes (the same list in every process)."""
    outs = []
    for i, (B, L) in enumerate([(1, 1), (3, 70), (2, 1024), (2, 1500), (1, 3001)]):
        for dtype in (torch.int32, torch.int64):
            ids, attn = make_batch(B, L, "cpu", dtype, seed=i)
            for specials, mdt, rate, (rp, rnd) in [(SPECIAL, torch.int64, 0.15, (0.8, 0.1)),
                                                   (list(range(0, 60, 3)), torch.bool, 0.5, (0.0, 1.0)),
                                                   (None, None, torch.rand(B, generator=torch.Generator().manual_seed(i)),
                                                    (0.5, 0.5)),
                                                   ([2], torch.uint8, 1.0, (0.3, 0.3))]:
                outs.append(pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=specials,
                                        attention_mask=None if mdt is None else attn.to(mdt), mask_prob=rate,
                                        replace_prob=rp, random_prob=rnd, seed=1000 + i))
        # random replacements only, a vocab near 2^32 (uniform_int rejects about half its first
        # draws: the scalar redraw) and next to 2^31 (int32 ids), with a few and with many special ids
        for vocab, dtype in ((2**32 - 1, torch.int64), (3 * 2**30 + 5, torch.int64), (2**31, torch.int32)):
            ids = torch.randint(0, 2**31 - 1, (B, L), generator=torch.Generator().manual_seed(i), dtype=dtype)
            for specials in ([0, 5, 5, vocab - 1, vocab + 3, -1], list(range(1, 40))):
                outs.append(pk.mlm_mask(ids, mask_token_id=3, vocab_size=vocab, special_token_ids=specials,
                                        mask_prob=0.9, replace_prob=0.0, random_prob=1.0, seed=2000 + i))
    return outs


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_instruction_sets_agree(isa, tmp_path):
    """The portable and AVX2 loops (CPUs without AVX-512), forced through PK_CPU_ISA in a fresh
    process, give exactly the outputs of this process's dispatch (AVX-512 where the CPU has it)."""
    import os
    import subprocess
    import sys
    out = str(tmp_path / "outs.pt")
    env = dict(os.environ, PK_CPU_ISA=isa)
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests, out=out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = torch.load(out)
    ours = isa_cases()
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), i


def test_philox_known_answers_through_python_reference():
    # Published Random123 vectors: the Python reference used by the tests is right.
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_rates_binomial_and_80_10_10_chi_square():
    B, L, p = 64, 512, 0.15
    ids, attn = make_batch(B, L, "cpu", pad_frac=0.0)
    out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, seed=3)
    sel = check_invariants(ids, torch.ones_like(ids), out, labels)
    n = int(mlm_eligible(ids, V, SPECIAL).sum())
    k = int(sel.sum())
    # Two-sided binomial bound at 1e-6.
    lo, hi = stats.binom.ppf([1e-6, 1 - 1e-6], n, p)
    assert lo <= k <= hi, (k, n * p)
    n_mask = int((out[sel] == MASK).sum())
    n_keep = int((out[sel] == ids[sel]).sum())
    n_rand = k - n_mask - n_keep
    # A random draw can equal the original id (prob 1/995): fold that into "keep".
    expected = [0.8 * k, (0.1 * (1 - 1 / (V - 5))) * k, (0.1 + 0.1 / (V - 5)) * k]
    chi = stats.chisquare([n_mask, n_rand, n_keep], expected)
    assert chi.pvalue > 1e-4, chi


def test_random_tokens_uniform_over_non_special():
    B, L = 256, 512
    ids = torch.full((B, L), 500, dtype=torch.int64)
    vocab = 40
    specials = [0, 3, 7, 39]
    out, labels = pk.mlm_mask(ids, mask_token_id=3, vocab_size=vocab + 461, special_token_ids=specials,
                              mask_prob=1.0, replace_prob=0.0, random_prob=1.0, seed=11)
    # vocab+461 = 501 ids; the 497 non-special ones should be drawn uniformly.
    allowed = [i for i in range(501) if i not in specials]
    counts = torch.bincount(out.flatten(), minlength=501)
    assert int(counts[specials].sum()) == 0
    chi = stats.chisquare(counts[allowed].numpy())
    assert chi.pvalue > 1e-4, chi


def test_per_row_mask_prob(device):
    B, L = 8, 2000
    ids, _ = make_batch(B, L, device, pad_frac=0.0)
    rates = torch.tensor([0.0, 0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.0], device=device)
    out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, mask_prob=rates,
                              seed=5)
    sel = (labels != -100).cpu()
    n = mlm_eligible(ids.cpu(), V, SPECIAL).sum(1)
    for i in range(B):
        r = float(rates[i])
        lo, hi = stats.binom.ppf([1e-6, 1 - 1e-6], int(n[i]), r)
        assert lo <= int(sel[i].sum()) <= hi
    # A per-row tensor equal to a scalar gives the scalar's result.
    a = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=torch.full((B,), 0.2, device=device), seed=9)
    b = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=0.2, seed=9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("max_predictions", [None, 3])
def test_exact_count(device, max_predictions):
    B, L = 16, 129
    ids, attn = make_batch(B, L, device, pad_frac=0.5)
    for seed in range(3):
        out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                                  attention_mask=attn, exact_count=True, max_predictions=max_predictions, seed=seed)
        sel = check_invariants(ids, attn, out, labels)
        n = mlm_eligible(ids.cpu(), V, SPECIAL, attn.cpu()).sum(1)
        want = torch.tensor([max(1, round(0.15 * int(x))) if x > 0 else 0 for x in n])
        if max_predictions:
            want = want.clamp(max=max_predictions)
        assert torch.equal(sel.sum(1), want)


def test_exact_count_subset_is_uniform():
    # Every eligible position is selected equally often across rows (chi-square).
    B, L = 4000, 20
    ids = torch.randint(5, V, (1, L)).expand(B, L).contiguous()
    _, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, exact_count=True, mask_prob=0.25, seed=1)
    counts = (labels != -100).sum(0)
    assert int(counts.sum()) == B * 5
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4


def test_whole_word_masking(device):
    B, L = 32, 300
    ids, attn = make_batch(B, L, device, pad_frac=0.2)
    g = torch.Generator().manual_seed(2)
    ws = (torch.rand(B, L, generator=g) < 0.6).to(device)
    for exact in (False, True):
        out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                                  attention_mask=attn, word_starts=ws, exact_count=exact, mask_prob=0.3, seed=4)
        sel = check_invariants(ids, attn, out, labels)
        elig = mlm_eligible(ids.cpu(), V, SPECIAL, attn.cpu())
        wsc = ws.cpu()
        n_words = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            start = 0
            for pos in range(L):
                if pos == 0 or wsc[b, pos]:
                    start = pos
                    n_words[b] += int(elig[b, pos])
                # all eligible pieces of a word share its start's decision
                if elig[b, pos]:
                    assert bool(sel[b, pos]) == bool(sel[b, start] and elig[b, start])
        if exact:
            sel_words = (sel & (wsc | (torch.arange(L) == 0))).sum(1)
            want = torch.tensor([max(1, round(0.3 * int(x))) if x else 0 for x in n_words])
            assert torch.equal(sel_words, want)


def test_span_mask_budget_and_lengths():
    B, L = 64, 512
    ids, attn = make_batch(B, L, "cpu", pad_frac=0.3)
    out, labels = pk.span_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                               attention_mask=attn, seed=8)
    sel = check_invariants(ids, attn, out, labels)
    n = mlm_eligible(ids, V, SPECIAL, attn).sum(1)
    want = torch.tensor([max(1, round(0.15 * int(x))) for x in n])
    assert torch.equal(sel.sum(1), want)
    # Span lengths: with geometric_p = 1 every span is one token; with p=0.2 the mean run
    # length of selected tokens is well above 1 (runs can merge, so only bound it).
    runs = []
    for b in range(B):
        r = 0
        for pos in range(L):
            if sel[b, pos]:
                r += 1
            elif r:
                runs.append(r)
                r = 0
        if r:
            runs.append(r)
    assert 2.5 < sum(runs) / len(runs) < 6.0


def test_span_length_distribution():
    # Isolated spans: one span per row (budget capped by a tiny rate, huge rows) so lengths
    # are not clipped by the budget or merged. Compare with geometric(0.2) clipped at 10.
    B, L = 3000, 400
    ids = torch.randint(5, V, (B, L))
    out, labels = pk.span_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=10 / L, seed=21)
    sel = labels != -100
    first = sel.float().argmax(1)
    lengths = []
    for b in range(B):
        s = int(first[b])
        ln = 0
        while s + ln < L and sel[b, s + ln]:
            ln += 1
        lengths.append(ln)
    # Only the first span of a row is unclipped when it is the only one: with a budget of
    # 10 tokens the first span is never clipped (max_span = 10).
    counts = torch.bincount(torch.tensor(lengths), minlength=11)[1:11].double()
    p = 0.2
    probs = torch.tensor([p * (1 - p) ** (k - 1) for k in range(1, 10)] + [(1 - p) ** 9], dtype=torch.double)
    # Merged neighbours can lengthen a run only if two spans touch; the first run is the
    # first span unless a later span lands right after it (rare): allow a loose p-value.
    chi = stats.chisquare(counts.numpy(), (probs * counts.sum()).numpy())
    assert chi.pvalue > 1e-6, (counts, chi)


def test_span_mask_word_mode(device):
    B, L = 8, 200
    ids, attn = make_batch(B, L, device)
    ws = (torch.rand(B, L, generator=torch.Generator().manual_seed(0)) < 0.5).to(device)
    out, labels = pk.span_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn,
                               word_starts=ws, seed=3)
    sel = check_invariants(ids, attn, out, labels)
    assert sel.any()


def test_same_seed_same_result_across_calls_and_threads():
    ids, attn = make_batch(37, 333, "cpu")
    kw = dict(mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn, seed=99)
    torch.set_num_threads(1)
    a = [pk.mlm_mask(ids, **kw), pk.mlm_mask(ids, exact_count=True, **kw), pk.span_mask(ids, **kw)]
    torch.set_num_threads(2)
    b = [pk.mlm_mask(ids, **kw), pk.mlm_mask(ids, exact_count=True, **kw), pk.span_mask(ids, **kw)]
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    c = pk.mlm_mask(ids, **{**kw, "seed": 100})
    assert not torch.equal(a[0][1], c[1])


def test_manual_seed_reproduces_and_generator():
    ids, _ = make_batch(4, 64, "cpu")
    torch.manual_seed(0)
    a = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V)
    torch.manual_seed(0)
    b = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V)
    assert torch.equal(a[1], b[1])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, generator=g1)[1],
                       pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, generator=g2)[1])


def test_int_seed_tensors_are_reused_but_never_stale():
    """An int seed reuses its one-element tensor from call to call; one changed in place is
    made again, so a seed always means its value."""
    from pretrain_kernels.ops._common import resolve_seed
    ids, _ = make_batch(2, 40, "cpu")
    ref = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=2**64 - 3)
    t = resolve_seed(2**64 - 3, None, torch.device("cpu"))
    assert t.tolist() == [-3] and resolve_seed(2**64 - 3, None, torch.device("cpu")) is t
    t.fill_(11)
    again = resolve_seed(2**64 - 3, None, torch.device("cpu"))
    assert again.tolist() == [-3]
    got = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=2**64 - 3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    other = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=11)
    assert not torch.equal(other[1], ref[1])


def test_cpu_and_cuda_agree_bit_for_bit(cuda_kernels):
    dev = cuda_kernels.device
    B, L = 33, 517
    ids, attn = make_batch(B, L, "cpu")
    ws = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.7
    rates = torch.rand(B, generator=torch.Generator().manual_seed(2))
    kws = [dict(), dict(exact_count=True), dict(word_starts=ws), dict(word_starts=ws, exact_count=True),
           dict(mask_prob=rates), dict(exact_count=True, max_predictions=7)]
    for kw in kws:
        for fn in (pk.mlm_mask, pk.span_mask):
            if fn is pk.span_mask and ("exact_count" in kw or "max_predictions" in kw):
                continue
            cpu = fn(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn, seed=77,
                     **kw)
            kw_cuda = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            with cuda_kernels.run():
                gpu = fn(ids.to(dev), mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                         attention_mask=attn.to(dev), seed=77, **kw_cuda)
            assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu()), (fn.__name__, kw)
    # A seed that lives with the kernels gives the same result as the same value on the CPU.
    s = torch.tensor([77], device=dev)
    with cuda_kernels.run():
        gpu = pk.mlm_mask(ids.to(dev), mask_token_id=MASK, vocab_size=V, seed=s)
    cpu = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=77)
    assert torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cpu_and_cuda_agree_vector_loads(cuda_kernels, dtype):
    """Rows of 4k tokens in aligned tensors take the CUDA kernel's vector loads and stores; a
    view at an odd offset takes its scalar loop: both give the CPU's bits."""
    dev = cuda_kernels.device
    B, L = 6, 516
    ids, attn = make_batch(B, L, "cpu", dtype)
    shifted = torch.cat([torch.zeros(1, dtype=dtype), ids.flatten()])[1:].view(B, L)  # 4 or 8 bytes off
    for x in (ids, shifted):
        for mask in (None, attn):
            kw = dict(mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, mask_prob=0.4, replace_prob=0.5,
                      random_prob=0.3, seed=5)
            cpu = pk.mlm_mask(x, attention_mask=mask, **kw)
            with cuda_kernels.run():
                gpu = pk.mlm_mask(x.to(dev), attention_mask=None if mask is None else mask.to(dev), **kw)
            assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_special_ids_tensor_cache_cannot_go_stale():
    """The wrapper sorts a special-ids tensor once per tensor and version: an in-place change,
    and a new tensor that may land at the freed address of an old one, both get their own ids."""
    from pretrain_kernels.ops.masking import _special_tensor
    dev = torch.device("cpu")
    t = torch.tensor([9, 2, 5])
    assert _special_tensor(t, dev).tolist() == [2, 5, 9]
    assert _special_tensor(t, dev) is _special_tensor(t, dev)  # cached
    t[0] = 1
    assert _special_tensor(t, dev).tolist() == [1, 2, 5]
    t[:2].fill_(7)  # through a view
    assert _special_tensor(t, dev).tolist() == [5, 7, 7]
    for i in range(50):  # fresh tensors, often at a just-freed address
        u = torch.tensor([i + 3, i + 1, i + 2])
        assert _special_tensor(u, dev).tolist() == [i + 1, i + 2, i + 3]
        del u


def test_out_of_range_ids_and_rates_follow_one_rule(cuda_kernels):
    """What a GPU cannot check without a host sync follows one rule on both backends, bit for
    bit: ids outside [0, vocab_size) are never selected and stay unchanged (label -100);
    per-row rates are clamped into [0, 1], NaN counting as 0."""
    dev = cuda_kernels.device
    B, L = 6, 301
    ids, attn = make_batch(B, L, "cpu")
    g = torch.Generator().manual_seed(4)
    bad = torch.rand(B, L, generator=g) < 0.3
    ids = torch.where(bad, torch.randint(-5, 5, (B, L), generator=g) + torch.where(
        torch.rand(B, L, generator=g) < 0.5, -10, V + 5), ids)
    rates = torch.tensor([0.3, 1.7, -0.2, float("nan"), 1.0, float("inf")])
    kws = [dict(), dict(mask_prob=rates), dict(mask_prob=rates, exact_count=True),
           dict(mask_prob=rates, word_starts=torch.rand(B, L, generator=g) < 0.6)]
    for kw in kws:
        for fn in (pk.mlm_mask, pk.span_mask):
            if fn is pk.span_mask and "exact_count" in kw:
                continue
            cpu = fn(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn, seed=5,
                     **kw)
            out, labels = cpu
            assert torch.equal(out[bad], ids[bad]) and (labels[bad] == -100).all(), (fn.__name__, kw)
            if "mask_prob" in kw:
                # clamped rates: rows 2 and 3 (negative, NaN) select nothing; rows 1 and 5 (> 1) as row 4 (1.0)
                assert (labels[2:4] == -100).all()
                clamped = fn(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, attention_mask=attn,
                             seed=5, **dict(kw, mask_prob=rates.nan_to_num(0.0).clamp(0, 1)))
                assert torch.equal(cpu[0], clamped[0]) and torch.equal(cpu[1], clamped[1])
            kw_cuda = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            with cuda_kernels.run():
                gpu = fn(ids.to(dev), mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL,
                         attention_mask=attn.to(dev), seed=5, **kw_cuda)
            assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu()), (fn.__name__, kw)


@pytest.mark.cuda
def test_cuda_graph_capture():
    ids, attn = make_batch(8, 256, "cuda")
    seed = torch.tensor([1], device="cuda")
    pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, attention_mask=attn, seed=seed, exact_count=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, labels = pk.mlm_mask(ids, mask_token_id=MASK, vocab_size=V, attention_mask=attn, seed=seed,
                                  exact_count=True)
    results = []
    for s in (1, 2, 1):
        seed.fill_(s)
        g.replay()
        results.append(labels.clone())
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])
    ref = pk.mlm_mask(ids.cpu(), mask_token_id=MASK, vocab_size=V, attention_mask=attn.cpu(), seed=2,
                      exact_count=True)
    assert torch.equal(results[1].cpu(), ref[1])


def test_empty_batches(device):
    for shape in [(0, 5), (3, 0), (0, 0)]:
        ids = torch.zeros(shape, dtype=torch.int64, device=device)
        for fn in (pk.mlm_mask, pk.span_mask):
            out, labels = fn(ids, mask_token_id=MASK, vocab_size=V, seed=0)
            assert out.shape == shape and labels.shape == shape


def test_opcheck(device):
    ids, attn = make_batch(4, 33, device)
    seed = torch.tensor([3])
    special = torch.tensor(SPECIAL, device=device)
    ws = torch.rand(4, 33, device=device) < 0.5
    rates = torch.full((4,), 0.3, device=device)
    for args in [
        (ids, attn, special, None, None, seed, 0.15, MASK, V, 0.8, 0.1, False, 0),
        (ids, attn.bool(), special, ws, rates, seed, 0.15, MASK, V, 0.8, 0.1, True, 5),
    ]:
        torch.library.opcheck(torch.ops.pretrain_kernels.mlm_mask.default, args)
    torch.library.opcheck(torch.ops.pretrain_kernels.span_mask.default,
                          (ids, attn, special, ws, None, seed, 0.2, MASK, V, 0.8, 0.1, 0.2, 10))


def test_torch_compile_fullgraph(device):
    ids, attn = make_batch(4, 64, device)

    def f(x, a, rates):
        m, l = pk.mlm_mask(x, mask_token_id=MASK, vocab_size=V, attention_mask=a, mask_prob=rates, seed=5,
                           special_token_ids=SPECIAL)
        s, sl = pk.span_mask(x, mask_token_id=MASK, vocab_size=V, attention_mask=a, seed=5)
        return m, l, s, sl

    rates = torch.full((4,), 0.2, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    got = compiled(ids, attn, rates)
    want = f(ids, attn, rates)
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)
    # A new rate schedule value must not recompile or change shapes.
    compiled(ids, attn, torch.full((4,), 0.5, device=device))


def test_bad_input_errors():
    ids, attn = make_batch(2, 10, "cpu")
    kw = dict(mask_token_id=MASK, vocab_size=V)
    with pytest.raises(TypeError, match="input_ids"):
        pk.mlm_mask(ids.float(), **kw)
    with pytest.raises(ValueError, match="input_ids"):
        pk.mlm_mask(ids[0], **kw)
    with pytest.raises(ValueError, match="mask_prob"):
        pk.mlm_mask(ids, mask_prob=1.5, **kw)
    with pytest.raises(ValueError, match="mask_prob"):
        pk.mlm_mask(ids, mask_prob=torch.tensor([0.1, 0.2, 0.3]), **kw)
    with pytest.raises(ValueError, match="replace_prob"):
        pk.mlm_mask(ids, replace_prob=0.95, random_prob=0.1, **kw)
    with pytest.raises(ValueError, match="random_prob"):
        pk.mlm_mask(ids, random_prob=-0.1, **kw)
    with pytest.raises(ValueError, match="mask_token_id"):
        pk.mlm_mask(ids, mask_token_id=V, vocab_size=V)
    with pytest.raises(ValueError, match="attention_mask"):
        pk.mlm_mask(ids, attention_mask=attn[:, :5], **kw)
    with pytest.raises(ValueError, match="word_starts"):
        pk.mlm_mask(ids, word_starts=torch.ones(3, 10, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="max_predictions"):
        pk.mlm_mask(ids, exact_count=True, max_predictions=0, **kw)
    with pytest.raises(ValueError, match="geometric_p"):
        pk.span_mask(ids, geometric_p=0.0, **kw)
    with pytest.raises(ValueError, match="seed"):
        pk.mlm_mask(ids, seed=1, generator=torch.Generator(), **kw)
    with pytest.raises(TypeError, match="special_token_ids"):
        pk.mlm_mask(ids, special_token_ids=torch.tensor([1.0]), **kw)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="attention_mask"):
            pk.mlm_mask(ids, attention_mask=attn.cuda(), **kw)
    # Direct op calls are checked in C++ too.
    with pytest.raises(RuntimeError, match="special_ids"):
        torch.ops.pretrain_kernels.mlm_mask(ids, None, torch.tensor([3, 1]), None, None, torch.tensor([1]), 0.1, 4, V,
                                            0.8, 0.1, False, 0)
    with pytest.raises(RuntimeError, match="mask_token_id"):
        torch.ops.pretrain_kernels.mlm_mask(ids, None, None, None, None, torch.tensor([1]), 0.1, V + 5, V, 0.8, 0.1,
                                            False, 0)


class _TinyTokenizer:
    mask_token_id = 4
    pad_token_id = 0
    all_special_ids = [0, 1, 2, 3, 4]
    padding_side = "right"

    def __len__(self):
        return V


def test_collator_pads_and_masks():
    coll = pk.MLMCollator(_TinyTokenizer(), mlm_probability=0.5, pad_to_multiple_of=8, seed=0)
    examples = [{"input_ids": [1, 10, 11, 12, 2]}, {"input_ids": [1, 20, 2]}, {"input_ids": list(range(5, 16))}]
    batch = coll(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 11]
    padded = torch.zeros(3, 16, dtype=torch.long)
    for i, e in enumerate(examples):
        padded[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
    check_invariants(padded, batch["attention_mask"], batch["input_ids"], batch["labels"])
    # seed= makes the collator reproducible; successive batches differ.
    again = pk.MLMCollator(_TinyTokenizer(), mlm_probability=0.5, pad_to_multiple_of=8, seed=0)
    first = again(examples)
    assert torch.equal(first["labels"], batch["labels"])
    # explicit ids, plain lists, causal LM mode
    c2 = pk.MLMCollator(mlm=False, pad_token_id=0)
    b2 = c2([[5, 6, 7], [8]])
    assert b2["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_collator_matches_transformers_interface():
    transformers = pytest.importorskip("transformers")
    from transformers import DataCollatorForLanguageModeling

    import inspect

    ours = set(inspect.signature(pk.MLMCollator.__init__).parameters)
    theirs = set(inspect.signature(DataCollatorForLanguageModeling.__init__).parameters)
    for name in ("tokenizer", "mlm", "mlm_probability", "mask_replace_prob", "random_replace_prob",
                 "pad_to_multiple_of", "return_tensors", "seed"):
        assert name in theirs or name in ("mask_replace_prob", "random_replace_prob", "seed")
        assert name in ours
