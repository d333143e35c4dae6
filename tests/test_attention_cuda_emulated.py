"""The CUDA attention kernels and launchers (csrc/cuda/attention_*.cu), compiled as C++ and run
on the CPU by the emulator of csrc/emu/ (one fiber per CUDA thread, warp-collective mma.sync
built from the PTX ISA's fragment layout, deferred cp.async, NaN-filled shared memory), against
the float64 reference and the CPU op. This runs the tensor-core and SIMT forward, the split-KV
combine, both backward paths and the kv-cache append on every change, without a GPU.

It is no substitute for a GPU run: timing, register use, races the emulator's scheduling does not
expose, and any difference between the PTX ISA's description and the hardware are out of its
reach (tests/test_attention_cuda.py covers those on a GPU)."""
import pytest
import torch

import emulated_cuda
from reference import (ATTN_ERR_FLOOR, ATTN_LSE_ATOL, assert_attention_matches, attention_ref, attention_varlen_ref,
                       contiguous_from_paged, kvcache_ref, paged_from_contiguous, rel_err, torch_sdpa)

FLOOR, LSE_ATOL = ATTN_ERR_FLOOR, ATTN_LSE_ATOL
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def _window(causal, window):
    left, right = window
    return left, 0 if causal else right


def fwd(ops, q, k, v, *, causal=False, window=(-1, -1), bottom_right=True, scale=None, mask=None, cu_q=None,
        cu_k=None, max_q=-1, max_k=-1, op_ns=None):
    left, right = _window(causal, window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (op_ns or ops).flash_attn_fwd(q, k, v, cu_q, cu_k, mask, max_q, max_k, scale, left, right, bottom_right)


# (B, Sq, Sk, H, Hk, D, causal, window, bottom_right): padded head dims, GQA/MQA, unequal
# lengths both ways, windows, rows that see no key, a decode-like row (split-KV), top-left.
FWD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), True),
    (1, 1, 1, 1, 1, 1, False, (-1, -1), True),
    (2, 70, 70, 4, 1, 8, True, (-1, -1), True),
    (1, 17, 150, 4, 2, 40, True, (-1, -1), True),
    (1, 150, 17, 2, 2, 96, True, (-1, -1), True),
    (1, 64, 129, 2, 2, 128, False, (32, 0), True),
    (1, 129, 64, 2, 1, 256, False, (16, 8), True),
    (2, 63, 63, 3, 1, 1, True, (5, -1), True),
    (1, 1, 300, 2, 2, 128, True, (-1, -1), True),
    (3, 7, 129, 6, 3, 40, False, (-1, 3), True),
    (1, 100, 100, 1, 1, 256, False, (20, 20), True),
    (1, 40, 90, 2, 1, 64, True, (-1, -1), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference_and_cpu_op(emu, case, dtype):
    B, sq, sk, H, Hk, D, causal, window, br = case
    g = torch.Generator().manual_seed(sq * 1000 + sk + D)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    out, lse = fwd(emu, q, k, v, causal=causal, window=window, bottom_right=br)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, sq) and lse.dtype == torch.float32
    ref, ref_lse = attention_ref(q, k, v, causal=causal, window=window, bottom_right=br)
    theirs = rel_err(torch_sdpa(q, k, v, causal=causal, window=window, bottom_right=br), ref)
    assert_attention_matches(out, lse, ref, ref_lse, theirs, dtype)
    out_c, lse_c = fwd(emu, q, k, v, causal=causal, window=window, bottom_right=br,
                       op_ns=torch.ops.pretrain_kernels)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), out_c.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_and_simt_paths_agree(emu, dtype, monkeypatch):
    """The same inputs through fwd_mma_kernel and fwd_rows_kernel (PK_ATTENTION_CUDA_PATH=simt),
    and through a pre-sm_80 device (SIMT too)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = rand(2, 77, 4, 64, dtype=dtype, gen=g), rand(2, 90, 2, 64, dtype=dtype, gen=g), rand(
        2, 90, 2, 64, dtype=dtype, gen=g)
    out_tc, lse_tc = fwd(emu, q, k, v, causal=True, window=(30, -1))
    monkeypatch.setenv("PK_ATTENTION_CUDA_PATH", "simt")
    out_s, lse_s = fwd(emu, q, k, v, causal=True, window=(30, -1))
    monkeypatch.delenv("PK_ATTENTION_CUDA_PATH")
    mod = emulated_cuda.load()
    mod.configure(major=7, sm_count=4)
    try:
        out_7, _ = fwd(emu, q, k, v, causal=True, window=(30, -1))
    finally:
        mod.configure(major=9, sm_count=4)
    torch.testing.assert_close(out_tc.float(), out_s.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_tc, lse_s, atol=2e-3, rtol=0)
    assert torch.equal(out_s, out_7)


@pytest.mark.parametrize("D, window", [(64, (200, -1)), (96, (-1, 40)), (128, (-1, -1))],
                         ids=["d64-window", "d96-window", "d128"])
def test_tall_and_short_blocks_agree(emu, D, window, monkeypatch):
    """128-row blocks (two m-tiles per warp) and 64-row blocks (PK_ATTENTION_FWD_BLOCK_M=64) on
    the same causal GQA inputs: both match the reference. Without a window both walk the same
    64-key tiles from key 0, so they give the same bits. A call with an attn_mask takes 64-row
    blocks."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(D)
    B, sq, sk, H, Hk = 2, 300, 310, 4, 2
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    mod = emulated_cuda.load()

    def run(block_m, mask=None):
        if block_m is None:
            monkeypatch.delenv("PK_ATTENTION_FWD_BLOCK_M", raising=False)
        else:
            monkeypatch.setenv("PK_ATTENTION_FWD_BLOCK_M", block_m)
        before = mod.stats()["blocks"]
        out, lse = fwd(emu, q, k, v, causal=True, window=window, mask=mask)
        return out, lse, mod.stats()["blocks"] - before

    out_t, lse_t, n_tall = run(None)
    out_s, lse_s, n_short = run("64")
    assert (n_tall, n_short) == (B * H * 3, B * H * 5)  # ceil(300 / 128), ceil(300 / 64) blocks per head
    ref, ref_lse = attention_ref(q, k, v, causal=True, window=window)
    theirs = rel_err(torch_sdpa(q, k, v, causal=True, window=window), ref)
    for out, lse in ((out_t, lse_t), (out_s, lse_s)):
        assert_attention_matches(out, lse, ref, ref_lse, theirs, dtype)
    if window == (-1, -1):
        assert torch.equal(out_t, out_s) and torch.equal(lse_t, lse_s)
    ones = torch.ones(B, H, sq, sk, dtype=torch.bool)
    out_m, lse_m, n_masked = run(None, mask=ones)
    assert n_masked == n_short
    assert torch.equal(out_m, out_s) and torch.equal(lse_m, lse_s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_kv_equals_unsplit(emu, dtype):
    """A grid too small for the device makes the launcher cut the keys into pieces (flash
    decoding) and merge them with combine_kernel; on a one-SM device the same grid fills it and
    the keys stay whole. Both equal the reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = rand(1, 3, 2, 64, dtype=dtype, gen=g), rand(1, 700, 2, 64, dtype=dtype, gen=g), rand(
        1, 700, 2, 64, dtype=dtype, gen=g)
    mod = emulated_cuda.load()
    res = []
    try:
        for sms in (64, 1):
            mod.configure(major=9, sm_count=sms)
            before = mod.stats()["launches"]
            res.append(fwd(emu, q, k, v, causal=True))
            res.append(mod.stats()["launches"] - before)
    finally:
        mod.configure(major=9, sm_count=4)
    (out_split, lse_split), n_split, (out_whole, lse_whole), n_whole = res
    assert n_split == 2 and n_whole == 1  # attention + combine, attention alone
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    for out, lse in ((out_split, lse_split), (out_whole, lse_whole)):
        assert rel_err(out, ref) <= 2 * max(rel_err(torch_sdpa(q, k, v, causal=True), ref), FLOOR[dtype])
        torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_and_scale(emu, dtype):
    g = torch.Generator().manual_seed(7)
    B, sq, sk, H, D = 2, 33, 50, 2, 40
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, H, D, dtype=dtype, gen=g), rand(
        B, sk, H, D, dtype=dtype, gen=g)
    bool_mask = (torch.rand(B, 1, sq, sk, generator=g) > 0.3).expand(B, H, sq, sk).clone()
    bool_mask[0, :, 3] = False  # a row that sees nothing
    float_mask = torch.randn(B, H, sq, sk, generator=g)
    for mask in (bool_mask, float_mask):
        out, lse = fwd(emu, q, k, v, mask=mask, scale=0.3)
        ref, ref_lse = attention_ref(q, k, v, attn_mask=mask, scale=0.3)
        assert rel_err(out, ref) <= 2 * max(FLOOR[dtype], 2e-3 if dtype != torch.float32 else 0), rel_err(out, ref)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=LSE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_forward_and_backward(emu, dtype):
    g = torch.Generator().manual_seed(8)
    lens_q, lens_k = [5, 0, 129, 1, 64], [7, 3, 129, 40, 1]
    H, Hk, D = 4, 2, 64
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), H, D, dtype=dtype, gen=g), rand(sum(lens_k), Hk, D, dtype=dtype, gen=g), rand(
        sum(lens_k), Hk, D, dtype=dtype, gen=g)
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    for causal, window, maxlen in ((True, (-1, -1), True), (False, (8, 2), False)):
        left, right = _window(causal, window)
        mq, mk = (max(lens_q), max(lens_k)) if maxlen else (-1, -1)
        out, lse = emu.flash_attn_fwd(q, k, v, cu_q, cu_k, None, mq, mk, D ** -0.5, left, right, True)
        ref, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, window=window)
        assert lse.shape == (H, sum(lens_q))
        assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=LSE_ATOL[dtype], rtol=0)
        dq, dk, dv = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, cu_q, cu_k, None, mq, mk, D ** -0.5, left,
                                        right, True, deterministic=True)
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out, _ = attention_varlen_ref(*xs, cu_q, cu_k, causal=causal, window=window)
        ref_g = torch.autograd.grad(ref_out, xs, dout.double())
        for a, r in zip((dq, dk, dv), ref_g):
            assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 2e-2), rel_err(a, r)


# (B, Sq, Sk, H, Hk, D, causal, window): tensor-core backward for the half types (one dK/dV
# pass up to D = 128, two at D = 256), the SIMT backward for float32
BWD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 70, 130, 4, 1, 32, True, (-1, -1)),
    (1, 130, 70, 2, 2, 96, True, (-1, -1)),
    (1, 65, 65, 2, 1, 128, False, (20, 3)),
    (1, 40, 40, 2, 2, 256, True, (-1, -1)),
    (1, 90, 75, 4, 2, 200, False, (30, -1)),
    (2, 1, 33, 2, 1, 48, False, (-1, -1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_reference(emu, case, dtype):
    B, sq, sk, H, Hk, D, causal, window = case
    g = torch.Generator().manual_seed(sq * 7 + sk + D)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout, dlse = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, H, sq, gen=g)
    left, right = _window(causal, window)
    out, lse = fwd(emu, q, k, v, causal=causal, window=window)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*xs, causal=causal, window=window)
    fin = torch.isfinite(ref_lse)
    ys = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = torch.autograd.grad(torch_sdpa(*ys, causal=causal, window=window), ys, dout)
    # without the lse gradient: within twice torch's own error; with it: against the reference
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, D ** -0.5, left, right, True,
                               deterministic=True)
    ref_g = torch.autograd.grad(ref_out, xs, dout.double(), retain_graph=True)
    for name, a, r, t in zip("qkv", grads, ref_g, theirs):
        assert a.dtype == dtype and a.shape == r.shape
        assert rel_err(a, r) <= 2 * max(rel_err(t, r), FLOOR[dtype]), (name, rel_err(a, r), rel_err(t, r))
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, dlse, None, None, None, -1, -1, D ** -0.5, left, right, True,
                               deterministic=True)
    ref_g = torch.autograd.grad((ref_out, ref_lse.masked_fill(~fin, 0)), xs, (dout.double(), dlse.double()))
    for name, a, r in zip("qkv", grads, ref_g):
        assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 2e-2), (name, rel_err(a, r))
    gc = torch.ops.pretrain_kernels.flash_attn_bwd(dout, q, k, v, out, lse, dlse, None, None, None, -1, -1,
                                                   D ** -0.5, left, right, True, deterministic=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, c in zip(grads, gc):
        torch.testing.assert_close(a.float(), c.float(), atol=tol, rtol=tol)


# (B, Sq, Sk, H, Hk, D, causal, window, bottom_right) for the fused dQ: every head dim, GQA,
# windows whose first key blocks no query sees, top-left alignment with more queries than keys,
# a single query, and enough key blocks (700 keys: 11) for long chains of turns.
FUSED_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), True),
    (1, 70, 130, 4, 1, 32, True, (-1, -1), True),
    (1, 130, 70, 2, 2, 96, True, (-1, -1), True),
    (1, 65, 65, 2, 1, 128, False, (20, 3), True),
    (1, 40, 40, 2, 2, 256, True, (-1, -1), True),
    (1, 90, 75, 4, 2, 200, False, (30, -1), True),
    (2, 1, 33, 2, 1, 48, False, (-1, -1), True),
    (1, 100, 300, 2, 1, 64, True, (20, -1), True),
    (1, 200, 130, 2, 2, 128, True, (-1, -1), False),
    (1, 150, 700, 2, 1, 64, False, (-1, -1), True),
]


@pytest.mark.parametrize("case, mode", [(c, "ordered") for c in FUSED_CASES] +
                         [(FUSED_CASES[i], "atomic") for i in (1, 3, 4, 8)],
                         ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_fused_dq_backward(emu, case, mode, monkeypatch):
    """deterministic=True with PK_ATTENTION_BWD=ordered, and deterministic=False (atomic): the
    dK/dV blocks add dS K into a float dQ instead of a separate dQ pass (one launch fewer). All
    three gradients match the reference within twice torch's error; without a mask dK and dV
    are the separate scheme's bits (the same products over the same query tiles; with one, the
    fused modes align the tiles to multiples of their height, which regroups the sums). Under
    the emulator every ordered block checks the turn counter: its predecessor's post, or zero
    for the first block on a query tile."""
    B, sq, sk, H, Hk, D, causal, window, br = case
    dtype = torch.bfloat16 if (sq + D) % 2 else torch.float16
    g = torch.Generator().manual_seed(sq * 5 + sk + D)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    left, right = _window(causal, window)
    out, lse = fwd(emu, q, k, v, causal=causal, window=window, bottom_right=br)
    mod = emulated_cuda.load()
    res, launches = {}, {}
    for m in ("separate", mode):
        monkeypatch.setenv("PK_ATTENTION_BWD", "ordered" if m == "ordered" else "separate")
        before = mod.stats()["launches"]
        res[m] = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, D ** -0.5, left, right,
                                    br, deterministic=(m != "atomic"))
        launches[m] = mod.stats()["launches"] - before
    assert launches[mode] == launches["separate"] - 1
    if not causal and window == (-1, -1):  # both walk the same query tiles from row 0
        assert torch.equal(res[mode][1], res["separate"][1]) and torch.equal(res[mode][2], res["separate"][2])
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*xs, causal=causal, window=window, bottom_right=br)[0], xs, dout.double())
    ys = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = torch.autograd.grad(torch_sdpa(*ys, causal=causal, window=window, bottom_right=br), ys, dout)
    for name, a, r, t in zip("qkv", res[mode], ref, theirs):
        assert a.dtype == dtype and a.shape == r.shape
        assert rel_err(a, r) <= 2 * max(rel_err(t, r), FLOOR[dtype]), (name, rel_err(a, r), rel_err(t, r))


def test_fused_dq_varlen_and_deterministic_algorithms(emu, monkeypatch):
    """Ordered turns and atomics on packed sequences (counters indexed by token) match the
    reference; deterministic=True never adds with atomics, deterministic=False does, except
    under torch.use_deterministic_algorithms, where it runs the scheme PK_ATTENTION_BWD picks
    for deterministic=True (the same bits)."""
    g = torch.Generator().manual_seed(15)
    lens = [5, 0, 129, 1, 200]
    H, Hk, D = 4, 2, 64
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (rand(sum(lens), n, D, dtype=torch.bfloat16, gen=g) for n in (H, Hk, Hk))
    dout = rand(sum(lens), H, D, dtype=torch.bfloat16, gen=g)
    out, lse = emu.flash_attn_fwd(q, k, v, cu, cu, None, -1, -1, D ** -0.5, -1, 0, True)
    monkeypatch.setenv("PK_ATTENTION_BWD", "ordered")
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, cu, cu, None, -1, -1, D ** -0.5, -1, 0, True, deterministic=True)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_varlen_ref(*xs, cu, cu, causal=True)
    ref_g = torch.autograd.grad(ref_out, xs, dout.double())
    for a, r in zip(grads, ref_g):
        assert rel_err(a, r) < 2e-2, rel_err(a, r)

    mod = emulated_cuda.load()

    def dq(scheme, deterministic):
        monkeypatch.setenv("PK_ATTENTION_BWD", scheme)
        before = mod.stats()["atomics"]
        r = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, cu, cu, None, -1, -1, D ** -0.5, -1, 0, True,
                               deterministic=deterministic)[0]
        return r, mod.stats()["atomics"] - before

    ordered, n_ordered = dq("ordered", True)
    separate, n_separate = dq("separate", True)
    atomic, n_atomic = dq("ordered", False)
    assert n_ordered == 0 and n_separate == 0 and n_atomic > 0
    assert rel_err(atomic, ref_g[0]) < 2e-2
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for scheme, want in (("ordered", ordered), ("separate", separate)):
            again, n_again = dq(scheme, False)
            assert n_again == 0 and torch.equal(again, want)
    finally:
        torch.use_deterministic_algorithms(was)
    for deterministic in (True, False):  # "atomic" is deterministic=False now, not a knob value
        for bad in ("bogus", "atomic"):
            with pytest.raises(RuntimeError, match="PK_ATTENTION_BWD: expected separate or ordered"):
                dq(bad, deterministic)


@pytest.mark.parametrize("scheme", ["separate", "ordered"])
def test_deterministic_backward_is_reproducible(emu, scheme, monkeypatch):
    """deterministic=True: no atomics, and the same bits from run to run whatever the launch
    schedule (warps in lockstep or one running ahead, 4 or 132 SMs) and whether or not
    torch.use_deterministic_algorithms is on; with and without a causal mask, GQA, 300 keys (5
    key blocks taking turns on each query tile under the ordered scheme). deterministic=False
    on the same inputs takes the fused atomic scheme (atomics counted) and matches the reference."""
    monkeypatch.setenv("PK_ATTENTION_BWD", scheme)
    g = torch.Generator().manual_seed(16)
    mod = emulated_cuda.load()
    for causal, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        q, k, v = rand(1, 150, 4, 64, dtype=dtype, gen=g), rand(1, 300, 2, 64, dtype=dtype, gen=g), rand(
            1, 300, 2, 64, dtype=dtype, gen=g)
        dout = rand(1, 150, 4, 64, dtype=dtype, gen=g)
        out, lse = fwd(emu, q, k, v, causal=causal)
        right = 0 if causal else -1

        def grads(deterministic):
            before = mod.stats()["atomics"]
            r = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, 0.125, -1, right, True,
                                   deterministic=deterministic)
            return r, mod.stats()["atomics"] - before

        runs = []
        try:
            for sms, ahead in ((4, False), (132, True)):
                mod.configure(major=9, sm_count=sms, eager_copies=ahead, run_ahead=ahead)
                r, n = grads(True)
                assert n == 0
                runs.append(r)
            mod.configure(major=9, sm_count=4)
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(not was)
            try:
                runs.append(grads(True)[0])
            finally:
                torch.use_deterministic_algorithms(was)
        finally:
            mod.configure(major=9, sm_count=4)
        for r in runs[1:]:
            for a, b in zip(runs[0], r):
                assert torch.equal(a, b)
        fast, n_atomics = grads(False)
        assert n_atomics > 0
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(attention_ref(*xs, causal=causal)[0], xs, dout.double())
        for a, b, r in zip(fast, runs[0], ref):
            assert rel_err(a, r) < 2e-2 and rel_err(b, r) < 2e-2


def test_long_causal_sequence_forward_and_backward(emu):
    """1000 queries and keys: 16 query blocks, up to 16 key tiles each, many pipeline stages."""
    g = torch.Generator().manual_seed(14)
    q, k, v = (rand(1, 1000, 1, 64, dtype=torch.bfloat16, gen=g) for _ in range(3))
    dout = rand(1, 1000, 1, 64, dtype=torch.bfloat16, gen=g)
    out, lse = fwd(emu, q, k, v, causal=True)
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, 0.125, -1, 0, True, deterministic=True)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*xs, causal=True)
    ref_g = torch.autograd.grad(ref_out, xs, dout.double())
    ys = [t.detach().requires_grad_() for t in (q, k, v)]
    sdpa = torch_sdpa(*ys, causal=True)
    theirs = torch.autograd.grad(sdpa, ys, dout)
    assert rel_err(out, ref_out) <= 2 * max(rel_err(sdpa, ref_out), FLOOR[torch.bfloat16])
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[torch.bfloat16], rtol=0)
    for name, a, r, t in zip("qkv", grads, ref_g, theirs):
        assert rel_err(a, r) <= 2 * max(rel_err(t, r), FLOOR[torch.bfloat16]), (name, rel_err(a, r), rel_err(t, r))


def test_backward_with_mask_uses_simt_and_is_deterministic(emu):
    g = torch.Generator().manual_seed(9)
    q, k, v = rand(1, 30, 2, 32, dtype=torch.bfloat16, gen=g), rand(1, 45, 2, 32, dtype=torch.bfloat16, gen=g), rand(
        1, 45, 2, 32, dtype=torch.bfloat16, gen=g)
    mask = torch.rand(1, 2, 30, 45, generator=g) > 0.2
    dout = rand(1, 30, 2, 32, dtype=torch.bfloat16, gen=g)
    out, lse = fwd(emu, q, k, v, mask=mask)
    runs = [emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, mask, -1, -1, 32 ** -0.5, -1, -1, True,
                               deterministic=False)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_g = torch.autograd.grad(attention_ref(*xs, attn_mask=mask)[0], xs, dout.double())
    for a, r in zip(runs[0], ref_g):
        assert rel_err(a, r) < 2e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvcache_append_and_decode(emu, dtype):
    """Rows at different cache lengths; k_new / v_new written in place; each step equals causal
    attention over the row's prefix; few SMs, so the decode steps run split-KV, and with two
    query heads per kv head the half-precision steps pack them into one block (pack_gqa). A
    70-token chunk (chunked prefill) runs the 128-row blocks."""
    g = torch.Generator().manual_seed(10)
    B, H, Hk, D, smax = 3, 4, 2, 64, 300
    k_cache, v_cache = rand(B, smax, Hk, D, dtype=dtype, gen=g), rand(B, smax, Hk, D, dtype=dtype, gen=g)
    lens = torch.tensor([0, 17, 200], dtype=torch.int32)
    for n in (1, 5, 70, 1):
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        k_before = k_cache.clone()
        out, _ = emu.flash_attn_kvcache(q, k_cache, v_cache, lens, kn, vn, D ** -0.5, True, -1, -1, None)
        for b in range(B):
            L = int(lens[b]) + n
            assert torch.equal(k_cache[b, L - n:L], kn[b]) and torch.equal(v_cache[b, L - n:L], vn[b])
            assert torch.equal(k_cache[b, :L - n], k_before[b, :L - n])
            assert torch.equal(k_cache[b, L:], k_before[b, L:])
            ref, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], causal=True)
            theirs = rel_err(torch_sdpa(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], causal=True), ref)
            assert rel_err(out[b:b + 1], ref) <= 2 * max(theirs, FLOOR[dtype])
        lens += n


def test_kvcache_rows_that_do_not_fit(emu):
    """The CUDA kernels follow the CPU's rule for cache rows that do not fit (no write, NaN
    output), on the split-KV path (few SMs) and on one that is not, with the same caches and
    the same NaN rows as the CPU op."""
    from test_attention import kvcache_rows_that_do_not_fit
    mod = emulated_cuda.load()
    cpu = kvcache_rows_that_do_not_fit(torch.ops.pretrain_kernels.flash_attn_kvcache)
    try:
        for sms in (4, 1024):
            mod.configure(major=9, sm_count=sms)
            got = kvcache_rows_that_do_not_fit(emu.flash_attn_kvcache)
            assert torch.equal(got[1], cpu[1]) and torch.equal(got[2], cpu[2])
            assert torch.equal(got[0].isnan(), cpu[0].isnan())
    finally:
        mod.configure(major=9, sm_count=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
def test_kvcache_paged_equals_contiguous(emu, page_size, dtype):
    """The CUDA kernels on the same data in a contiguous cache and in pages at a random
    permutation of blocks: the same output and lse bits and the same cache contents, over
    appends that cross page boundaries and steps of 1, 5, 70 and 1 tokens (split-KV decode with
    few SMs, pack_gqa, 128-row blocks), GQA and windows; the result matches the reference."""
    g = torch.Generator().manual_seed(50 + page_size)
    B, H, Hk, D = 3, 4, 2, 64
    cap = -(-300 // page_size) * page_size
    kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, page_size, gen=g)
    spare = torch.ones(kp.shape[0], dtype=torch.bool)
    spare[table.flatten().long()] = False
    kp_spare = kp[spare].clone()
    lens = torch.tensor([0, 17, 200], dtype=torch.int32)
    for n, causal, window in ((1, True, (-1, -1)), (5, True, (8, -1)), (70, False, (-1, -1)), (1, False, (30, 2))):
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        left, right = window
        ref, ref_lse, _, _ = kvcache_ref(q, kc, vc, lens, k_new=kn, v_new=vn, causal=causal, window=window)
        out_c, lse_c = emu.flash_attn_kvcache(q, kc, vc, lens, kn, vn, D ** -0.5, causal, left, right, None)
        out_p, lse_p = emu.flash_attn_kvcache(q, kp, vp, lens, kn, vn, D ** -0.5, causal, left, right, table)
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
        assert torch.equal(contiguous_from_paged(kp, table), kc) and torch.equal(contiguous_from_paged(vp, table), vc)
        assert torch.equal(kp[spare], kp_spare)
        assert rel_err(out_p, ref) <= {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
        torch.testing.assert_close(lse_p.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)
        lens += n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, window", [(True, (6, -1)), (False, (6, 3)), (False, (0, -1)), (True, (0, 7))],
                         ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_window_and_lse_match_reference(emu, paged, causal, window, dtype):
    """Sliding-window kv-cache attention and its lse against the float64 reference, within twice
    torch SDPA's error, contiguous and paged (page size 5), with an empty row."""
    g = torch.Generator().manual_seed(51)
    B, H, Hk, D, cap, n = 3, 6, 2, 32, 65, 3
    kc, vc = rand(B, cap, Hk, D, dtype=dtype, gen=g), rand(B, cap, Hk, D, dtype=dtype, gen=g)
    table = None
    if paged:
        kc, vc, table = paged_from_contiguous(kc, vc, 5, gen=g)
    lens = torch.tensor([0, 9, 40], dtype=torch.int32)
    q = rand(B, n, H, D, dtype=dtype, gen=g)
    kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
    ref, ref_lse, k_rows, v_rows = kvcache_ref(q, kc, vc, lens, k_new=kn, v_new=vn, causal=causal, scale=0.3,
                                               window=window, block_table=table)
    out, lse = emu.flash_attn_kvcache(q, kc, vc, lens, kn, vn, 0.3, causal, *window, table)
    from test_attention import _kv_sdpa_err
    sdpa_err = _kv_sdpa_err(q, k_rows, v_rows, lens, n, causal, window, 0.3)
    assert_attention_matches(out, lse, ref, ref_lse, sdpa_err, dtype)


