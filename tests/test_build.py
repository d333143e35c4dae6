"""The build itself: what it reports, and that the CPU kernels really use torch's threads."""
import os

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels import _C


def test_build_info_fields():
    info = pk.build_info()
    for key in ("with_cuda", "cuda_archs", "cpu_isa", "cpu_parallel", "torch_version", "compiler",
                "torch_runtime_version", "cpu_threads"):
        assert key in info, key


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_cpu_kernels_follow_torch_threads():
    # at::parallel_for is inlined into the extension: built without torch's OpenMP flag it
    # silently runs every kernel on one thread, whatever torch.set_num_threads says.
    if "OpenMP" in torch.__config__.parallel_info():
        assert pk.build_info()["cpu_parallel"] == "openmp"
    torch.set_num_threads(2)
    assert _C.parallel_threads() == 2
    torch.set_num_threads(1)
    assert _C.parallel_threads() == 1


def test_generated_attention_instances_are_current():
    """The per-(dtype, head dim) instance files and lists match their generator script."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "generate_attention_instances.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
