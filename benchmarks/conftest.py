import pytest
import torch

import pretrain_kernels  # noqa: F401


def cuda_sync_fn(fn, device):
    """Wrap fn so that a timed call includes the device work."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def bench_device(request):
    if request.param == "cuda" and not (torch.cuda.is_available() and pretrain_kernels.build_info()["with_cuda"]):
        pytest.skip("no GPU")
    return request.param