def test_kvcache_paged_rows_that_do_not_fit(emu):
    """Paged rows that do not fit: the same rule, caches and NaN rows as the CPU op, on the
    split-KV path (few SMs) and on one that is not."""
    from test_attention import kvcache_paged_rows_that_do_not_fit
    mod = emulated_cuda.load()
    cpu = kvcache_paged_rows_that_do_not_fit(torch.ops.pretrain_kernels.flash_attn_kvcache)
    try:
        for sms in (4, 1024):
            mod.configure(major=9, sm_count=sms)
            got = kvcache_paged_rows_that_do_not_fit(emu.flash_attn_kvcache)
            assert torch.equal(got[2], cpu[2]) and torch.equal(got[3], cpu[3])
            assert torch.equal(got[0].isnan(), cpu[0].isnan()) and torch.equal(got[1].isnan(), cpu[1].isnan())
    finally:
        mod.configure(major=9, sm_count=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_kvcache_block_ids_out_of_range_follow_the_rule(emu, dtype):
    """A block id outside [0, num_blocks) among the pages a row uses: the CPU op raises (it reads
    the table on the host); the CUDA kernels cannot, and give the row the rule of a row that does
    not fit. Run through both: the CUDA result equals the CPU kernel's on the same call with
    those rows made not to fit (nothing written, NaN out and lse, the other rows alike)."""
    g = torch.Generator().manual_seed(52)
    B, H, Hk, D, ps = 4, 4, 2, 32, 4
    kc, vc = rand(B, 16, Hk, D, dtype=dtype, gen=g), rand(B, 16, Hk, D, dtype=dtype, gen=g)
    kp, vp, table = paged_from_contiguous(kc, vc, ps, gen=g)
    nb = kp.shape[0]
    lens = torch.tensor([5, 9, 2, 6], dtype=torch.int32)
    table[1, 2] = nb          # row 1 appends at positions 9, 10: page 2
    table[2, 0] = -3          # row 2 reads page 0
    table[3, 3] = 2**31 - 1   # row 3 uses pages 0, 1 only: never read
    q = rand(B, 2, H, D, dtype=dtype, gen=g)
    kn, vn = rand(B, 2, Hk, D, dtype=dtype, gen=g), rand(B, 2, Hk, D, dtype=dtype, gen=g)
    with pytest.raises(RuntimeError, match="block_table: row 1 uses block id"):
        torch.ops.pretrain_kernels.flash_attn_kvcache(q, kp.clone(), vp.clone(), lens, kn, vn, 0.2, True, -1, -1,
                                                      table)
    kp_e, vp_e = kp.clone(), vp.clone()
    out, lse = emu.flash_attn_kvcache(q, kp_e, vp_e, lens, kn, vn, 0.2, True, -1, -1, table)
    no_fit = lens.clone()
    no_fit[1] = no_fit[2] = -1
    kp_c, vp_c = kp.clone(), vp.clone()
    want, want_lse = torch.ops.pretrain_kernels.flash_attn_kvcache(q, kp_c, vp_c, no_fit, kn, vn, 0.2, True, -1, -1,
                                                                   table)
    assert torch.equal(kp_e, kp_c) and torch.equal(vp_e, vp_c)
    assert torch.isnan(out[1:3]).all() and torch.isnan(lse[1:3]).all()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(lse.isnan(), want_lse.isnan())
    for b in (0, 3):
        assert rel_err(out[b], want[b]) <= (3e-3 if dtype == torch.float16 else 1e-6)
        torch.testing.assert_close(lse[b], want_lse[b], atol=LSE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_copy_timing_and_schedule_do_not_change_the_bits(emu, dtype):
    """cp.async copies landing at their wait_group with warps in near lockstep (the default),
    and landing at once with warp 0 running ahead of the others to each barrier: a missing
    wait shows up in the first setting, a missing barrier before a prefetch into a tile other
    warps still read in the second, and either way the results would differ."""
    g = torch.Generator().manual_seed(12)
    # 260 keys: four key tiles per query block in the forward and dQ passes, so each stage
    # of the double buffers is refilled while the other is read
    q, k, v = rand(1, 200, 4, 64, dtype=dtype, gen=g), rand(1, 260, 2, 64, dtype=dtype, gen=g), rand(
        1, 260, 2, 64, dtype=dtype, gen=g)
    dout = rand(1, 200, 4, 64, dtype=dtype, gen=g)
    mod = emulated_cuda.load()
    res = []
    try:
        for eager in (False, True):
            mod.configure(major=9, sm_count=4, eager_copies=eager, run_ahead=eager)
            out, lse = fwd(emu, q, k, v)
            grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, 0.125, -1, -1, True,
                                       deterministic=True)
            res.append([out, lse, *grads])
    finally:
        mod.configure(major=9, sm_count=4)
    for a, b in zip(*res):
        assert torch.equal(a, b)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*xs)[0], xs, dout.double())
    for a, r in zip(res[0][2:], ref):
        assert rel_err(a, r) < 2e-2


