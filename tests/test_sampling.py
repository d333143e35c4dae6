"""pk.sample, pk.top_k_top_p_filter, pk.TopKTopPLogitsWarper, pk.speculative_accept against the
float64 references in tests/reference.py: exact invariants on every draw, chi-square tests at
fixed seeds, opcheck, torch.compile, bad inputs."""
import math

import pytest
import torch

import emulated_cuda
import pretrain_kernels as pk
import reference as ref

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _logits(B, V, *, scale=2.0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit; cells with small expectations are pooled into one. Needs
    scipy: the calling test skips (alone) without it."""
    stats = pytest.importorskip("scipy.stats")
    counts = counts.double().cpu()
    probs = probs.double().cpu()
    n = counts.sum()
    exp = probs * n
    assert float(counts[probs == 0].sum()) == 0, "draws outside the support"
    big = exp >= min_expected
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum().reshape(1)])
    ex = torch.cat([exp[big], exp[~big & (probs > 0)].sum().reshape(1)])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    if obs.numel() < 2:
        return 1.0
    return float(stats.chisquare(obs.numpy(), ex.numpy() * (obs.sum() / ex.sum()).item()).pvalue)


# ---- filter ------------------------------------------------------------------------------------

FILTER_KNOBS = [
    dict(top_k=1), dict(top_k=5), dict(top_k=50), dict(top_p=0.5), dict(top_p=0.95), dict(min_p=0.1),
    dict(top_k=40, top_p=0.8), dict(top_k=10, top_p=0.9, min_p=0.05), dict(top_p=1e-6),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 63), (5, 129), (2, 1000)])
@pytest.mark.parametrize("knobs", FILTER_KNOBS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_filter_matches_reference(device, dtype, shape, knobs):
    x = _logits(*shape, dtype=dtype, device=device, seed=shape[1])
    out = pk.top_k_top_p_filter(x, **knobs)
    want = ref.top_k_top_p_filter(x.double().cpu(), **knobs)
    assert out.dtype == x.dtype and out.shape == x.shape
    kept = out.cpu() > -math.inf
    assert torch.equal(kept, want > -math.inf)
    assert torch.equal(out.cpu()[kept], x.cpu()[kept])


def test_filter_large_vocab_and_ties(device):
    # 32k entries with many exact ties (bfloat16 has 8 significant bits).
    x = _logits(4, 32000, scale=3.0, dtype=torch.bfloat16, device=device, seed=3)
    for knobs in (dict(top_k=100), dict(top_p=0.9), dict(top_k=1000, top_p=0.7, min_p=0.01)):
        out = pk.top_k_top_p_filter(x, **knobs)
        want = ref.top_k_top_p_filter(x.double().cpu(), **knobs)
        assert torch.equal(out.cpu() > -math.inf, want > -math.inf), knobs
    # top-k keeps every entry tied with the k-th largest
    t = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]], device=device)
    assert (pk.top_k_top_p_filter(t, top_k=3) > -math.inf).cpu().tolist() == [[0, 1, 1, 1, 1, 1, 0]]
    assert (pk.top_k_top_p_filter(t, top_k=2) > -math.inf).cpu().tolist() == [[0, 1, 0, 1, 0, 0, 0]]


def test_filter_per_row_knobs(device):
    x = _logits(6, 300, device=device, seed=5)
    k = torch.tensor([0, 1, 5, 50, 299, 300], device=device)
    p = torch.tensor([1.0, 0.3, 0.9, 0.5, 0.99, 0.7], device=device)
    m = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.01, 0.2], device=device)
    out = pk.top_k_top_p_filter(x, top_k=k, top_p=p, min_p=m)
    for b in range(6):
        one = pk.top_k_top_p_filter(x[b:b + 1], top_k=int(k[b]), top_p=float(p[b]), min_p=float(m[b]))
        assert torch.equal(out[b:b + 1], one)


def test_filter_nonfinite(device):
    x = torch.tensor([[0.0, float("nan"), 1.0, -float("inf")],
                      [float("inf"), 2.0, float("inf"), float("nan")],
                      [float("nan"), -float("inf"), float("nan"), -float("inf")]], device=device)
    out = pk.top_k_top_p_filter(x, top_p=0.9).cpu()
    inf = math.inf
    assert out[0].tolist() == [0.0, -inf, 1.0, -inf]
    assert out[1].tolist() == [inf, -inf, inf, -inf]
    assert out[2].tolist() == [-inf] * 4


def test_logits_warper_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (MinPLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    x = _logits(8, 5000, scale=3.0, seed=11)
    for k, p, m in ((50, 1.0, 0.0), (0, 0.9, 0.0), (100, 0.8, 0.0), (0, 1.0, 0.05)):
        scores = x.clone()
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        if m > 0:
            scores = MinPLogitsWarper(m)(None, scores)
        ours = pk.TopKTopPLogitsWarper(top_k=k, top_p=p, min_p=m)(None, x)
        assert torch.equal(ours > -math.inf, scores > -math.inf)


def test_logits_warper_in_generate():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.generation.logits_process import LogitsProcessorList
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.tensor([[1, 2, 3]])
    seen = []

    class Spy(pk.TopKTopPLogitsWarper):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            seen.append((scores, out))
            return out

    out = model.generate(ids, do_sample=True, max_new_tokens=6, top_k=0, top_p=1.0, pad_token_id=0,
                         logits_processor=LogitsProcessorList([Spy(top_k=5)]))
    assert out.shape == (1, 9) and len(seen) == 6
    for step, (scores, filtered) in enumerate(seen):
        kept = filtered[0] > -math.inf
        assert int(kept.sum()) == 5 and bool(kept[out[0, 3 + step]])


# ---- sample ------------------------------------------------------------------------------------

SAMPLE_KNOBS = [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.2, temperature=1.5),
    dict(top_k=20, top_p=0.9, temperature=0.8), dict(top_k=3, top_p=0.5, min_p=0.3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", SAMPLE_KNOBS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()) or "plain")
def test_sample_in_kept_set(device, dtype, knobs):
    x = _logits(64, 129, dtype=dtype, device=device, seed=1)
    probs = ref.sampling_probs(x.double().cpu(), **knobs)
    for seed in range(2 if emulated_cuda.active() else 8):
        tok, lp = pk.sample(x, seed=seed, return_logprobs=True, **knobs)
        assert tok.dtype == torch.int64 and lp.dtype == torch.float32
        tok, lp = tok.cpu(), lp.cpu()
        p = probs.gather(1, tok[:, None])[:, 0]
        assert bool((p > 0).all()), "a token outside the kept set"
        torch.testing.assert_close(lp.double(), p.log(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("knobs", [
    dict(), dict(temperature=0.5), dict(top_k=7), dict(top_p=0.7), dict(min_p=0.1),
    dict(top_k=12, top_p=0.85, min_p=0.02, temperature=1.3),
])
@pytest.mark.not_emulated("tens of thousands of rows of 1024 emulated threads each")
def test_sample_distribution_chi_square(device, knobs):
    # one distribution replicated over many rows: row i draws with (seed, i), independent draws
    x = _logits(1, 40, scale=1.5, seed=2)
    n = 40000
    tok = pk.sample(x.to(device).expand(n, -1), seed=1234, **knobs).cpu()
    probs = ref.sampling_probs(x, **knobs)[0]
    counts = torch.bincount(tok, minlength=40)
    assert _chi2_pvalue(counts, probs) > 1e-3


def test_greedy_exact(device):
    x = _logits(33, 1000, device=device, seed=4)
    x[3, 10] = x[3, 500] = x[3].max() + 1  # tie: lowest index wins
    tok, lp = pk.sample(x, temperature=0.0, top_k=3, top_p=0.5, return_logprobs=True)
    want = x.cpu().argmax(dim=1)
    want[3] = 10
    assert torch.equal(tok.cpu(), want)
    assert bool((lp == 0).all())
    temps = torch.tensor([0.0, 1.0, 0.0], device=device)
    tok = pk.sample(x[:3], temperature=temps, seed=0)
    assert int(tok[0]) == int(want[0]) and int(tok[2]) == int(want[2])


def test_penalties_match_reference(device):
    B, V, T = 6, 300, 40
    x = _logits(B, V, device=device, seed=6)
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(-1, V, (B, T), generator=g)
    prev[:, :5] = torch.arange(5)  # repeated ids
    prev[:, 5:10] = torch.arange(5)
    knobs = dict(repetition_penalty=torch.tensor([1.0, 1.3, 0.8, 2.0, 1.1, 1.0]),
                 presence_penalty=torch.tensor([0.0, 0.5, -0.3, 0.0, 1.0, 0.2]),
                 frequency_penalty=torch.tensor([0.0, 0.25, 0.1, 0.5, 0.0, 0.3]))
    pen = ref.penalized_logits(x.double().cpu(), prev, **knobs)
    dev_knobs = {k: v.to(device) for k, v in knobs.items()}
    tok = pk.sample(x, temperature=0.0, prev_tokens=prev.to(device), **dev_knobs)
    assert torch.equal(tok.cpu(), pen.argmax(dim=1))
    probs = ref.sampling_probs(x.double().cpu(), prev_tokens=prev, top_k=30, **knobs)
    for seed in range(5):
        tok, lp = pk.sample(x, prev_tokens=prev.to(device).int(), top_k=30, seed=seed, return_logprobs=True,
                            **dev_knobs)
        p = probs.gather(1, tok.cpu()[:, None])[:, 0]
        assert bool((p > 0).all())
        torch.testing.assert_close(lp.cpu().double(), p.log(), atol=2e-5, rtol=1e-5)


def test_per_row_knobs_equal_separate_calls(device):
    B, V = 5, 500
    x = _logits(B, V, device=device, seed=7)
    prev = torch.randint(0, V, (B, 12), generator=torch.Generator().manual_seed(1)).to(device)
    knobs = dict(temperature=torch.tensor([0.5, 1.0, 0.0, 2.0, 0.9]), top_k=torch.tensor([0, 10, 3, 400, 1]),
                 top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0]), min_p=torch.tensor([0.0, 0.05, 0.0, 0.1, 0.0]),
                 repetition_penalty=torch.tensor([1.2, 1.0, 1.5, 0.9, 1.0]),
                 presence_penalty=torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]),
                 frequency_penalty=torch.tensor([0.1, 0.0, 0.0, 0.3, 0.0]))
    seeds = torch.tensor([11, 22, 33, 44, 55], device=device)
    for rep in range(3):
        tok, lp = pk.sample(x, prev_tokens=prev, seed=seeds + rep, return_logprobs=True,
                            **{k: v.to(device) for k, v in knobs.items()})
        for b in range(B):
            one, lp1 = pk.sample(x[b:b + 1], prev_tokens=prev[b:b + 1], seed=int(seeds[b]) + rep,
                                 return_logprobs=True, **{k: v[b].item() for k, v in knobs.items()})
            assert int(tok[b]) == int(one[0])
            assert float(lp[b]) == float(lp1[0])


def test_same_seed_across_batch_compositions(device):
    x = _logits(16, 2000, device=device, seed=8)
    other = _logits(16, 2000, device=device, seed=9)
    knobs = dict(top_k=100, top_p=0.9, temperature=0.8)
    a = pk.sample(x, seed=77, **knobs)
    mixed = x.clone()
    mixed[1::2] = other[1::2]
    b = pk.sample(mixed, seed=77, **knobs)
    assert torch.equal(a[0::2], b[0::2])
    assert torch.equal(pk.sample(x[:5], seed=77, **knobs), a[:5])


def test_thread_count_and_seed_reproducibility():
    x = _logits(32, 3000, seed=10)
    torch.set_num_threads(1)
    a = pk.sample(x, seed=5, top_p=0.9)
    torch.set_num_threads(2)
    assert torch.equal(pk.sample(x, seed=5, top_p=0.9), a)
    torch.manual_seed(123)
    c = pk.sample(x)
    torch.manual_seed(123)
    assert torch.equal(pk.sample(x), c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(pk.sample(x, generator=g1), pk.sample(x, generator=g2))
    assert not torch.equal(pk.sample(x, seed=1), pk.sample(x, seed=2))


def test_noncontiguous_and_empty(device):
    base = _logits(300, 8, device=device, seed=12)
    x = base.t()  # [8, 300], non-contiguous
    assert torch.equal(pk.sample(x, seed=3, top_k=20), pk.sample(x.contiguous(), seed=3, top_k=20))
    assert torch.equal(pk.top_k_top_p_filter(x, top_p=0.5), pk.top_k_top_p_filter(x.contiguous(), top_p=0.5))
    e = torch.empty(0, 10, device=device)
    t, lp = pk.sample(e, return_logprobs=True)
    assert t.shape == (0,) and lp.shape == (0,)
    assert pk.top_k_top_p_filter(e, top_k=3).shape == (0, 10)


def test_sample_nonfinite(device):
    inf, nan = math.inf, math.nan
    x = torch.tensor([[nan, 0.0, nan, -inf, 1.0],
                      [inf, 5.0, inf, nan, 1e30],
                      [nan, -inf, -inf, nan, nan]], device=device)
    for seed in range(50):
        tok, lp = pk.sample(x, seed=seed, return_logprobs=True)
        tok = tok.cpu().tolist()
        assert tok[0] in (1, 4) and tok[1] in (0, 2) and tok[2] == -1
        assert abs(float(lp[1]) - math.log(0.5)) < 1e-6 and float(lp[2]) == -inf
    # temperature so small that finite logits overflow to +inf: uniform over the overflowing ones
    y = torch.tensor([[3e38, 3e38, 1.0, 2.0]], device=device)
    toks = pk.sample(y.expand(200 if emulated_cuda.active() else 2000, -1), temperature=1e-3, seed=0).cpu()
    assert set(toks.tolist()) == {0, 1}
    assert int(pk.sample(x[2:], temperature=0.0)[0]) == -1


def test_sample_infinite_temperature(device):
    # temperature = +inf is the limit of softmax(x / T): uniform over the +inf logits if any
    # (inf / inf must not become NaN), else over the finite ones; NaN and -inf never drawn
    inf, nan = math.inf, math.nan
    x = torch.tensor([[inf, 1.0, inf, nan, -inf], [1.0, 2.0, nan, -inf, 3.0]], device=device)
    seen = [set(), set()]
    for seed in range(40):
        tok, lp = pk.sample(x, temperature=inf, seed=seed, return_logprobs=True)
        for b in range(2):
            seen[b].add(int(tok[b]))
        assert abs(float(lp[0]) - math.log(1 / 2)) < 1e-6 and abs(float(lp[1]) - math.log(1 / 3)) < 1e-6
    assert seen == [{0, 2}, {0, 1, 4}]
    # with top-k the +inf entries are the top ones
    assert int(pk.sample(x[:1], temperature=inf, top_k=1, seed=3)[0]) in (0, 2)


def test_sample_large_vocab(device):
    # a real-size vocabulary: all filters, the kept-set invariant and the logprob
    x = _logits(3, 128256, scale=3.0, dtype=torch.bfloat16, device=device, seed=13)
    knobs = dict(top_k=50, top_p=0.9, temperature=0.7)
    probs = ref.sampling_probs(x.double().cpu(), **knobs)
    for seed in range(3):
        tok, lp = pk.sample(x, seed=seed, return_logprobs=True, **knobs)
        p = probs.gather(1, tok.cpu()[:, None])[:, 0]
        assert bool((p > 0).all())
        torch.testing.assert_close(lp.cpu().double(), p.log(), atol=2e-5, rtol=1e-5)


# ---- speculative -------------------------------------------------------------------------------


def _probs(B, n, V, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, n, V, generator=g, dtype=torch.float64) * sharp, dim=-1).float()


def test_speculative_invariants(device):
    B, n, V = 64, 4, 50
    draft = _probs(B, n, V, 0)
    target = _probs(B, n + 1, V, 1)
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=torch.Generator().manual_seed(2)).reshape(B, n)
    out, acc = pk.speculative_accept(draft.to(device), ids.to(device), target.to(device), seed=3)
    out, acc = out.cpu(), acc.cpu()
    assert out.shape == (B, n + 1) and acc.shape == (B,)
    for b in range(B):
        a = int(acc[b])
        assert out[b, :a].tolist() == ids[b, :a].tolist()
        tok = int(out[b, a])
        assert 0 <= tok < V
        if a < n:
            assert float(target[b, a, tok]) > float(draft[b, a, tok])  # from the residual
        assert out[b, a + 1:].tolist() == [-1] * (n - a)
    # draft == target: everything accepted, plus a bonus token
    out, acc = pk.speculative_accept(target[:, :n].to(device), ids.to(device), target.to(device), seed=4)
    assert bool((acc == n).all()) and bool((out[:, :n].cpu() == ids).all()) and bool((out[:, n] >= 0).all())


@pytest.mark.not_emulated("tens of thousands of rows of 1024 emulated threads each")
def test_speculative_distribution_chi_square(device):
    # The emitted first token follows the target when the draft token is drawn from the draft.
    N, V = 30000, 20
    draft = _probs(1, 2, V, 5, sharp=1.5)
    target = _probs(1, 3, V, 6, sharp=1.5)
    ids = torch.multinomial(draft[0, 0], N, replacement=True, generator=torch.Generator().manual_seed(7))
    ids = torch.stack([ids, torch.zeros_like(ids)], dim=1)
    out, acc = pk.speculative_accept(draft.expand(N, -1, -1).to(device), ids.to(device),
                                     target.expand(N, -1, -1).to(device), seed=8)
    counts = torch.bincount(out[:, 0].cpu(), minlength=V)
    assert _chi2_pvalue(counts, target[0, 0].double()) > 1e-3
    # and with a fixed draft token, the mixture of acceptance and residual
    fixed = torch.full((N, 2), 3)
    out, _ = pk.speculative_accept(draft.expand(N, -1, -1).to(device), fixed.to(device),
                                   target.expand(N, -1, -1).to(device), seed=9)
    want = ref.speculative_first_token_probs(draft[0], fixed[0], target[0])
    assert _chi2_pvalue(torch.bincount(out[:, 0].cpu(), minlength=V), want) > 1e-3


# ---- CUDA agreement and graphs -----------------------------------------------------------------


def test_cuda_matches_cpu(cuda_kernels):
    dev, run = cuda_kernels.device, cuda_kernels.run
    # fewer rows through the emulator (1024 fibers per row), same vocabulary
    rows = 48 if cuda_kernels.kind == "cuda" else 6
    x = _logits(rows, 50000, scale=3.0, seed=14)
    for dtype in DTYPES:
        xd = x.to(dtype)
        for knobs in SAMPLE_KNOBS + [dict(top_k=1000, top_p=0.95), dict(temperature=0.0)]:
            a, la = pk.sample(xd, seed=21, return_logprobs=True, **knobs)
            with run():
                b, lb = pk.sample(xd.to(dev), seed=21, return_logprobs=True, **knobs)
            assert torch.equal(a, b.cpu()), (dtype, knobs)
            torch.testing.assert_close(la, lb.cpu(), atol=1e-5, rtol=1e-5)
        for knobs in FILTER_KNOBS:
            want = pk.top_k_top_p_filter(xd, **knobs)
            with run():
                got = pk.top_k_top_p_filter(xd.to(dev), **knobs)
            assert torch.equal(want, got.cpu())
    prev = torch.randint(-1, 50000, (rows, 64), generator=torch.Generator().manual_seed(0))
    pen = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, top_k=40)
    want = pk.sample(x, prev_tokens=prev, seed=1, **pen)
    with run():
        got = pk.sample(x.to(dev), prev_tokens=prev.to(dev), seed=1, **pen)
    assert torch.equal(want, got.cpu())
    draft, target = _probs(32, 3, 1000, 0), _probs(32, 4, 1000, 1)
    ids = torch.randint(0, 1000, (32, 3), generator=torch.Generator().manual_seed(0))
    with run():
        got = pk.speculative_accept(draft.to(dev), ids.to(dev), target.to(dev), seed=2)
    for g, want in zip(got, pk.speculative_accept(draft, ids, target, seed=2)):
        assert torch.equal(g.cpu(), want)


def test_per_row_knobs_out_of_range_on_device(cuda_kernels):
    # Per-row tensors in device memory are not checked (no host sync): the kernels apply the
    # documented rule (sampling.h, RowKnobs): each bad value acts as its stated substitute. The
    # CPU rejects such tensors, so the CUDA kernels with the bad values are compared with the
    # CPU kernels given the substitutes, through the raw ops (the wrappers check CPU tensors).
    inf, nan = math.inf, math.nan
    B, V = 12, 300
    x = _logits(B, V, seed=18)
    prev = torch.randint(0, V, (B, 9), generator=torch.Generator().manual_seed(19))
    #             bad value -> substitute, per row
    temp = [(nan, 0.0), (-1.0, 0.0)] + [(1.0, 1.0)] * 10
    top_k = [(0, 0)] * 11 + [(-5, 0)]
    top_p = [(1.0, 1.0)] * 2 + [(nan, 1.0), (1.5, 1.0), (-0.5, 1e-9)] + [(1.0, 1.0)] * 7
    min_p = [(0.0, 0.0)] * 5 + [(nan, 0.0), (-0.2, 0.0), (3.0, 1.0)] + [(0.0, 0.0)] * 4
    rep_ = [(1.3, 1.3)] * 8 + [(nan, 1.0), (-2.0, 1.0), (inf, 1.0), (0.0, 1.0)]
    pres = [(0.2, 0.2)] * 8 + [(inf, 0.0), (nan, 0.0), (-inf, 0.0), (0.5, 0.5)]
    freq = [(0.1, 0.1)] * 8 + [(-inf, 0.0), (nan, 0.0), (0.3, 0.3), (inf, 0.0)]
    bad_prev, good_prev = prev.clone(), prev.clone()
    bad_prev[8:, 0], bad_prev[8:, 1] = V, -7  # ids outside [0, V): ignored
    good_prev[8:, :2] = -1

    def rows(pairs, i, dtype=torch.float32):
        return torch.tensor([p[i] for p in pairs], dtype=dtype)

    def args(i, prev_tokens, dev):
        t = [rows(temp, i), rows(top_k, i, torch.int64), rows(top_p, i), rows(min_p, i), rows(rep_, i),
             rows(pres, i), rows(freq, i)]
        return (x.to(dev), prev_tokens.to(dev), torch.tensor([5]).to(dev), *(r.to(dev) for r in t),
                1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)

    op, filt = torch.ops.pretrain_kernels.sample, torch.ops.pretrain_kernels.top_k_top_p_filter
    with pytest.raises(RuntimeError, match="temperature"):
        op(*args(0, bad_prev, "cpu"))  # the CPU kernels check host tensors
    want, want_lp = op(*args(1, good_prev, "cpu"))
    fwant = filt(x, rows(top_k, 1, torch.int64), rows(top_p, 1), rows(min_p, 1), 0, 1.0, 0.0)
    dev = cuda_kernels.device
    with cuda_kernels.run():
        got, got_lp = op(*args(0, bad_prev, dev))
        fgot = filt(x.to(dev), rows(top_k, 0, torch.int64).to(dev), rows(top_p, 0).to(dev), rows(min_p, 0).to(dev),
                    0, 1.0, 0.0)
    assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(got_lp.cpu(), want_lp, atol=1e-5, rtol=1e-5)
    assert torch.equal(fgot.cpu(), fwant)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_speculative_out_of_vocabulary_drafts(cuda_kernels, id_dtype):
    # One rule on both backends: a draft id outside [0, V) is rejected at its position and the
    # correction token is drawn there as for any rejection. Same outputs, bit for bit, as with
    # the id replaced by an in-vocabulary one that the target gives probability 0 (always
    # rejected, same Philox words), and CPU == CUDA kernels.
    B, n, V = 8, 4, 50
    draft = _probs(B, n, V, 20)
    target = _probs(B, n + 1, V, 21)
    zero = 7
    target[:, :, zero] = 0  # id 7: never accepted
    target = target / target.sum(-1, keepdim=True)
    ids = torch.multinomial(target[:, :n].reshape(-1, V), 1, generator=torch.Generator().manual_seed(22))
    ids = ids.reshape(B, n)
    huge = 2**31 - 1 if id_dtype == torch.int32 else 2**62
    lowest = -(2**31) if id_dtype == torch.int32 else -(2**63)
    bad = ids.clone()
    bad[0, 0], bad[1, 1], bad[2, 2], bad[3, 3] = -1, V, huge, lowest
    bad[4, 0], bad[4, 2] = V + 1, -5  # rejected at 0; the later bad id is never reached
    bad[5, 1], bad[5, 3] = V, V       # rows 6, 7: all in the vocabulary
    stand_in = torch.where((bad < 0) | (bad >= V), torch.full_like(bad, zero), bad)
    bad, stand_in = bad.to(id_dtype), stand_in.to(id_dtype)
    out, acc = pk.speculative_accept(draft, bad, target, seed=23)
    want_out, want_acc = pk.speculative_accept(draft, stand_in, target, seed=23)
    assert torch.equal(out, want_out) and torch.equal(acc, want_acc)
    for b, first_bad in enumerate([0, 1, 2, 3, 0, 1]):
        assert int(acc[b]) <= first_bad
    assert int(acc[0]) == 0 and int(acc[4]) == 0
    rows = torch.arange(B)
    assert bool((out[rows, acc] >= 0).all()) and bool((out < V).all())  # a correction token at the stop
    dev = cuda_kernels.device
    with cuda_kernels.run():
        got_out, got_acc = pk.speculative_accept(draft.to(dev), bad.to(dev), target.to(dev), seed=23)
    assert torch.equal(got_out.cpu(), out) and torch.equal(got_acc.cpu(), acc)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x = _logits(8, 32000, device="cuda", seed=15)
    seed = torch.tensor([5], device="cuda")
    top_p = torch.full((8,), 0.9, device="cuda")
    pk.sample(x, seed=seed, top_k=50, top_p=top_p)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pk.sample(x, seed=seed, top_k=50, top_p=top_p)
    for s in (5, 6):
        seed.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, pk.sample(x, seed=s, top_k=50, top_p=top_p))


# ---- opcheck, compile, bad inputs ----------------------------------------------------------------


def test_opcheck(device):
    x = _logits(4, 300, device=device, seed=16)
    seed = torch.tensor([3])
    none = [None] * 7
    torch.library.opcheck(torch.ops.pretrain_kernels.sample,
                          (x, None, seed, *none, 0.8, 20, 0.9, 0.0, 1.0, 0.0, 0.0))
    rows = torch.tensor([0.5, 1.0, 0.0, 2.0], device=device)
    prev = torch.randint(-1, 300, (4, 9), device=device)
    torch.library.opcheck(torch.ops.pretrain_kernels.sample,
                          (x, prev, torch.arange(4, device=device), rows, torch.tensor([0, 5, 1, 50], device=device),
                           None, rows * 0.1, rows + 1, None, rows, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0))
    torch.library.opcheck(torch.ops.pretrain_kernels.top_k_top_p_filter, (x, None, None, None, 10, 0.8, 0.05))
    draft, target = _probs(4, 2, 30, 0).to(device), _probs(4, 3, 30, 1).to(device)
    ids = torch.randint(0, 30, (4, 2), device=device)
    torch.library.opcheck(torch.ops.pretrain_kernels.speculative_accept, (draft, ids, target, seed))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = _logits(4, 500, device=device, seed=17)
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.7], device=device)

    def step(x, top_p):
        tok, lp = pk.sample(x, temperature=0.8, top_k=40, top_p=top_p, seed=9, return_logprobs=True)
        return tok, lp, pk.top_k_top_p_filter(x, top_k=10, min_p=0.05)

    got = torch.compile(step, fullgraph=True)(x, top_p)
    want = step(x, top_p)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    draft, target = _probs(4, 2, 30, 0).to(device), _probs(4, 3, 30, 1).to(device)
    ids = torch.randint(0, 30, (4, 2), device=device)
    spec = torch.compile(lambda d, i, t: pk.speculative_accept(d, i, t, seed=4), fullgraph=True)
    for g, w in zip(spec(draft, ids, target), pk.speculative_accept(draft, ids, target, seed=4)):
        assert torch.equal(g, w)
    # without a seed: drawn from the default generator inside the graph (compiled random ops
    # draw differently from eager ones, but torch.manual_seed still makes runs reproducible)
    f = torch.compile(lambda x: pk.sample(x), fullgraph=True)
    torch.manual_seed(0)
    a = f(x)
    torch.manual_seed(0)
    assert torch.equal(a, f(x))
    assert bool(((a >= 0) & (a < 500)).all())


X = torch.zeros(2, 10)
BAD = [
    (lambda: pk.sample(X.long()), TypeError, "logits"),
    (lambda: pk.sample(X[0]), ValueError, "logits"),
    (lambda: pk.sample([[0.0]]), TypeError, "logits"),
    (lambda: pk.sample(torch.zeros(2, 0)), ValueError, "logits"),
    (lambda: pk.sample(X, temperature=-1.0), ValueError, "temperature"),
    (lambda: pk.sample(X, top_k=-1), ValueError, "top_k"),
    (lambda: pk.sample(X, top_k=2.5), TypeError, "top_k"),
    (lambda: pk.sample(X, top_p=0.0), ValueError, "top_p"),
    (lambda: pk.sample(X, top_p=1.5), ValueError, "top_p"),
    (lambda: pk.sample(X, min_p=-0.1), ValueError, "min_p"),
    (lambda: pk.sample(X, repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (lambda: pk.sample(X, presence_penalty=math.inf), ValueError, "presence_penalty"),
    (lambda: pk.sample(X, frequency_penalty=math.nan), ValueError, "frequency_penalty"),
    (lambda: pk.sample(X, temperature=math.nan), ValueError, "temperature"),
    (lambda: pk.sample(X, top_p=math.nan), ValueError, "top_p"),
    (lambda: pk.sample(X, min_p=math.nan), ValueError, "min_p"),
    (lambda: pk.sample(X, repetition_penalty=math.nan), ValueError, "repetition_penalty"),
    (lambda: pk.sample(X, repetition_penalty=math.inf), ValueError, "repetition_penalty"),
    (lambda: pk.sample(X, presence_penalty=math.nan), ValueError, "presence_penalty"),
    (lambda: pk.sample(X, temperature=torch.tensor([1.0, math.nan])), ValueError, "temperature"),
    (lambda: pk.sample(X, min_p=torch.tensor([math.nan, 0.0])), ValueError, "min_p"),
    (lambda: pk.sample(X, frequency_penalty=torch.tensor([0.0, -math.inf])), ValueError, "frequency_penalty"),
    (lambda: pk.top_k_top_p_filter(X, top_p=math.nan), ValueError, "top_p"),
    (lambda: pk.top_k_top_p_filter(X, min_p=torch.tensor([0.1, math.nan])), ValueError, "min_p"),
    (lambda: pk.sample(X, temperature=torch.tensor([1.0, -0.5])), ValueError, "temperature"),
    (lambda: pk.sample(X, top_k=torch.tensor([1, -2])), ValueError, "top_k"),
    (lambda: pk.sample(X, top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
    (lambda: pk.sample(X, top_p=torch.tensor([0.5, 0.0])), ValueError, "top_p"),
    (lambda: pk.sample(X, top_p=torch.tensor([0.5, 0.5, 0.5])), ValueError, "top_p"),
    (lambda: pk.sample(X, prev_tokens=torch.tensor([[1, 10], [0, 0]])), ValueError, "prev_tokens"),
    (lambda: pk.sample(X, prev_tokens=torch.tensor([[1, -2], [0, 0]])), ValueError, "prev_tokens"),
    (lambda: pk.sample(X, prev_tokens=torch.tensor([[1, 2]])), ValueError, "prev_tokens"),
    (lambda: pk.sample(X, prev_tokens=torch.tensor([[1.0], [2.0]])), TypeError, "prev_tokens"),
    (lambda: pk.sample(X, seed=1.5), TypeError, "seed"),
    (lambda: pk.sample(X, seed=torch.tensor([1, 2, 3])), ValueError, "seed"),
    (lambda: pk.sample(X, seed=1, generator=torch.Generator()), ValueError, "seed"),
    (lambda: pk.top_k_top_p_filter(X, top_k=-3), ValueError, "top_k"),
    (lambda: pk.top_k_top_p_filter(X, top_p=2.0), ValueError, "top_p"),
    (lambda: pk.top_k_top_p_filter(X, min_p=1.5), ValueError, "min_p"),
    (lambda: pk.TopKTopPLogitsWarper(top_p=0.0), ValueError, "top_p"),
    (lambda: pk.speculative_accept(torch.ones(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, 5)),
     ValueError, "target_probs"),
    (lambda: pk.speculative_accept(torch.ones(2, 3, 5), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 4, 5)),
     ValueError, "draft_token_ids"),
    (lambda: pk.speculative_accept(torch.ones(2, 3, 5), torch.zeros(2, 3), torch.ones(2, 4, 5)),
     TypeError, "draft_token_ids"),
    (lambda: pk.speculative_accept(torch.ones(2, 3, 5), torch.zeros(2, 3, dtype=torch.long),
                                   torch.ones(2, 4, 5, dtype=torch.float64)), TypeError, "target_probs"),
]


@pytest.mark.parametrize("call,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_bad_inputs_raw_op():
    # direct calls of the op check what the wrappers check
    seed = torch.tensor([0])
    op = torch.ops.pretrain_kernels.sample
    with pytest.raises(RuntimeError, match="top_p"):
        op(X, None, seed, None, None, None, None, None, None, None, 1.0, 0, 0.0, 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="prev_tokens"):
        op(X, torch.tensor([[99], [0]]), seed, None, None, None, None, None, None, None, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="top_k"):
        op(X, None, seed, None, torch.tensor([-1, 0]), None, None, None, None, None, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="seed"):
        op(X, None, torch.tensor([1.0]), None, None, None, None, None, None, None, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)
    # NaN scalar knobs, each by name
    nan = math.nan
    scalars = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                   frequency_penalty=0.0)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        knobs = dict(scalars, **{name: nan})
        with pytest.raises(RuntimeError, match=f"{name}: expected"):
            op(X, None, seed, None, None, None, None, None, None, None, *knobs.values())
    filt = torch.ops.pretrain_kernels.top_k_top_p_filter
    for top_p, min_p in ((nan, 0.0), (1.0, nan)):
        with pytest.raises(RuntimeError, match="top_p" if top_p != top_p else "min_p"):
            filt(X, None, None, None, 0, top_p, min_p)
    with pytest.raises(RuntimeError, match="presence_penalty: expected a finite value, got nan in row 1"):
        op(X, None, seed, None, None, None, None, None, torch.tensor([0.0, nan]), None, 1.0, 0, 1.0, 0.0, 1.0, 0.0,
           0.0)
