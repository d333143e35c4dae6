"""pk.linear_cross_entropy (the fused LM-head loss) against the float64 reference of
tests/reference.py (F.linear then F.cross_entropy): every reduction, ignore_index, label
smoothing, softcap, bias, odd sizes, leading dims and non-contiguous hidden, every dtype, the
chunk loop (several chunks, ragged last chunk), the CUDA kernel through the emulator, opcheck,
gradcheck, torch.compile, autocast and bad input."""
import math

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.ops import loss as L

import reference as ref

# `device` also runs the CUDA kernels on the CPU through the emulator (conftest.py).
EMULATE_CUDA = True

OPS = torch.ops.pretrain_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
# relative error of the loss / the gradients against float64 (the matmuls round the logits to
# the input dtype, as F.linear does)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def inputs(n, h, v, dtype, *, seed, bias=False, ignore_frac=0.0, lead=None, device="cpu", ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(max(h, 1)) * 2).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, v, shape, generator=g)
    if ignore_frac > 0:
        targets[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(hidden), to(weight), to(targets), to(b)


def run_both(hidden, weight, targets, bias, **kw):
    """(loss, grads) of pk.linear_cross_entropy and of the float64 reference, for a random
    upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    refs = [t.detach().clone().double().requires_grad_() for t in leaves]
    b, rb = (leaves[2], refs[2]) if bias is not None else (None, None)
    loss = pk.linear_cross_entropy(leaves[0], leaves[1], targets, bias=b, **kw)
    kw.pop("chunk_size", None)
    rloss = ref.linear_cross_entropy(refs[0], refs[1], targets, bias=rb, **kw)
    gout = torch.rand(rloss.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    (loss * gout.to(loss.dtype).to(loss.device)).sum().backward()
    (rloss * gout).sum().backward()
    return loss, rloss, [t.grad for t in leaves], [t.grad for t in refs]


def check_close(loss, rloss, grads, rgrads, dtype):
    tol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if rloss.isnan().any():
        assert torch.equal(loss.isnan().cpu(), rloss.isnan())
    else:
        assert rel(loss, rloss) < tol, (rel(loss, rloss), tol)
    for g, r in zip(grads, rgrads):
        assert g.dtype == dtype
        assert rel(g, r) < tol, (rel(g, r), tol)


CASES = [
    # n, h, v, bias, label_smoothing, softcap, ignore_frac, chunk_size
    (1, 8, 3, False, 0.0, None, 0.0, None),
    (7, 33, 1, True, 0.0, None, 0.0, None),
    (7, 33, 1031, True, 0.1, None, 0.3, 3),
    (129, 16, 257, False, 0.0, 30.0, 0.2, 64),
    (129, 24, 1000, True, 0.2, 5.0, 0.1, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}h{c[1]}v{c[2]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, dtype, reduction, case):
    n, h, v, bias, ls, cap, ign, chunk = case
    hidden, weight, targets, b = inputs(n, h, v, dtype, seed=n * 1000 + v, bias=bias, ignore_frac=ign, device=device)
    out = run_both(hidden, weight, targets, b, reduction=reduction, label_smoothing=ls, softcap=cap, chunk_size=chunk)
    check_close(*out, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dims_noncontiguous_hidden_int32_targets(device, reduction):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 17, 3, generator=g)  # hidden [3, 5, 17] as a transposed view
    hidden = base.permute(2, 0, 1)
    assert not hidden.is_contiguous()
    _, weight, _, b = inputs(1, 17, 211, torch.float32, seed=4, bias=True)
    targets = torch.randint(0, 211, (3, 5), generator=g, dtype=torch.int32)
    targets[1, 2] = -100
    loss, rloss, grads, rgrads = run_both(hidden, weight, targets, b, reduction=reduction, chunk_size=4)
    assert loss.shape == rloss.shape == ((3, 5) if reduction == "none" else ())
    check_close(loss, rloss, grads, rgrads, torch.float32)


def test_chunking_changes_results_only_by_rounding(device):
    hidden, weight, targets, b = inputs(50, 12, 97, torch.float32, seed=8, bias=True, ignore_frac=0.2)
    outs = []
    for chunk in (1, 7, 50, None):
        hw = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss = pk.linear_cross_entropy(hw[0], hw[1], targets, bias=hw[2], softcap=3.0, label_smoothing=0.05,
                                       chunk_size=chunk)
        loss.backward()
        outs.append((loss.detach(), [t.grad for t in hw]))
    for loss, grads in outs[1:]:
        # the matmul library may round differently for other shapes; grad_weight also adds the
        # chunks in another order
        assert rel(loss, outs[0][0]) < 1e-6
        assert rel(grads[0], outs[0][1][0]) < 1e-6
        assert rel(grads[1], outs[0][1][1]) < 1e-6
        assert rel(grads[2], outs[0][1][2]) < 1e-6


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_ignore_index_inside_and_outside_the_vocab(device, ignore_index):
    hidden, weight, targets, _ = inputs(20, 8, 11, torch.float32, seed=9, ignore_frac=0.4, ignore_index=ignore_index)
    for reduction in REDUCTIONS:
        check_close(*run_both(hidden, weight, targets, None, reduction=reduction, ignore_index=ignore_index,
                              label_smoothing=0.1), torch.float32)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_ignored_matches_torch(device, label_smoothing):
    hidden, weight, _, b = inputs(6, 8, 13, torch.float32, seed=10, bias=True)
    targets = torch.full((6,), -100)
    for reduction in REDUCTIONS:
        loss, rloss, grads, rgrads = run_both(hidden, weight, targets, b, reduction=reduction,
                                              label_smoothing=label_smoothing)
        assert torch.equal(loss.isnan(), rloss.isnan())
        if reduction == "mean":
            assert loss.isnan()
        else:
            assert torch.equal(loss, torch.zeros_like(loss))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_empty_batch(device):
    _, weight, _, _ = inputs(1, 8, 13, torch.float32, seed=11)
    hidden = torch.zeros(0, 8, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64)
    assert pk.linear_cross_entropy(hidden, weight, targets).isnan()
    assert pk.linear_cross_entropy(hidden, weight, targets, reduction="sum").item() == 0.0
    assert pk.linear_cross_entropy(hidden, weight, targets, reduction="none").shape == (0,)
    w = weight.clone().requires_grad_()
    pk.linear_cross_entropy(hidden, w, targets, reduction="sum").backward()
    assert hidden.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


def test_float64_and_frozen_weight(device):
    hidden, weight, targets, b = inputs(9, 6, 31, torch.float64, seed=12, bias=True, ignore_frac=0.2)
    check_close(*run_both(hidden, weight, targets, b, softcap=2.0, label_smoothing=0.1), torch.float64)
    h = hidden.clone().requires_grad_()
    pk.linear_cross_entropy(h, weight, targets, bias=b).backward()  # weight, bias need no gradient
    hr = hidden.clone().requires_grad_()
    ref.linear_cross_entropy(hr, weight, targets, bias=b).backward()
    assert rel(h.grad, hr.grad) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", ["h", "w", "b", "hb", "wb", "hw"])
def test_gradients_of_the_trainable_inputs_only(device, reduction, trainable):
    """Frozen inputs get no gradient and the others the reference's: the op computes only the
    gradients asked for (a frozen LM head skips the weight-sized product)."""
    hidden, weight, targets, b = inputs(23, 10, 67, torch.float32, seed=13, bias=True, ignore_frac=0.2, device=device)
    leaves = [t.detach().clone().requires_grad_(k in trainable) for t, k in zip((hidden, weight, b), "hwb")]
    refs = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    loss = pk.linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], reduction=reduction, chunk_size=5)
    rloss = ref.linear_cross_entropy(*refs[:2], targets, bias=refs[2], reduction=reduction)
    gout = torch.rand(rloss.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    (loss * gout.float().to(loss.device)).sum().backward()
    (rloss * gout).sum().backward()
    for t, r, k in zip(leaves, refs, "hwb"):
        if k in trainable:
            assert rel(t.grad, r.grad) < TOL[torch.float32], k
        else:
            assert t.grad is None, k


def test_raw_op_returns_only_the_gradients_asked_for(device):
    hidden, weight, targets, b = inputs(12, 8, 29, torch.float32, seed=14, bias=True, device=device)
    full = OPS.linear_cross_entropy(hidden, weight, targets, b, -100, 0.0, 0.0, "mean", True, 5)
    full_bwd = OPS.linear_cross_entropy_backward(torch.ones(12, device=device), hidden, weight, targets, b, -100, 0.0,
                                                 0.0, "none", 5)
    for grads in range(8):
        out = OPS.linear_cross_entropy(hidden, weight, targets, b, -100, 0.0, 0.0, "mean", True, 5, grads)
        bwd = OPS.linear_cross_entropy_backward(torch.ones(12, device=device), hidden, weight, targets, b, -100, 0.0,
                                                0.0, "none", 5, grads)
        assert torch.equal(out[0], full[0])
        for bit, got, want, got_b, want_b in zip((1, 2, 4), out[1:], full[1:], bwd, full_bwd):
            if grads & bit:
                assert torch.equal(got, want) and torch.equal(got_b, want_b), (grads, bit)
            else:
                assert got.numel() == 0 and got_b.numel() == 0, (grads, bit)
    with pytest.raises(RuntimeError, match="grads"):
        OPS.linear_cross_entropy(hidden, weight, targets, b, -100, 0.0, 0.0, "mean", True, 5, 8)
    with pytest.raises(RuntimeError, match="grads"):
        OPS.linear_cross_entropy_backward(torch.ones(12, device=device), hidden, weight, targets, b, -100, 0.0, 0.0,
                                          "none", 5, -1)


def test_emulated_cuda_equals_cpu():
    """The same call on the CPU kernel and on the CUDA kernel run by the emulator."""
    import emulated_cuda
    hidden, weight, targets, b = inputs(21, 10, 517, torch.float32, seed=13, bias=True, ignore_frac=0.2)

    def run(reduction):
        hw = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        loss = pk.linear_cross_entropy(hw[0], hw[1], targets, bias=hw[2], softcap=4.0, label_smoothing=0.1,
                                       reduction=reduction, chunk_size=8)
        loss.sum().backward()
        return [loss.detach()] + [t.grad for t in hw]

    for reduction in REDUCTIONS:
        cpu = run(reduction)
        with emulated_cuda.routed(["linear_cross_entropy", "linear_cross_entropy_backward"]):
            emu = run(reduction)
        for a, c in zip(emu, cpu):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_out_of_range_target_on_device_is_nan(emu):
    """The rule where targets cannot be read on the host (csrc/common/loss.h): that row's loss
    and gradient are NaN, the other rows are untouched. Run through the emulated CUDA op, which
    does not read target values on the host; the CPU op raises instead."""
    hidden, weight, targets, _ = inputs(5, 8, 13, torch.float64, seed=14)
    targets[2] = 13
    loss, gh, gw, gb = emu.linear_cross_entropy(hidden, weight, targets, None, -100, 0.0, 0.0, "none", False, 0)
    assert loss[2].isnan() and not loss[[0, 1, 3, 4]].isnan().any()
    gh, gw, gb = emu.linear_cross_entropy_backward(torch.ones(5, dtype=torch.float64), hidden, weight, targets, None,
                                                   -100, 0.0, 0.0, "none", 0)
    assert gh[2].isnan().all() and not gh[[0, 1, 3, 4]].isnan().any()
    ok = torch.tensor([0, 1, 3, 4])
    r = ref.linear_cross_entropy(hidden[ok], weight, targets[ok], reduction="none")
    assert rel(loss[ok], r) < 1e-12
    with pytest.raises(RuntimeError, match="targets: expected values in"):
        OPS.linear_cross_entropy(hidden, weight, targets, None, -100, 0.0, 0.0, "none", False, 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    hidden, weight, targets, b = inputs(6, 5, 7, torch.float64, seed=15, bias=True, ignore_frac=0.2)
    hw = [t.clone().requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bb):
        return pk.linear_cross_entropy(h, w, targets, bias=bb, reduction=reduction, label_smoothing=0.1,
                                       softcap=3.0, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(hw))


def test_opcheck():
    hidden, weight, targets, b = inputs(9, 6, 23, torch.float32, seed=16, bias=True, ignore_frac=0.2)
    hr, wr, br = (t.clone().requires_grad_() for t in (hidden, weight, b))
    for reduction in REDUCTIONS:
        for bias in (None, br):
            for compute_grad in ((False, True) if reduction != "none" else (False,)):
                for grads in (7, 5, 2):
                    torch.library.opcheck(OPS.linear_cross_entropy.default,
                                          (hr, wr, targets, bias, -100, 0.1, 2.0, reduction, compute_grad, 4, grads))
            grad = torch.ones(9) if reduction == "none" else torch.tensor(1.5)
            for grads in (7, 1):
                torch.library.opcheck(OPS.linear_cross_entropy_backward.default,
                                      (grad, hidden, weight, targets, None if bias is None else b, -100, 0.1, 2.0,
                                       reduction, 4, grads))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    hidden, weight, targets, b = inputs(11, 8, 37, torch.float32, seed=17, bias=True, ignore_frac=0.2)

    def f(h, w, bb, t):
        return pk.linear_cross_entropy(h, w, t, bias=bb, reduction=reduction, softcap=5.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    hw = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = compiled(*hw, targets)
    out.backward()
    hw2 = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out2 = f(*hw2, targets)
    out2.backward()
    torch.testing.assert_close(out, out2)
    for a, c in zip(hw, hw2):
        torch.testing.assert_close(a.grad, c.grad)


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    hidden, weight, targets, b = inputs(10, 8, 29, torch.float32, seed=18, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pk.linear_cross_entropy(hidden, weight, targets, bias=b)
        raw = OPS.linear_cross_entropy(hidden, weight, targets, b, -100, 0.0, 0.0, "mean", False, 0)[0]
    expect = pk.linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, bias=b.bfloat16())
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expect) and torch.equal(raw, expect)


def test_double_backward_and_forward_mode_raise():
    hidden, weight, targets, _ = inputs(4, 3, 5, torch.float64, seed=19)
    h = hidden.clone().requires_grad_()
    for reduction in ("mean", "none"):
        loss = pk.linear_cross_entropy(h, weight, targets, reduction=reduction).sum()
        (g,) = torch.autograd.grad(loss, h, create_graph=True)
        if reduction == "none":  # the gradient comes from the backward op, which has no derivative
            with pytest.raises(NotImplementedError, match="pk.linear_cross_entropy"):
                g.sum().backward()
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: pk.linear_cross_entropy(x, weight, targets), (hidden,), (torch.ones_like(hidden),))


def test_auto_chunk_size_matches_the_op():
    assert L.auto_chunk_size(8192, 32768) == 1024
    assert L.auto_chunk_size(8192, 128256) == 512
    assert L.auto_chunk_size(100, 50) == 100
    assert L.auto_chunk_size(100000, 50) == 4096


# ---- bad input ------------------------------------------------------------------------------


def _good():
    hidden, weight, targets, b = inputs(4, 6, 9, torch.float32, seed=20, bias=True)
    return dict(hidden=hidden, weight=weight, targets=targets, bias=b)


BAD_PY = [
    ("hidden", lambda a: a.update(hidden=a["hidden"].long()), TypeError),
    ("hidden", lambda a: a.update(hidden=torch.tensor(1.0)), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"][0]), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"].double()), TypeError),
    ("weight", lambda a: a.update(weight=a["weight"][:, :5]), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"].to("meta")), ValueError),
    ("weight", lambda a: a.update(weight=a["weight"][:0], bias=None), ValueError),
    ("targets", lambda a: a.update(targets=a["targets"].float()), TypeError),
    ("targets", lambda a: a.update(targets=a["targets"][:3]), ValueError),
    ("targets", lambda a: a.update(targets=torch.tensor([0, 1, 9, 2])), ValueError),
    ("targets", lambda a: a.update(targets=torch.tensor([0, 1, -1, 2])), ValueError),
    ("bias", lambda a: a.update(bias=a["bias"][:5]), ValueError),
    ("bias", lambda a: a.update(bias=a["bias"].double()), TypeError),
    ("ignore_index", lambda a: a.update(ignore_index=1.5), TypeError),
    ("label_smoothing", lambda a: a.update(label_smoothing=1.5), ValueError),
    ("label_smoothing", lambda a: a.update(label_smoothing=-0.1), ValueError),
    ("label_smoothing", lambda a: a.update(label_smoothing=float("nan")), ValueError),
    ("label_smoothing", lambda a: a.update(label_smoothing="x"), TypeError),
    ("reduction", lambda a: a.update(reduction="avg"), ValueError),
    ("softcap", lambda a: a.update(softcap=0.0), ValueError),
    ("softcap", lambda a: a.update(softcap=-1.0), ValueError),
    ("softcap", lambda a: a.update(softcap=float("nan")), ValueError),
    ("softcap", lambda a: a.update(softcap=float("inf")), ValueError),
    ("chunk_size", lambda a: a.update(chunk_size=0), ValueError),
    ("chunk_size", lambda a: a.update(chunk_size=2.0), TypeError),
]


@pytest.mark.parametrize("name,edit,exc", BAD_PY, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_PY)])
def test_bad_input_python(name, edit, exc):
    a = _good()
    edit(a)
    with pytest.raises(exc, match=name):
        pk.linear_cross_entropy(a.pop("hidden"), a.pop("weight"), a.pop("targets"), **a)


def _raw(a):
    return (a["hidden"], a["weight"], a["targets"], a["bias"], a.get("ignore_index", -100),
            a.get("label_smoothing", 0.0), a.get("softcap", 0.0), a.get("reduction", "mean"),
            a.get("compute_grad", False), a.get("chunk_size", 0))


BAD_RAW = [
    ("hidden", lambda a: a.update(hidden=a["hidden"][None])),
    ("hidden", lambda a: a.update(hidden=a["hidden"].long())),
    ("weight", lambda a: a.update(weight=a["weight"].double())),
    ("weight", lambda a: a.update(weight=a["weight"][:, :5])),
    ("targets", lambda a: a.update(targets=a["targets"].float())),
    ("targets", lambda a: a.update(targets=a["targets"][:3])),
    ("targets", lambda a: a.update(targets=torch.tensor([0, 1, 9, 2]))),
    ("bias", lambda a: a.update(bias=a["bias"][:5])),
    ("label_smoothing", lambda a: a.update(label_smoothing=1.5)),
    ("label_smoothing", lambda a: a.update(label_smoothing=float("nan"))),
    ("softcap", lambda a: a.update(softcap=-1.0)),
    ("softcap", lambda a: a.update(softcap=float("nan"))),
    ("reduction", lambda a: a.update(reduction="avg")),
    ("chunk_size", lambda a: a.update(chunk_size=-1)),
    ("compute_grad", lambda a: a.update(reduction="none", compute_grad=True)),
]


@pytest.mark.parametrize("name,edit", BAD_RAW, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_RAW)])
def test_bad_input_raw_op(name, edit):
    a = _good()
    edit(a)
    with pytest.raises(RuntimeError, match=name):
        OPS.linear_cross_entropy(*_raw(a))


def test_bad_grad_loss_raw_op():
    a = _good()
    args = _raw(a)[:4] + (-100, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_loss"):
        OPS.linear_cross_entropy_backward(torch.ones(4), *args, "mean", 0)
    with pytest.raises(RuntimeError, match="grad_loss"):
        OPS.linear_cross_entropy_backward(torch.tensor(1.0), *args, "none", 0)
    with pytest.raises(RuntimeError, match="grad_loss"):
        OPS.linear_cross_entropy_backward(torch.ones(4, dtype=torch.int64), *args, "none", 0)


def test_backward_twice_through_a_retained_graph():
    """The first backward of "mean"/"sum" scales the forward's gradients in place; a second one
    through the same graph recomputes them."""
    hidden, weight, targets, b = inputs(9, 6, 23, torch.float32, seed=21, bias=True, ignore_frac=0.2)
    hw = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    loss = pk.linear_cross_entropy(hw[0], hw[1], targets, bias=hw[2], reduction="sum")
    first = torch.autograd.grad(loss * 2.0, hw, retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, hw)
    for a, c in zip(first, second):
        torch.testing.assert_close(a * 1.5, c)
    rw = [t.clone().double().requires_grad_() for t in (hidden, weight, b)]
    want = torch.autograd.grad(ref.linear_cross_entropy(rw[0], rw[1], targets, bias=rw[2], reduction="sum") * 3.0, rw)
    for c, r in zip(second, want):
        assert rel(c, r) < 2e-5
