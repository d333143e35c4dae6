"""Builds and loads the CPU emulation of the CUDA kernels (csrc/emu/): the kernels and
launchers of csrc/cuda/*.cu compiled as C++ and run with one fiber per CUDA thread. The ops
are torch.ops.pretrain_kernels_emu.* on CPU tensors, with the schemas of the pretrain_kernels
ops. Built once per checkout into build/cuda_emulation."""
import contextlib
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
_module = None
_routing = False


def load():
    """The emulator's Python module (configure, stats); its ops live in torch.ops.pretrain_kernels_emu."""
    global _module
    if _module is None:
        import pretrain_kernels  # noqa: F401  (the schemas are read from its ops)
        from torch.utils import cpp_extension

        # the interpreter's own bin folder first: the virtualenv's ninja when PATH lacks one
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        build = ROOT / "build" / "cuda_emulation"
        _module = cpp_extension.load(
            name="pk_cuda_emulation",
            sources=[str(ROOT / "csrc" / "emu" / "module.cpp")] + _wrapper_sources(build / "src"),
            # CUDA code type-puns registers and 16-byte chunks freely (nvcc allows it); GCC must not
            # optimise on strict aliasing
            extra_cflags=["-O2", "-fno-strict-aliasing", "-DPK_CUDA_EMULATION", "-fvisibility=hidden",
                          "-Wno-unknown-pragmas"],
            build_directory=str(build),
            with_cuda=False,
            verbose=os.environ.get("PK_EMU_VERBOSE") == "1",
        )
    return _module


def _wrapper_sources(folder):
    """C++ files that include the CUDA attention sources: one per file of csrc/cuda, one per
    direction for the per-(dtype, head dim) instances of csrc/cuda/instances. Rewritten only
    when their text changes, so the build stays incremental."""
    cuda = ROOT / "csrc" / "cuda"
    groups = {f.stem: [f] for f in sorted(cuda.glob("*.cu"))}
    for f in sorted((cuda / "instances").glob("attention*.cu")):
        groups.setdefault("instances_" + f.stem.split("_")[1], []).append(f)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, files in groups.items():
        path = folder / f"{name}.cpp"
        text = "".join(f'#include "{f}"\n' for f in files)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(str(path))
    return paths


def ops():
    load()
    return torch.ops.pretrain_kernels_emu


# The ops whose CUDA kernels run under the emulator besides attention (which has its own test
# file, tests/test_attention_cuda_emulated.py).
ROUTED_OPS = ("mlm_mask", "span_mask", "sample", "top_k_top_p_filter", "speculative_accept", "add_noise",
              "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddim_step", "euler_step", "heun_step",
              "dpmpp_2m_step", "flow_match_step")


@contextlib.contextmanager
def routed(names=ROUTED_OPS):
    """Within the block, torch.ops.pretrain_kernels.<name> on CPU tensors runs the emulated CUDA
    kernel instead of the CPU one (a CPU-key override; leaving the block removes it), so the
    tests written for the public API exercise the CUDA code as they stand."""
    global _routing
    emu = ops()
    lib = torch.library.Library("pretrain_kernels", "IMPL")
    try:
        for name in names:
            lib.impl(name, _forward_to(getattr(emu, name).default), "CPU")
        _routing = True
        yield
    finally:
        _routing = False
        lib._destroy()


def active():
    """Whether routed() is in force: tests draw fewer samples through the emulator, whose
    blocks of up to 1024 fibers cost milliseconds each."""
    return _routing


def _forward_to(op):
    def kernel(*args, **kwargs):
        return op(*args, **kwargs)
    return kernel
