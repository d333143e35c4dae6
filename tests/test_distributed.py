"""Context-parallel attention (pretrain_kernels.distributed) on gloo, in spawned CPU processes.

Each world size (2 and 4) is one spawned run that goes through every case (spawning costs
seconds per process): every rank draws the same full-sequence inputs, runs
context_parallel_attention on its zigzag shard, and compares output and gradients with
single-process pk.flash_attention on the whole sequence, sharded by tests/reference.py's
zigzag_shard_ref. float64 must agree to 1e-10; float32 to rounding; bfloat16/float16 must be
within twice the single-process kernel's own error against float64 (plus a rounding floor).
The ranks record each case's outcome in a file, and one pytest test per case reads them.
The process group has a timeout, and the whole run a deadline, so a hang fails instead.
"""
import datetime
import json
import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

import pretrain_kernels as pk
from pretrain_kernels.distributed import context_parallel_attention, shard_sequence, unshard_sequence
from reference import ATTN_ERR_FLOOR, rel_err, zigzag_shard_ref
from processes import free_port, run_ranks

RUN_DEADLINE_S = 300  # generous: the machine may be shared; the group timeout catches a hang sooner
GROUP_TIMEOUT_S = 40

# (name, dtype, causal, B, chunk, heads, kv_heads, head_dim, extra): the global sequence is
# 2 * world * chunk long; extra: "varlen" (several packed sequences, one empty), "softcap",
# "lse" (the loss uses the returned lse too), "scale", "kv_longer" (non-causal, keys longer
# than queries), "noncontig" (q, k, v are strided views, as from a packed qkv projection),
# ("window", left, right) a sliding window (chunk 5: windows narrower than a chunk, between one
# and two chunks, wider than the sequence, one-sided)
CASES = [
    ("causal_f64_gqa", torch.float64, True, 2, 5, 4, 2, 16, ()),
    ("full_f64", torch.float64, False, 1, 3, 2, 2, 8, ()),
    ("causal_f64_mqa_lse_scale", torch.float64, True, 1, 4, 4, 1, 8, ("lse", "scale")),
    ("causal_f64_softcap", torch.float64, True, 1, 3, 2, 2, 12, ("softcap",)),
    ("causal_f64_noncontig", torch.float64, True, 2, 3, 3, 3, 8, ("noncontig",)),
    ("causal_f64_window0", torch.float64, True, 1, 5, 2, 1, 8, (("window", 0, -1),)),
    ("causal_f64_window3", torch.float64, True, 2, 5, 2, 2, 8, (("window", 3, -1),)),
    ("causal_f64_window7", torch.float64, True, 1, 5, 4, 2, 8, (("window", 7, -1), "lse")),
    ("causal_f64_window13", torch.float64, True, 1, 5, 2, 2, 8, (("window", 13, -1),)),
    ("causal_f64_window_wide", torch.float64, True, 1, 5, 2, 2, 8, (("window", 1000, 7),)),
    ("full_f64_window3_6", torch.float64, False, 1, 5, 2, 1, 8, (("window", 3, 6),)),
    ("full_f64_window0_12", torch.float64, False, 1, 5, 2, 2, 8, (("window", 0, 12),)),
    ("full_f64_window_right4", torch.float64, False, 1, 5, 2, 2, 8, (("window", -1, 4),)),
    ("full_f64_window_left6", torch.float64, False, 1, 5, 2, 2, 8, (("window", 6, -1), "softcap")),
    ("causal_bf16_window9", torch.bfloat16, True, 1, 8, 4, 2, 32, (("window", 9, -1),)),
    ("full_f64_kv_longer", torch.float64, False, 2, 3, 2, 1, 8, ("kv_longer",)),
    ("varlen_causal_f64_gqa", torch.float64, True, 3, 0, 4, 2, 16, ("varlen",)),
    ("varlen_full_f64", torch.float64, False, 3, 0, 2, 2, 8, ("varlen",)),
    ("causal_f32_gqa", torch.float32, True, 2, 7, 4, 2, 32, ()),
    ("full_f32", torch.float32, False, 1, 6, 2, 2, 16, ()),
    ("varlen_causal_f32", torch.float32, True, 3, 0, 2, 1, 16, ("varlen", "lse")),
    ("causal_bf16_gqa", torch.bfloat16, True, 1, 8, 4, 2, 32, ()),
    ("causal_f16", torch.float16, True, 1, 8, 2, 2, 32, ()),
    ("varlen_causal_bf16", torch.bfloat16, True, 3, 0, 2, 2, 16, ("varlen",)),
]
CASES_4 = {"causal_f64_gqa", "full_f64", "varlen_causal_f64_gqa", "causal_f32_gqa", "causal_bf16_gqa",
           "causal_f64_mqa_lse_scale", "causal_f64_window3", "causal_f64_window13", "full_f64_window3_6"}
