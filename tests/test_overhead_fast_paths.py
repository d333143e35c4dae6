"""The wrappers' fast paths (plain calls go to the op with the checks it makes left to it) give
the results of the full path bit for bit, and bad input still raises the wrapper's error."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain_kernels as pk


class _SeenDispatch(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python key (a torch dispatch mode)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim): decode, GQA, odd sizes, a prefill
SHAPES = [(1, 1, 1, 8, 8, 64), (2, 1, 17, 8, 2, 32), (3, 5, 9, 4, 1, 7), (1, 33, 63, 2, 2, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_fast_path_matches_full_path(dtype, shape, causal):
    g = torch.Generator().manual_seed(hash((shape, causal)) % 2**31)
    B, Sq, Sk, H, Hk, D = shape
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    scale = 1 / math.sqrt(D)  # an explicit scale takes the full path
    out, lse = pk.flash_attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = pk.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    # non-contiguous views (the SDPA layout transposed)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = pk.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    ref = pk.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True, scale=scale)
    assert torch.equal(out, ref)
    kc = torch.randn(B, Sk + 3, Hk, D, generator=g).to(dtype)
    vc = torch.randn(B, Sk + 3, Hk, D, generator=g).to(dtype)
    lens = torch.randint(0, Sk + 4, (B,), generator=g, dtype=torch.int32)
    out, lse = pk.flash_attention_with_kvcache(q, kc, vc, lens, causal=causal, return_lse=True)
    ref, ref_lse = pk.flash_attention_with_kvcache(q, kc, vc, lens, causal=causal, scale=scale, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_attention_fast_path_errors():
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention(q, q, q[..., :32])  # the op allows another head_dim for v; the API does not
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention(q, q[..., :32], q)
    with pytest.raises(TypeError, match="one dtype"):
        pk.flash_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="q: expected float32"):
        pk.flash_attention(q.int(), q, q)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        pk.flash_attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="enable_gqa"):
        pk.scaled_dot_product_attention(torch.randn(1, 4, 1, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    lens = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        pk.flash_attention_with_kvcache(q, q, q[..., :32], lens)
    with pytest.raises(TypeError, match="cache_seqlens"):
        pk.flash_attention_with_kvcache(q, q, q, lens.long())


def test_attention_fast_path_keeps_autograd():
    q = torch.randn(1, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    pk.flash_attention(q, q, q).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_denoising_checks_after_the_op():
    x0, n = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    acp = pk.noise_schedule("linear")
    t = torch.tensor([10, 500])
    with pytest.raises(ValueError, match="model_output: expected shape"):
        pk.ddpm_step(x0[:1], n, t, t, acp, seed=1)
    with pytest.raises(ValueError, match="timesteps: expected values below 1000"):
        pk.ddim_step(x0, n, t + 1000, t, acp)
    with pytest.raises(TypeError, match="alphas_cumprod: expected a tensor"):
        pk.add_noise(x0, n, t, acp.tolist())
    with pytest.raises(ValueError, match="alphas_cumprod: expected values in"):
        pk.ddpm_step(x0, n, t, t, acp * 2, seed=1)
    with pytest.raises(ValueError, match="sigma: expected finite values > 0"):
        pk.euler_step(x0, n, torch.tensor([1.0, -1.0]), 0.5)
    with pytest.raises(TypeError, match="sigma: expected a float32"):
        pk.flow_match_step(x0, n, torch.tensor([True, False]), 0.5)
    with pytest.raises(ValueError, match="prev_x0: expected shape"):
        pk.dpmpp_2m_step(x0, n, 2.0, 1.0, prev_x0=x0[:1], sigma_prev=3.0)
    with pytest.raises(ValueError, match="target: expected shape"):
        pk.diffusion_loss(x0, n[:1])


def test_special_ids_cache_keeps_type_checks():
    ids = torch.randint(5, 100, (2, 16))
    a = pk.mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=[1, 2], seed=0)
    b = pk.mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=(2, 1), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError, match="special_token_ids"):
        pk.mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=[True, 2], seed=0)
    with pytest.raises(TypeError, match="special_token_ids"):
        pk.mlm_mask(ids, mask_token_id=3, vocab_size=100, special_token_ids=[[1], 2], seed=0)


class _SeenOps(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_op_calls_keep_torch_function_modes():
    """The wrappers' boxed op calls (ops/_common.py) step aside for a torch function mode: the
    mode sees the op, and the result is the one without it."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g)
    x = torch.randn(2, 7, 16, generator=g)
    q = torch.randn(1, 1, 4, 16, generator=g)
    calls = {
        "pretrain_kernels.sample": lambda: pk.sample(logits, seed=1),
        "pretrain_kernels.rms_norm": lambda: pk.rms_norm(x, torch.ones(16)),
        "pretrain_kernels.add_noise": lambda: pk.add_noise(x, x, torch.tensor([3, 9]), pk.noise_schedule("linear"))[0],
        "pretrain_kernels.flash_attn_fwd": lambda: pk.flash_attention(q, q, q),
    }
    for name, call in calls.items():
        ref = call()
        with _SeenOps() as mode:
            out = call()
        assert torch.equal(out, ref), name
        assert any(s.startswith(name) for s in mode.seen), (name, mode.seen)


