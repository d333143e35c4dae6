"""What the benchmark families share: the run's mode (quick or not, which device), the timing
helpers, and the registry of the alternatives the package is compared with.

The mode comes from the environment so that the suites read it at import time, whether
pk-bench runs them or pytest does directly:
  PK_BENCH_QUICK=1          fewer sizes and rounds (pk-bench --quick)
  PK_BENCH_DEVICE=cpu|cuda  run only that device's cases (pk-bench --device)
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch

QUICK = os.environ.get("PK_BENCH_QUICK") == "1"


def quick(full, small):
    """`small` under --quick, else `full` (a size list, a round count, a time)."""
    return small if QUICK else full


def rounds(n: int) -> int:
    """Timed rounds of a pedantic benchmark: n, or at most 2 under --quick."""
    return min(n, 2) if QUICK else n


def gpu_usable() -> bool:
    import pretrain_kernels as pk
    return torch.cuda.is_available() and bool(pk.build_info()["with_cuda"])


def cuda_sync_fn(fn, device):
    """Wrap fn so that a timed call includes the device work."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


# ---- alternatives ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alternative:
    name: str         # as the reports print it
    module: str       # what `import` takes
    dist: str         # the pip distribution (what `pip install` takes)
    devices: tuple    # where the suites use it
    compared_on: str  # which benchmarks use it


# Everything the suites compare the package with, beyond plain torch code. A family uses one
# through require(name); when it is missing, the cases that need it skip with
# "<name> not installed" and pk-bench lists them.
ALTERNATIVES = {a.name: a for a in (
    Alternative("torch SDPA", "torch", "torch", ("cpu", "cuda"), "attention, train, integrations"),
    Alternative("flash-attn", "flash_attn", "flash-attn", ("cuda",), "attention (forward, backward, decode)"),
    Alternative("FlashInfer", "flashinfer", "flashinfer-python", ("cuda",), "attention decode, sampling"),
    Alternative("transformers", "transformers", "transformers", ("cpu", "cuda"), "masking, sampling, integrations"),
    Alternative("diffusers", "diffusers", "diffusers", ("cpu", "cuda"), "diffusion"),
    Alternative("Liger-Kernel", "liger_kernel", "liger-kernel", ("cuda",), "loss (fused linear cross-entropy)"),
    Alternative("numba", "numba", "numba", ("cpu",), "masking, sampling"),
    Alternative("CuPy", "cupy", "cupy-cuda12x", ("cuda",), "masking"),
)}


def installed(name: str) -> bool:
    return importlib.util.find_spec(ALTERNATIVES[name].module) is not None


def version(name: str):
    """The installed version of an alternative, or None."""
    alt = ALTERNATIVES[name]
    if not installed(name):
        return None
    for dist in (alt.dist, alt.module, alt.dist.split("-cuda")[0]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return getattr(importlib.import_module(alt.module), "__version__", "installed")


def skip_message(name: str) -> str:
    return f"{name} not installed"


def require(name: str, module_level: bool = False):
    """Import an alternative for a benchmark, or skip the benchmark (the whole module with
    module_level=True) with "<name> not installed". A library that is present but fails to
    import skips with its error instead."""
    import pytest

    if not installed(name):
        pytest.skip(skip_message(name), allow_module_level=module_level)
    try:
        return importlib.import_module(ALTERNATIVES[name].module)
    except Exception as e:  # noqa: BLE001  (a broken install: report it, do not fail the suite)
        pytest.skip(f"{name} does not import: {type(e).__name__}: {e}", allow_module_level=module_level)
