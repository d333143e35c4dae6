import os

import pytest
import torch

import pretrain_kernels  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and pretrain_kernels.build_info()["with_cuda"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of the extension")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=_devices())
def device(request):
    """Runs a test on the CPU and, where a GPU is present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a whole module (the model and training tests: tiny shapes, where
    a second thread only adds synchronisation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads():
    # Keep tests deterministic in cost on small machines; tests that vary threads set them.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    info = pretrain_kernels.build_info()
    return [f"pretrain-kernels build: {info}", f"cuda available: {torch.cuda.is_available()}",
            f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"]
