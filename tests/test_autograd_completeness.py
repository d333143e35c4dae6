"""Autograd beyond the first backward, and the backward's `deterministic` argument, for every
differentiable public function (pk.flash_attention dense / varlen / return_lse,
pk.scaled_dot_product_attention, pk.diffusion_loss):

- reverse mode composes: torch.func.grad, vjp, jacrev and vmap over grad give the gradients of
  the float64 reference (and of a loop over the batch, for vmap; the attention ops have vmap
  rules, pk.diffusion_loss runs through torch's per-sample fallback);
- what is not implemented raises NotImplementedError naming the function instead of returning
  zeros: double backward (torch.autograd.grad of a gradient, torch.func.grad of torch.func.grad,
  gradgradcheck) and forward mode (torch.func.jvp, jacfwd, torch.autograd.forward_ad), through
  the public functions and through the raw ops;
- deterministic=True/False reaches flash_attn_bwd (eager, opcheck, the backward graph of
  torch.compile(fullgraph=True)) and changes nothing on the CPU, whose backward is always
  deterministic. The CUDA side (no atomics, the same bits run to run) is in
  test_attention_cuda_emulated.py and test_attention_cuda.py."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import pretrain_kernels as pk
import reference

OPS = torch.ops.pretrain_kernels
DOUBLE = "double backward is not supported"
FORWARD = "forward-mode AD"


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _varlen_inputs(dtype=torch.float64):
    lens_q, lens_k = [3, 1, 6], [4, 5, 6]
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9, 15], dtype=torch.int32)
    assert cu_q[-1] == sum(lens_q) and cu_k[-1] == sum(lens_k)
    q, k, v = rand(10, 4, 8, dtype=dtype, seed=1), rand(15, 2, 8, dtype=dtype, seed=2), rand(15, 2, 8, dtype=dtype,
                                                                                            seed=3)
    return q, k, v, cu_q, cu_k


def _mask():
    return rand(1, 1, 5, 7, seed=9) > -0.8  # bool, some rows partly masked


# Each case: (name, fn(q, k, v) -> a tensor, reference fn in float64, inputs). fn takes the
# three differentiable inputs; everything else is closed over.
def _cases(dtype=torch.float64, deterministic=False):
    dense = (rand(2, 5, 4, 8, dtype=dtype, seed=4), rand(2, 7, 2, 8, dtype=dtype, seed=5),
             rand(2, 7, 2, 8, dtype=dtype, seed=6))
    q, k, v, cu_q, cu_k = _varlen_inputs(dtype)
    sdpa_in = tuple(t.transpose(1, 2).contiguous() for t in dense)  # (B, H, L, E)
    mask = _mask()

    def lse_fn(a, b, c):
        out, lse = pk.flash_attention(a, b, c, causal=True, return_lse=True, deterministic=deterministic)
        return out.sum(-1).transpose(1, 2) * 0.5 + lse.masked_fill(torch.isinf(lse), 0)

    def lse_ref(a, b, c):
        out, lse = reference.attention_ref(a, b, c, causal=True)
        return out.sum(-1).transpose(1, 2) * 0.5 + lse.masked_fill(torch.isinf(lse), 0)

    def sdpa_ref(a, b, c):
        t = [x.transpose(1, 2) for x in (a, b, c)]
        m = mask.expand(a.shape[0], a.shape[1], -1, -1)
        return reference.attention_ref(*t, attn_mask=m, bottom_right=False)[0].transpose(1, 2)

    return [
        ("flash_attention", lambda a, b, c: pk.flash_attention(a, b, c, causal=True, window=(3, -1),
                                                               deterministic=deterministic),
         lambda a, b, c: reference.attention_ref(a, b, c, causal=True, window=(3, -1))[0], dense),
        ("flash_attention-varlen", lambda a, b, c: pk.flash_attention(
            a, b, c, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, deterministic=deterministic),
         lambda a, b, c: reference.attention_varlen_ref(a, b, c, cu_q, cu_k, causal=True)[0], (q, k, v)),
        ("flash_attention-return_lse", lse_fn, lse_ref, dense),
        ("scaled_dot_product_attention", lambda a, b, c: pk.scaled_dot_product_attention(
            a, b, c, attn_mask=mask, enable_gqa=True, deterministic=deterministic), sdpa_ref, sdpa_in),
    ]


CASE_NAMES = [c[0] for c in _cases()]


def _case(name, **kw):
    return next(c for c in _cases(**kw) if c[0] == name)


def _public_name(name):
    return "pk.scaled_dot_product_attention" if name.startswith("scaled") else "pk.flash_attention"


def _ref_grads(ref, xs, cot):
    xs = [x.detach().double().requires_grad_() for x in xs]
    return torch.autograd.grad(ref(*xs), xs, cot.double())


# ---- reverse mode composes -------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_func_grad_and_vjp_match_reference(name):
    _, fn, ref, xs = _case(name)
    cot = torch.randn_like(fn(*xs), dtype=torch.float64)
    want = _ref_grads(ref, xs, cot)
    got_grad = torch.func.grad(lambda a, b, c: (fn(a, b, c) * cot).sum(), argnums=(0, 1, 2))(*xs)
    out, vjp = torch.func.vjp(fn, *xs)
    got_vjp = vjp(cot)
    torch.testing.assert_close(out, ref(*xs))
    for a, b, w in zip(got_grad, got_vjp, want):
        torch.testing.assert_close(a, w, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(b, w, atol=1e-10, rtol=1e-8)
    # a first derivative with create_graph=True (what torch.func.grad does) is not an error
    ys = [x.detach().requires_grad_() for x in xs]
    g = torch.autograd.grad(fn(*ys), ys, cot, create_graph=True)
    for a, w in zip(g, want):
        torch.testing.assert_close(a, w, atol=1e-10, rtol=1e-8)


@pytest.mark.filterwarnings("error:There is a performance drop")  # the ops' own vmap rules, not torch's fallback
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_vmap_over_grad_matches_a_loop(name, which):
    """vmap over a batch of one input: dense calls fold the vmapped dim into the batch (one op
    call), varlen calls run per sample; either way the gradients are those of a Python loop."""
    _, fn, _, xs = _case(name)
    batch = torch.stack([xs[which], rand(*xs[which].shape, seed=20), rand(*xs[which].shape, seed=21)])

    def loss(a):
        args = list(xs)
        args[which] = a
        return (fn(*args) ** 2).sum()

    got = torch.func.vmap(torch.func.grad(loss))(batch)
    want = torch.stack([torch.func.grad(loss)(a) for a in batch])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert got.abs().sum() > 0
    # the forward alone, vmapped over a dim that is not the first
    qs = torch.stack([xs[0], rand(*xs[0].shape, seed=22)], dim=1)
    got = torch.func.vmap(lambda a: fn(a, *xs[1:]), in_dims=1)(qs)
    torch.testing.assert_close(got, torch.stack([fn(qs.select(1, j), *xs[1:]) for j in range(2)]), atol=1e-12,
                               rtol=1e-10)


def test_jacrev_matches_reference():
    _, fn, ref, (q, k, v) = _case("flash_attention")
    q = q[:1, :3]
    k, v = k[:1], v[:1]
    got = torch.func.jacrev(lambda a: fn(a, k, v))(q)
    want = torch.autograd.functional.jacobian(lambda a: ref(a, k, v), q)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


# ---- double backward and forward mode raise --------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_double_backward_raises(name):
    _, fn, _, xs = _case(name)
    ys = [x.detach().requires_grad_() for x in xs]
    g = torch.autograd.grad(fn(*ys).sum(), ys, create_graph=True)
    assert g[0].requires_grad
    with pytest.raises(NotImplementedError, match=f"{_public_name(name)}.*{DOUBLE}"):
        torch.autograd.grad(sum((t ** 2).sum() for t in g), ys)
    with pytest.raises(NotImplementedError, match=DOUBLE):
        torch.func.grad(lambda a: torch.func.grad(lambda b: fn(b, *xs[1:]).sum())(a).sum())(xs[0])


def test_gradgradcheck_raises():
    xs = [rand(1, 2, 1, 2, seed=s).requires_grad_() for s in (60, 61, 62)]
    with pytest.raises(NotImplementedError, match=f"pk.flash_attention.*{DOUBLE}"):
        torch.autograd.gradgradcheck(lambda a, b, c: pk.flash_attention(a, b, c, causal=True), xs)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_mode_raises(name):
    _, fn, _, xs = _case(name)
    tangents = tuple(torch.ones_like(x) for x in xs)
    match = f"{_public_name(name)}.*{FORWARD}"
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jvp(fn, xs, tangents)
    with pytest.raises(NotImplementedError, match=match):
        torch.func.jacfwd(lambda a: fn(a, *xs[1:]))(xs[0])
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=match):
            fn(fwAD.make_dual(xs[0], tangents[0]), *xs[1:])
        # no tangent anywhere: the level alone is no error
        torch.testing.assert_close(fn(*xs), fn(*[x.clone() for x in xs]))


def _raw_fwd(q, k, v):
    return OPS.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 0.3, -1, 0, True)[0]


def test_raw_ops_do_not_give_silent_zeros():
    """Direct op calls: first derivatives work (gradcheck), double backward and forward mode
    raise, and under torch.func transforms the op sends the caller to the public function."""
    xs = [rand(1, 3, 2, 4, seed=s).requires_grad_() for s in (30, 31, 32)]
    assert torch.autograd.gradcheck(_raw_fwd, xs)
    g = torch.autograd.grad(_raw_fwd(*xs).sum(), xs, create_graph=True)
    with pytest.raises(NotImplementedError, match=f"pk.flash_attention.*{DOUBLE}.*flash_attn_bwd"):
        torch.autograd.grad(g[0].sum(), xs)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=f"flash_attn_fwd.*{FORWARD}"):
            _raw_fwd(fwAD.make_dual(xs[0].detach(), torch.ones(1, 3, 2, 4, dtype=torch.float64)), *xs[1:])
    with pytest.raises(NotImplementedError, match="call pk.flash_attention"):
        torch.func.grad(lambda a: _raw_fwd(a, *xs[1:]).sum())(xs[0].detach())
    # the backward op differentiated directly
    out, lse = OPS.flash_attn_fwd(*[x.detach() for x in xs], None, None, None, -1, -1, 0.3, -1, 0, True)
    dout = torch.ones_like(out).requires_grad_()
    dq, _, _ = OPS.flash_attn_bwd(dout, *[x.detach() for x in xs], out, lse, None, None, None, None, -1, -1, 0.3, -1,
                                  0, True, deterministic=True)
    with pytest.raises(NotImplementedError, match=DOUBLE):
        dq.sum().backward()


# ---- pk.diffusion_loss -----------------------------------------------------------------------


def _loss_inputs():
    pred, target = rand(3, 2, 5, seed=40), rand(3, 2, 5, seed=41)
    t = torch.tensor([10, 500, 999])
    acp = pk.noise_schedule("linear", 1000)
    return pred, target, t, acp


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_diffusion_loss_reverse_mode_composes(weighting):
    pred, target, t, acp = _loss_inputs()

    def fn(p, y):
        return pk.diffusion_loss(p, y, t, acp, weighting=weighting, reduction="none")

    def ref(p, y):
        return reference.diffusion_loss(p, y, t, acp, weighting=weighting, reduction="none")

    cot = rand(3, seed=42)
    want = _ref_grads(ref, (pred, target), cot)
    got = torch.func.grad(lambda p, y: (fn(p, y) * cot).sum(), argnums=(0, 1))(pred, target)
    _, vjp = torch.func.vjp(fn, pred, target)
    for a, b, w in zip(got, vjp(cot), want):
        torch.testing.assert_close(a, w, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(b, w, atol=1e-12, rtol=1e-10)
    preds = torch.stack([pred, rand(3, 2, 5, seed=43)])
    with pytest.warns(UserWarning, match="batching rule"):
        vm = torch.func.vmap(torch.func.grad(lambda p: fn(p, target).sum()))(preds)
    torch.testing.assert_close(vm, torch.stack([torch.func.grad(lambda p: fn(p, target).sum())(p) for p in preds]))


def test_diffusion_loss_double_backward_and_forward_mode_raise():
    pred, target, t, acp = _loss_inputs()
    p, y = pred.clone().requires_grad_(), target.clone().requires_grad_()
    gp, gy = torch.autograd.grad(pk.diffusion_loss(p, y, t, acp, weighting="min_snr"), (p, y), create_graph=True)
    for g in (gp, gy):  # gy = -gp: through a torch op, then the backward op
        with pytest.raises(NotImplementedError, match=f"pk.diffusion_loss: {DOUBLE}"):
            torch.autograd.grad(g.sum(), (p, y), retain_graph=True)
    with pytest.raises(NotImplementedError, match=f"pk.diffusion_loss.*{FORWARD}"):
        torch.func.jvp(lambda a: pk.diffusion_loss(a, target), (pred,), (torch.ones_like(pred),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=f"pk.diffusion_loss.*{FORWARD}"):
            OPS.diffusion_loss(fwAD.make_dual(pred, torch.ones_like(pred)), target, None, None, "none", 5.0,
                               "epsilon")


# ---- deterministic= --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_cpu_backward_identical_either_way(name, dtype):
    """The CPU backward is deterministic: the flag changes no bit, and two runs agree."""
    runs = []
    for deterministic in (True, False, True):
        _, fn, _, xs = _case(name, dtype=dtype, deterministic=deterministic)
        ys = [x.detach().requires_grad_() for x in xs]
        out = fn(*ys)
        runs.append((out, *torch.autograd.grad(out, ys, torch.ones_like(out))))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def _bwd_flags(fn, *xs):
    """The `deterministic` arguments of the flash_attn_bwd calls in the backward graphs that
    torch.compile(fullgraph=True) builds for fn, and the gradients it computes."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    ys = [x.detach().requires_grad_() for x in xs]
    out = torch.compile(fn, fullgraph=True, backend=backend)(*ys)
    grads = torch.autograd.grad(out, ys, torch.ones_like(out))
    schema = OPS.flash_attn_bwd.default._schema
    at = [a.name for a in schema.arguments].index("deterministic")
    default = schema.arguments[at].default_value  # a graph omits an argument equal to its default
    flags = [n.args[at] if len(n.args) > at else n.kwargs.get("deterministic", default)
             for gm in backend.bw_graphs for n in gm.graph.nodes
             if n.op == "call_function" and n.target is OPS.flash_attn_bwd.default]
    return flags, grads


