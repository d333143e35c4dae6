"""Flash attention on CUDA against torch SDPA, flash-attn and FlashInfer (where installed) in the
same run, same inputs.

Training shapes (FlashAttention's benchmark): batch x seqlen = 16k tokens, hidden 2048
(32 heads of 64 or 16 heads of 128), seqlen 512 .. 16k, causal and not, bfloat16; forward
and backward, each against torch SDPA restricted to its flash backend. TFLOP/s use
FlashAttention's count: 4 * B * H * S * S * D for the forward, halved when causal, and 2.5x
the forward for the backward; flash-attn's flash_attn_func beside them. Decode: one query token
per row against a long GQA cache, against torch SDPA on the cache prefix, flash-attn's
flash_attn_with_kvcache (contiguous, and paged with 256-token pages) and FlashInfer's
BatchDecodeWithPagedKVCacheWrapper (16-token pages); bytes = the cache read once (K and V).

The default run takes seqlen 1k, 4k and 16k (it has to fit the device check's time budget
next to the other families); --quick takes 1k; PK_BENCH_ALL=1 runs 512 .. 16k in powers of two.

Run: pk-bench attention --device cuda [--quick]. Each test records group, impl, flops or bytes,
baseline (True for pretrain-kernels) and the GPU name in extra_info.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels.bench.common import cuda_sync_fn, quick, require, version

pytestmark = pytest.mark.cuda

TOKENS = 16 * 1024
HIDDEN = 2048
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384] if os.environ.get("PK_BENCH_ALL") == "1" else \
    quick([1024, 4096, 16384], [1024])
HEAD_DIMS = [64, 128]
IMPLS = ["pk", "sdpa_flash", "flash-attn"]


def _require_cuda():
    if not (torch.cuda.is_available() and pk.build_info()["with_cuda"]):
        pytest.skip("needs an NVIDIA GPU and a CUDA build of the extension")


def _flops(B, H, S, D, causal, mode):
    f = 4.0 * B * H * S * S * D
    if causal:
        f /= 2
    return f * 2.5 if mode == "bwd" else f


def _inputs(S, D, dtype=torch.bfloat16):
    B, H = TOKENS // S, HIDDEN // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g)
    return B, H, q, k, v, dout


def _attention(impl, causal, deterministic=False):
    if impl == "pk":
        return lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, deterministic=deterministic)
    if impl == "flash-attn":
        flash_attn = require("flash-attn")
        return lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=causal)

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal)
        return out.transpose(1, 2)

    return sdpa


def _info(benchmark, impl, mode, S, D, causal, B, H):
    benchmark.group = f"attention {mode} S={S} D={D} {'causal' if causal else 'full'} bf16 cuda"
    benchmark.extra_info.update(family="attention", op=f"flash_attention {mode}", impl=impl, device="cuda",
                                shape=f"{B}x{S}x{H}x{D}", baseline=(impl == "pk"),
                                flops=_flops(B, H, S, D, causal, mode), gpu=torch.cuda.get_device_name())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("S", SEQLENS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("impl", IMPLS + ["pk_bm64"])
def test_cuda_attention_forward(benchmark, impl, S, D, causal, monkeypatch):
    """pk_bm64: the same kernels held to 64-row blocks (PK_ATTENTION_FWD_BLOCK_M=64), to weigh
    the default 128-row blocks on this GPU."""
    _require_cuda()
    B, H, q, k, v, _ = _inputs(S, D)
    if impl == "pk_bm64":
        monkeypatch.setenv("PK_ATTENTION_FWD_BLOCK_M", "64")
    fn = _attention("pk" if impl == "pk_bm64" else impl, causal)
    _info(benchmark, impl, "fwd", S, D, causal, B, H)
    with torch.no_grad():
        benchmark(cuda_sync_fn(lambda: fn(q, k, v), "cuda"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("S", SEQLENS, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("impl", IMPLS + ["pk_separate", "pk_ordered"])
def test_cuda_attention_backward(benchmark, impl, S, D, causal, monkeypatch):
    """pk: deterministic=False (the default: dQ added with float atomics in the dK/dV pass);
    pk_separate / pk_ordered: deterministic=True with the separate dQ pass or the ordered fused
    dQ (PK_ATTENTION_BWD), to weigh the schemes against each other on this GPU."""
    _require_cuda()
    B, H, q, k, v, dout = _inputs(S, D)
    if impl in ("pk_separate", "pk_ordered"):
        monkeypatch.setenv("PK_ATTENTION_BWD", impl[3:])
    out = _attention("pk" if impl.startswith("pk") else impl, causal,
                     deterministic=impl in ("pk_separate", "pk_ordered"))(q, k, v)
    _info(benchmark, impl, "bwd", S, D, causal, B, H)
    benchmark(cuda_sync_fn(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), "cuda"))


def _paged(kc, vc, ps, g):
    """The cache's values in pages of ps tokens at a random permutation of blocks:
    (block_table [B, L / ps] int32, k_pages, v_pages [blocks, ps, Hk, D])."""
    B, L, Hk, D = kc.shape
    table = torch.randperm(B * L // ps, device="cuda", generator=g).view(B, L // ps).to(torch.int32)
    kp, vp = (torch.empty(B * L // ps, ps, Hk, D, device="cuda", dtype=kc.dtype) for _ in range(2))
    kp[table.flatten().long()] = kc.reshape(-1, ps, Hk, D)
    vp[table.flatten().long()] = vc.reshape(-1, ps, Hk, D)
    return table, kp, vp


def _flashinfer_decode(q, kc, vc, n, ps, g):
    """FlashInfer's batch decode over the same values in pages of ps tokens (NHD layout)."""
    flashinfer = require("FlashInfer")
    B, L, Hk, D = kc.shape
    table, kp, vp = _paged(kc, vc, ps, g)
    per_row = L // ps
    indptr = torch.arange(B + 1, device="cuda", dtype=torch.int32) * per_row
    last_page_len = torch.full((B,), n - (per_row - 1) * ps, device="cuda", dtype=torch.int32)
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    try:
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(indptr, table.flatten(), last_page_len, q.shape[2], Hk, D, ps,
                     q_data_type=q.dtype, kv_data_type=kc.dtype)
    except (AttributeError, TypeError) as e:  # an API older or newer than the one written here
        pytest.skip(f"FlashInfer {version('FlashInfer')}: batch decode API not as expected: {e}")
    q3 = q[:, 0]
    return lambda: wrapper.run(q3, (kp, vp))


