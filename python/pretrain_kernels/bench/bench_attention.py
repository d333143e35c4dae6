"""pk.flash_attention / pk.flash_attention_with_kvcache against what a user would run instead,
on the same inputs: torch's SDPA (its fused CPU flash kernel) and eager attention
(softmax(q k^T * scale) v, materialised).

Shapes: B=2, H=8, head_dim 64 and 128, S in {512, 1024, 2048, 4096}, causal and not,
float32 and bfloat16; forward, forward+backward; decode (batch 8, cache 4096, one new
token); prefix-LM forward+backward (S=2048, causal after a prefix of S/4) against the plain
causal kernel; softcap / ALiBi against the plain kernel (S=2048, D=64, causal,
forward+backward); paged decode (the decode shape, D=64, page sizes 16 and 256 at a random
permutation of blocks, against the contiguous cache in the same group); attention dropout p=0.1
(S=2048, D=64, not causal, forward+backward) against the plain kernel and torch's SDPA with the
same dropout_p. The default run takes a subset (S=1024, decode, prefix-LM, the score modifiers,
paged decode, dropout); PK_BENCH_ALL=1 runs them all; --quick shrinks every case (S=512, D=64,
float32, a cache of 1024, no peak memory).
extra_info.flops: 4*B*H*Sq*Sk*D for the forward (halved when causal), x3.5 for
forward+backward. test_peak_memory records the peak resident memory of forward+backward at
S=4096 for each implementation (a fresh process each).

Run: pk-bench attention --device cpu [--quick].
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels.bench.common import QUICK, quick, rounds

ALL = os.environ.get("PK_BENCH_ALL") == "1"
B, H = 2, 8
SEQLENS = [512, 1024, 2048, 4096] if ALL else quick([1024], [512])
HEAD_DIMS = quick([64, 128], [64])
DTYPES = quick({"fp32": torch.float32, "bf16": torch.bfloat16}, {"fp32": torch.float32})
IMPLS = ["pk", "torch sdpa", "eager"]
DECODE = dict(batch=8, cache=quick(4096, 1024), heads=8)
LONG = quick(2048, 512)  # the sequence of the prefix-LM, score-modifier and dropout cases


def eager_attention(q, k, v, causal):
    """(B, H, S, D) layout, the scores materialised."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        S = q.shape[-2]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def make_inputs(S, D, dtype, impl, grad=False):
    """Same values for every implementation; each in its natural layout: (B, S, H, D) for pk,
    (B, H, S, D) for torch."""
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3)]
    if impl != "pk":
        qkv = [t.transpose(1, 2).contiguous() for t in qkv]
    return [t.requires_grad_(grad) for t in qkv]


def run_fn(impl, q, k, v, causal):
    if impl == "pk":
        return lambda: pk.flash_attention(q, k, v, causal=causal)
    if impl == "torch sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda: eager_attention(q, k, v, causal)


def _rounds(S):
    return rounds(2 if S >= 2048 else 4)


CASES = [(S, D, c, dt) for S in SEQLENS for D in HEAD_DIMS for c in (False, True) for dt in DTYPES]


def _id(case):
    S, D, c, dt = case
    return f"S{S}-D{D}-{'causal' if c else 'full'}-{dt}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(benchmark, case, impl):
    S, D, causal, dt = case
    q, k, v = make_inputs(S, D, DTYPES[dt], impl)
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    benchmark.group = f"attention fwd B{B} H{H} {_id(case)}"
    benchmark.extra_info.update(family="attention", op="flash_attention fwd", impl=impl, device="cpu",
                                shape=f"{B}x{S}x{H}x{D}", baseline=(impl == "pk"), flops=flops)
    fn = run_fn(impl, q, k, v, causal)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=_rounds(S), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward(benchmark, case, impl):
    S, D, causal, dt = case
    q, k, v = make_inputs(S, D, DTYPES[dt], impl, grad=True)
    dout = torch.randn_like(q)
    flops = 3.5 * 4 * B * H * S * S * D / (2 if causal else 1)
    benchmark.group = f"attention fwd+bwd B{B} H{H} {_id(case)}"
    benchmark.extra_info.update(family="attention", op="flash_attention fwd+bwd", impl=impl, device="cpu",
                                shape=f"{B}x{S}x{H}x{D}", baseline=(impl == "pk"), flops=flops)
    fwd = run_fn(impl, q, k, v, causal)

    def step():
        torch.autograd.grad(fwd(), (q, k, v), dout)

    benchmark.pedantic(step, rounds=_rounds(S), iterations=1, warmup_rounds=1)


