"""Build pretrain_kernels._C with torch.utils.cpp_extension.

Environment knobs:
  PK_BUILD_CUDA=0|1      force the CUDA sources off/on (default: on when torch is a CUDA
                         build and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA targets (default: the local GPU, else "8.0;9.0")
  MAX_JOBS               parallel compile jobs (ninja)
  PK_DEBUG=1             -O0 -g
  PK_PTXAS_VERBOSE=1     ptxas reports registers, spills and shared memory per kernel (read
                         the build log with scripts/cuda_resources.py)
ccache is used when it is on PATH.
"""
import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _pip_cuda_includes():
    """Headers of the pip CUDA wheels (nvidia/cu13/include, nvidia/*/include): torch's
    headers include cusparse.h and friends, which a bare toolkit may lack."""
    dirs = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots += [os.path.dirname(os.path.dirname(torch.__file__))]
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def _want_cuda():
    flag = os.environ.get("PK_BUILD_CUDA")
    if flag == "0":
        return False, None
    cuda_home = _find_cuda_home()
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("PK_BUILD_CUDA=1 but torch is a CPU-only build (torch.version.cuda is None)")
        if cuda_home is None:
            sys.exit("PK_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True, cuda_home
    return (torch.version.cuda is not None and cuda_home is not None), cuda_home


def _arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        else:
            archs = "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _use_ccache(cuda_home):
    """Newer torch wraps the compilers in ccache by itself; for older ones, do it here."""
    ccache = shutil.which("ccache")
    if not ccache:
        return None
    if not hasattr(cpp_extension, "_wrap_compiler"):
        cxx = os.environ.get("CXX", "c++")
        if "ccache" not in cxx:
            os.environ["CXX"] = f"{ccache} {cxx}"
        if cuda_home and "PYTORCH_NVCC" not in os.environ:
            os.environ["PYTORCH_NVCC"] = f"{ccache} {os.path.join(cuda_home, 'bin', 'nvcc')}"
    return ccache


def _openmp_flag():
    """-fopenmp when torch's CPU backend is OpenMP (the Linux wheels); macOS wheels use a
    native thread pool that at::parallel_for reaches without it."""
    if os.environ.get("PK_OPENMP", "1") == "0":
        return None
    if "OpenMP" not in torch.__config__.parallel_info() or sys.platform == "darwin":
        return None
    return "-fopenmp"


def build_extension():
    with_cuda, cuda_home = _want_cuda()
    ccache = _use_ccache(cuda_home if with_cuda else None)
    debug = os.environ.get("PK_DEBUG") == "1"
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    torch_version = torch.__version__.split("+")[0]
    define_macros = [("PK_TORCH_VERSION", f'"{torch.__version__}"')]
    # -ffp-contract=off: no fused multiply-adds the source did not ask for, so the float math the
    # CPU kernels share with the CUDA kernels (csrc/common) rounds the same on every build.
    cxx_flags = ["-O0" if debug else "-O3", "-fvisibility=hidden", "-ffp-contract=off"]
    link_flags = []
    openmp = _openmp_flag()
    if openmp:
        # at::parallel_for is a header template: without OpenMP at compile time it runs the
        # whole range on the calling thread. libgomp.so.1 is the soname torch itself loads,
        # so the extension joins torch's thread pool and honours torch.set_num_threads.
        cxx_flags.append(openmp)
        link_flags.append(openmp)
    if debug:
        cxx_flags.append("-g")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("PK_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        archs = _arch_list()
        # csrc/cuda/instances: the tensor-core attention kernels, one file per (dtype, head dim)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/instances/*.cu"))
        define_macros += [("PK_WITH_CUDA", None), ("PK_CUDA_ARCHS", f'"{archs}"')]
        include_dirs += _pip_cuda_includes()
        ext_cls = cpp_extension.CUDAExtension
    print(f"pretrain-kernels: building against torch {torch_version}, CUDA "
          f"{'on (' + os.environ.get('TORCH_CUDA_ARCH_LIST', '') + ')' if with_cuda else 'off'}"
          f"{', ccache' if ccache else ''}")
    return ext_cls(
        name="pretrain_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=False,
    )


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
