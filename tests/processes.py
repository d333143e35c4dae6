"""Spawning worker processes for the multi-process tests (gloo on CPU), under a deadline so a
hang fails the test instead of blocking the suite."""
import socket
import time

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 300  # generous: the machine may be shared; the process groups' own timeouts catch a hang sooner


def free_port():
    """A TCP port nothing listens on now, for a tcp:// rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, args=(), deadline_s=DEADLINE_S):
    """fn(rank, *args) in `world` spawned processes. Fails the test, killing what is left, when
    they do not all finish within deadline_s; a worker's exception fails it too (with the
    worker's traceback, as torch.multiprocessing reports it)."""
    ctx = mp.start_processes(fn, args=tuple(args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(1.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} worker processes did not finish within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