PREFIX_LM = dict(S=LONG, D=64)
PREFIX_IMPLS = ["pk prefix-lm", "pk causal", "torch sdpa"]


@pytest.mark.parametrize("impl", PREFIX_IMPLS)
@pytest.mark.parametrize("dt", list(DTYPES))
def test_prefix_lm_forward_backward(benchmark, dt, impl):
    """Prefix-LM (causal after a bidirectional prefix of S/4 keys, prefix_lens) forward+backward
    at B=2, H=8, D=64, S=2048, next to the plain causal kernel in the same run (the price of the
    prefix: the keys below S/4 are visible to every query, 1/16 more of the S x S scores than
    causal) and torch's SDPA with the same mask given explicitly."""
    S, D = PREFIX_LM["S"], PREFIX_LM["D"]
    P = S // 4
    q, k, v = make_inputs(S, D, DTYPES[dt], "torch sdpa" if impl == "torch sdpa" else "pk", grad=True)
    dout = torch.randn_like(q)
    prefix = torch.full((B,), P, dtype=torch.int32)
    pairs = sum(max(i + 1, P) for i in range(S)) if impl != "pk causal" else S * (S + 1) // 2
    benchmark.group = f"attention prefix-lm fwd+bwd B{B} H{H} S{S} D{D} prefix{P} {dt}"
    benchmark.extra_info.update(family="attention", op="flash_attention prefix-lm fwd+bwd", impl=impl, device="cpu",
                                shape=f"{B}x{S}x{H}x{D} prefix {P}", baseline=(impl == "pk prefix-lm"),
                                flops=3.5 * 4 * B * H * pairs * D)
    if impl == "pk prefix-lm":
        fwd = lambda: pk.flash_attention(q, k, v, causal=True, prefix_lens=prefix)  # noqa: E731
    elif impl == "pk causal":
        fwd = lambda: pk.flash_attention(q, k, v, causal=True)  # noqa: E731
    else:
        i, j = torch.arange(S)[:, None], torch.arange(S)[None]
        mask = (j <= i) | (j < P)
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731

    def step():
        torch.autograd.grad(fwd(), (q, k, v), dout)

    benchmark.pedantic(step, rounds=_rounds(S), iterations=1, warmup_rounds=1)