@pytest.mark.parametrize("name", ["flash_attention", "flash_attention-varlen", "scaled_dot_product_attention"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_compile_passes_the_flag_to_the_backward_op(name, deterministic):
    _, fn, _, xs = _case(name, dtype=torch.float32, deterministic=deterministic)
    flags, grads = _bwd_flags(fn, *xs)
    assert flags == [deterministic]
    ys = [x.detach().requires_grad_() for x in xs]
    out = fn(*ys)
    for a, b in zip(grads, torch.autograd.grad(out, ys, torch.ones_like(out))):
        torch.testing.assert_close(a, b)


def test_raw_op_autograd_passes_false():
    """A direct flash_attn_fwd call differentiates with deterministic=False, the public default."""
    xs = [rand(1, 6, 2, 8, dtype=torch.float32, seed=s) for s in (50, 51, 52)]
    flags, grads = _bwd_flags(_raw_fwd, *xs)
    assert flags == [False]
    ys = [x.detach().requires_grad_() for x in xs]
    for a, b in zip(grads, torch.autograd.grad(_raw_fwd(*ys).sum(), ys)):
        torch.testing.assert_close(a, b)


def test_deterministic_must_be_a_bool():
    q = rand(1, 3, 2, 8)
    for bad in (1, None, "yes", torch.tensor(True)):
        with pytest.raises(TypeError, match="deterministic: expected a bool"):
            pk.flash_attention(q, q, q, deterministic=bad)
        with pytest.raises(TypeError, match="deterministic: expected a bool"):
            pk.scaled_dot_product_attention(q, q, q, deterministic=bad)
    with pytest.raises(TypeError):  # keyword-only in the SDPA drop-in: torch's positional signature stays
        pk.scaled_dot_product_attention(q, q, q, None, 0.0, False, None, False, True)


def test_vmap_with_dropout_matches_a_loop():
    """With dropout each vmapped sample runs alone, so it draws the keep mask of a plain call
    with the same seed (a folded batch would key the mask by other sequence indices)."""
    xs = [rand(3, 2, 9, 2, 8, dtype=torch.float32, seed=s) for s in (21, 22, 23)]
    fn = lambda a, b, c: pk.flash_attention(a, b, c, causal=True, dropout_p=0.3, seed=7)  # noqa: E731
    got = torch.func.vmap(fn)(*xs)
    want = torch.stack([fn(*(x[i] for x in xs)) for i in range(3)])
    assert torch.equal(got, want)
    grads = torch.func.vmap(torch.func.grad(lambda a, b, c: fn(a, b, c).sum(), argnums=(0, 1, 2)))(*xs)
    for n, g in enumerate(grads):
        loop = torch.stack([torch.func.grad(lambda a, b, c: fn(a, b, c).sum(), argnums=n)(*(x[i] for x in xs))
                            for i in range(3)])
        torch.testing.assert_close(g, loop, rtol=1e-6, atol=1e-6)


def test_compile_without_inputs_that_require_grad():
    """torch.compile(fullgraph=True) traces the op directly when no input needs a gradient (and
    the Function when one does), so inference under torch.compile works."""
    q, k, v = (rand(1, 8, 2, 16, dtype=torch.float32, seed=s) for s in (31, 32, 33))
    fn = torch.compile(lambda a, b, c: pk.flash_attention(a, b, c, causal=True), fullgraph=True)
    assert torch.equal(fn(q, k, v), pk.flash_attention(q, k, v, causal=True))
    qg = q.clone().requires_grad_()
    with torch.no_grad():
        assert torch.equal(fn(qg, k, v), pk.flash_attention(q, k, v, causal=True))
    fn(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
