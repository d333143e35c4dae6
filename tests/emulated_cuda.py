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
            extra_cflags=["-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-DPK_CUDA_EMULATION", "-fvisibility=hidden",
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


NAMESPACE = "pretrain_kernels"
# Op-name prefixes that routed() leaves alone, each with its reason. The attention family runs
# under the emulator in its own file (tests/test_attention_cuda_emulated.py), which calls
# torch.ops.pretrain_kernels_emu.* directly with shapes sized for fibers.
NOT_ROUTED_PREFIXES = {"flash_attn_": "attention: tests/test_attention_cuda_emulated.py calls the emulated ops directly"}


def registered_ops(namespace=NAMESPACE):
    """Names of every op (with a schema) of a namespace, sorted, read from the dispatcher: for
    pretrain_kernels, the schemas of csrc/ops.cpp and anything registered later."""
    import pretrain_kernels  # noqa: F401  (registers the ops)
    prefix = namespace + "::"
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith(prefix):
            continue
        name, _, overload = full[len(prefix):].partition(".")
        try:  # an implementation registered without a schema is not an op
            torch._C._dispatch_find_schema_or_throw(prefix + name, overload)
        except RuntimeError:
            continue
        names.add(name)
    return sorted(names)


def routed_ops():
    """The ops whose CUDA kernels the `device` fixture's "emulated" runs route to: every op of
    the namespace but those of NOT_ROUTED_PREFIXES, so a new op cannot escape emulation."""
    return tuple(n for n in registered_ops() if not n.startswith(tuple(NOT_ROUTED_PREFIXES)))


@contextlib.contextmanager
def routed(names=None):
    """Within the block, torch.ops.pretrain_kernels.<name> on CPU tensors runs the emulated CUDA
    kernel instead of the CPU one (a CPU-key override; leaving the block removes it), so the
    tests written for the public API exercise the CUDA code as they stand. names: routed_ops()
    unless given."""
    global _routing
    emu = ops()
    lib = torch.library.Library(NAMESPACE, "IMPL")
    try:
        for name in (routed_ops() if names is None else names):
            packet = getattr(emu, name)
            for overload in packet.overloads():
                target = name if overload == "default" else f"{name}.{overload}"
                lib.impl(target, _forward_to(getattr(packet, overload)), "CPU")
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
