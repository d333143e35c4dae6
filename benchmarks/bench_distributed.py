"""Context-parallel attention on CPU: one sequence split over 2 processes against one process.

    python benchmarks/bench_distributed.py [--seq-len 8192] [--heads 8] [--head-dim 64] [--iters 3]

Causal attention forward + backward, batch 1, float32 (the defaults: S = 8192, 8 heads,
head_dim 64):
  - "1 process": pk.flash_attention on the whole sequence, 2 threads;
  - "context parallel": pretrain_kernels.distributed.context_parallel_attention over 2 gloo
    processes of 1 thread each, each holding half of the sequence (zigzag shards).
Same inputs, same machine, one run. Each side runs in processes of its own, spawned after
the other's have exited. Time: the median over --iters timed steps after one warm-up step
(for context parallel, the slower rank's). Memory: each process's peak resident set growth,
resource.getrusage(RUSAGE_SELF).ru_maxrss after the timed steps minus its value after import
and a small warm-up, before the inputs are made: the inputs, activations, gradients and
ring buffers of one step (tracemalloc does not see torch's allocations). Prints a Markdown
table and the ratios. Standalone (spawned processes do not fit a pytest-benchmark timer).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inputs(args, seq_len):
    g = torch.Generator().manual_seed(0)
    shape = (1, seq_len, args.heads, args.head_dim)
    q, k, v, go = (torch.randn(*shape, generator=g) for _ in range(4))
    return q, k, v, go


def _warm_up(attend):
    x = torch.randn(1, 64, 2, 16, requires_grad=True)
    attend(x, x, x).sum().backward()


def _timed(step, iters):
    step()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _single(rank, args, queue):
    import pretrain_kernels as pk
    torch.set_num_threads(2)
    _warm_up(lambda q, k, v: pk.flash_attention(q, k, v, causal=True))
    base = _maxrss_mib()
    q, k, v, go = _inputs(args, args.seq_len)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        for t in (q, k, v):
            t.grad = None
        pk.flash_attention(q, k, v, causal=True).backward(go)

    times = _timed(step, args.iters)
    queue.put(("single", rank, times, _maxrss_mib() - base))


def _context_parallel(rank, world, port, args, queue):
    import torch.distributed as dist
    from pretrain_kernels.distributed import context_parallel_attention
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        _warm_up(lambda q, k, v: context_parallel_attention(q, k, v, None, causal=True))
        base = _maxrss_mib()
        # its shard only (random values: the timing and memory do not depend on them; never the
        # full sequence, which would raise the peak being measured)
        q, k, v, go = _inputs(args, args.seq_len // world)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            for t in (q, k, v):
                t.grad = None
            context_parallel_attention(q, k, v, None, causal=True).backward(go)
            dist.barrier()

        times = _timed(step, args.iters)
        queue.put(("context parallel", rank, times, _maxrss_mib() - base))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, nprocs, extra, queue):
    mp.start_processes(fn, args=(*extra, queue), nprocs=nprocs, join=True, start_method="spawn")
    return [queue.get() for _ in range(nprocs)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    world = 2
    if args.seq_len % (2 * world):
        p.error(f"--seq-len must divide by {2 * world}")
    queue = mp.get_context("spawn").SimpleQueue()
    single = _launch(_single, 1, (args,), queue)
    cp = _launch(_context_parallel, world, (world, _free_port(), args), queue)

    t_single = statistics.median(single[0][2])
    t_cp = statistics.median(max(ts) for ts in zip(*(r[2] for r in cp)))
    mem_single = single[0][3]
    mem_cp = [r[3] for r in sorted(cp, key=lambda r: r[1])]
    print(f"Causal attention forward + backward, B=1, S={args.seq_len}, H={args.heads}, D={args.head_dim}, "
          f"float32; {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, median of {args.iters}\n")
    print("| mode | processes x threads | fwd+bwd time | peak RSS growth per process |")
    print("|---|---|---:|---:|")
    print(f"| 1 process (pk.flash_attention) | 1 x 2 | {t_single * 1e3:.0f} ms | {mem_single:.0f} MiB |")
    print(f"| context parallel (ring, gloo) | {world} x 1 | {t_cp * 1e3:.0f} ms | "
          f"{' / '.join(f'{m:.0f}' for m in mem_cp)} MiB |")
    print(f"\ntime, context parallel / 1 process: {t_cp / t_single:.2f}x; "
          f"peak memory per rank / 1 process: {max(mem_cp) / mem_single:.2f}x")


if __name__ == "__main__":
    main()
