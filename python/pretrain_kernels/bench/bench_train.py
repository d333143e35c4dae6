"""GPT training throughput: the package's model (pretrain_kernels.models.GPT: pk.flash_attention,
pk.rotary_embedding, the pk.linear_cross_entropy head) against the same architecture written in
plain eager torch (EagerGPT below: the eager rotary, torch's scaled_dot_product_attention, an
F.linear + F.cross_entropy head), with the same parameter names and the same weights, on the
same batch. One timed call = one optimizer step: forward,
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
from torch import nn

from pretrain_kernels.models import GPT, GPTConfig
from pretrain_kernels.models.gpt import rope_tables

# name: (config, batch, sequence length). "seq1024" is the target: head_dim 64.
CONFIGS = {"small": (GPTConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=192, block_size=256), 16, 256),
           "gqa": (GPTConfig(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, block_size=512), 8, 512),
           "seq1024": (GPTConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, block_size=1024), 4, 1024)}


# ---- the baseline: the same GPT in plain eager torch ------------------------------------------


def eager_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, heads, head_dim] by cos/sin [T, 1, head_dim / 2]
    in float32, as eager torch code does it."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


class EagerAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: bool = True):
        super().__init__()
        self.attention = attention
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hk * D, Hk * D], dim=-1)
        q = eager_rope(q.view(B, T, H, D), cos, sin).transpose(1, 2)
        k = eager_rope(k.view(B, T, Hk, D), cos, sin).transpose(1, 2)
        v = v.reshape(B, T, Hk, D).transpose(1, 2)
        if not self.attention:      # the bound of free attention: each query takes its own value row
            y = (v.repeat_interleave(H // Hk, dim=1) if Hk != H else v) + 0 * (q.sum() + k.sum())
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hk != H)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class EagerMLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc = nn.Linear(dim, int(dim * ratio), bias=False)
        self.out = nn.Linear(int(dim * ratio), dim, bias=False)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x), approximate="tanh"))


class EagerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: bool = True):
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.n_embd)
        self.attn = EagerAttention(cfg, attention)
        self.ln2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = EagerMLP(cfg.n_embd, cfg.mlp_ratio)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + self.mlp(self.ln2(x))


class EagerGPT(nn.Module):
    """pretrain_kernels.models.GPT's architecture and parameter names (so its state_dict loads),
    in eager torch: the training forward only (idx, targets) -> (logits, loss). attention=False
    replaces attention by the identity on the values (the rest unchanged, rotary included): the
    step time if attention cost nothing, the bound on what a faster attention alone can give."""

    def __init__(self, cfg: GPTConfig, attention: bool = True):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(EagerBlock(cfg, attention) for _ in range(cfg.n_layer))
        self.ln_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx, targets):
        T = idx.shape[1]
        cos, sin = rope_tables(torch.arange(T, device=idx.device), self.cfg.n_embd // self.cfg.n_head,
                               self.cfg.rope_base)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = F.linear(self.ln_f(x), self.lm_head.weight)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# AdamW as torch picks it by default for CPU tensors (the single-tensor loop), or its fused kernel
OPTIMIZERS = {"adamw": dict(foreach=False), "adamw-fused": dict(fused=True)}


def make(impl: str, cfg: GPTConfig, device="cpu", optimizer="adamw"):
    """(model, optimizer) for impl "pk" (the package's GPT), "torch sdpa" (EagerGPT) or "no attention"
    (EagerGPT without attention, the bound), with the same initial weights and the same optimizer."""
    torch.manual_seed(0)
    model = GPT(cfg)
    if impl in ("torch sdpa", "no attention"):
        eager = EagerGPT(cfg, attention=impl == "torch sdpa")
        eager.load_state_dict(model.state_dict())
        model = eager
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **OPTIMIZERS[optimizer])
    return model, opt


def train_step_fn(impl, name, device="cpu", dtype="float32", optimizer="adamw"):
    cfg, B, T = CONFIGS[name]
    B = quick(B, 4)
    model, opt = make(impl, cfg, device, optimizer)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T + 1), generator=g).to(device)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16" else None

    # the package's model trains through its fused LM head (no [B, T, vocab] logits)
    kw = {"return_logits": False} if impl == "pk" else {}

    def step():
        if ctx:
            with ctx():
                _, loss = model(x[:, :-1], x[:, 1:], **kw)
        else:
            _, loss = model(x[:, :-1], x[:, 1:], **kw)
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
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                    help="adamw: torch's default for CPU tensors (the single-tensor loop); adamw-fused: fused=True "
                         "(both models use the same)")
    ap.add_argument("--bound", action="store_true", help="also time the eager model without attention (what "
                    "free attention would give: the bound on the attention kernel's share of the speedup)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    impls = ("pk", "torch sdpa") + (("no attention",) if args.bound else ())
    steps = {impl: train_step_fn(impl, args.config, args.device, args.dtype, args.optimizer) for impl in impls}
    for impl in steps:
        steps[impl][0]()  # warm up
    times = {impl: [] for impl in steps}
    cpu_times = {impl: [] for impl in steps}
    for _ in range(args.steps):  # interleaved, so both see the same machine load
        for impl, (fn, _) in steps.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[impl].append(time.perf_counter() - t)
            cpu_times[impl].append(time.process_time() - c)

    def median(v):
        return sorted(v)[len(v) // 2]

    rates, cpu_rates = {}, {}
    for impl, (_, tokens) in steps.items():
        med, cpu = median(times[impl]), median(cpu_times[impl])
        rates[impl], cpu_rates[impl] = tokens / med, tokens / cpu
        print(f"{impl:11s} {rates[impl]:10,.0f} tokens/s  (median step {med * 1e3:.1f} ms wall, "
              f"{cpu * 1e3:.1f} ms process CPU time)")
    where = f"({args.config}, {args.dtype}, {args.device}, {args.optimizer}, {torch.get_num_threads()} threads)"
    for impl in (i for i in impls if i != "torch sdpa"):
        print(f"{impl} / torch sdpa: {rates[impl] / rates['torch sdpa']:.2f}x wall clock, "
              f"{cpu_rates[impl] / cpu_rates['torch sdpa']:.2f}x process CPU time  {where}")


if __name__ == "__main__":
    main()