def test_noncontiguous_and_unaligned_inputs(emu):
    """Strided head-major views and a q that starts one element off 16 bytes (the element
    copies instead of 16-byte cp.async)."""
    g = torch.Generator().manual_seed(11)
    base = rand(1, 4, 50, 65, dtype=torch.float16, gen=g)
    q = base[..., 1:].transpose(1, 2)  # (1, 50, 4, 64), unaligned, strided
    k = rand(1, 2, 60, 64, dtype=torch.float16, gen=g).transpose(1, 2)
    v = rand(1, 2, 60, 64, dtype=torch.float16, gen=g).transpose(1, 2)
    out, lse = fwd(emu, q, k, v, causal=True)
    out_c, lse_c = fwd(emu, q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert rel_err(out, ref) < 1e-3


def test_bad_inputs_raise(emu):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="float64"):
        fwd(emu, q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match="head_dim"):
        fwd(emu, torch.randn(1, 4, 2, 300), torch.randn(1, 4, 2, 300), torch.randn(1, 4, 2, 300))
    with pytest.raises(RuntimeError, match="multiple"):
        fwd(emu, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))


# ---- prefix-LM (prefix_lens) ------------------------------------------------------------------

# (B, Sq, Sk, H, Hk, D, causal, window, prefix per sequence): prefixes 0, 1, a middle value and
# Sk; more queries than keys, a left window, a right window without causal, head dim 256 (64-row
# forward blocks, two dK/dV passes), GQA.
PREFIX_CASES = [
    (4, 70, 70, 4, 2, 32, True, (-1, -1), [0, 1, 35, 70]),
    (1, 40, 130, 2, 1, 64, True, (-1, -1), [100]),
    (1, 150, 60, 2, 2, 96, True, (-1, -1), [30]),
    (1, 129, 129, 2, 1, 128, True, (16, -1), [100]),
    (1, 65, 65, 2, 2, 40, False, (20, 3), [50]),
    (1, 40, 40, 2, 2, 256, True, (-1, -1), [17]),
]


