"""GPT training throughput: the package's model (pk.flash_attention) against an identical model
whose attention is torch's scaled_dot_product_attention (everything else the same eager
modules, the same weights, the same batch). One timed call = one optimizer step: forward,
backward, AdamW. extra_info records impl, baseline (True for the package's), tokens, so
report.py shows the speedup; "tokens_per_s" is B * T / time. --quick: the small config in
float32 only, batch 4, 2 rounds.

Run: pk-bench train [--device cpu|cuda] [--quick]
Or:  python -m pretrain_kernels.bench.bench_train [--steps 20] [--dtype bfloat16]  (tokens/s and the ratio)
"""
import argparse
import copy
import time

import pytest
import torch
import torch.nn.functional as F

from pretrain_kernels.bench.common import QUICK, quick, rounds
from pretrain_kernels.models import GPT, GPTConfig
from pretrain_kernels.models.gpt import CausalSelfAttention

CONFIGS = {"small": (GPTConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=192, block_size=256), 16, 256),
           "gqa": (GPTConfig(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, block_size=512), 8, 512)}


def sdpa_attend(q, k, v):
    """The baseline: torch SDPA on the same (B, T, heads, head_dim) tensors."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2)


def make(impl: str, cfg: GPTConfig, device="cpu"):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if impl == "torch sdpa":
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                m.attend = sdpa_attend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    return model, opt


def train_step_fn(impl, name, device="cpu", dtype="float32"):
    cfg, B, T = CONFIGS[name]
    B = quick(B, 4)
    model, opt = make(impl, cfg, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T + 1), generator=g).to(device)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16" else None

    def step():
        if ctx:
            with ctx():
                _, loss = model(x[:, :-1], x[:, 1:])
        else:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, B * T


@pytest.mark.parametrize("dtype", quick(["float32", "bfloat16"], ["float32"]))
@pytest.mark.parametrize("name", quick(list(CONFIGS), ["small"]))
@pytest.mark.parametrize("impl", ["pk", "torch sdpa"])
def test_gpt_train_step(benchmark, bench_device, impl, name, dtype):
    step, tokens = train_step_fn(impl, name, bench_device, dtype)
    step()
    benchmark.group = f"gpt train step {name} {dtype} {bench_device}"
    benchmark.extra_info.update(family="train", op="gpt_train_step", impl=impl, device=bench_device, shape=name,
                                dtype=dtype, baseline=(impl == "pk"), tokens=tokens)
    benchmark.pedantic(step, rounds=rounds(5), iterations=1, warmup_rounds=0 if QUICK else 1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median


def test_same_losses():
    """The two models are the same function: their first losses agree."""
    a, _ = train_step_fn("pk", "small")
    b, _ = train_step_fn("torch sdpa", "small")
    torch.testing.assert_close(a(), b(), rtol=1e-4, atol=1e-4)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--config", choices=list(CONFIGS), default="small")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rates = {}
    steps = {impl: train_step_fn(impl, args.config, args.device, args.dtype) for impl in ("pk", "torch sdpa")}
    for impl in steps:
        steps[impl][0]()  # warm up
    times = {impl: [] for impl in steps}
    for _ in range(args.steps):  # interleaved, so both see the same machine load
        for impl, (fn, _) in steps.items():
            t = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t)
    for impl, (_, tokens) in steps.items():
        med = sorted(times[impl])[len(times[impl]) // 2]
        rates[impl] = tokens / med
        print(f"{impl:11s} {rates[impl]:10,.0f} tokens/s  (median step {med * 1e3:.1f} ms)")
    print(f"pk / torch sdpa: {rates['pk'] / rates['torch sdpa']:.2f}x  ({args.config}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