BAD_CASES = ["odd_local_length", "shard_indivisible", "shape_disagrees", "dtype_disagrees", "one_rank_bad_softcap",
             "causal_disagrees", "requires_grad_disagrees", "varlen_disagrees", "unshard_shape_disagrees",
             "bad_cu_seqlens", "not_a_member", "in_sync_after_errors"]
LAYOUT_CASES = ["shard_unshard_dense", "shard_unshard_varlen", "unshard_gradient", "compiled", "causal_work"]
ONLY_2 = {c[0] for c in CASES} - CASES_4 | {"compiled", "not_a_member"}  # cases the 4-process run leaves out (time)


def _seqlens(world):
    return [2 * world * 3, 0, 2 * world * 1, 2 * world * 5]  # one empty sequence


def _case_inputs(case, world, seed):
    name, dtype, causal, B, chunk, H, Hk, D, extra = case
    g = torch.Generator().manual_seed(seed)
    if "varlen" in extra:
        lens = _seqlens(world)
        T = sum(lens)
        shapes = [(T, H, D), (T, Hk, D), (T, Hk, D)]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    else:
        S = 2 * world * chunk
        Sk = 2 * S if "kv_longer" in extra else S
        shapes = [(B, S, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D)]
        lens, cu = None, None
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)
    go = torch.randn(*shapes[0], generator=g, dtype=torch.float64).to(dtype)
    gl = torch.randn(H, shapes[0][0], generator=g, dtype=torch.float64) if "varlen" in extra else \
        torch.randn(B, H, shapes[0][1], generator=g, dtype=torch.float64)
    kw = dict(causal=causal, scale=0.37 if "scale" in extra else None, softcap=3.0 if "softcap" in extra else None)
    for e in extra:
        if isinstance(e, tuple) and e[0] == "window":
            kw["window"] = e[1:]
    return (q, k, v, go, gl), lens, cu, kw


