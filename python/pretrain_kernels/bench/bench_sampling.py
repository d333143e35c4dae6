"""Sampling benchmarks: pk.sample against what a user would run instead.

Contenders (same logits, same machine, one run):
  * pk            pk.sample, fused and sort-free (temperature, top-k, top-p in one op)
  * transformers  the transformers pipeline: TemperatureLogitsWarper, TopKLogitsWarper,
                  TopPLogitsWarper (sort + cumsum), softmax, torch.multinomial
  * torch_sort    the same pipeline written in plain torch (sort-based top-p)
  * numba         a numba (parallel over rows) version: partition for top-k, sort of the
                  survivors, softmax, cumsum, one uniform per row (CPU only)
  * flashinfer    FlashInfer's top_k_top_p_sampling_from_logits on the logits / temperature
                  (GPU only)
  * pk_plain / softmax_multinomial: no filters, pk.sample against softmax + torch.multinomial
  * unmask_pk / unmask_composite: one masked-diffusion step, pk.unmask_step (confidence
    strategy, no filter, every position masked, 64 of 1024 revealed per row) against the torch
    composite: softmax, multinomial, gather of the confidence, topk, scatter; 64 rows x 1024
    positions x 4096 vocabulary (1 GiB of float32 logits) on the CPU, PK_BENCH_UNMASK_SHAPE=B,L,V
    to change it

Knobs of the filtered cases: temperature 0.7, top_k 50, top_p 0.9.

Run:  pk-bench sampling [--device cpu|cuda] [--quick]
The default grid is short (B in {1, 64}, V in {32000, 128256} on the CPU; B=128, V=128256 on a
GPU); --quick takes V=32000 only on the CPU; PK_BENCH_FULL=1 runs B in {1, 64, 256} x V in
{32000, 128256, 256000}. Each case runs a few rounds only (PK_BENCH_ROUNDS, default 5; 2 under
--quick).
"""
import os

import numpy as np
import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.bench.common import quick, require, rounds, version

TEMPERATURE, TOP_K, TOP_P = 0.7, 50, 0.9
ROUNDS = rounds(int(os.environ.get("PK_BENCH_ROUNDS", "5")))
FULL = os.environ.get("PK_BENCH_FULL") == "1"
CPU_SHAPES = [(b, v) for b in (1, 64, 256) for v in (32000, 128256, 256000)] if FULL else \
    quick([(1, 32000), (1, 128256), (64, 32000), (64, 128256)], [(1, 32000), (64, 32000)])
CUDA_SHAPES = [(b, v) for b in (1, 64, 128, 256) for v in (32000, 128256, 256000)] if FULL else [(128, 128256)]


def _cases():
    out = [pytest.param("cpu", b, v, id=f"cpu-B{b}-V{v}") for b, v in CPU_SHAPES]
    out += [pytest.param("cuda", b, v, id=f"cuda-B{b}-V{v}", marks=pytest.mark.cuda) for b, v in CUDA_SHAPES]
    return out


def _logits(B, V, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, V, generator=g) * 3.0).to(device)


def _run(benchmark, fn, device):
    if device == "cuda":
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    call()  # warm-up (allocations, numba / transformers first calls)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ---- contenders ---------------------------------------------------------------------------------


def transformers_pipeline(logits):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K),
                                   TopPLogitsWarper(TOP_P)])
    return lambda: torch.multinomial(torch.softmax(warpers(None, logits), dim=-1), 1)


def torch_sort_pipeline(logits):
    def run():
        x = logits / TEMPERATURE
        kth = torch.topk(x, TOP_K, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -float("inf"))
        sx, idx = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sx, dim=-1)
        above = probs.cumsum(dim=-1) - probs
        sx = sx.masked_fill(above >= TOP_P, -float("inf"))
        x = torch.empty_like(x).scatter_(-1, idx, sx)
        return torch.multinomial(torch.softmax(x, dim=-1), 1)
    return run


_numba_fn = None


def numba_sampler():
    global _numba_fn
    if _numba_fn is None:
        import numba

        @numba.njit(parallel=True, fastmath=False)
        def sample_rows(logits, temperature, top_k, top_p, uniforms, out):
            B, V = logits.shape
            for b in numba.prange(B):
                row = logits[b] / temperature
                kth = np.partition(row, V - top_k)[V - top_k]
                cand = np.nonzero(row >= kth)[0]
                vals = row[cand]
                order = np.argsort(-vals)
                vals = vals[order]
                cand = cand[order]
                w = np.exp(vals - vals[0])
                probs = w / w.sum()
                cum = 0.0
                n = 0
                while n < probs.size and cum < top_p:
                    cum += probs[n]
                    n += 1
                kept = probs[:n] / probs[:n].sum()
                target = uniforms[b]
                acc = 0.0
                pick = n - 1
                for i in range(n):
                    acc += kept[i]
                    if acc > target:
                        pick = i
                        break
                out[b] = cand[pick]

        _numba_fn = sample_rows
    return _numba_fn


