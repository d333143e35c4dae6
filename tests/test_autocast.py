"""torch.autocast on every op family (python/pretrain_kernels/ops/autocast.py), through the public
functions and the raw ops, each against its torch counterpart's behaviour: attention casts q, k,
v to the autocast dtype (as torch's SDPA), the denoising math runs in float32 (as mse_loss),
masking and sampling are unaffected; and a tiny Llama trains through the transformers
integration under CPU bfloat16 autocast. Runs on the CPU, CUDA (with a GPU) and the emulated
CUDA kernels."""
import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from reference import attention_ref, rel_err

EMULATE_CUDA = True
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def rand(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _dev(device):
    return device.type  # the autocast device type ("cpu" for the emulated kernels too)


@pytest.mark.parametrize("ac_dtype", AUTOCAST_DTYPES)
def test_flash_attention_casts_like_sdpa(device, ac_dtype):
    """Mixed float32 / bfloat16 q, k, v (RoPE in float32 next to a bf16 projection) under autocast:
    the output has torch SDPA's dtype under the same autocast, and equals the call on inputs cast
    by hand; gradients reach the float32 inputs in float32."""
    q = rand(2, 19, 4, 32, device=device, seed=1).requires_grad_()
    k = rand(2, 19, 2, 32, device=device, seed=2).requires_grad_()
    v = rand(2, 19, 2, 32, device=device, dtype=torch.bfloat16, seed=3).requires_grad_()
    with torch.autocast(_dev(device), dtype=ac_dtype):
        out = pk.flash_attention(q, k, v, causal=True)
        raw = torch.ops.pretrain_kernels.flash_attn_fwd(q, k, v, None, None, None, -1, -1, 32 ** -0.5, -1, 0,
                                                        True)[0]
        torch_out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True, enable_gqa=True)
    assert out.dtype == raw.dtype == torch_out.dtype == ac_dtype
    by_hand = pk.flash_attention(q.detach().to(ac_dtype), k.detach().to(ac_dtype), v.detach().to(ac_dtype),
                                 causal=True)
    assert torch.equal(out, by_hand) and torch.equal(raw, by_hand)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert rel_err(out, ref) < 2e-2
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_float64_is_not_cast():
    """Autocast leaves float64 alone (torch's rule), so float64 attention (a CPU feature) stays float64."""
    q = rand(1, 7, 2, 8, device=torch.device("cpu"), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pk.flash_attention(q, q, q)
    assert out.dtype == torch.float64
    assert torch.equal(out, pk.flash_attention(q, q, q))


def test_sdpa_mask_and_alibi_keep_their_dtypes(device):
    """The float attention mask and the float32 ALiBi slopes are not cast with q, k, v."""
    q, k, v = (rand(2, 3, 11, 16, device=device, seed=s) for s in range(3))
    mask = rand(2, 1, 11, 11, device=device, seed=4)
    with torch.autocast(_dev(device), dtype=torch.bfloat16):
        out = pk.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        slopes = torch.rand(3, device=device)
        out_alibi = pk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       alibi_slopes=slopes)
    assert out.dtype == torch_out.dtype == torch.bfloat16
    by_hand = pk.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
    assert torch.equal(out, by_hand)
    assert out_alibi.dtype == torch.bfloat16
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alibi_slopes=slopes)
    assert rel_err(out_alibi, ref) < 2e-2


