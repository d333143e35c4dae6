"""Per-call overhead: every public op on a tiny input, three ways, on one CPU thread:

  pk     the public function (argument checks, defaults, seeds, then the op);
  raw    the torch.ops.pretrain_kernels op it calls, with exactly the arguments it passes
         (recorded by a TorchDispatchMode during one call of the public function);
  torch  what a user would call instead, where there is a plain-torch equivalent
         (torch SDPA for attention, torch.multinomial for sampling, torch composites).

On tiny inputs the kernels' own work is small, so pk - raw is the cost of the Python wrapper
and raw - torch that of the op's entry (checks, allocation, dispatch).

Run as a pytest-benchmark suite like the other files here:
    pk-bench overhead [--quick]
or alone for a Markdown table (times from the thread's CPU clock, so other processes on a
shared machine disturb them less):
    python -m pretrain_kernels.bench.bench_overhead
"""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain_kernels as pk

VOCAB = 1000


def _mask_composite(ids, p=0.15, mask_id=3):
    sel = torch.bernoulli(torch.full(ids.shape, p)).bool()
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    return ids.masked_fill(sel, mask_id), labels


def _top_k_top_p_composite(logits, k=50, p=0.9):
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    x = logits.masked_fill(logits < kth, -math.inf)
    s, i = torch.sort(x, dim=-1, descending=True)
    c = s.softmax(-1).cumsum(-1)
    drop = (c - s.softmax(-1)) > p
    return x.scatter(-1, i, s.masked_fill(drop, -math.inf))