DECODE_IMPLS = ["pk", "pk paged16", "pk paged256", "sdpa", "flash-attn", "flash-attn paged256", "flashinfer paged16"]


@pytest.mark.parametrize("shape", [(1, 16384), (8, 8192), (32, 2048)], ids=lambda s: f"b{s[0]}-cache{s[1]}")
@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_cuda_attention_decode(benchmark, impl, shape):
    _require_cuda()
    B, L = shape
    H, Hk, D = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    kc, vc = (torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    n = L - 1  # keys in every row
    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    if impl == "pk":
        def fn():
            return pk.flash_attention_with_kvcache(q, kc, vc, lens, causal=True)
    elif impl.startswith("pk paged"):
        table, kp, vp = _paged(kc, vc, int(impl[len("pk paged"):]), g)

        def fn():
            return pk.flash_attention_with_kvcache(q, kp, vp, lens, causal=True, block_table=table)
    elif impl.startswith("flash-attn"):
        flash_attn = require("flash-attn")
        table, kf, vf = _paged(kc, vc, 256, g) if impl.endswith("paged256") else (None, kc, vc)

        def fn():
            return flash_attn.flash_attn_with_kvcache(q, kf, vf, cache_seqlens=lens, block_table=table, causal=True)
    elif impl.startswith("flashinfer"):
        fn = _flashinfer_decode(q, kc, vc, n, int(impl[len("flashinfer paged"):]), g)
    else:
        kt, vt = kc[:, :n].transpose(1, 2), vc[:, :n].transpose(1, 2)

        def fn():
            return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, enable_gqa=True)
    benchmark.group = f"attention decode B={B} cache={L} H={H}/{Hk} D={D} bf16 cuda"
    benchmark.extra_info.update(family="attention", op="flash_attention_with_kvcache", impl=impl, device="cuda",
                                shape=f"{B}x{L}x{Hk}x{D}", baseline=(impl == "pk"), bytes=2 * B * n * Hk * D * 2,
                                gpu=torch.cuda.get_device_name())
    with torch.no_grad():
        benchmark(cuda_sync_fn(fn, "cuda"))