def test_kvcache_follows_the_cache_dtype(device):
    """The caches are written in place and keep their dtype: q, k_new, v_new take it."""
    B, H, D, S = 2, 2, 16, 12
    k_cache = rand(B, S, H, D, device=device, dtype=torch.bfloat16, seed=1)
    v_cache = rand(B, S, H, D, device=device, dtype=torch.bfloat16, seed=2)
    q, k_new, v_new = (rand(B, 1, H, D, device=device, seed=s) for s in (3, 4, 5))
    lens = torch.tensor([3, 7], dtype=torch.int32, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    with torch.autocast(_dev(device), dtype=torch.float16):  # another dtype than the cache's
        out = pk.flash_attention_with_kvcache(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)
    by_hand = pk.flash_attention_with_kvcache(q.bfloat16(), kc, vc, lens, k_new=k_new.bfloat16(),
                                              v_new=v_new.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, by_hand)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


@pytest.mark.parametrize("ac_dtype", AUTOCAST_DTYPES)
def test_denoising_runs_in_float32(device, ac_dtype):
    """A half-precision model output next to float32 samples: add_noise, the loss and the solver
    steps run in float32 (as F.mse_loss under autocast) and equal the float32 calls."""
    acp = pk.noise_schedule("linear").to(device)
    x0 = rand(3, 2, 5, 5, device=device, seed=1)
    noise = rand(3, 2, 5, 5, device=device, seed=2)
    pred = rand(3, 2, 5, 5, device=device, dtype=ac_dtype, seed=3)
    t = torch.tensor([1, 400, 999], device=device)
    ac = torch.autocast(_dev(device), dtype=ac_dtype)
    with ac:
        xt, target = pk.add_noise(x0.to(ac_dtype), noise, t, acp)
        loss = pk.diffusion_loss(pred, target, t, acp, weighting="min_snr")
        raw = torch.ops.pretrain_kernels.diffusion_loss(pred, target, t, acp, "min_snr", 5.0, "epsilon")
        torch_loss = F.mse_loss(pred, target)
        step = pk.ddim_step(pred, xt, t, (t - 50).clamp(min=0), acp)
        sig = torch.tensor([0.9, 0.5, 0.1], device=device)
        flow = pk.flow_match_step(pred, x0, sig, sig * 0.5)
    assert xt.dtype == target.dtype == torch.float32
    assert loss.dtype == raw.dtype == torch_loss.dtype == torch.float32
    xt32, target32 = pk.add_noise(x0.to(ac_dtype).float(), noise, t, acp)
    assert torch.equal(xt, xt32) and torch.equal(target, target32)
    assert torch.equal(loss, pk.diffusion_loss(pred.float(), target32, t, acp, weighting="min_snr"))
    assert torch.equal(raw, torch.ops.pretrain_kernels.diffusion_loss(pred.float(), target32, t, acp, "min_snr", 5.0,
                                                                      "epsilon"))
    ref_step = pk.ddim_step(pred.float(), xt32, t, (t - 50).clamp(min=0), acp)
    for a, b in zip(step, ref_step):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    ref_flow = pk.flow_match_step(pred.float(), x0, sig, sig * 0.5)
    for a, b in zip(flow, ref_flow):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_loss_backward_under_autocast(device):
    """The float32 loss on a bf16 prediction gives a bf16 gradient to the prediction (the cast is
    differentiable), equal to the float32 gradient rounded."""
    pred = rand(4, 8, device=device, dtype=torch.bfloat16, seed=1).requires_grad_()
    target = rand(4, 8, device=device, seed=2)
    with torch.autocast(_dev(device), dtype=torch.bfloat16):
        loss = pk.diffusion_loss(pred, target)
    loss.backward()
    p32 = pred.detach().float().requires_grad_()
    pk.diffusion_loss(p32, target).backward()
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad, p32.grad.bfloat16())


def test_masking_and_sampling_unaffected(device):
    ids = torch.randint(5, 100, (4, 33), generator=torch.Generator().manual_seed(0)).to(device)
    logits = rand(4, 50, device=device, seed=1)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=123)
    plain = (pk.mlm_mask(ids, mask_token_id=1, vocab_size=100, seed=7), pk.sample(logits, **kw),
             pk.top_k_top_p_filter(logits, top_k=5))
    with torch.autocast(_dev(device), dtype=torch.bfloat16):
        under = (pk.mlm_mask(ids, mask_token_id=1, vocab_size=100, seed=7), pk.sample(logits, **kw),
                 pk.top_k_top_p_filter(logits, top_k=5))
    for a, b in zip(plain, under):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_llama_trains_under_bf16_autocast(transformers):
    """A tiny float32 Llama on attn_implementation="pretrain_kernels" trains a few steps under CPU
    bfloat16 autocast (its RoPE runs in float32 next to bf16 projections: mixed q, k, v), on a
    padded batch, and its loss tracks the same model on "sdpa"."""
    from pretrain_kernels.integrations import transformers as pkt
    name = pkt.register()
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    models = []
    for attn in ("sdpa", name):
        torch.manual_seed(0)
        models.append(transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).train())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :15] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = {0: [], 1: []}
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    for _ in range(5):
        for i, (m, opt) in enumerate(zip(models, opts)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    assert losses[1][-1] < losses[1][0] - 0.1, losses[1]
    for a, b in zip(losses[0], losses[1]):
        assert abs(a - b) < 0.05 * abs(a), (losses[0], losses[1])


def test_compiles_under_autocast():
    """The autocast-aware functions trace with torch.compile(fullgraph=True) inside autocast, and
    the compiled attention differentiates back to the float32 inputs."""
    cpu = torch.device("cpu")
    q = rand(2, 9, 4, 16, device=cpu, seed=1).requires_grad_()
    k = rand(2, 9, 2, 16, device=cpu, seed=2).requires_grad_()
    v = rand(2, 9, 2, 16, device=cpu, dtype=torch.bfloat16, seed=3).requires_grad_()
    attn = torch.compile(lambda q, k, v: pk.flash_attention(q, k, v, causal=True), fullgraph=True,
                         backend="aot_eager")
    pred = rand(2, 3, 4, 4, device=cpu, dtype=torch.bfloat16, seed=4)
    x0 = rand(2, 3, 4, 4, device=cpu, seed=5)
    loss = torch.compile(lambda p, x: pk.diffusion_loss(p, x), fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, value = attn(q, k, v), loss(pred, x0)
    assert out.dtype == torch.bfloat16
    want = pk.flash_attention(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), causal=True)
    assert torch.equal(out.detach(), want)
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert value.dtype == torch.float32 and torch.equal(value, pk.diffusion_loss(pred.float(), x0))