def _single(q, k, v, go, gl, cu, kw, use_lse, dtype=None):
    """pk.flash_attention on the whole sequence (in `dtype` when given): out, lse, dq, dk, dv."""
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    var = {} if cu is None else dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    out, lse = pk.flash_attention(q, k, v, return_lse=True, **var, **kw)
    loss = (out.double() * go.double()).sum() + ((lse.double() * gl).sum() if use_lse else 0)
    loss.backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def _check_case(case, rank, world, group):
    name, dtype, causal, B, chunk, H, Hk, D, extra = case
    (q, k, v, go, gl), lens, cu, kw = _case_inputs(case, world, seed=zlib.crc32(name.encode()) + world)
    use_lse = "lse" in extra
    ref = _single(q, k, v, go, gl, cu, kw, use_lse)
    varlen = cu is not None
    dim = 0 if varlen else 1

    def shard(x, d=dim):
        return zigzag_shard_ref(x, rank, world, d, lens)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    var = dict(cu_seqlens=(cu // world).to(torch.int32)) if varlen else {}
    args = (ql, kl, vl)
    if "noncontig" in extra:  # views into one (B, S, 3, H, D) tensor
        args = torch.stack(args, 2).unbind(2)
        assert not any(a.is_contiguous() for a in args)
    out, lse = context_parallel_attention(*args, group, return_lse=True, **kw, **var)
    loss = (out.double() * shard(go)).sum() + ((lse.double() * shard(gl, dim + 1)).sum() if use_lse else 0)
    loss.backward()
    got = [out.detach(), lse.detach(), ql.grad, kl.grad, vl.grad]
    want = [shard(ref[0]), shard(ref[1], dim + 1), shard(ref[2]), shard(ref[3]), shard(ref[4])]
    labels = ["out", "lse", "dq", "dk", "dv"]
    if dtype == torch.float64:
        for lab, a, b in zip(labels, got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {lab}: {m}")
    elif dtype == torch.float32:
        for lab, a, b in zip(labels, got, want):
            torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5, msg=lambda m: f"{name} {lab}: {m}")
    else:  # against float64 on the same rounded inputs: within twice the single-process error
        exact = _single(q, k, v, go, gl, cu, kw, use_lse, dtype=torch.float64)
        for lab, a, b, e in zip(labels, got, want, exact):
            e_shard = shard(e, dim + 1) if lab == "lse" else shard(e)
            ours, single = rel_err(a, e_shard), rel_err(b, e_shard)
            assert ours <= 2 * max(single, ATTN_ERR_FLOOR[dtype]), f"{name} {lab}: {ours} vs single {single}"


def _expect(exc_type, match, fn):
    try:
        fn()
    except exc_type as e:
        if match not in str(e):
            raise AssertionError(f"expected {exc_type.__name__} with {match!r}, got: {e}") from e
        return
    raise AssertionError(f"expected {exc_type.__name__} with {match!r}, nothing raised")


def _check_bad(name, rank, world, group):
    g = torch.Generator().manual_seed(7)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    S = 2 * world * 2
    q = t(1, S // world, 2, 8)
    if name == "odd_local_length":
        x = t(1, 3, 2, 8)
        _expect(ValueError, "must be even", lambda: context_parallel_attention(x, x, x, group))
    elif name == "shard_indivisible":
        x = t(1, 2 * world + 2, 2, 8)
        _expect(ValueError, f"must divide by 2 * world_size = {2 * world}", lambda: shard_sequence(x, group, 1))
    elif name == "shape_disagrees":
        x = q if rank else t(1, S // world + 2, 2, 8)
        _expect(ValueError, "must agree on q.shape[1]", lambda: context_parallel_attention(x, x, x, group))
    elif name == "dtype_disagrees":
        x = q.double() if rank == world - 1 else q
        _expect(ValueError, "must agree on dtype", lambda: context_parallel_attention(x, x, x, group))
    elif name == "one_rank_bad_softcap":
        cap = -1.0 if rank == 1 else 2.0
        if rank == 1:
            _expect(ValueError, "softcap: expected a finite number > 0",
                    lambda: context_parallel_attention(q, q, q, group, softcap=cap))
        else:
            _expect(ValueError, "rank 1 rejected its arguments (ValueError: softcap",
                    lambda: context_parallel_attention(q, q, q, group, softcap=cap))
    elif name == "causal_disagrees":
        _expect(ValueError, "must agree on causal", lambda: context_parallel_attention(q, q, q, group,
                                                                                     causal=rank % 2 == 0))
    elif name == "requires_grad_disagrees":
        x = q.clone().requires_grad_(rank == 0)
        _expect(ValueError, "must agree on requires_grad", lambda: context_parallel_attention(x, q, q, group))
    elif name == "varlen_disagrees":
        x = t(8, 2, 8)
        cu = torch.tensor([0, 4, 8] if rank else [0, 2, 8], dtype=torch.int32)
        _expect(ValueError, "must agree on cu_seqlens", lambda: context_parallel_attention(x, x, x, group,
                                                                                          cu_seqlens=cu))
    elif name == "unshard_shape_disagrees":
        x = t(1, 4 + 2 * (rank == 0), 3)
        _expect(ValueError, "must agree on x_local.shape[1]", lambda: unshard_sequence(x, group, 1))
    elif name == "bad_cu_seqlens":
        x = t(8, 2, 8)
        _expect(ValueError, "cu_seqlens: expected non-decreasing offsets from 0 to 8",
                lambda: context_parallel_attention(x, x, x, group, cu_seqlens=torch.tensor([0, 6, 4],
                                                                                           dtype=torch.int32)))
        _expect(TypeError, "cu_seqlens: expected an int32 tensor",
                lambda: context_parallel_attention(x, x, x, group, cu_seqlens=torch.tensor([0, 8])))
        _expect(ValueError, "window: a sliding window is not offered with cu_seqlens",
                lambda: context_parallel_attention(x, x, x, group, window=(2, 0),
                                                   cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)))
        _expect(ValueError, "must agree on window left",
                lambda: context_parallel_attention(q, q, q, group, window=(rank + 1, 0)))
    elif name == "not_a_member":  # a group of rank 0 alone: one rank (no ring) there, an error elsewhere
        solo = dist.new_group([0])
        full = t(1, 6, 2, 8, dtype=torch.float64)
        if rank == 0:
            out = context_parallel_attention(full, full, full, solo)
            torch.testing.assert_close(out, pk.flash_attention(full, full, full, causal=True), rtol=0, atol=0)
        else:
            _expect(ValueError, "not a member of the group", lambda: context_parallel_attention(full, full, full,
                                                                                               solo))
    elif name == "in_sync_after_errors":  # the ring still works after every error above
        full = t(1, S, 2, 8)
        out = context_parallel_attention(shard_sequence(full, group), shard_sequence(full, group),
                                         shard_sequence(full, group), group)
        torch.testing.assert_close(out, shard_sequence(pk.flash_attention(full, full, full, causal=True), group))
    else:
        raise KeyError(name)


def _check_layout(name, rank, world, group):
    g = torch.Generator().manual_seed(11)
    if name == "shard_unshard_dense":
        x = torch.randn(3, 2 * world * 5, 4, generator=g)
        for dim in (1, -2):
            local = shard_sequence(x, group, dim)
            torch.testing.assert_close(local, zigzag_shard_ref(x, rank, world, 1), rtol=0, atol=0)
            torch.testing.assert_close(unshard_sequence(local, group, dim), x, rtol=0, atol=0)
    elif name == "shard_unshard_varlen":
        lens = _seqlens(world)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        x = torch.randn(sum(lens), 3, generator=g)
        local = shard_sequence(x, group, 0, cu_seqlens=cu)
        torch.testing.assert_close(local, zigzag_shard_ref(x, rank, world, 0, lens), rtol=0, atol=0)
        torch.testing.assert_close(unshard_sequence(local, group, 0, cu_seqlens=cu // world), x, rtol=0, atol=0)
    elif name == "unshard_gradient":  # all_gather's convention: the sum over ranks of their gradients
        x = torch.randn(2, 2 * world * 3, generator=g)
        weights = torch.randn(world, *x.shape, generator=g)
        local = shard_sequence(x, group, 1).requires_grad_()
        (unshard_sequence(local, group, 1) * weights[rank]).sum().backward()
        torch.testing.assert_close(local.grad, zigzag_shard_ref(weights.sum(0), rank, world, 1))
    elif name == "compiled":  # inside a compiled function: runs eagerly (a graph break), same results
        full = [torch.randn(1, 2 * world * 3, 2, 8, generator=g) for _ in range(3)]

        def f(x, y, z):
            x, y, z = (shard_sequence(t, group) for t in (x, y, z))
            return context_parallel_attention(x.sin(), y, z, group).square().sum()

        grads = []
        for fn in (f, torch.compile(f, backend="eager")):
            args = [t.clone().requires_grad_() for t in full]
            loss = fn(*args)
            loss.backward()
            grads.append([loss.detach()] + [a.grad for a in args])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif name == "causal_work":  # hidden chunks are skipped: each step is c x 2c pairs (the diagonal 2c x 2c causal)
        from torch.utils._python_dispatch import TorchDispatchMode

        class Calls(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket).split(".")[-1]
                if name in ("flash_attn_fwd", "flash_attn_bwd"):
                    q, k = (args[0], args[1]) if name == "flash_attn_fwd" else (args[1], args[2])
                    self.seen.append((name, q.shape[1], k.shape[1]))
                return func(*args, **(kwargs or {}))

        c = 3
        q, k, v = (torch.randn(1, 2 * c, 2, 8, generator=g).requires_grad_() for _ in range(3))
        with Calls() as mode:
            context_parallel_attention(q, k, v, group).sum().backward()
        for op in ("flash_attn_fwd", "flash_attn_bwd"):
            shapes = [s[1:3] for s in mode.seen if s[0] == op]
            assert shapes[0] == (2 * c, 2 * c), (op, shapes)
            assert len(shapes) == world and all(sq * sk == 2 * c * c for sq, sk in shapes[1:]), (op, shapes)
            # the steps whose keys come from an earlier rank use the first key chunk, the others
            # the second query chunk
            assert [sk == c for _, sk in shapes[1:]] == [(rank - s) % world < rank for s in range(1, world)], shapes
    else:
        raise KeyError(name)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    try:
        group = dist.group.WORLD
        jobs = [(c[0], lambda c=c: _check_case(c, rank, world, group)) for c in CASES]
        jobs += [(n, lambda n=n: _check_layout(n, rank, world, group)) for n in LAYOUT_CASES]
        jobs += [(n, lambda n=n: _check_bad(n, rank, world, group)) for n in BAD_CASES]
        jobs = [(n, job) for n, job in jobs if world == 2 or n not in ONLY_2]
        for name, job in jobs:
            try:
                job()
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_RUNS = {}


def _run(world, tmp_path_factory):
    """Every case on `world` spawned processes, once per session: {case: [error or None per rank]}."""
    if world not in _RUNS:
        out_dir = str(tmp_path_factory.mktemp(f"cp{world}"))
        run_ranks(_worker, world, (world, free_port(), out_dir), deadline_s=RUN_DEADLINE_S)
        per_rank = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
        _RUNS[world] = {name: [res.get(name, "not run") for res in per_rank] for name in per_rank[0]}
    return _RUNS[world]


def _params():
    names = [c[0] for c in CASES] + LAYOUT_CASES + BAD_CASES
    out = []
    for world in (2, 4):
        for n in names:
            if world == 4 and n in ONLY_2:
                continue
            out.append(pytest.param(world, n, id=f"w{world}-{n}"))
    return out


@pytest.mark.parametrize("world, case", _params())
def test_context_parallel(world, case, tmp_path_factory):
    results = _run(world, tmp_path_factory)
    assert case in results, f"{case} was not run"
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(results[case]) if e is not None]
    assert not errors, "\n".join(errors)


def test_not_initialised():
    """Without an initialised process group: a clear error, no collective (so no hang)."""
    assert not dist.is_initialized()
    x = torch.randn(1, 4, 2, 8)
    for fn in (lambda: context_parallel_attention(x, x, x, None), lambda: shard_sequence(x, None),
               lambda: unshard_sequence(x, None)):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            fn()