def _prefix_fwd(ops, q, k, v, prefix, causal=False, window=(-1, -1), bottom_right=True, cu_q=None, cu_k=None):
    left, right = _window(causal, window)
    return ops.flash_attn_fwd(q, k, v, cu_q, cu_k, None, -1, -1, q.shape[-1] ** -0.5, left, right, bottom_right,
                              prefix_lens=prefix)


def _prefix_bwd(ops, dout, q, k, v, out, lse, prefix, causal=False, window=(-1, -1), cu_q=None, cu_k=None):
    left, right = _window(causal, window)
    return ops.flash_attn_bwd(dout, q, k, v, out, lse, None, cu_q, cu_k, None, -1, -1, q.shape[-1] ** -0.5, left,
                              right, True, prefix_lens=prefix)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_prefix_lm_forward_and_backward(emu, case, dtype):
    """Tensor-core (half types) and SIMT (float32) forward and backward with prefix_lens against the
    float64 reference (within twice torch's error on the same explicit mask) and the CPU op."""
    B, sq, sk, H, Hk, D, causal, window, pl = case
    g = torch.Generator().manual_seed(sq * 13 + sk + D)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    prefix = torch.tensor(pl, dtype=torch.int32)
    kw = dict(causal=causal, window=window)
    out, lse = _prefix_fwd(emu, q, k, v, prefix, **kw)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ref(*xs, prefix_lens=pl, **kw)
    ys = [t.detach().requires_grad_() for t in (q, k, v)]
    sdpa = torch_sdpa(*ys, prefix_lens=pl, **kw)
    assert_attention_matches(out, lse, ref.detach(), ref_lse.detach(), rel_err(sdpa, ref), dtype)
    out_c, _ = _prefix_fwd(torch.ops.pretrain_kernels, q, k, v, prefix, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), out_c.float(), atol=tol, rtol=tol)
    grads = _prefix_bwd(emu, dout, q, k, v, out, lse, prefix, **kw)
    ref_g = torch.autograd.grad(ref, xs, dout.double())
    theirs = torch.autograd.grad(sdpa, ys, dout)
    for name, a, r, t in zip("qkv", grads, ref_g, theirs):
        assert rel_err(a, r) <= 2 * max(rel_err(t, r), FLOOR[dtype]), (name, rel_err(a, r), rel_err(t, r))