def decode_inputs(D, dtype):
    """The decode shape's caches (full but for the last position), one new token per row, the
    cache lengths, and the generator that drew them (seed 0)."""
    Bd, L, Hd = DECODE["batch"], DECODE["cache"], DECODE["heads"]
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(Bd, L, Hd, D, generator=g).to(dtype)
    v_cache = torch.randn(Bd, L, Hd, D, generator=g).to(dtype)
    q = torch.randn(Bd, 1, Hd, D, generator=g).to(dtype)
    k_new = torch.randn(Bd, 1, Hd, D, generator=g).to(dtype)
    v_new = torch.randn(Bd, 1, Hd, D, generator=g).to(dtype)
    lens = torch.full((Bd,), L - 1, dtype=torch.int32)
    return k_cache, v_cache, q, k_new, v_new, lens, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_decode(benchmark, D, dt, impl):
    """One new token per row against a cache of 4096 (the new key/value written in place by
    pk; the alternatives attend to the full cache slice)."""
    Bd, L, Hd = DECODE["batch"], DECODE["cache"], DECODE["heads"]
    dtype = DTYPES[dt]
    k_cache, v_cache, q, k_new, v_new, lens, g = decode_inputs(D, dtype)
    benchmark.group = f"attention decode B{Bd} cache{L} H{Hd} D{D} {dt}"
    benchmark.extra_info.update(family="attention", op="flash_attention_with_kvcache", impl=impl, device="cpu",
                                shape=f"{Bd}x1x{Hd}x{D} cache {L}", baseline=(impl == "pk"),
                                flops=4 * Bd * Hd * L * D, bytes=2 * k_cache.numel() * k_cache.element_size())
    if impl == "pk":
        fn = lambda: pk.flash_attention_with_kvcache(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)  # noqa: E731
    else:
        # the cache kept as torch users keep it: (B, H, L, D), new token appended in place
        kc, vc = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
        qt, kn, vn = q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2)

        def fn():
            kc[:, :, L - 1:L] = kn
            vc[:, :, L - 1:L] = vn
            if impl == "torch sdpa":
                return F.scaled_dot_product_attention(qt, kc, vc)
            return eager_attention(qt, kc, vc, False)

    with torch.no_grad():
        benchmark.pedantic(fn, rounds=quick(10, 5), iterations=1, warmup_rounds=quick(2, 1))