def test_attention_direct_entry():
    """pretrain_kernels._C.attention_fwd_plain (csrc/module.cpp), the CPU fast path past the
    dispatcher: the op's result bit for bit where it takes the call, NotImplemented wherever the
    dispatcher would not go straight to the CPU kernel (a derivative to record, autocast, a torch
    dispatch mode), and still seen by the profiler under the op's name."""
    from torch.profiler import ProfilerActivity, profile
    from pretrain_kernels import _C

    g = torch.Generator().manual_seed(5)
    op = torch.ops.pretrain_kernels.flash_attn_fwd
    for dtype in DTYPES:
        q = torch.randn(2, 3, 4, 16, generator=g).to(dtype)
        k = torch.randn(2, 7, 2, 16, generator=g).to(dtype)
        v = torch.randn(2, 7, 2, 16, generator=g).to(dtype)
        for wr, bottom_right in ((-1, True), (0, True), (0, False)):
            out, lse = _C.attention_fwd_plain(q, k, v, 0.3, wr, bottom_right, False)
            ref, ref_lse = op(q, k, v, None, None, None, -1, -1, 0.3, -1, wr, bottom_right)
            assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out, lse = _C.attention_fwd_plain(qt, kt, vt, 0.3, wr, bottom_right, True)
            assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    q = torch.randn(1, 2, 4, 16, generator=g)
    args = (q, q, q, 0.25, -1, True, False)
    assert _C.attention_fwd_plain(q.requires_grad_(), q, q, 0.25, -1, True, False) is NotImplemented
    with torch.no_grad():
        assert _C.attention_fwd_plain(q, q, q, 0.25, -1, True, False) is not NotImplemented
    q = q.detach()
    args = (q, q, q, 0.25, -1, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _C.attention_fwd_plain(*args) is NotImplemented
        assert pk.flash_attention(q, q, q).dtype == torch.bfloat16  # the op's autocast kernel ran

    with _SeenDispatch() as mode:
        assert _C.attention_fwd_plain(*args) is NotImplemented
        pk.flash_attention(q, q, q)
    assert any(s.startswith("pretrain_kernels.flash_attn_fwd") for s in mode.ops), mode.ops
    assert _C.attention_fwd_plain(q, q, q[..., :3, :], 0.25, -1, True, False) is NotImplemented  # k, v mismatch
    assert _C.attention_fwd_plain(q.int(), q, q, 0.25, -1, True, False) is NotImplemented
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pk.flash_attention(q, q, q)
    assert any(e.name == "pretrain_kernels::flash_attn_fwd" for e in prof.events())


def test_masking_direct_entries():
    """pretrain_kernels._C.mlm_mask_direct / span_mask_direct (csrc/module.cpp): the ops' results
    bit for bit on the ops' own arguments, NotImplemented where the dispatcher would not go
    straight to the CPU kernel (a torch dispatch mode) or the kernel's checks fail; pk.mlm_mask
    under a mode still reaches the op."""
    from pretrain_kernels import _C

    g = torch.Generator().manual_seed(11)
    ops = torch.ops.pretrain_kernels
    seed = torch.tensor([1234], dtype=torch.int64)
    for dtype in (torch.int32, torch.int64):
        ids = torch.randint(0, 500, (5, 67), generator=g).to(dtype)
        attn = (torch.rand(5, 67, generator=g) > 0.2).long()
        words = torch.rand(5, 67, generator=g) > 0.5
        special = torch.tensor([0, 1, 2, 3])
        rows = torch.rand(5, generator=g)
        for a, sp, w, r, exact in ((None, None, None, None, False), (attn, special, None, None, False),
                                   (attn.bool(), special, words, None, True), (None, special, None, rows, False)):
            args = (ids, a, sp, w, r, seed, 0.3, 3, 500, 0.8, 0.1, exact, 0)
            out = _C.mlm_mask_direct(*args)
            ref = ops.mlm_mask(*args)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
            sargs = (ids, a if a is None else a.bool(), sp, w, r, seed, 0.3, 3, 500, 0.8, 0.1, 0.2, 10)
            out = _C.span_mask_direct(*sargs)
            ref = ops.span_mask(*sargs)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    ids = torch.randint(0, 500, (2, 9), generator=g)
    args = (ids, None, None, None, None, seed, 0.3, 3, 500, 0.8, 0.1, False, 0)
    assert _C.mlm_mask_direct(ids, None, None, None, None, seed, 0.3, 600, 500, 0.8, 0.1, False, 0) is NotImplemented
    assert _C.mlm_mask_direct(ids.float(), *args[1:]) is NotImplemented
    assert _C.mlm_mask_direct(*args[:6], 1, *args[7:]) is NotImplemented  # an int where the op takes a float

    ref = pk.mlm_mask(ids, mask_token_id=3, vocab_size=500, seed=5)
    with _SeenDispatch() as mode:
        assert _C.mlm_mask_direct(*args) is NotImplemented
        out = pk.mlm_mask(ids, mask_token_id=3, vocab_size=500, seed=5)
    assert any(s.startswith("pretrain_kernels.mlm_mask") for s in mode.ops), mode.ops
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_diffusion_loss_direct_entry():
    """pretrain_kernels._C.diffusion_loss_direct (csrc/module.cpp): the op's per-sample losses,
    or their mean as Tensor.mean gives it, bit for bit, for every dtype and weighting;
    NotImplemented for inputs that need a derivative, under autocast and a dispatch mode, and
    where the op's checks fail (pk.diffusion_loss then raises its own error); the profiler
    still sees the op."""
    from pretrain_kernels import _C

    g = torch.Generator().manual_seed(12)
    ops = torch.ops.pretrain_kernels
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((3, 4, 5, 5), (1, 7), (17, 2, 3)):
            pred = torch.randn(shape, generator=g).to(dtype)
            target = torch.randn(shape, generator=g).to(dtype)
            t = torch.randint(0, 1000, (shape[0],), generator=g)
            for weighting, ts, tab in (("none", None, None), ("min_snr", t, acp), ("min_snr", t, acp.float())):
                for prediction_type in ("epsilon", "v_prediction", "sample"):
                    args = (pred, target, ts, tab, weighting, 5.0, prediction_type)
                    ref = ops.diffusion_loss(*args)
                    assert torch.equal(_C.diffusion_loss_direct(*args, False), ref)
                    mean = _C.diffusion_loss_direct(*args, True)
                    assert mean.dim() == 0 and torch.equal(mean, ref.mean())
                    got = pk.diffusion_loss(pred, target, ts, tab, weighting=weighting,
                                            prediction_type=prediction_type)
                    assert torch.equal(got, ref.mean())
    pred, target = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    args = (pred, target, None, None, "none", 5.0, "epsilon")
    # a derivative to record, autocast, a dispatch mode: the dispatcher goes elsewhere
    assert _C.diffusion_loss_direct(pred.requires_grad_(), *args[1:], True) is NotImplemented
    with torch.no_grad():
        assert _C.diffusion_loss_direct(pred, *args[1:], True) is not NotImplemented
    pred = pred.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _C.diffusion_loss_direct(pred, *args[1:], True) is NotImplemented
    with _SeenDispatch() as mode:
        assert _C.diffusion_loss_direct(pred, *args[1:], True) is NotImplemented
        out = pk.diffusion_loss(pred, target)
    assert any(s.startswith("pretrain_kernels.diffusion_loss") for s in mode.ops), mode.ops
    assert torch.equal(out, pk.diffusion_loss(pred, target))
    # arguments of another type or values the op rejects
    assert _C.diffusion_loss_direct(pred, target, None, None, "none", 5, "epsilon", True) is NotImplemented
    assert _C.diffusion_loss_direct(pred, target[:1], None, None, "none", 5.0, "epsilon", True) is NotImplemented
    assert _C.diffusion_loss_direct(pred, target, None, None, "min_snr", 5.0, "epsilon", True) is NotImplemented
    with pytest.raises(ValueError, match="target"):
        pk.diffusion_loss(pred, target[:1])
    with pytest.raises(TypeError, match="expected the op's 7 arguments"):
        _C.diffusion_loss_direct(pred, target)
    with torch.profiler.profile() as prof:
        pk.diffusion_loss(pred, target)
    assert any(e.name == "pretrain_kernels::diffusion_loss" for e in prof.events())