@pytest.mark.parametrize("case", [PREFIX_CASES[0], PREFIX_CASES[3], PREFIX_CASES[5]],
                         ids=lambda c: "-".join(map(str, c)))
def test_prefix_lm_fused_dq(emu, case, monkeypatch):
    """PK_ATTENTION_BWD=ordered with a prefix: the key blocks that see a query tile stay
    consecutive (query_lo and query_hi grow with the key block), so the turns hold (the emulator
    checks every turn counter) and the gradients equal the separate scheme's."""
    B, sq, sk, H, Hk, D, causal, window, pl = case
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(sq + sk)
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    prefix = torch.tensor(pl, dtype=torch.int32)
    out, lse = _prefix_fwd(emu, q, k, v, prefix, causal=causal, window=window)
    res = {}
    for m in ("separate", "ordered"):
        monkeypatch.setenv("PK_ATTENTION_BWD", m)
        res[m] = _prefix_bwd(emu, dout, q, k, v, out, lse, prefix, causal=causal, window=window)
    assert torch.equal(res["ordered"][1], res["separate"][1]) and torch.equal(res["ordered"][2], res["separate"][2])
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_g = torch.autograd.grad(attention_ref(*xs, causal=causal, window=window, prefix_lens=pl)[0], xs,
                                dout.double())
    for a, r in zip(res["ordered"], ref_g):
        assert rel_err(a, r) < 2e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_lm_varlen_and_split_kv(emu, dtype):
    """Varlen with a different prefix per sequence (forward and backward), and a decode-like call
    whose keys the launcher splits (flash decoding): every split and the combine see the same
    widened intervals."""
    g = torch.Generator().manual_seed(31)
    lens_q, lens_k, pl = [5, 0, 129, 1, 64], [7, 3, 129, 40, 70], [7, 2, 60, 1, 0]
    H, Hk, D = 4, 2, 64
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), H, D, dtype=dtype, gen=g), rand(sum(lens_k), Hk, D, dtype=dtype, gen=g), rand(
        sum(lens_k), Hk, D, dtype=dtype, gen=g)
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    prefix = torch.tensor(pl, dtype=torch.int32)
    out, lse = _prefix_fwd(emu, q, k, v, prefix, causal=True, cu_q=cu_q, cu_k=cu_k)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_varlen_ref(*xs, cu_q, cu_k, prefix_lens=pl, causal=True)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin].detach(), atol=LSE_ATOL[dtype], rtol=0)
    grads = _prefix_bwd(emu, dout, q, k, v, out, lse, prefix, causal=True, cu_q=cu_q, cu_k=cu_k)
    for a, r in zip(grads, torch.autograd.grad(ref, xs, dout.double())):
        assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 2e-2), rel_err(a, r)

    q, k, v = rand(1, 3, 2, 64, dtype=dtype, gen=g), rand(1, 700, 2, 64, dtype=dtype, gen=g), rand(
        1, 700, 2, 64, dtype=dtype, gen=g)
    mod = emulated_cuda.load()
    res = []
    try:
        for sms in (64, 1):
            mod.configure(major=9, sm_count=sms)
            for p in (0, 698, 700):
                before = mod.stats()["launches"]
                res.append((p, _prefix_fwd(emu, q, k, v, torch.tensor([p], dtype=torch.int32), causal=True,
                                           window=(400, -1)), mod.stats()["launches"] - before, sms))
    finally:
        mod.configure(major=9, sm_count=4)
    for p, (out, lse), launches, sms in res:
        assert launches == (2 if sms == 64 else 1)  # split + combine, or whole
        ref, ref_lse = attention_ref(q, k, v, causal=True, window=(400, -1), prefix_lens=[p])
        sdpa = torch_sdpa(q, k, v, causal=True, window=(400, -1), prefix_lens=[p])
        assert_attention_matches(out, lse, ref, ref_lse, rel_err(sdpa, ref), dtype)


def test_prefix_lm_tiles_still_skipped(emu):
    """The emulator counts mma.sync instructions, a measure of the tiles the tensor-core kernels
    visit. Causal with a prefix visits more tiles than plain causal and fewer than no mask; a
    prefix of 0 or 1 (query 0 sees key 0 anyway) visits exactly the causal tiles, a prefix of
    every key exactly the unmasked ones (forward and backward)."""
    g = torch.Generator().manual_seed(40)
    B, S, H, D = 1, 200, 2, 64
    q, k, v, dout = (rand(B, S, H, D, dtype=torch.float16, gen=g) for _ in range(4))
    mod = emulated_cuda.load()

    def mma(prefix, causal=True):
        p = None if prefix is None else torch.tensor([prefix], dtype=torch.int32)
        before = mod.stats()["mma"]
        out, lse = _prefix_fwd(emu, q, k, v, p, causal=causal)
        mid = mod.stats()["mma"]
        _prefix_bwd(emu, dout, q, k, v, out, lse, p, causal=causal)
        return mid - before, mod.stats()["mma"] - mid

    causal, full = mma(None), mma(None, causal=False)
    assert causal[0] < full[0] and causal[1] < full[1]
    assert mma(0) == causal and mma(1) == causal
    assert mma(S) == full
    mid = mma(150)  # past the causal reach of the first query blocks: they visit more key tiles
    assert causal[0] < mid[0] < full[0] and causal[1] < mid[1] < full[1]


