"""pk.unmask_step (one masked-diffusion sampling step) against the float64 references in
tests/reference.py: exact invariants on every draw (revealed count, unmasked positions
unchanged, drawn tokens inside the filtered set, the confidence strategy revealing exactly the
most confident positions, the random strategy's Philox keys), chi-square tests of the drawn
tokens and of the random subsets at fixed seeds, per-row seed independence, CPU against the
emulated CUDA kernels bit for bit, opcheck, torch.compile, dtypes, odd sizes, strided inputs."""
import itertools
import math

import pytest
import torch

import emulated_cuda
import pretrain_kernels as pk
import reference as ref

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = False

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = torch.ops.pretrain_kernels.unmask_step
KNOB_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty")
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                frequency_penalty=0.0)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _logits(B, L, V, *, scale=2.0, dtype=torch.float32, device="cpu", seed=0):
    return (torch.randn(B, L, V, generator=_g(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def _tokens(B, L, V, mask_id, *, frac=0.6, seed=0, dtype=torch.int64, device="cpu"):
    g = _g(seed + 1000)
    t = torch.randint(0, V, (B, L), generator=g)
    t = torch.where(t == mask_id, (t + 1) % V if V > 1 else t, t)
    masked = torch.rand(B, L, generator=g) < frac
    return torch.where(masked, torch.full_like(t, mask_id), t).to(dtype).to(device)


def _raw(logits, tokens, *, mask_token_id, num_reveal, strategy="confidence", seed=0, prev_tokens=None, **knobs):
    """The raw op's three outputs (new tokens, drawn tokens, confidences), scalar knobs only."""
    k = {**DEFAULTS, **knobs}
    n_rows = num_reveal if isinstance(num_reveal, torch.Tensor) else None
    n = 0 if n_rows is not None else num_reveal
    seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor([seed])
    return OP(logits, tokens, n_rows, prev_tokens, seed_t, *([None] * 7), mask_token_id, n, strategy,
              *(k[name] for name in KNOB_NAMES))


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit; cells with small expectations are pooled into one. Needs
    scipy: the calling test skips (alone) without it."""
    stats = pytest.importorskip("scipy.stats")
    counts, probs = counts.double().cpu(), probs.double().cpu()
    exp = probs * counts.sum()
    assert float(counts[probs == 0].sum()) == 0, "draws outside the support"
    big = exp >= min_expected
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum().reshape(1)])
    ex = torch.cat([exp[big], exp[~big & (probs > 0)].sum().reshape(1)])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    if obs.numel() < 2:
        return 1.0
    return float(stats.chisquare(obs.numpy(), ex.numpy() * (obs.sum() / ex.sum()).item()).pvalue)


def _check_step(x, t, mask, n, new, drawn, conf, probs, strategy, keys=None):
    """The exact invariants of one call, given the float64 distributions probs [B, L, V]."""
    B, L = t.shape
    t, new, drawn, conf = t.cpu(), new.cpu(), drawn.cpu(), conf.cpu()
    assert new.dtype == t.dtype and new.shape == t.shape
    assert drawn.dtype == torch.int64 and conf.dtype == torch.float32
    masked = t == mask
    assert torch.equal(new[~masked], t[~masked]), "an unmasked position changed"
    assert bool((drawn[~masked] == -1).all()) and bool((conf[~masked] == -1).all())
    drawable = probs.sum(-1) > 0
    # every drawn token inside the filtered set (never the mask token), with its probability
    ok = masked & drawable
    assert bool((drawn[ok] >= 0).all()) and bool((drawn[ok] != mask).all())
    p = probs.gather(2, drawn.clamp(min=0)[..., None])[..., 0]
    assert bool((p[ok] > 0).all()), "a token outside the filtered set"
    torch.testing.assert_close(conf[ok].double(), p[ok], atol=1e-6, rtol=2e-4)
    assert bool((drawn[masked & ~drawable] == -1).all())
    # revealed count and the choice
    n_rows = torch.as_tensor(n).expand(B)
    revealed = masked & (new != mask)
    for b in range(B):
        want = min(max(int(n_rows[b]), 0), int(masked[b].sum()))
        if bool(drawable[b][masked[b]].all()):
            assert int(revealed[b].sum()) == want, (b, want)
    assert torch.equal(new[revealed], drawn[revealed])
    if keys is None:
        assert strategy == "confidence"
        keys = [[(-float(conf[b, l]) if int(drawn[b, l]) >= 0 else math.inf) for l in range(L)] for b in range(B)]
    assert torch.equal(new, ref.unmask_reveal(t, mask, drawn, keys, n))


def _random_keys(B, L, drawn, seed, per_row=False):
    """The random strategy's ordering keys from the documented layout: Philox words 0 and 1 of
    counter (index, 0x534d5003, l) under seed (index b), or seed[b] (index 0)."""
    keys = []
    for b in range(B):
        s = int(seed[b]) if per_row else int(seed)
        s &= (1 << 64) - 1
        index = 0 if per_row else b
        row = []
        for l in range(L):
            w = ref.philox4x32_10((index & 0xFFFFFFFF, index >> 32, 0x534D5003, l), (s & 0xFFFFFFFF, s >> 32))
            row.append(((w[0] << 32) | w[1]) if int(drawn[b, l]) >= 0 else (1 << 64) - 1)
        keys.append(row)
    return keys


# ---- invariants on every draw --------------------------------------------------------------------

KNOBS = [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.2, temperature=1.5),
    dict(top_k=20, top_p=0.9, temperature=0.8), dict(temperature=0.0), dict(temperature=0.0, top_k=3),
]


def _kid(k):
    return "-".join(f"{a}{b}" for a, b in k.items()) or "plain"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("knobs", KNOBS, ids=_kid)
@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_invariants(device, dtype, knobs, strategy):
    B, L, V, mask = 4, 13, 129, 7
    x = _logits(B, L, V, dtype=dtype, device=device, seed=V)
    t = _tokens(B, L, V, mask, seed=1, device=device)
    probs = ref.unmask_probs(x.double().cpu(), t.cpu(), mask, **knobs)
    for seed in range(2 if emulated_cuda.active() else 4):
        n = torch.tensor([0, 3, 5, 100], device=device) if seed % 2 else 4
        new, drawn, conf = _raw(x, t, mask_token_id=mask, num_reveal=n, strategy=strategy, seed=seed, **knobs)
        keys = _random_keys(B, L, drawn, seed) if strategy == "random" else None
        _check_step(x, t, mask, n if isinstance(n, int) else n.cpu(), new, drawn, conf, probs, strategy, keys)
        got = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=n, strategy=strategy, seed=seed, **knobs)
        assert torch.equal(got, new)


def test_greedy_draws_the_argmax(device):
    B, L, V, mask = 3, 9, 50, 0
    x = _logits(B, L, V, device=device, seed=3)
    x[0, 0, mask] = 100.0  # the mask token is never drawn, even as the largest logit
    x[1, 2, 5] = x[1, 2, 9] = 50.0  # ties: the lower index
    t = torch.full((B, L), mask, device=device)
    new, drawn, conf = _raw(x, t, mask_token_id=mask, num_reveal=L, temperature=0.0)
    xm = x.cpu().clone()
    xm[..., mask] = -math.inf
    assert torch.equal(drawn.cpu(), xm.argmax(-1))
    assert torch.equal(new.cpu(), drawn.cpu())
    assert int(drawn[1, 2]) == 5
    probs = ref.unmask_probs(x.cpu(), t.cpu(), mask, temperature=0.0)
    torch.testing.assert_close(conf.cpu().double(), probs.gather(2, drawn.cpu()[..., None])[..., 0],
                               atol=1e-6, rtol=2e-4)


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 7, 3), (3, 129, 5), (2, 7, 1000), (1, 5, 4099)])
@pytest.mark.parametrize("tok_dtype", [torch.int32, torch.int64])
def test_odd_sizes(device, shape, tok_dtype):
    B, L, V = shape
    mask = V - 1
    x = _logits(B, L, V, device=device, seed=L)
    t = _tokens(B, L, V, mask, frac=0.7, seed=L, dtype=tok_dtype, device=device)
    probs = ref.unmask_probs(x.cpu(), t.cpu(), mask, top_p=0.9)
    for n in (1, L // 2, L + 3):
        new, drawn, conf = _raw(x, t, mask_token_id=mask, num_reveal=n, seed=n, top_p=0.9)
        _check_step(x, t, mask, n, new, drawn, conf, probs, "confidence")


def test_vocab_of_one_and_nothing_drawable(device):
    # V = 1: the only token is the mask token, nothing can be drawn, every position stays masked
    x = _logits(2, 5, 1, device=device)
    t = torch.zeros(2, 5, dtype=torch.int64, device=device)
    new, drawn, conf = _raw(x, t, mask_token_id=0, num_reveal=3)
    assert torch.equal(new, t) and bool((drawn == -1).all()) and bool((conf == -1).all())
    # a position whose logits are all -inf / NaN ranks last and stays masked
    x = _logits(1, 4, 6, device=device, seed=2)
    x[0, 1] = -math.inf
    x[0, 2] = math.nan
    t = torch.full((1, 4), 5, device=device)
    for strategy in ("confidence", "random"):
        new, drawn, _ = _raw(x, t, mask_token_id=5, num_reveal=2, strategy=strategy)
        assert drawn.cpu().tolist()[0][1:3] == [-1, -1]
        assert new.cpu().tolist()[0][1:3] == [5, 5] and bool((new.cpu()[0, [0, 3]] != 5).all())
        new, _, _ = _raw(x, t, mask_token_id=5, num_reveal=4, strategy=strategy)
        assert int((new != 5).sum()) == 2


def test_empty(device):
    for B, L in ((0, 5), (3, 0)):
        x = _logits(B, L, 10, device=device)
        t = torch.zeros(B, L, dtype=torch.int32, device=device)
        out = pk.unmask_step(x, t, mask_token_id=0, num_reveal=2)
        assert out.shape == (B, L) and out.dtype == torch.int32


def test_penalties(device):
    B, L, V, mask = 3, 8, 40, 39
    x = _logits(B, L, V, device=device, seed=8)
    t = torch.full((B, L), mask, device=device)
    prev = torch.randint(-1, V, (B, 12), generator=_g(0)).to(device)
    pen = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, top_k=10, temperature=0.9)
    probs = ref.unmask_probs(x.cpu(), t.cpu(), mask, prev_tokens=prev.cpu(), **pen)
    new, drawn, conf = _raw(x, t, mask_token_id=mask, num_reveal=4, prev_tokens=prev, seed=3, **pen)
    _check_step(x, t, mask, 4, new, drawn, conf, probs, "confidence")
    got = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=4, prev_tokens=prev, seed=3, **pen)
    assert torch.equal(got, new)


def test_per_row_knobs_equal_separate_calls(device):
    B, L, V, mask = 4, 6, 60, 1
    x = _logits(B, L, V, device=device, seed=9)
    t = _tokens(B, L, V, mask, frac=0.8, seed=9, device=device)
    knobs = dict(temperature=torch.tensor([0.5, 1.0, 0.0, 2.0]), top_k=torch.tensor([0, 5, 1, 50]),
                 top_p=torch.tensor([1.0, 0.5, 0.9, 0.7]), min_p=torch.tensor([0.0, 0.1, 0.0, 0.05]))
    n = torch.tensor([1, 2, 3, 6])
    seeds = torch.tensor([11, 12, 13, 14])
    for strategy in ("confidence", "random"):
        got = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=n.to(device), strategy=strategy,
                             seed=seeds.to(device), **{k: v.to(device) for k, v in knobs.items()})
        for b in range(B):
            one = pk.unmask_step(x[b:b + 1], t[b:b + 1], mask_token_id=mask, num_reveal=int(n[b]), strategy=strategy,
                                 seed=int(seeds[b]), **{k: v[b].item() for k, v in knobs.items()})
            assert torch.equal(got[b:b + 1], one), (strategy, b)


def test_rows_do_not_depend_on_each_other(device):
    B, L, V, mask = 5, 10, 30, 0
    x = _logits(B, L, V, device=device, seed=10)
    t = _tokens(B, L, V, mask, seed=10, device=device)
    for strategy in ("confidence", "random"):
        a = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=3, strategy=strategy, seed=77)
        x2 = x.clone()
        x2[[0, 1, 3]] = _logits(3, L, V, device=device, seed=11)
        b = pk.unmask_step(x2, t, mask_token_id=mask, num_reveal=3, strategy=strategy, seed=77)
        assert torch.equal(a[[2, 4]], b[[2, 4]])
        # a different seed changes the draw
        c = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=3, strategy=strategy, seed=78)
        assert not torch.equal(a, c)
    # per-row seeds: row b equals a one-row call with seed[b]
    seeds = torch.tensor([5, 6, 7, 8, 9], device=device)
    _, drawn, _ = _raw(x, t, mask_token_id=mask, num_reveal=3, strategy="random", seed=seeds)
    new = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=3, strategy="random", seed=seeds)
    assert torch.equal(new.cpu(), ref.unmask_reveal(t.cpu(), mask, drawn.cpu(),
                                                    _random_keys(B, L, drawn, seeds.cpu(), per_row=True), 3))


def test_noncontiguous(device):
    B, L, V, mask = 3, 7, 33, 4
    base = _logits(L, B, 2 * V, device=device, seed=12)
    x = base.transpose(0, 1)[..., ::2]                       # strided vocabulary: copied
    y = base[..., :V].transpose(0, 1)                         # unit-stride vocabulary, strided rows
    t = _tokens(B, L, V, mask, seed=12, device=device)
    tt = torch.stack([t, t], -1)[..., 0]                     # non-contiguous tokens
    for logits in (x, y):
        for strategy in ("confidence", "random"):
            want = pk.unmask_step(logits.contiguous(), t, mask_token_id=mask, num_reveal=3, strategy=strategy, seed=1)
            got = pk.unmask_step(logits, tt, mask_token_id=mask, num_reveal=3, strategy=strategy, seed=1)
            assert torch.equal(got, want)
    # expanded (stride 0) logits and knobs
    e = _logits(1, 1, V, device=device, seed=13).expand(B, L, V)
    k = torch.tensor(5, device=device).expand(B)
    want = pk.unmask_step(e.contiguous(), t, mask_token_id=mask, num_reveal=2, top_k=k.contiguous(), seed=3)
    assert torch.equal(pk.unmask_step(e, t, mask_token_id=mask, num_reveal=2, top_k=k, seed=3), want)


def test_generator_and_default_seed(device):
    x = _logits(2, 6, 20, device=device, seed=14)
    t = torch.full((2, 6), 3, device=device)
    torch.manual_seed(5)
    a = pk.unmask_step(x, t, mask_token_id=3, num_reveal=2)
    torch.manual_seed(5)
    assert torch.equal(a, pk.unmask_step(x, t, mask_token_id=3, num_reveal=2))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(pk.unmask_step(x, t, mask_token_id=3, num_reveal=2, generator=g1),
                       pk.unmask_step(x, t, mask_token_id=3, num_reveal=2, generator=g2))


# ---- distributions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("knobs", [dict(), dict(temperature=0.6), dict(top_k=7, top_p=0.9), dict(min_p=0.1)], ids=_kid)
def test_drawn_token_distribution(device, knobs):
    # one distribution at every position of a long sequence: independent draws (counter l)
    V, mask = 25, 24
    L = 600 if emulated_cuda.active() else 20000
    x = _logits(1, 1, V, scale=1.5, seed=15)
    t = torch.full((1, L), mask)
    _, drawn, _ = _raw(x.expand(1, L, V).to(device), t.to(device), mask_token_id=mask, num_reveal=0, seed=99, **knobs)
    probs = ref.unmask_probs(x, t[:, :1], mask, **knobs)[0, 0]
    counts = torch.bincount(drawn.cpu().flatten(), minlength=V)
    assert _chi2_pvalue(counts, probs) > 1e-3


def test_random_subset_distribution(device):
    # 6 masked positions, 2 revealed: each of the 15 subsets with probability 1/15
    B = 300 if emulated_cuda.active() else 6000
    L, V, mask = 6, 5, 0
    x = _logits(1, L, V, seed=16).expand(B, L, V).to(device)
    t = torch.zeros(B, L, dtype=torch.int64, device=device)
    new = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=2, strategy="random", seed=2024).cpu()
    revealed = new != mask
    assert bool((revealed.sum(1) == 2).all())
    subsets = list(itertools.combinations(range(L), 2))
    index = {s: i for i, s in enumerate(subsets)}
    counts = torch.zeros(len(subsets))
    for row in revealed:
        counts[index[tuple(row.nonzero()[:, 0].tolist())]] += 1
    assert _chi2_pvalue(counts, torch.full((len(subsets),), 1 / len(subsets))) > 1e-3


# ---- opcheck, compile ------------------------------------------------------------------------------

def test_opcheck(device):
    B, L, V = 3, 5, 40
    x = _logits(B, L, V, device=device, seed=17)
    t = _tokens(B, L, V, 2, seed=17, device=device)
    none = [None] * 7
    torch.library.opcheck(OP, (x, t, None, None, torch.tensor([3]), *none, 2, 2, "confidence",
                               0.8, 10, 0.9, 0.0, 1.0, 0.0, 0.0))
    rows = torch.tensor([0.5, 1.0, 0.0], device=device)
    prev = torch.randint(-1, V, (B, 4), device=device)
    torch.library.opcheck(OP, (x, t.int(), torch.tensor([1, 0, 9], device=device), prev,
                               torch.arange(B, device=device), rows, torch.tensor([0, 5, 1], device=device), None,
                               rows * 0.1, rows + 1, None, rows, 2, 0, "random", 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    B, L, V, mask = 3, 9, 70, 69
    x = _logits(B, L, V, device=device, seed=18)
    t = _tokens(B, L, V, mask, seed=18, device=device)
    n = torch.tensor([1, 4, 2], device=device)
    temp = torch.tensor([0.7, 1.0, 0.0], device=device)

    def step(x, t, n, temp):
        a = pk.unmask_step(x, t, mask_token_id=mask, num_reveal=n, temperature=temp, top_k=20, seed=4)
        b = pk.unmask_step(x, a, mask_token_id=mask, num_reveal=2, strategy="random", top_p=0.9, seed=5)
        return a, b

    got = torch.compile(step, fullgraph=True)(x, t, n, temp)
    for g, w in zip(got, step(x, t, n, temp)):
        assert torch.equal(g, w)
    f = torch.compile(lambda x, t: pk.unmask_step(x, t, mask_token_id=mask, num_reveal=3), fullgraph=True)
    torch.manual_seed(0)
    a = f(x, t)
    torch.manual_seed(0)
    assert torch.equal(a, f(x, t))


def test_cuda_matches_cpu(cuda_kernels):
    dev, run = cuda_kernels.device, cuda_kernels.run
    B, L = (8, 64) if cuda_kernels.kind == "cuda" else (2, 5)
    V, mask = 5000, 17
    x = _logits(B, L, V, scale=3.0, seed=19)
    t = _tokens(B, L, V, mask, frac=0.7, seed=19)
    n = torch.tensor([0, 2, 4, 100, 1, 3, 5, 7][:B])
    prev = torch.randint(-1, V, (B, 16), generator=_g(1))
    cases = [dict(), dict(temperature=0.7, top_k=50), dict(top_p=0.9), dict(min_p=0.05, temperature=1.4),
             dict(top_k=1000, top_p=0.95), dict(temperature=0.0), dict(temperature=0.0, top_p=0.5),
             dict(prev_tokens=prev, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, top_k=40)]
    for dtype in DTYPES:
        xd = x.to(dtype)
        for knobs in cases:
            for strategy in ("confidence", "random"):
                a = _raw(xd, t, mask_token_id=mask, num_reveal=n, strategy=strategy, seed=21, **knobs)
                dk = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in knobs.items()}
                with run():
                    b = _raw(xd.to(dev), t.to(dev), mask_token_id=mask, num_reveal=n.to(dev), strategy=strategy,
                             seed=21, **dk)
                for u, w in zip(a, b):
                    assert torch.equal(u, w.cpu()), (dtype, knobs, strategy)
