"""Memory growth: 10,000 calls of each public op on tiny inputs leave the resident set flat.

Each case runs its call WARMUP times (the allocator's free lists, torch's dispatch caches and
thread pools reach their steady state), then CALLS times, and the resident set size (RSS,
/proc/self/statm) may not grow by more than BOUND over those CALLS calls.

Why BOUND = 8 MiB catches a leak: every case's inputs and outputs hold at least 2 KiB of data,
so an op that leaks a buffer the size of an input or output on each call (the common leak: a
tensor whose refcount is never dropped, a malloc without its free) grows RSS by at least
10,000 x 2 KiB ~ 20 MiB, more with the tensor and storage objects around it;
test_the_bound_catches_one_leaked_buffer_per_call shows it on a deliberate leak. The slack
absorbs what moves between two readings of a healthy process: a new malloc arena page,
Python's object pools, the autograd engine's per-thread state. Both readings follow a garbage
collection and malloc_trim(0), so memory freed earlier (by other tests, by the warm-up) is
returned first and a leak cannot hide in free blocks that are already resident. A leak of a few
bytes per call (a small host-side object) stays below the bound: the sanitizer build
(make sanitize) is the tool for those.
"""
import ctypes
import ctypes.util
import gc
import os
import sys

import pytest
import torch

import pretrain_kernels as pk

CALLS = 10_000
WARMUP = 300
BOUND = 8 << 20  # bytes
PAGE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _malloc_trim():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(libc, "malloc_trim", None)  # glibc; other C libraries go without
    if trim is None:
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_free_memory = _malloc_trim()


def settled_rss() -> int:
    """RSS after a garbage collection and malloc_trim: memory the process freed (earlier tests,
    the warm-up) goes back to the system, so a leak must fault in new pages to be stored and
    cannot hide in free blocks that are already resident."""
    gc.collect()
    release_free_memory()
    return rss()


def growth(call, calls=CALLS, warmup=WARMUP) -> int:
    """RSS growth in bytes over `calls` calls after `warmup` ones."""
    for _ in range(warmup):
        call()
    before = settled_rss()
    for _ in range(calls):
        call()
    return settled_rss() - before


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---- the calls: each builds its tiny inputs once and returns a function of no argument ----------


def masking_cases():
    g = _g(0)
    ids = torch.randint(5, 1000, (4, 128), generator=g)              # 4 KiB of int64 ids
    attn = torch.rand(4, 128, generator=g) < 0.9
    words = torch.rand(4, 128, generator=g) < 0.5
    special = [0, 1, 2, 3]
    return {
        "mlm_mask": lambda: pk.mlm_mask(ids, mask_token_id=4, vocab_size=1000, special_token_ids=special,
                                        attention_mask=attn),  # seed drawn from the default generator
        "mlm_mask_exact_words": lambda: pk.mlm_mask(ids, mask_token_id=4, vocab_size=1000, special_token_ids=special,
                                                    word_starts=words, exact_count=True, seed=1),
        "span_mask": lambda: pk.span_mask(ids, mask_token_id=4, vocab_size=1000, attention_mask=attn, seed=2),
    }


def sampling_cases():
    g = _g(1)
    logits = torch.randn(4, 256, generator=g)                         # 4 KiB
    prev = torch.randint(0, 256, (4, 16), generator=g)
    draft = torch.softmax(torch.randn(2, 3, 128, generator=g), -1)
    target = torch.softmax(torch.randn(2, 4, 128, generator=g), -1)
    draft_ids = torch.randint(0, 128, (2, 3), generator=g)
    temps = torch.tensor([0.5, 1.0, 0.0, 2.0])
    u_logits = torch.randn(2, 8, 64, generator=g)                     # 4 KiB
    u_tokens = torch.where(torch.rand(2, 8, generator=g) < 0.7, 0, torch.randint(1, 64, (2, 8), generator=g))
    return {
        "sample": lambda: pk.sample(logits, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                                    presence_penalty=0.1, frequency_penalty=0.1, prev_tokens=prev,
                                    return_logprobs=True),
        "sample_per_row": lambda: pk.sample(logits, temperature=temps, top_p=0.5, seed=3),
        "top_k_top_p_filter": lambda: pk.top_k_top_p_filter(logits, top_k=10, top_p=0.8, min_p=0.02),
        "speculative_accept": lambda: pk.speculative_accept(draft, draft_ids, target, seed=4),
        "unmask_step": lambda: pk.unmask_step(u_logits, u_tokens, mask_token_id=0, num_reveal=torch.tensor([2, 3]),
                                              top_k=10, strategy="confidence", seed=5),
        "unmask_step_random": lambda: pk.unmask_step(u_logits, u_tokens, mask_token_id=0, num_reveal=3,
                                                     strategy="random", prev_tokens=prev[:2] % 64,
                                                     repetition_penalty=1.2),
    }


def attention_cases():
    g = _g(2)
    q = torch.randn(1, 16, 2, 16, generator=g)                        # 2 KiB each
    k = torch.randn(1, 16, 2, 16, generator=g)
    v = torch.randn(1, 16, 2, 16, generator=g)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    k_cache = torch.randn(2, 32, 1, 16, generator=g)
    v_cache = torch.randn(2, 32, 1, 16, generator=g)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    q_dec = torch.randn(2, 1, 2, 16, generator=g)
    k_new = torch.randn(2, 1, 1, 16, generator=g)
    v_new = torch.randn(2, 1, 1, 16, generator=g)

    def fwd_bwd():
        out, lse = pk.flash_attention(qg, kg, vg, causal=True, return_lse=True)
        torch.autograd.grad((out, lse), (qg, kg, vg), (dout, torch.ones_like(lse)))

    return {
        "flash_attention_fwd": lambda: pk.flash_attention(q, k, v, causal=True),
        "flash_attention_fwd_bwd": fwd_bwd,
        "flash_attention_with_kvcache": lambda: pk.flash_attention_with_kvcache(q_dec, k_cache, v_cache, lens,
                                                                                k_new=k_new, v_new=v_new),
    }