def test_prefix_lm_out_of_range_values_are_clamped(emu):
    """The CUDA kernels cannot read prefix_lens on the host: values outside [0, keys of the
    sequence] are clamped into it (make_window). The emulated kernels give exactly the bits of the
    clamped values, and the CPU op (which raises on such values) agrees with the clamped call."""
    g = torch.Generator().manual_seed(41)
    B, sq, sk, H, D = 4, 33, 50, 2, 32
    q, k, v, = rand(B, sq, H, D, dtype=torch.bfloat16, gen=g), rand(B, sk, H, D, dtype=torch.bfloat16, gen=g), rand(
        B, sk, H, D, dtype=torch.bfloat16, gen=g)
    dout = rand(B, sq, H, D, dtype=torch.bfloat16, gen=g)
    wild = torch.tensor([-5, sk + 10, 2**31 - 1, -2**31], dtype=torch.int32)
    clamped = torch.tensor([0, sk, sk, 0], dtype=torch.int32)
    o_w, l_w = _prefix_fwd(emu, q, k, v, wild, causal=True)
    o_c, l_c = _prefix_fwd(emu, q, k, v, clamped, causal=True)
    assert torch.equal(o_w, o_c) and torch.equal(l_w, l_c)
    for a, b in zip(_prefix_bwd(emu, dout, q, k, v, o_w, l_w, wild, causal=True),
                    _prefix_bwd(emu, dout, q, k, v, o_c, l_c, clamped, causal=True)):
        assert torch.equal(a, b)
    o_cpu, l_cpu = _prefix_fwd(torch.ops.pretrain_kernels, q, k, v, clamped, causal=True)
    torch.testing.assert_close(o_w.float(), o_cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l_w, l_cpu, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="prefix_lens: expected values in"):
        _prefix_fwd(torch.ops.pretrain_kernels, q, k, v, wild, causal=True)
    # the shared checks of attention_checks.h raise on both backends
    for ops in (emu, torch.ops.pretrain_kernels):
        with pytest.raises(RuntimeError, match="prefix_lens: expected an int32 tensor"):
            _prefix_fwd(ops, q, k, v, clamped.long(), causal=True)
        with pytest.raises(RuntimeError, match=r"prefix_lens: expected shape \[4\]"):
            _prefix_fwd(ops, q, k, v, clamped[:3], causal=True)
        with pytest.raises(RuntimeError, match=r"prefix_lens: expected shape \[4\]"):
            _prefix_bwd(ops, dout, q, k, v, o_c, l_c, clamped[None], causal=True)


# ---- score modifiers: soft-cap and ALiBi -----------------------------------------------------

# (B, Sq, Sk, H, Hk, D, causal, window, bottom_right): 64-row and 128-row forward blocks,
# packed GQA rows (fewer queries than a block), split-KV decode, top-left alignment, both
# backward shapes (D = 256: separate dK and dV passes) and the SIMT kernels for float32
MOD_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), True),
    (1, 130, 70, 2, 2, 96, True, (-1, -1), True),
    (1, 70, 130, 4, 1, 32, True, (-1, -1), True),
    (1, 65, 65, 2, 1, 128, False, (20, 3), True),
    (1, 1, 300, 4, 2, 128, True, (-1, -1), True),
    (1, 40, 90, 2, 1, 64, True, (-1, -1), False),
    (1, 50, 45, 2, 2, 256, False, (30, -1), True),
]
MODS = {
    "softcap": lambda B, H, g: (2.5, None),
    "alibi-h": lambda B, H, g: (0.0, torch.rand(H, generator=g) * 0.5),
    "both": lambda B, H, g: (1.5, torch.rand(B, H, generator=g) * 0.3),
}


def _mods_kw(softcap, slopes):
    return dict(softcap=softcap if softcap > 0 else None, alibi_slopes=slopes)


def _check_score_mods(emu, case, dtype, softcap, slopes, g, deterministic=True):
    B, sq, sk, H, Hk, D, causal, window, br = case
    q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g) * 2, rand(
        B, sk, Hk, D, dtype=dtype, gen=g)
    dout = rand(B, sq, H, D, dtype=dtype, gen=g)
    left, right = _window(causal, window)
    scale = D ** -0.5
    out, lse = emu.flash_attn_fwd(q, k, v, None, None, None, -1, -1, scale, left, right, br, softcap, slopes)
    kw = dict(causal=causal, window=window, bottom_right=br, **_mods_kw(softcap, slopes))
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ref(*xs, **kw)
    ys = [t.detach().requires_grad_() for t in (q, k, v)]
    eager, _ = attention_ref(*ys, **kw, compute_dtype=dtype)
    assert rel_err(out, ref) <= 2 * max(rel_err(eager, ref), FLOOR[dtype]), (rel_err(out, ref), rel_err(eager, ref))
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=20 * FLOOR[dtype], rtol=0)
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, None, -1, -1, scale, left, right, br,
                               softcap, slopes, deterministic=deterministic)
    ref_g = torch.autograd.grad(ref, xs, dout.double())
    theirs = torch.autograd.grad(eager, ys, dout)
    for name, a, r, t in zip("qkv", grads, ref_g, theirs):
        assert a.dtype == dtype and a.shape == r.shape
        assert rel_err(a, r) <= 2 * max(rel_err(t, r), 2 * FLOOR[dtype]), (name, rel_err(a, r), rel_err(t, r))
    # the CPU op on the same inputs
    out_c, _ = torch.ops.pretrain_kernels.flash_attn_fwd(q, k, v, None, None, None, -1, -1, scale, left, right, br,
                                                         softcap, slopes)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), out_c.float(), atol=tol, rtol=tol)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_score_mods_match_reference(emu, case, dtype):
    """softcap and ALiBi together through the CUDA forward and backward kernels."""
    g = torch.Generator().manual_seed(case[1] * 13 + case[2] + case[5])
    softcap, slopes = MODS["both"](case[0], case[3], g)
    _check_score_mods(emu, case, dtype, softcap, slopes, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mod", ["softcap", "alibi-h"], ids=str)
def test_score_mods_alone(emu, mod, dtype):
    case = MOD_CASES[2]
    g = torch.Generator().manual_seed(len(mod))
    softcap, slopes = MODS[mod](case[0], case[3], g)
    _check_score_mods(emu, case, dtype, softcap, slopes, g)


@pytest.mark.parametrize("scheme", ["atomic", "ordered"])
def test_score_mods_fused_dq(emu, scheme, monkeypatch):
    """The fused dQ schemes of the tensor-core backward compute dS with the same modifiers."""
    case = (1, 100, 120, 4, 2, 64, True, (-1, -1), True)
    g = torch.Generator().manual_seed(3)
    softcap, slopes = MODS["both"](1, 4, g)
    g_sep = _check_score_mods(emu, case, torch.bfloat16, softcap, slopes, torch.Generator().manual_seed(4))
    if scheme == "ordered":
        monkeypatch.setenv("PK_ATTENTION_BWD", scheme)
    g_fused = _check_score_mods(emu, case, torch.bfloat16, softcap, slopes, torch.Generator().manual_seed(4),
                                deterministic=scheme != "atomic")
    for a, b in zip(g_sep, g_fused):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_mods_varlen(emu, dtype):
    g = torch.Generator().manual_seed(14)
    lens_q, lens_k = [5, 0, 129, 1, 64], [7, 3, 129, 40, 1]
    H, Hk, D = 4, 2, 64
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), H, D, dtype=dtype, gen=g), rand(sum(lens_k), Hk, D, dtype=dtype, gen=g), rand(
        sum(lens_k), Hk, D, dtype=dtype, gen=g)
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    slopes = torch.rand(len(lens_q), H, generator=g) * 0.3
    out, lse = emu.flash_attn_fwd(q, k, v, cu_q, cu_k, None, -1, -1, D ** -0.5, -1, 0, True, 2.0, slopes)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_varlen_ref(*xs, cu_q, cu_k, causal=True, softcap=2.0, alibi_slopes=slopes)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=LSE_ATOL[dtype] * 10, rtol=0)
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, cu_q, cu_k, None, -1, -1, D ** -0.5, -1, 0, True, 2.0,
                               slopes)
    ref_g = torch.autograd.grad(ref, xs, dout.double())
    for a, r in zip(grads, ref_g):
        assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 2e-2), rel_err(a, r)


