"""pytest hooks and fixtures of the benchmark suites (loaded by pk-bench and by a direct
`pytest python/pretrain_kernels/bench/...` run alike).

- PK_BENCH_DEVICE=cpu|cuda deselects the other device's cases. A case's device is its
  `device` / `bench_device` parameter, else "cuda" when it carries the cuda marker, else "cpu".
- PK_BENCH_THREADS=<n> sets torch's CPU threads before any case runs.
- PK_BENCH_SKIPS=<file> collects the reason of every skip, one a line (pk-bench reads it to
  name the alternatives that are not installed).
"""
import os

import pytest
import torch

import pretrain_kernels  # noqa: F401  (registers the ops)

from pretrain_kernels.bench.common import gpu_usable


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (skipped without one)")
    if os.environ.get("PK_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["PK_BENCH_THREADS"]))


def case_device(item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    for key in ("device", "bench_device"):
        if key in params:
            return str(params[key])
    return "cuda" if item.get_closest_marker("cuda") else "cpu"


def pytest_collection_modifyitems(config, items):
    want = os.environ.get("PK_BENCH_DEVICE")
    if want:
        keep, drop = [], []
        for item in items:
            (keep if case_device(item) == want else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    if not gpu_usable():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of the extension")
        for item in items:
            if case_device(item) == "cuda":
                item.add_marker(skip)


def _record_skip(report):
    path = os.environ.get("PK_BENCH_SKIPS")
    if not path or not report.skipped:
        return
    lr = report.longrepr
    msg = str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    with open(path, "a") as f:
        f.write(msg.removeprefix("Skipped: ").replace("\n", " ") + "\n")


def pytest_runtest_logreport(report):
    if report.when == "setup" or report.when == "call":
        _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def bench_device(request):
    return request.param