def diffusion_cases():
    g = _g(3)
    shape = (2, 4, 8, 8)                                              # 2 KiB per tensor
    x0, eps, out = (torch.randn(shape, generator=g) for _ in range(3))
    acp = pk.noise_schedule("scaled_linear", 1000, 0.00085, 0.012)
    t = torch.tensor([10, 700])
    prev_t = t - 20
    sigma, sigma_next = torch.tensor([0.9, 0.6]), torch.tensor([0.7, 0.3])
    pred = out.clone().requires_grad_()

    def loss_bwd():
        loss = pk.diffusion_loss(pred, x0, t, acp, weighting="min_snr", prediction_type="v_prediction")
        torch.autograd.grad(loss, pred)

    def heun_two_stages():
        x1, d = pk.heun_step(out, x0, sigma, sigma_next)
        pk.heun_step(out, x1, sigma, sigma_next, prev_derivative=d, prev_sample=x0)

    return {
        "add_noise": lambda: pk.add_noise(x0, eps, t, acp, target="v_prediction"),
        "add_noise_flow": lambda: pk.add_noise(x0, eps, sigma, target="flow"),
        "diffusion_loss": lambda: pk.diffusion_loss(pred.detach(), x0),
        "diffusion_loss_backward": loss_bwd,
        "ddpm_step": lambda: pk.ddpm_step(out, x0, t, prev_t, acp, seed=5),
        "ddim_step": lambda: pk.ddim_step(out, x0, t, prev_t, acp, eta=0.5, seed=6),
        "euler_step": lambda: pk.euler_step(out, x0, sigma, sigma_next, gamma=0.2, seed=7),
        "heun_step": heun_two_stages,
        "dpmpp_2m_step": lambda: pk.dpmpp_2m_step(out, x0, sigma, sigma_next, prev_x0=eps, sigma_prev=sigma + 0.1,
                                                  algorithm_type="sde-dpmsolver++", seed=8),
        "flow_match_step": lambda: pk.flow_match_step(out, x0, sigma, sigma_next, stochastic=True, seed=9),
    }


def loss_cases():
    g = _g(5)
    hidden = torch.randn(16, 32, generator=g)                         # 2 KiB
    weight = torch.randn(64, 32, generator=g).requires_grad_()        # 8 KiB
    bias = torch.randn(64, generator=g)
    targets = torch.randint(0, 64, (16,), generator=g)
    targets[3] = -100
    h = hidden.clone().requires_grad_()

    def fused_bwd(reduction):
        def call():
            loss = pk.linear_cross_entropy(h, weight, targets, bias=bias, softcap=5.0, reduction=reduction,
                                           chunk_size=5)
            torch.autograd.grad(loss.sum(), (h, weight))
        return call

    return {
        "linear_cross_entropy": lambda: pk.linear_cross_entropy(hidden, weight.detach(), targets, label_smoothing=0.1),
        "linear_cross_entropy_backward_mean": fused_bwd("mean"),
        "linear_cross_entropy_backward_none": fused_bwd("none"),
    }


def error_cases():
    # The error paths: a kernel's TORCH_CHECK throws after its checks allocated nothing, or
    # after they did; either way the exception must not strand memory.
    g = _g(4)
    logits = torch.randn(4, 256, generator=g)
    seed = torch.tensor([0])

    def bad_top_k():  # reaches the C++ check: top_k_rows of the wrong length
        try:
            torch.ops.pretrain_kernels.top_k_top_p_filter(logits, torch.tensor([1, 2]), None, None, 0, 1.0, 0.0)
        except RuntimeError:
            return
        raise AssertionError("expected the op to reject top_k_rows of length 2 for 4 rows")

    def bad_sample_seed():
        try:
            torch.ops.pretrain_kernels.sample(logits, None, seed.repeat(3), *([None] * 7), 1.0, 0, 1.0, 0.0, 1.0, 0.0,
                                              0.0)
        except RuntimeError:
            return
        raise AssertionError("expected the op to reject a seed tensor of 3 elements for 4 rows")

    return {"error_top_k_top_p_filter": bad_top_k, "error_sample_seed": bad_sample_seed}


CASES = {}
for _family in (masking_cases, sampling_cases, attention_cases, diffusion_cases, loss_cases, error_cases):
    CASES.update({name: (_family, name) for name in _family()})


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    # Tiny inputs run on one thread anyway; one thread keeps the pool out of the readings.
    yield


@pytest.mark.parametrize("name", sorted(CASES))
def test_rss_flat_over_10000_calls(name):
    family, key = CASES[name]
    call = family()[key]
    grew = growth(call)
    assert grew < BOUND, f"{name}: RSS grew by {grew / 2**20:.1f} MiB over {CALLS} calls (bound {BOUND >> 20} MiB)"


def test_the_bound_catches_one_leaked_buffer_per_call():
    # The smallest leak the bound is meant to catch, one 2 KiB tensor kept per call, exceeds it
    # even when the process has just freed far more than the leak in blocks of that size.
    freed = [torch.ones(512) for _ in range(3 * CALLS)]  # ~60 MiB of resident 2 KiB blocks
    del freed
    kept = []
    x = torch.randn(512)
    grew = growth(lambda: kept.append(x * 2), warmup=10)
    assert len(kept) == CALLS + 10
    assert grew >= BOUND, f"a 2 KiB-per-call leak grew RSS by only {grew / 2**20:.1f} MiB"