# Score modifiers: pk with softcap / ALiBi against the plain pk kernel, same inputs, same run
# (B=2, H=8, D=64, S=2048, causal, forward+backward; the ratio to "plain" is the cost).
MOD_VARIANTS = {
    "plain": {},
    "softcap": dict(softcap=30.0),
    "alibi": dict(alibi_slopes=torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])),
    "softcap+alibi": dict(softcap=30.0, alibi_slopes=torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])),
}


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("variant", list(MOD_VARIANTS))
def test_score_mods_forward_backward(benchmark, variant, dt):
    S, D = LONG, 64
    q, k, v = make_inputs(S, D, DTYPES[dt], "pk", grad=True)
    dout = torch.randn_like(q)
    kw = MOD_VARIANTS[variant]
    benchmark.group = f"attention fwd+bwd score modifiers B{B} H{H} S{S} D{D} causal {dt}"
    benchmark.extra_info.update(family="attention", op="flash_attention fwd+bwd", impl=f"pk {variant}",
                                device="cpu", shape=f"{B}x{S}x{H}x{D}", baseline=(variant == "plain"),
                                flops=3.5 * 4 * B * H * S * S * D / 2)

    def step():
        torch.autograd.grad(pk.flash_attention(q, k, v, causal=True, **kw), (q, k, v), dout)

    benchmark.pedantic(step, rounds=rounds(3), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged256"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_decode_paged(benchmark, dt, layout):
    """Decode against a paged cache (vLLM's layout: block_table, pages at a random permutation
    of blocks) and against the contiguous cache holding the same values: one new token per row,
    batch 8, cache 4096, H=8, D=64. The contiguous row is the baseline of the group."""
    Bd, L, Hd, D = DECODE["batch"], DECODE["cache"], DECODE["heads"], 64
    dtype = DTYPES[dt]
    k_cache, v_cache, q, k_new, v_new, lens, g = decode_inputs(D, dtype)
    table = None
    if layout != "contiguous":
        ps = int(layout[len("paged"):])
        per_row = L // ps
        table = torch.randperm(Bd * per_row, generator=g).view(Bd, per_row).to(torch.int32)
        kp, vp = torch.empty(Bd * per_row, ps, Hd, D, dtype=dtype), torch.empty(Bd * per_row, ps, Hd, D, dtype=dtype)
        kp[table.flatten().long()] = k_cache.reshape(-1, ps, Hd, D)
        vp[table.flatten().long()] = v_cache.reshape(-1, ps, Hd, D)
        k_cache, v_cache = kp, vp
    benchmark.group = f"attention paged decode B{Bd} cache{L} H{Hd} D{D} {dt}"
    benchmark.extra_info.update(family="attention", op="flash_attention_with_kvcache", impl=f"pk {layout}",
                                device="cpu", shape=f"{Bd}x1x{Hd}x{D} cache {L}", baseline=(layout == "contiguous"),
                                flops=4 * Bd * Hd * L * D, bytes=2 * k_cache.numel() * k_cache.element_size())

    def fn():
        return pk.flash_attention_with_kvcache(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new,
                                               block_table=table)

    with torch.no_grad():
        benchmark.pedantic(fn, rounds=quick(20, 5), iterations=1, warmup_rounds=quick(3, 1))


# Attention dropout: pk with dropout_p=0.1 against the plain pk kernel and torch's SDPA with the
# same dropout_p, same inputs, same run (B=2, H=8, D=64, S=2048, not causal, forward+backward;
# the ratio "pk dropout" / "pk plain" is the price of the mask: Philox per 8 keys, regenerated in
# the backward).
DROPOUT_IMPLS = ["pk dropout", "pk plain", "torch sdpa dropout"]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("impl", DROPOUT_IMPLS)
def test_dropout_forward_backward(benchmark, impl, dt):
    S, D, p = LONG, 64, 0.1
    q, k, v = make_inputs(S, D, DTYPES[dt], "torch sdpa" if impl.startswith("torch") else "pk", grad=True)
    dout = torch.randn_like(q)
    benchmark.group = f"attention fwd+bwd dropout p{p} B{B} H{H} S{S} D{D} {dt}"
    benchmark.extra_info.update(family="attention", op="flash_attention dropout fwd+bwd", impl=impl, device="cpu",
                                shape=f"{B}x{S}x{H}x{D}", baseline=(impl == "pk dropout"),
                                flops=3.5 * 4 * B * H * S * S * D)
    if impl == "pk dropout":
        fwd = lambda: pk.flash_attention(q, k, v, dropout_p=p)  # noqa: E731
    elif impl == "pk plain":
        fwd = lambda: pk.flash_attention(q, k, v)  # noqa: E731
    else:
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # noqa: E731

    def step():
        torch.autograd.grad(fwd(), (q, k, v), dout)

    benchmark.pedantic(step, rounds=rounds(3), iterations=1, warmup_rounds=1)


_MEM_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
import pretrain_kernels.bench.bench_attention as ba


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


impl, S, D = {impl!r}, {S}, {D}
q, k, v = ba.make_inputs(S, D, torch.float32, impl, grad=True)
dout = torch.randn_like(q)
with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident size (VmHWM)
    f.write("5")
before = status("VmRSS")
torch.autograd.grad(ba.run_fn(impl, q, k, v, False)(), (q, k, v), dout)
print((status("VmHWM") - before) / 1024.0)
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory(benchmark, impl):
    """Peak extra resident memory (MiB) of one forward+backward at S=4096, D=64, float32, beyond
    the inputs: recorded in extra_info.peak_mib (the time is that of the subprocess). Not under
    --quick (a fresh process per implementation)."""
    if QUICK:
        pytest.skip("not under --quick")
    S, D = 4096, 64
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = _MEM_SCRIPT.format(root=root, impl=impl, S=S, D=D)
    result = {}

    def run():
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        result["mib"] = float(r.stdout.strip().splitlines()[-1])

    benchmark.group = f"attention fwd+bwd peak memory S{S} D{D} fp32"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(family="attention", op="flash_attention fwd+bwd memory", impl=impl, device="cpu",
                                shape=f"{B}x{S}x{H}x{D}", baseline=(impl == "pk"), peak_mib=result["mib"])
    print(f"\npeak extra memory {impl}: {result['mib']:.0f} MiB")