def cases():
    """name -> (pk call, torch alternative or None). Fresh tensors, created once."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (1, 64), generator=g)
    attn = torch.ones(1, 64, dtype=torch.int64)
    c = {}
    c["mlm_mask 1x64"] = (lambda: pk.mlm_mask(ids, mask_token_id=3, vocab_size=VOCAB, special_token_ids=[0, 1, 2, 3],
                                              attention_mask=attn, seed=1), lambda: _mask_composite(ids))
    c["span_mask 1x64"] = (lambda: pk.span_mask(ids, mask_token_id=3, vocab_size=VOCAB, special_token_ids=[0, 1, 2, 3],
                                                seed=1), None)
    for sk in (1, 16, 64):
        q = torch.randn(1, 1, 8, 64, generator=g)
        k = torch.randn(1, sk, 8, 64, generator=g)
        v = torch.randn(1, sk, 8, 64, generator=g)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        c[f"flash_attention decode Sk={sk}"] = (
            lambda q=q, k=k, v=v: pk.flash_attention(q, k, v),
            lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt))
    q = torch.randn(1, 8, 1, 64, generator=g)
    k = torch.randn(1, 8, 16, 64, generator=g)
    v = torch.randn(1, 8, 16, 64, generator=g)
    c["scaled_dot_product_attention decode Sk=16"] = (lambda: pk.scaled_dot_product_attention(q, k, v),
                                                      lambda: F.scaled_dot_product_attention(q, k, v))
    qc = torch.randn(1, 1, 8, 64, generator=g)
    kc = torch.randn(1, 64, 8, 64, generator=g)
    vc = torch.randn(1, 64, 8, 64, generator=g)
    lens = torch.tensor([16], dtype=torch.int32)
    c["flash_attention_with_kvcache decode 16/64"] = (
        lambda: pk.flash_attention_with_kvcache(qc, kc, vc, lens),
        lambda: F.scaled_dot_product_attention(qc.transpose(1, 2), kc[:, :16].transpose(1, 2),
                                               vc[:, :16].transpose(1, 2)))
    logits = torch.randn(1, VOCAB, generator=g)
    c["sample 1x1000"] = (lambda: pk.sample(logits, seed=1),
                          lambda: torch.multinomial(torch.softmax(logits, -1), 1))
    c["sample top_k/top_p 1x1000"] = (lambda: pk.sample(logits, top_k=50, top_p=0.9, seed=1), None)
    c["top_k_top_p_filter 1x1000"] = (lambda: pk.top_k_top_p_filter(logits, top_k=50, top_p=0.9),
                                      lambda: _top_k_top_p_composite(logits))
    dp = torch.softmax(torch.randn(1, 4, VOCAB, generator=g), -1)
    tp = torch.softmax(torch.randn(1, 5, VOCAB, generator=g), -1)
    dt = torch.randint(0, VOCAB, (1, 4), generator=g)
    c["speculative_accept 1x4"] = (lambda: pk.speculative_accept(dp, dt, tp, seed=1), None)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    acp = pk.noise_schedule("linear")
    t = torch.tensor([10, 500])
    prev = torch.tensor([0, 480])
    sig = torch.tensor([2.0, 1.0])
    sig_next = torch.tensor([1.5, 0.5])
    ac = acp.float()
    c["add_noise 2x4x8x8"] = (lambda: pk.add_noise(x0, noise, t, acp),
                              lambda: (ac[t].sqrt().view(-1, 1, 1, 1) * x0
                                       + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise, noise))
    c["diffusion_loss 2x4x8x8"] = (lambda: pk.diffusion_loss(x0, noise),
                                   lambda: F.mse_loss(x0, noise))
    c["ddpm_step 2x4x8x8"] = (lambda: pk.ddpm_step(x0, noise, t, prev, acp, seed=1), None)
    c["ddim_step 2x4x8x8"] = (lambda: pk.ddim_step(x0, noise, t, prev, acp), None)
    c["euler_step 2x4x8x8"] = (lambda: pk.euler_step(x0, noise, sig, sig_next),
                               lambda: noise + (sig_next - sig).view(-1, 1, 1, 1) * x0)
    c["heun_step 2x4x8x8"] = (lambda: pk.heun_step(x0, noise, sig, sig_next), None)
    c["dpmpp_2m_step 2x4x8x8"] = (lambda: pk.dpmpp_2m_step(x0, noise, sig, sig_next, seed=1), None)
    sf, sfn = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    c["flow_match_step 2x4x8x8"] = (lambda: pk.flow_match_step(x0, noise, sf, sfn),
                                    lambda: noise + (sfn - sf).view(-1, 1, 1, 1) * x0)
    return c


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pretrain_kernels":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def raw_call(fn):
    """The torch.ops.pretrain_kernels calls fn makes, replayed with the same arguments."""
    with _Record() as rec:
        fn()
    calls = rec.calls
    if not calls:
        return None
    if len(calls) == 1:
        func, args, kwargs = calls[0]
        return lambda: func(*args, **kwargs)
    return lambda: [func(*args, **kwargs) for func, args, kwargs in calls]


def cpu_time_us(fn, n=None, repeat=7):
    """Best per-call CPU time of this thread over `repeat` loops, in microseconds."""
    for _ in range(20):
        fn()
    if n is None:
        t0 = time.thread_time()
        fn()
        n = max(20, min(5000, int(2e-3 / max(time.thread_time() - t0, 1e-7))))
    best = math.inf
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - t0) / n)
    return best * 1e6


# ---- pytest-benchmark suite ------------------------------------------------------------------

_CASES = cases()


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("impl", ["pk", "raw", "torch"])
@pytest.mark.parametrize("case", list(_CASES))
def test_overhead(benchmark, one_thread, case, impl):
    call, alt = _CASES[case]
    fn = {"pk": call, "raw": raw_call(call) if impl == "raw" else None, "torch": alt}[impl]
    if fn is None:
        pytest.skip(f"{case}: no {impl} equivalent")
    benchmark.group = f"overhead {case} cpu"
    benchmark.extra_info.update(family="overhead", op=case.split()[0], impl=impl, device="cpu", shape=case,
                                baseline=(impl == "pk"))
    benchmark(fn)


# ---- Markdown table --------------------------------------------------------------------------


def main():
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU time per call (us), best of 7 loops\n")
    print("| op (input) | pk | raw op | pk - raw | torch | pk / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (call, alt) in _CASES.items():
        raw = raw_call(call)
        t_pk = cpu_time_us(call)
        t_raw = cpu_time_us(raw) if raw else math.nan
        t_alt = cpu_time_us(alt) if alt else math.nan
        fmt = lambda x: "-" if math.isnan(x) else f"{x:.1f}"  # noqa: E731
        ratio = "-" if math.isnan(t_alt) else f"{t_pk / t_alt:.2f}"
        print(f"| {name} | {fmt(t_pk)} | {fmt(t_raw)} | {fmt(t_pk - t_raw)} | {fmt(t_alt)} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