@pytest.mark.parametrize("window", [(-1, 0), (40, 0)], ids=["causal", "window"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features_compose_varlen(emu, dtype, window):
    """softcap, ALiBi [batch, heads] and the prefix-LM mask at once, with GQA, varlen (empty and
    one-token sequences) and a sliding window: the tensor-core (half) and SIMT (float32) kernels,
    forward and backward (deterministic and atomic dQ), against the float64 reference."""
    g = torch.Generator().manual_seed(16)
    lens_q, lens_k = [5, 0, 129, 1, 64], [7, 3, 129, 40, 64]
    H, Hk, D = 4, 2, 64
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(sum(lens_q), H, D, dtype=dtype, gen=g), rand(sum(lens_k), Hk, D, dtype=dtype, gen=g), rand(
        sum(lens_k), Hk, D, dtype=dtype, gen=g)
    dout = rand(sum(lens_q), H, D, dtype=dtype, gen=g)
    slopes = torch.rand(len(lens_q), H, generator=g) * 0.3
    prefix = torch.tensor([3, 2, 50, 0, 64], dtype=torch.int32)
    left, right = window
    args = (cu_q, cu_k, None, -1, -1, D ** -0.5, left, right, True, 2.0, slopes, prefix)
    out, lse = emu.flash_attn_fwd(q, k, v, *args)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_varlen_ref(*xs, cu_q, cu_k, prefix_lens=prefix, causal=True, window=(left, -1),
                                        softcap=2.0, alibi_slopes=slopes)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=LSE_ATOL[dtype] * 10, rtol=0)
    ref_g = torch.autograd.grad(ref, xs, dout.double())
    for deterministic in (True, False):
        grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, *args, deterministic=deterministic)
        for a, r in zip(grads, ref_g):
            assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 2e-2), (deterministic, rel_err(a, r))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_mods_kvcache(emu, dtype):
    """Decode (split-KV, packed GQA rows) and a chunk with softcap and ALiBi aligned to each
    row's cache length."""
    g = torch.Generator().manual_seed(15)
    B, H, Hk, D, smax = 3, 4, 2, 64, 300
    k_cache, v_cache = rand(B, smax, Hk, D, dtype=dtype, gen=g), rand(B, smax, Hk, D, dtype=dtype, gen=g)
    lens = torch.tensor([0, 17, 200], dtype=torch.int32)
    slopes = torch.rand(H, generator=g) * 0.2
    for n in (1, 5):
        q = rand(B, n, H, D, dtype=dtype, gen=g)
        kn, vn = rand(B, n, Hk, D, dtype=dtype, gen=g), rand(B, n, Hk, D, dtype=dtype, gen=g)
        out, _ = emu.flash_attn_kvcache(q, k_cache, v_cache, lens, kn, vn, D ** -0.5, True, -1, -1, None, 3.0, slopes)
        for b in range(B):
            L = int(lens[b]) + n
            kw = dict(causal=True, softcap=3.0, alibi_slopes=slopes)
            ref, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], **kw)
            eager, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], **kw,
                                     compute_dtype=dtype)
            assert rel_err(out[b:b + 1], ref) <= 2 * max(rel_err(eager, ref), FLOOR[dtype])
        lens += n


def test_score_mods_bad_inputs_raise(emu):
    """The shared checks (csrc/common/attention_checks.h) on the CUDA entry points; slope values
    are not checked there (no host sync)."""
    q = torch.randn(2, 4, 2, 16)
    for softcap, slopes, msg in ((-1.0, None, "softcap"), (float("nan"), None, "softcap"),
                                 (1e-300, None, "softcap"), (0.0, torch.ones(3), "alibi_slopes: expected shape"),
                                 (0.0, torch.ones(2, dtype=torch.float64), "alibi_slopes: expected a float32")):
        with pytest.raises(RuntimeError, match=msg):
            emu.flash_attn_fwd(q, q, q, None, None, None, -1, -1, 0.25, -1, -1, True, softcap, slopes)
        with pytest.raises(RuntimeError, match=msg):
            emu.flash_attn_bwd(q, q, q, q, q, torch.zeros(2, 2, 4), None, None, None, None, -1, -1, 0.25, -1, -1,
                               True, softcap, slopes)
    out, _ = emu.flash_attn_fwd(q, q, q, None, None, None, -1, -1, 0.25, -1, -1, True, 0.0,
                                torch.tensor([0.5, float("nan")]))
    assert out[:, :, 1].isnan().all() and not out[:, :, 0].isnan().any()


# ---- attention dropout ---------------------------------------------------------------------
# Dropout runs in the kernels a call takes: float16 / bfloat16 on the tensor-core kernels (each
# Philox block of a score fragment drawn once per warp, its keep bits exchanged by shuffles,
# attention_common.cuh), float32 and PK_ATTENTION_CUDA_PATH=simt on the SIMT kernels (each lane of
# a warp draws one Philox block, which serves 8 keys). The keep mask is
# csrc/common/attention_dropout.h's and must equal the CPU kernel's (AVX-512 Philox) bit for bit.

def _drop_args(p, seed, offset, softcap=0.0, slopes=None, prefix=None):
    return (softcap, slopes, prefix, p, torch.tensor([seed, offset], dtype=torch.int64))


@pytest.mark.parametrize("sms", [4, 64], ids=["split", "whole"])
def test_dropout_keep_mask_equals_cpu(emu, sms):
    """The keep mask read through the output (q = 0: equal scores; V = identity: key j's factor
    in column j) is the CPU op's, bit for bit, with and without the split-KV combine."""
    B, sq, sk, H, p = 2, 5, 96, 2, 0.3
    q = torch.zeros(B, sq, H, sk)
    k = torch.randn(B, sk, 1, sk, generator=torch.Generator().manual_seed(1))
    v = torch.eye(sk).expand(B, 1, sk, sk).transpose(1, 2).contiguous()
    args = (q, k, v, None, None, None, -1, -1, 0.5, -1, -1, True, *_drop_args(p, -12345678901234, 4000000000))
    mod = emulated_cuda.load()
    try:
        mod.configure(major=9, sm_count=sms)
        out, lse = emu.flash_attn_fwd(*args)
    finally:
        mod.configure(major=9, sm_count=4)
    out_c, lse_c = torch.ops.pretrain_kernels.flash_attn_fwd(*args)
    keep, keep_c = out > 0, out_c > 0
    assert torch.equal(keep, keep_c)
    assert 0.6 < keep.double().mean() < 0.8
    torch.testing.assert_close(out, out_c, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=1e-6)


# (dtype, path): the tensor-core kernels and the SIMT kernels, which float32 always takes.
DROPOUT_PATHS = [(torch.float16, "tensor-cores"), (torch.bfloat16, "tensor-cores"), (torch.float16, "simt"),
                 (torch.float32, "simt")]


def _dropout_path(path, monkeypatch):
    if path == "simt":
        monkeypatch.setenv("PK_ATTENTION_CUDA_PATH", "simt")
    else:
        monkeypatch.delenv("PK_ATTENTION_CUDA_PATH", raising=False)


def _unit_rows(idx, d, dtype):
    """Rows of unit vectors: row r is e_(idx[r] % d), shape idx.shape + (d,)."""
    return torch.eye(d, dtype=torch.float64)[idx % d].to(dtype)


def _assert_mma(path, mma):
    if path == "tensor-cores":
        assert mma > 0, "dropout should run on the tensor-core kernels"
    else:
        assert mma == 0


# (B, Sq, Sk, H, Hk, causal, window): a GQA group over 128-row blocks, and decode-like rows whose
# GQA heads share a block (pack_gqa); the windows start the key loops off the 8-key Philox blocks.
DROPOUT_KEEP_CASES = [(1, 70, 300, 2, 1, False, (37, 5)), (2, 5, 300, 4, 2, True, (37, -1))]


@pytest.mark.parametrize("sms", [1, 64], ids=["whole", "split"])
@pytest.mark.parametrize("case", DROPOUT_KEEP_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype, path", DROPOUT_PATHS, ids=lambda x: x if isinstance(x, str) else str(x))
def test_dropout_keep_bits_forward(emu, case, dtype, path, sms, monkeypatch):
    """The forward's keep mask, bit for bit, on each path, with and without the split-KV combine:
    q = 0 makes the scores equal, and V row j = e_(j % 64) puts key j's factor in column j % 64
    (a row sees at most 43 keys, so no two of them share a column): out > 0 exactly where the
    reference keeps a visible key, and the values are 1 / (1 - p) / (visible keys)."""
    B, sq, sk, H, Hk, causal, window = case
    D, p, seed, offset = 64, 0.5, 77 + sq, 3
    left, right = _window(causal, window)
    g = torch.Generator().manual_seed(sq + sk)
    q = torch.zeros(B, sq, H, D, dtype=dtype)
    k = rand(B, sk, Hk, D, dtype=dtype, gen=g)
    v = _unit_rows(torch.arange(sk), D, dtype)[None, :, None].expand(B, sk, Hk, D).contiguous()
    _dropout_path(path, monkeypatch)
    mod = emulated_cuda.load()
    before = mod.stats()["mma"]
    try:
        mod.configure(major=9, sm_count=sms)
        out, lse = emu.flash_attn_fwd(q, k, v, None, None, None, -1, -1, D ** -0.5, left, right, True,
                                      *_drop_args(p, seed, offset))
    finally:
        mod.configure(major=9, sm_count=4)
    _assert_mma(path, mod.stats()["mma"] - before)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, window=window, dropout=(p, seed, offset))
    assert torch.equal(out > 0, ref > 0)
    kept = (ref > 0).sum().item() / (ref_lse.isfinite().sum().item() * min(sk, 43))
    assert 0.3 < kept < 0.6
    torch.testing.assert_close(out.double(), ref, rtol=4e-3 if dtype == torch.bfloat16 else 1e-3, atol=0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)


