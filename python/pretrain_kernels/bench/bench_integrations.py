"""transformers integration: a small Llama (4 layers, width 256, 4 heads of 64, batch 8, lengths
128-512 padded to 512) with attn_implementation="pretrain_kernels" (the attention alone), the same
plus apply_kernels (RMSNorm, SwiGLU, rotary embedding and the fused linear cross-entropy on the
package's kernels: "pretrain_kernels+apply_kernels"), against the same weights on transformers'
"sdpa" (torch's scaled_dot_product_attention with the padding mask). Timed:
forward + backward of the padded batch (right padding, labels on the real tokens), the same
tokens padding-free (the sequences packed into one row with restarting position_ids, as
transformers' DataCollatorWithFlattening makes them: the whole model then skips the padding),
and greedy generate of 64 new tokens with the KV cache from the left-padded batch. extra_info
records impl, baseline (True for the package's all-kernels row) and tokens, so report.py shows
the speedups. The table of main() gives wall times and the process CPU times (user + system of
this process, less sensitive to other load on the machine) with their ratios against sdpa.
--quick: batch 4, lengths 64-128, 8 new tokens.

Run: pk-bench integrations [--device cpu|cuda] [--quick]
Or:  python -m pretrain_kernels.bench.bench_integrations [--rounds 5]   (a table of times and ratios)
"""
import argparse
import time

import pytest
import torch

from pretrain_kernels.bench.common import quick, require, rounds

B, MIN_LEN, MAX_LEN, NEW_TOKENS, VOCAB = quick((8, 128, 512, 64), (4, 64, 128, 8)) + (1024,)
PK, PK_ALL, SDPA = "pretrain_kernels", "pretrain_kernels+apply_kernels", "sdpa"
IMPLS = (PK, PK_ALL, SDPA)
BASELINE = PK_ALL


def _transformers():
    transformers = require("transformers")
    from pretrain_kernels.integrations import transformers as pkt
    pkt.register()
    return transformers


def make_model(impl: str, device="cpu"):
    tf = _transformers()
    from pretrain_kernels.integrations import transformers as pkt
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    attn = PK if impl == PK_ALL else impl
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).to(device)
    return pkt.apply_kernels(model) if impl == PK_ALL else model


def make_batch(padding: str, device="cpu"):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(MIN_LEN, MAX_LEN + 1, (B,), generator=g)
    lens[0] = MAX_LEN
    ids = torch.randint(1, VOCAB, (B, MAX_LEN), generator=g)
    pos = torch.arange(MAX_LEN)[None]
    mask = (pos < lens[:, None]) if padding == "right" else (pos >= MAX_LEN - lens[:, None])
    ids = ids.masked_fill(~mask, 0)
    return ids.to(device), mask.long().to(device), int(lens.sum())


def packed_batch(device="cpu"):
    """The right-padded batch's real tokens packed into one row: input_ids [1, T], position_ids
    restarting at each sequence, labels -100 at each sequence's first token (no prediction across
    a boundary), as DataCollatorWithFlattening."""
    ids, mask, tokens = make_batch("right", device)
    keep = mask.bool()
    lens = keep.sum(1).tolist()
    flat = ids[keep][None]
    pos = torch.cat([torch.arange(n, device=ids.device) for n in lens])[None]
    labels = flat.clone()
    labels[pos == 0] = -100
    return flat, pos, labels, tokens


def fwd_bwd_fn(impl, device="cpu", packed=False):
    model = make_model(impl, device).train()
    if packed:
        ids, pos, labels, tokens = packed_batch(device)
        kw = dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)  # transformers finds packed sequences only without a cache
    else:
        ids, mask, tokens = make_batch("right", device)
        kw = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def step():
        loss = model(**kw).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, tokens


def generate_fn(impl, device="cpu"):
    model = make_model(impl, device).eval()
    ids, mask, _ = make_batch("left", device)

    def step():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return step, B * NEW_TOKENS


