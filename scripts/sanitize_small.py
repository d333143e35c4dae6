"""Small calls of every CUDA op, for compute-sanitizer (memcheck / racecheck) runs from
scripts/device_check.sh. Exits non-zero if an op raises."""
import os

import torch

import pretrain_kernels as pk


def masking():
    g = torch.Generator().manual_seed(0)
    for B, L in [(1, 1), (3, 7), (2, 300), (5, 33)]:
        ids = torch.randint(5, 100, (B, L), generator=g).cuda()
        attn = (torch.rand(B, L, generator=g) < 0.8).cuda()
        ws = (torch.rand(B, L, generator=g) < 0.5).cuda()
        rates = torch.rand(B, generator=g).cuda()
        for kw in [dict(), dict(exact_count=True), dict(word_starts=ws), dict(word_starts=ws, exact_count=True),
                   dict(mask_prob=rates, exact_count=True, max_predictions=2)]:
            pk.mlm_mask(ids, mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3, 4], attention_mask=attn,
                        seed=1, **kw)
        pk.span_mask(ids, mask_token_id=4, vocab_size=100, attention_mask=attn, seed=1)
        pk.span_mask(ids, mask_token_id=4, vocab_size=100, word_starts=ws, seed=2)


def sampling():
    g = torch.Generator().manual_seed(1)
    for B, V in [(1, 7), (3, 1000), (2, 5000)]:
        logits = torch.randn(B, V, generator=g).cuda()
        prev = torch.randint(-1, V, (B, 9), generator=g).cuda()
        pk.sample(logits, temperature=0.7, top_k=5, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                  presence_penalty=0.1, frequency_penalty=0.1, prev_tokens=prev, seed=3, return_logprobs=True)
        pk.sample(logits, temperature=0.0, seed=3)
        pk.sample(logits, top_p=0.5, seed=4)
        pk.top_k_top_p_filter(logits, top_k=3, top_p=0.8, min_p=0.05)
        n = 3
        draft = torch.softmax(torch.randn(B, n, V, generator=g), -1).cuda()
        target = torch.softmax(torch.randn(B, n + 1, V, generator=g), -1).cuda()
        ids = torch.randint(0, V, (B, n), generator=g).cuda()
        pk.speculative_accept(draft, ids, target, seed=5)


def diffusion():
    g = torch.Generator().manual_seed(2)
    acp = pk.noise_schedule("scaled_linear", 1000, 0.00085, 0.012).cuda()
    for shape in [(1, 1, 3, 3), (3, 4, 7, 5), (2, 3, 32, 32)]:
        x0 = torch.randn(shape, generator=g).cuda()
        eps = torch.randn(shape, generator=g).cuda()
        t = torch.randint(0, 1000, (shape[0],), generator=g).cuda()
        xt, target = pk.add_noise(x0, eps, t, acp, target="v_prediction")
        pred = target.clone().requires_grad_(True)
        pk.diffusion_loss(pred, target, t, acp, weighting="min_snr", prediction_type="v_prediction").backward()
        prev_t = (t - 20).clamp(min=-1)
        pk.ddpm_step(eps, xt, t, prev_t, acp, seed=1)
        pk.ddim_step(eps, xt, t, prev_t, acp, eta=0.5, seed=1)
        sigma = torch.rand(shape[0], generator=g).cuda()
        pk.flow_match_step(eps, xt, sigma, sigma * 0.5, stochastic=True, seed=1)