# (B, Sq, Sk, H, Hk, causal, window): a key sees at most 26 queries of each of the 2 heads of its
# GQA group, so 52 distinct columns of 64 suffice (see the test).
DROPOUT_KEEP_BWD_CASES = [(1, 70, 150, 2, 1, False, (20, 5)), (2, 33, 90, 4, 2, True, (20, -1))]


@pytest.mark.parametrize("case", DROPOUT_KEEP_BWD_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype, path, scheme", [(d, pa, "separate") for d, pa in DROPOUT_PATHS] +
                         [(torch.float16, "tensor-cores", "atomic"), (torch.bfloat16, "tensor-cores", "atomic")],
                         ids=lambda x: x if isinstance(x, str) else str(x))
def test_dropout_keep_bits_backward(emu, case, dtype, path, scheme, monkeypatch):
    """The backward's keep mask, bit for bit, in the dK/dV pass (dV) and in the dQ pass or, with
    the fused scheme, the dK/dV pass's dS (dQ). q = 0 makes P uniform over the visible keys.
    dO row (i, h) = e_c with c = (i G + h % G) % 64: dV[j, c] = P_ij M_ij for the one (i, h) of c,
    so dV > 0 exactly where the reference keeps. K row j = e_(j % 64) and V row j = e_(j % 64) + 1:
    dQ[i, j % 64] = scale dS_ij = scale P_ij (dP_ij M_ij - Di) with dP_ij >= 1, where a flipped
    keep bit moves the value by at least scale / (1 - p) / 26, eight times the absolute tolerance."""
    B, sq, sk, H, Hk, causal, window = case
    D, p, seed, offset = 64, 0.5, 91 + sq, 12
    G, scale = H // Hk, D ** -0.5
    left, right = _window(causal, window)
    q = torch.zeros(B, sq, H, D, dtype=dtype)
    k = _unit_rows(torch.arange(sk), D, dtype)[None, :, None].expand(B, sk, Hk, D).contiguous()
    v = (k.double() + 1).to(dtype)
    c = torch.arange(sq)[:, None] * G + torch.arange(H)[None, :] % G  # [sq, H]
    dout = _unit_rows(c, D, dtype)[None].expand(B, sq, H, D).contiguous()
    _dropout_path(path, monkeypatch)
    monkeypatch.setenv("PK_ATTENTION_BWD", "separate")
    drop = _drop_args(p, seed, offset)
    common = (None, None, None, -1, -1, scale, left, right, True)
    mod = emulated_cuda.load()
    before = mod.stats()["mma"]
    out, lse = emu.flash_attn_fwd(q, k, v, *common, *drop)
    dq, dk, dv = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, *common, *drop,
                                    deterministic=(scheme == "separate"))
    _assert_mma(path, mod.stats()["mma"] - before)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    o = attention_ref(*xs, causal=causal, window=window, dropout=(p, seed, offset))[0]
    rq, rk, rv = torch.autograd.grad(o, xs, dout.double())
    assert torch.equal(dv > 0, rv > 0) and (rv > 0).any()
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-3  # P M and dS are rounded to the dtype for the products
    torch.testing.assert_close(dv.double(), rv, rtol=tol, atol=0)
    flip = scale * (1 / (1 - p)) / 26
    torch.testing.assert_close(dq.double(), rq, rtol=tol, atol=flip / 8)
    assert rq.abs().max() > flip / 2  # the gradients carry the mask
    assert not dk.any() and not rk.any()  # q = 0


# (B, Sq, Sk, H, Hk, D, causal, window, varlen, softcap, alibi, prefix)
DROPOUT_CASES = [
    (2, 17, 17, 2, 2, 64, False, (-1, -1), False, 0.0, False, False),
    (1, 40, 70, 4, 2, 32, True, (-1, -1), False, 0.0, False, False),
    (1, 45, 45, 2, 1, 24, True, (9, -1), False, 2.0, True, True),
    (3, 30, 30, 2, 1, 16, True, (-1, -1), True, 0.0, False, False),
    (1, 1, 200, 2, 1, 64, True, (-1, -1), False, 0.0, False, False),
    # a warp's keys start off the 8-key Philox blocks (the window) and run past 256 keys, where
    # the lanes draw their blocks again
    (1, 5, 700, 2, 1, 32, True, (333, -1), False, 0.0, False, False),
    # the tensor-core kernels (float16 / bfloat16): two query blocks of a GQA group, head dims 96
    # and 128, windows that start the key loops off the Philox blocks, prefix_lens with varlen
    (2, 130, 130, 4, 2, 64, False, (-1, -1), False, 0.0, False, False),
    (1, 77, 150, 2, 2, 96, True, (50, -1), False, 0.0, False, True),
    (3, 70, 70, 4, 1, 64, True, (-1, -1), True, 0.0, False, True),
    (1, 90, 100, 2, 1, 128, False, (20, 30), False, 1.5, True, False),
    # head dim 256: 32-key forward / dQ tiles, 16-query dK/dV tiles in two passes (dK, then dV)
    (1, 40, 75, 2, 1, 256, True, (30, -1), False, 0.0, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dropout_forward_backward(emu, case, dtype):
    """Forward and gradients with dropout against the float64 reference (same mask, within twice
    the eager composite's error in the dtype) and against the CPU op."""
    B, sq, sk, H, Hk, D, causal, window, varlen, softcap, alibi, prefix = case
    g = torch.Generator().manual_seed(sq * 13 + sk + D)
    p, seed, offset = 0.2, 555 + sq, 9
    left, right = _window(causal, window)
    slopes = torch.rand(B, H, generator=g) * 0.3 if alibi else None
    pl = torch.randint(0, sq + 1, (B,), generator=g, dtype=torch.int32) if prefix else None
    if varlen:
        lens = [sq, 0, 7][:B]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (rand(int(cu[-1]), h, D, dtype=dtype, gen=g) for h in (H, Hk, Hk))
        cu_q = cu_k = cu
        if pl is not None:  # within each sequence's keys
            pl = torch.minimum(pl, torch.tensor(lens, dtype=torch.int32))
    else:
        q, k, v = rand(B, sq, H, D, dtype=dtype, gen=g), rand(B, sk, Hk, D, dtype=dtype, gen=g), rand(
            B, sk, Hk, D, dtype=dtype, gen=g)
        cu_q = cu_k = None
    dout = rand(*q.shape, dtype=dtype, gen=g)
    extra = _drop_args(p, seed, offset, softcap, slopes, pl)
    common = (cu_q, cu_k, None, -1, -1, D ** -0.5, left, right, True)
    out, lse = emu.flash_attn_fwd(q, k, v, *common, *extra)
    grads = emu.flash_attn_bwd(dout, q, k, v, out, lse, None, *common, *extra)
    out_c, lse_c = torch.ops.pretrain_kernels.flash_attn_fwd(q, k, v, *common, *extra)
    grads_c = torch.ops.pretrain_kernels.flash_attn_bwd(dout, q, k, v, out_c, lse_c, None, *common, *extra)
    refkw = dict(causal=causal, window=window, softcap=softcap or None, alibi_slopes=slopes, dropout=(p, seed, offset))
    if pl is not None:
        refkw["prefix_lens"] = pl

    def ref(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if varlen:
            o = attention_varlen_ref(*xs, cu_q, cu_k, compute_dtype=dt, **refkw)[0]
        else:
            o = attention_ref(*xs, compute_dtype=dt, **refkw)[0]
        return [o.detach()] + list(torch.autograd.grad(o, xs, dout.to(dt)))

    r, y = ref(torch.float64), ref(dtype)
    for name, a, c, yy, rr in zip(["out", "dq", "dk", "dv"], [out, *grads], [out_c, *grads_c], y, r):
        assert rel_err(a, rr) <= 2 * max(rel_err(yy, rr), 2 * FLOOR[dtype]), (name, rel_err(a, rr), rel_err(yy, rr))
        assert rel_err(a, c) <= (1e-5 if dtype == torch.float32 else 2e-2), (name, rel_err(a, c))
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=LSE_ATOL[dtype] * 4)


def test_dropout_bad_inputs_raise(emu):
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    base = (q, k, v, None, None, None, -1, -1, 0.3, -1, -1, True, 0.0, None, None)
    with pytest.raises(RuntimeError, match=r"dropout_p: expected a probability in \[0, 1\]"):
        emu.flash_attn_fwd(*base, float("nan"), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="dropout_seed: required when dropout_p > 0"):
        emu.flash_attn_fwd(*base, 0.1, None)
    with pytest.raises(RuntimeError, match=r"dropout_seed: expected an int64 tensor of shape \[2\]"):
        emu.flash_attn_fwd(*base, 0.1, torch.tensor([1]))
