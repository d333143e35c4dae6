"""Every op of the pretrain_kernels namespace has an emulated CUDA twin (csrc/emu/module.cpp
takes the schemas from the dispatcher; the kernels come from csrc/cuda/*.cu), and the
"emulated" device of the masking, sampling and denoising tests routes every op outside the
attention family (which tests/test_attention_cuda_emulated.py covers) to it."""
import pytest
import torch

import emulated_cuda

pytestmark = pytest.mark.emulated


def missing_emulated_ops():
    """(op, what is missing) for each pretrain_kernels op (every overload) without an emulated
    twin of the same schema that has a CPU kernel."""
    emulated_cuda.load()
    missing = []
    for name in emulated_cuda.registered_ops():
        packet = getattr(torch.ops.pretrain_kernels, name)
        for overload in packet.overloads():
            full = name if overload == "default" else f"{name}.{overload}"
            try:
                twin = getattr(getattr(torch.ops.pretrain_kernels_emu, name), overload)
            except (AttributeError, RuntimeError):
                missing.append((full, "no pretrain_kernels_emu op (was it registered after the emulator loaded?)"))
                continue
            ours, theirs = str(getattr(packet, overload)._schema), str(twin._schema)
            if ours.replace("pretrain_kernels::", "", 1) != theirs.replace("pretrain_kernels_emu::", "", 1):
                missing.append((full, f"schema differs: {ours} vs {theirs}"))
            elif not torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "CPU"):
                missing.append((full, "no emulated kernel: csrc/cuda registers no CUDA kernel for it "
                                      "(PK_CUDA_LIBRARY_IMPL)"))
    return missing


def test_every_op_has_an_emulated_kernel():
    assert emulated_cuda.registered_ops(), "no pretrain_kernels op registered"
    assert missing_emulated_ops() == []


def test_a_new_op_without_cuda_kernel_is_reported():
    # The check above must be able to fail: an op defined after the emulator loaded has no twin.
    emulated_cuda.load()
    lib = torch.library.Library("pretrain_kernels", "FRAGMENT")
    try:
        lib.define("_emulation_probe(Tensor x) -> Tensor")
        assert "_emulation_probe" in emulated_cuda.registered_ops()
        assert [m[0] for m in missing_emulated_ops()] == ["_emulation_probe"]
    finally:
        lib._destroy()
    assert "_emulation_probe" not in emulated_cuda.registered_ops()


def test_routed_ops_are_all_but_the_attention_family():
    ops = emulated_cuda.registered_ops()
    routed = emulated_cuda.routed_ops()
    skipped = [n for n in ops if n not in routed]
    assert all(n.startswith(tuple(emulated_cuda.NOT_ROUTED_PREFIXES)) for n in skipped)
    assert skipped, "the attention family is registered and not routed"
    assert {"mlm_mask", "sample", "add_noise", "flow_match_step"} <= set(routed)


def test_routed_calls_run_the_emulated_kernel():
    # Inside routed(), a routed op launches emulated CUDA blocks; outside it the CPU kernel runs.
    mod = emulated_cuda.load()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.5])

    def launches():
        return mod.stats()["launches"]

    before = launches()
    torch.ops.pretrain_kernels.flow_match_step(x, x, t, t * 0.5, None, None, False, False)
    assert launches() == before
    with emulated_cuda.routed():
        torch.ops.pretrain_kernels.flow_match_step(x, x, t, t * 0.5, None, None, False, False)
    assert launches() > before
    after = launches()
    torch.ops.pretrain_kernels.flow_match_step(x, x, t, t * 0.5, None, None, False, False)
    assert launches() == after
