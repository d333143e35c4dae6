import contextlib
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


class CudaKernels:
    """Where the CUDA kernels of a CPU-versus-CUDA test run: a GPU (device "cuda"), or CPU
    tensors with the ops routed to the emulated kernels while run() is active."""

    def __init__(self, kind):
        self.kind = kind
        self.device = torch.device("cuda" if kind == "cuda" else "cpu")

    def run(self):
        if self.kind == "cuda":
            return contextlib.nullcontext()
        import emulated_cuda
        return emulated_cuda.routed()


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emulated", marks=pytest.mark.emulated)])
def cuda_kernels(request):
    return CudaKernels(request.param)


def pytest_generate_tests(metafunc):
    # `device`: the CPU, CUDA where a GPU is present, and in modules that set
    # EMULATE_CUDA = True the CUDA kernels run on the CPU by the emulator (tests/emulated_cuda.py).
    if "device" in metafunc.fixturenames:
        params = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
        if getattr(metafunc.module, "EMULATE_CUDA", False):
            params.append(pytest.param("emulated", marks=pytest.mark.emulated))
        metafunc.parametrize("device", params, indirect=True)


@pytest.fixture
def device(request):
    """Runs a test on the CPU, on CUDA where a GPU is present, and (EMULATE_CUDA modules) on
    CPU tensors with the pretrain_kernels ops routed to their emulated CUDA kernels."""
    if request.param == "emulated":
        skip = request.node.get_closest_marker("not_emulated")
        if skip is not None:
            pytest.skip(skip.args[0])
        import emulated_cuda
        with emulated_cuda.routed():
            yield torch.device("cpu")
    else:
        yield torch.device(request.param)


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
