"""Decoder-layer ops, forward + backward: pk.rms_norm, pk.swiglu and pk.gelu (tanh form) against
what a model written in eager torch runs (nn.RMSNorm, F.silu(g) * u, F.gelu(approximate="tanh")),
on the same inputs, gradients flowing to the inputs (and to the norm's weight).

Sizes: the GPT of bench_train's seq1024 config (4 x 1024 tokens; width 256, MLP hidden 1024) and
a 7B-class layer slice (2048 tokens; width 4096, MLP hidden 11008; on the CPU 512 tokens).

    pk-bench layers [--device cpu|cuda] [--quick]
    python -m pretrain_kernels.bench.bench_layers [--device cpu|cuda] [--dtype float32|bfloat16]
                                                  [--rounds 5]     # a Markdown table of ratios
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels.bench.common import quick

# name -> (tokens, width of the norm, hidden width of the MLP); tokens per device
SIZES = {"gpt-seq1024": ({"cpu": 4096, "cuda": 4096}, 256, 1024),
         "7b-slice": ({"cpu": 512, "cuda": 2048}, 4096, 11008)}
OPS = ("rms_norm", "swiglu", "gelu")
IMPLS = ("pk", "eager")


def make_run(op, impl, size, dtype, device, seed=0):
    """One forward + backward of `op` by `impl` on fresh inputs, as a closure."""
    tokens, dim, hidden = SIZES[size]
    n = tokens[device]
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_()

    if op == "rms_norm":
        x, w = leaf(n, dim), leaf(dim)
        dy = torch.randn(n, dim, generator=g).to(dtype).to(device)
        eps = torch.finfo(dtype).eps
        if impl == "pk":
            return lambda: pk.rms_norm(x, w, eps=eps).backward(dy)
        return lambda: F.rms_norm(x, (dim,), w, eps).backward(dy)
    if op == "swiglu":
        a, b = leaf(n, hidden), leaf(n, hidden)
        dy = torch.randn(n, hidden, generator=g).to(dtype).to(device)
        if impl == "pk":
            return lambda: pk.swiglu(a, b).backward(dy)
        return lambda: (F.silu(a) * b).backward(dy)
    x = leaf(n, hidden)
    dy = torch.randn(n, hidden, generator=g).to(dtype).to(device)
    if impl == "pk":
        return lambda: pk.gelu(x, approximate="tanh").backward(dy)
    return lambda: F.gelu(x, approximate="tanh").backward(dy)


def _synced(run, device):
    if device != "cuda":
        return run

    def timed():
        run()
        torch.cuda.synchronize()
    return timed


@pytest.mark.parametrize("dtype", quick(["float32", "bfloat16"], ["float32"]))
@pytest.mark.parametrize("size", quick(list(SIZES), ["gpt-seq1024"]))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_fwd_bwd(benchmark, bench_device, impl, op, size, dtype):
    run = _synced(make_run(op, impl, size, getattr(torch, dtype), bench_device), bench_device)
    benchmark.group = f"{op} fwd+bwd {size} {dtype} {bench_device}"
    benchmark.extra_info.update(family="layers", op=op, impl=impl, device=bench_device, shape=size, dtype=dtype,
                                baseline=(impl == "pk"))
    benchmark(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    print(f"device {a.device}, threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"median of {a.rounds} forward + backward passes after {a.warmup} warm-ups, pk and eager "
          f"alternating (ms)\n")
    print("| op | size | dtype | pk | eager torch | eager / pk |")
    print("|---|---|---|---:|---:|---:|")
    for dtype in a.dtype:
        for size in SIZES:
            for op in OPS:
                # alternating calls: the allocator's state (whether a call's large outputs come
                # back from the heap or fault in fresh pages) and the machine drift alike for both
                runs = {impl: _synced(make_run(op, impl, size, getattr(torch, dtype), a.device), a.device)
                        for impl in IMPLS}
                for _ in range(a.warmup):
                    for impl in IMPLS:
                        runs[impl]()
                times = {impl: [] for impl in IMPLS}
                for _ in range(a.rounds):
                    for impl in IMPLS:
                        t0 = time.perf_counter()
                        runs[impl]()
                        times[impl].append(time.perf_counter() - t0)
                ms = {impl: statistics.median(times[impl]) * 1e3 for impl in IMPLS}
                print(f"| {op} | {size} | {dtype} | {ms['pk']:.2f} | {ms['eager']:.2f} | "
                      f"{ms['eager'] / ms['pk']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