def attention():
    """Forward, backward (tensor-core and SIMT passes), varlen, split-KV decode with append,
    and the SDPA drop-in with bool / float masks, on small odd shapes in every dtype."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g).to("cuda", dtype)

    cases = [  # (B, Sq, Sk, H, Hk, D, causal, window)
        (1, 1, 1, 1, 1, 8, False, (-1, -1)),
        (2, 17, 33, 4, 2, 64, True, (-1, -1)),
        (1, 70, 70, 2, 1, 40, False, (16, 4)),
        (1, 33, 20, 2, 2, 128, True, (-1, -1)),
        (1, 20, 20, 1, 1, 256, False, (-1, -1)),
        (1, 129, 65, 2, 1, 96, False, (-1, 0)),
        (1, 40, 200, 2, 1, 64, False, (-1, -1)),   # several key tiles: the double-buffered dQ pass
        (1, 150, 150, 2, 1, 256, True, (-1, -1)),  # the two dK/dV passes of head_dim 256, many tiles
        (1, 200, 260, 2, 1, 128, True, (-1, -1)),  # 128-row forward blocks over five key tiles
    ]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for B, sq, sk, H, Hk, D, causal, window in cases:
            q = rnd(B, sq, H, D, dtype=dtype).requires_grad_()
            k = rnd(B, sk, Hk, D, dtype=dtype).requires_grad_()
            v = rnd(B, sk, Hk, D, dtype=dtype).requires_grad_()
            out, lse = pk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
            torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.ones_like(lse)))
        cu_q = torch.tensor([0, 5, 5, 38], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 9, 12, 80], dtype=torch.int32, device="cuda")
        q, k, v = (rnd(n, 4, 64, dtype=dtype).requires_grad_() for n in (38, 80, 80))
        out = pk.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        out.float().sum().backward()
        kc, vc = rnd(2, 600, 2, 64, dtype=dtype), rnd(2, 600, 2, 64, dtype=dtype)
        lens = torch.tensor([3, 590], dtype=torch.int32, device="cuda")
        pk.flash_attention_with_kvcache(rnd(2, 1, 8, 64, dtype=dtype), kc, vc, lens, k_new=rnd(2, 1, 2, 64, dtype=dtype),
                                        v_new=rnd(2, 1, 2, 64, dtype=dtype))
        pk.flash_attention_with_kvcache(rnd(2, 7, 8, 64, dtype=dtype), kc, vc, lens, causal=False)
        q, k, v = (rnd(2, 3, 19, 40, dtype=dtype).requires_grad_() for _ in range(3))
        for mask in (torch.rand(19, 19, generator=g).cuda() > 0.3, rnd(2, 1, 19, 19, dtype=torch.float32)):
            pk.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()
    # the dQ schemes of the tensor-core backward: the separate pass and turns between key blocks
    # (ordered; deterministic=True, PK_ATTENTION_BWD picks), float atomics (deterministic=False),
    # with and without a causal mask, over several key blocks and GQA heads
    for scheme, deterministic in (("separate", True), ("ordered", True), ("separate", False)):
        os.environ["PK_ATTENTION_BWD"] = scheme
        try:
            for causal, D in ((True, 64), (False, 128), (True, 256)):
                q = rnd(1, 150, 4, D, dtype=torch.bfloat16).requires_grad_()
                k, v = (rnd(1, 200, 2, D, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
                out = pk.flash_attention(q, k, v, causal=causal, deterministic=deterministic)
                torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        finally:
            del os.environ["PK_ATTENTION_BWD"]


def layers():
    # pk.rms_norm (odd widths, a float32 weight for bf16 x, more rows than weight-gradient blocks)
    # and pk.swiglu and pk.gelu (both forms), forward and backward
    for dtype in (torch.float32, torch.bfloat16):
        for rows, D in ((3, 7), (300, 129), (5, 1000)):
            x = torch.randn(rows, D, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(D, device="cuda", dtype=torch.float32, requires_grad=True)
            pk.rms_norm(x, w, offset=1.0).float().sum().backward()
        g, u = (torch.randn(7, 333, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        pk.swiglu(g, u).float().sum().backward()
        for approximate in ("none", "tanh"):
            pk.gelu(g, approximate=approximate).float().sum().backward()


CHECKS = [masking, sampling, diffusion, attention, layers]

if __name__ == "__main__":
    for check in CHECKS:
        check()
        torch.cuda.synchronize()
        print(f"{check.__name__}: ok")