@pytest.mark.parametrize("impl", IMPLS)
def test_llama_padded_fwd_bwd(benchmark, bench_device, impl):
    step, tokens = fwd_bwd_fn(impl, bench_device)
    step()
    benchmark.group = f"transformers llama fwd+bwd B{B} len{MIN_LEN}-{MAX_LEN} {bench_device}"
    benchmark.extra_info.update(family="integrations", op="llama fwd+bwd", impl=impl, device=bench_device,
                                baseline=(impl == BASELINE), tokens=tokens)
    benchmark.pedantic(step, rounds=rounds(3), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_llama_padding_free_fwd_bwd(benchmark, bench_device, impl):
    step, tokens = fwd_bwd_fn(impl, bench_device, packed=True)
    step()
    benchmark.group = f"transformers llama fwd+bwd padding-free B{B} len{MIN_LEN}-{MAX_LEN} {bench_device}"
    benchmark.extra_info.update(family="integrations", op="llama fwd+bwd padding-free", impl=impl,
                                device=bench_device, baseline=(impl == BASELINE), tokens=tokens)
    benchmark.pedantic(step, rounds=rounds(3), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_llama_generate(benchmark, bench_device, impl):
    step, tokens = generate_fn(impl, bench_device)
    benchmark.group = f"transformers llama generate B{B} +{NEW_TOKENS} {bench_device}"
    benchmark.extra_info.update(family="integrations", op="llama generate", impl=impl, device=bench_device,
                                baseline=(impl == BASELINE), tokens=tokens)
    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", (PK, PK_ALL))
def test_padding_free_matches_padded(impl):
    """The padding-free batch gives the padded batch's loss (same tokens, same labels)."""
    losses = []
    for packed in (False, True):
        model = make_model(impl).eval()
        if packed:
            ids, pos, labels, _ = packed_batch()
            kw = dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)  # transformers finds packed sequences only without a cache
        else:
            ids, mask, _ = make_batch("right")
            kw = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        with torch.no_grad():
            losses.append(model(**kw).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_same_generation():
    """Every implementation generates the same tokens (greedy) from the benchmark's batch, shortened."""
    outs = []
    for impl in IMPLS:
        model = make_model(impl).eval()
        ids, mask, _ = make_batch("left")
        with torch.no_grad():
            outs.append(model.generate(ids[:2, -min(150, MAX_LEN):], attention_mask=mask[:2, -min(150, MAX_LEN):],
                                       max_new_tokens=8,
                                       do_sample=False, pad_token_id=0))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rows = []
    makers = (("fwd+bwd", fwd_bwd_fn), ("fwd+bwd padding-free", lambda impl, d: fwd_bwd_fn(impl, d, packed=True)),
              ("generate", generate_fn))
    for what, make in makers:
        fns = {impl: make(impl, args.device)[0] for impl in IMPLS}
        for fn in fns.values():
            fn()  # warm up
        wall = {impl: [] for impl in IMPLS}
        cpu = {impl: [] for impl in IMPLS}
        for _ in range(args.rounds):  # interleaved, so all see the same machine load
            for impl, fn in fns.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall[impl].append(time.perf_counter() - t)
                cpu[impl].append(time.process_time() - c)
        med = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
        rows.append((what, {i: med(wall[i]) for i in IMPLS}, {i: med(cpu[i]) for i in IMPLS}))
    print(f"small Llama (4 x 256, batch {B}, lengths {MIN_LEN}-{MAX_LEN}), {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}; wall time, and in brackets the "
          f"process CPU time; ratios sdpa / pk")
    print("| | pk attention | pk attention + apply_kernels | sdpa | sdpa / pk attention | sdpa / pk all |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, w, c in rows:
        print(f"| {what} | {w[PK] * 1e3:.0f} ms ({c[PK] * 1e3:.0f}) | {w[PK_ALL] * 1e3:.0f} ms ({c[PK_ALL] * 1e3:.0f}) "
              f"| {w[SDPA] * 1e3:.0f} ms ({c[SDPA] * 1e3:.0f}) | {w[SDPA] / w[PK]:.2f}x ({c[SDPA] / c[PK]:.2f}x) "
              f"| {w[SDPA] / w[PK_ALL]:.2f}x ({c[SDPA] / c[PK_ALL]:.2f}x) |")
    padded_sdpa, free_pk = rows[0][1][SDPA], rows[1][1][PK_ALL]
    print(f"\nthe padded batch on sdpa against the same tokens padding-free on pretrain_kernels + apply_kernels: "
          f"{padded_sdpa / free_pk:.2f}x")


if __name__ == "__main__":
    main()