# ---- benchmarks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device,B,V", _cases())
def test_filtered_pk(benchmark, device, B, V):
    x = _logits(B, V, device)
    benchmark.group = f"filtered-{device}-B{B}-V{V}"
    _run(benchmark, lambda: pk.sample(x, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=0), device)


@pytest.mark.parametrize("device,B,V", _cases())
def test_filtered_transformers(benchmark, device, B, V):
    require("transformers")
    x = _logits(B, V, device)
    benchmark.group = f"filtered-{device}-B{B}-V{V}"
    _run(benchmark, transformers_pipeline(x), device)


@pytest.mark.parametrize("device,B,V", _cases())
def test_filtered_torch_sort(benchmark, device, B, V):
    x = _logits(B, V, device)
    benchmark.group = f"filtered-{device}-B{B}-V{V}"
    _run(benchmark, torch_sort_pipeline(x), device)


@pytest.mark.parametrize("device,B,V", [c for c in _cases() if c.values[0] == "cpu"])
def test_filtered_numba(benchmark, device, B, V):
    require("numba")
    x = _logits(B, V, device).numpy()
    u = np.random.default_rng(0).random(B)
    out = np.empty(B, dtype=np.int64)
    fn = numba_sampler()
    benchmark.group = f"filtered-{device}-B{B}-V{V}"
    _run(benchmark, lambda: fn(x, np.float32(TEMPERATURE), TOP_K, TOP_P, u, out), device)


@pytest.mark.parametrize("device,B,V", [c for c in _cases() if c.values[0] == "cuda"])
def test_filtered_flashinfer(benchmark, device, B, V):
    flashinfer = require("FlashInfer")
    fi_sample = getattr(flashinfer.sampling, "top_k_top_p_sampling_from_logits", None)
    if fi_sample is None:
        pytest.skip(f"FlashInfer {version('FlashInfer')} has no sampling.top_k_top_p_sampling_from_logits")
    x = _logits(B, V, device)
    benchmark.group = f"filtered-{device}-B{B}-V{V}"
    _run(benchmark, lambda: fi_sample(x / TEMPERATURE, TOP_K, TOP_P), device)


@pytest.mark.parametrize("device,B,V", _cases())
def test_plain_pk(benchmark, device, B, V):
    x = _logits(B, V, device)
    benchmark.group = f"plain-{device}-B{B}-V{V}"
    _run(benchmark, lambda: pk.sample(x, seed=0), device)


@pytest.mark.parametrize("device,B,V", _cases())
def test_plain_softmax_multinomial(benchmark, device, B, V):
    x = _logits(B, V, device)
    benchmark.group = f"plain-{device}-B{B}-V{V}"
    _run(benchmark, lambda: torch.multinomial(torch.softmax(x, dim=-1), 1), device)


# ---- unmask_step ----------------------------------------------------------------------------------

UNMASK_SHAPE = tuple(int(n) for n in os.environ.get("PK_BENCH_UNMASK_SHAPE", quick("64,1024,4096", "8,256,4096")).split(","))
UNMASK_REVEAL, MASK_ID = 64, 0


def _unmask_cases():
    B, L, V = UNMASK_SHAPE
    return [pytest.param("cpu", id=f"cpu-B{B}-L{L}-V{V}"),
            pytest.param("cuda", id=f"cuda-B{B}-L{L}-V{V}", marks=pytest.mark.cuda)]


def _unmask_inputs(device):
    B, L, V = UNMASK_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, V, generator=g).mul_(3.0).to(device)
    return x, torch.full((B, L), MASK_ID, dtype=torch.int64, device=device)


def unmask_composite(logits, tokens):
    """The step in plain torch: draw everywhere, confidence of the drawn token, the most
    confident masked positions revealed."""
    B, L, V = logits.shape
    probs = torch.softmax(logits, dim=-1)
    drawn = torch.multinomial(probs.view(-1, V), 1).view(B, L)
    conf = probs.gather(-1, drawn[..., None])[..., 0]
    conf = conf.masked_fill(tokens != MASK_ID, -float("inf"))
    idx = conf.topk(UNMASK_REVEAL, dim=-1).indices
    return tokens.scatter(1, idx, drawn.gather(1, idx))


@pytest.mark.parametrize("device", _unmask_cases())
def test_unmask_pk(benchmark, device):
    x, t = _unmask_inputs(device)
    benchmark.group = f"unmask-{device}-B{UNMASK_SHAPE[0]}-L{UNMASK_SHAPE[1]}-V{UNMASK_SHAPE[2]}"
    _run(benchmark, lambda: pk.unmask_step(x, t, mask_token_id=MASK_ID, num_reveal=UNMASK_REVEAL, seed=0), device)


@pytest.mark.parametrize("device", _unmask_cases())
def test_unmask_composite(benchmark, device):
    x, t = _unmask_inputs(device)
    benchmark.group = f"unmask-{device}-B{UNMASK_SHAPE[0]}-L{UNMASK_SHAPE[1]}-V{UNMASK_SHAPE[2]}"
    _run(benchmark, lambda: unmask_composite(x, t), device)
