"""Fused LM-head loss: pk.linear_cross_entropy against eager F.linear + F.cross_entropy (and
Liger-Kernel's fused linear cross-entropy where it installs: it needs Triton on a GPU, so on the
CPU it is skipped and named), forward + backward, on the same inputs.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                    [--tokens 8192] [--hidden 1024] [--vocab 32768 128256] [--rounds 2]
    pytest benchmarks/bench_loss.py --benchmark-only        # time only, pytest-benchmark groups

The script prints one markdown row per (vocab, implementation): the peak memory a forward +
backward adds above its inputs, and the median time of `rounds` timed forward + backward
passes after one warm-up. Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU,
which keeps no allocator statistics, each measurement runs in a fresh subprocess and reports
the growth of the process's peak resident set (VmHWM) over its size once the inputs exist
(an upper bound: the peak may include temporaries made while building the inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk

IMPLS = ("pk", "eager", "liger")


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    t[::17] = -100
    return h, w, t


def liger_fn():
    """Liger-Kernel's fused linear cross-entropy, or a string saying why it is not available."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # not installed, or no Triton
        return f"Liger-Kernel not importable ({type(e).__name__}: {e})"
    return liger_fused_linear_cross_entropy


def step_fn(impl, h, w, t):
    """One forward + backward of the implementation, as a closure."""
    if impl == "pk":
        def run():
            pk.linear_cross_entropy(h, w, t).backward()
    elif impl == "eager":
        def run():
            F.cross_entropy(F.linear(h, w).float(), t).backward()
    else:
        fn = liger_fn()
        if isinstance(fn, str):
            return fn
        if h.device.type != "cuda":
            return "Liger-Kernel runs on GPUs only (Triton)"

        def run():
            fn(h, w, t).backward()
    return run


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    """VmHWM: the peak resident set of this process image (ru_maxrss would carry the parent's
    peak over the fork and exec that started it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(impl, tokens, hidden, vocab, dtype, device):
    """Peak bytes one forward + backward adds over its inputs (None with the reason if it cannot run)."""
    if device == "cuda":
        h, w, t = make_inputs(tokens, hidden, vocab, dtype, device)
        run = step_fn(impl, h, w, t)
        if isinstance(run, str):
            return None, run
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        _sync(device)
        return torch.cuda.max_memory_allocated() - base, ""
    cmd = [sys.executable, __file__, "--_memory", impl, str(tokens), str(hidden), str(vocab), str(dtype)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["bytes"], res["note"]


def _memory_child(impl, tokens, hidden, vocab, dtype):
    dtype = getattr(torch, dtype.replace("torch.", ""))
    warm = step_fn(impl, *make_inputs(8, 16, 32, dtype, "cpu"))  # libraries and thread pools up first
    if not isinstance(warm, str):
        warm()
    h, w, t = make_inputs(tokens, hidden, vocab, dtype, "cpu")
    run = step_fn(impl, h, w, t)
    if isinstance(run, str):
        print(json.dumps({"bytes": None, "note": run}))
        return
    base = _rss_bytes()
    run()
    print(json.dumps({"bytes": _peak_rss_bytes() - base, "note": ""}))


def measure_time(impl, tokens, hidden, vocab, dtype, device, rounds):
    h, w, t = make_inputs(tokens, hidden, vocab, dtype, device)
    run = step_fn(impl, h, w, t)
    if isinstance(run, str):
        return None, run
    run()  # warm-up
    times = []
    for _ in range(rounds):
        h.grad = w.grad = None
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192],
                   help="one value, or one per --vocab value")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--_memory", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._memory:
        impl, tokens, hidden, vocab, dtype = a._memory
        _memory_child(impl, int(tokens), int(hidden), int(vocab), dtype)
        return
    dtype = getattr(torch, a.dtype)
    tokens = a.tokens * len(a.vocab) if len(a.tokens) == 1 else a.tokens
    print(f"device {a.device}, {a.dtype}, hidden {a.hidden}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print("| tokens | vocab | impl | peak memory (MiB) | vs eager | fwd+bwd (s) | vs eager | note |")
    print("|---|---|---|---|---|---|---|---|")
    for n, v in zip(tokens, a.vocab):
        rows = {}
        for impl in ("eager", "pk", "liger"):
            mem, note_m = measure_memory(impl, n, a.hidden, v, dtype, a.device)
            sec, note_t = (None, note_m) if mem is None else measure_time(impl, n, a.hidden, v, dtype, a.device,
                                                                          a.rounds)
            rows[impl] = (mem, sec, note_m or note_t)
        for impl, (mem, sec, note) in rows.items():
            em, es, _ = rows["eager"]
            f = lambda x, d: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
            print(f"| {n} | {v} | {impl} | {f(None if mem is None else mem / 2**20, 0)} | "
                  f"{f(None if mem is None or not em else mem / em, 2)} | {f(sec, 2)} | "
                  f"{f(None if sec is None or not es else sec / es, 2)} | {note} |", flush=True)


# ---- pytest-benchmark (time only) -----------------------------------------------------------

SIZES = {"v32768": (8192, 1024, 32768), "v128256": (8192, 1024, 128256)}


@pytest.mark.benchmark(max_time=1.0, min_rounds=2, warmup=False)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES))
def test_linear_cross_entropy(benchmark, bench_device, size, impl):
    n, hdim, v = SIZES[size]
    h, w, t = make_inputs(n, hdim, v, torch.float32 if bench_device == "cpu" else torch.bfloat16, bench_device)
    run = step_fn(impl, h, w, t)
    if isinstance(run, str):
        pytest.skip(run)
    benchmark.group = f"linear_cross_entropy-{bench_device}-{size}"
    benchmark.extra_info["impl"] = impl

    def timed():
        run()
        _sync(bench_device)
    benchmark(timed)


if __name__ == "__main__":
    main()
