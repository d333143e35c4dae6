"""Models: shapes, a short overfit on one batch, cached generation against uncached, packed
varlen encoding against one sequence at a time, and the samplers on tiny denoisers."""
import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.models import (BertConfig, BertMLM, DiT, DiTConfig, GPT, GPTConfig, UNet, UNetConfig,
                                     pack)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _overfit(model, loss_fn, steps=40, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, float(loss_fn().detach())


def tiny_gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=260, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


# ---- GPT -------------------------------------------------------------------------------------


def test_gpt_shapes_and_tied_head():
    m = tiny_gpt()
    x = torch.randint(0, 256, (3, 17))
    logits, loss = m(x, x)
    assert logits.shape == (3, 17, 260)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert m.lm_head.weight is m.wte.weight
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 49, dtype=torch.long))


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_gpt_fused_head_loss_equals_the_logits_path():
    """return_logits=False (what training calls): pk.linear_cross_entropy on the final hidden
    states, the same loss and gradients as F.cross_entropy of the logits."""
    m = tiny_gpt()
    x = torch.randint(0, 256, (3, 17))
    y = x.roll(-1, 1)
    y[0, :4] = -100
    logits, ref = m(x, y)
    ref.backward()
    want = _grads(m)
    m.zero_grad()
    none, loss = m(x, y, return_logits=False)
    loss.backward()
    assert none is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = _grads(m)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gpt_is_causal():
    m = tiny_gpt().eval()
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gpt_overfits_one_batch():
    m = tiny_gpt()
    x = torch.randint(0, 256, (4, 33))
    first, last = _overfit(m, lambda: m(x[:, :-1], x[:, 1:])[1], steps=60, lr=1e-2)
    assert last < 0.5 * first, (first, last)


PROMPTS = [[10, 20, 30], [1, 2, 3, 4, 5, 6, 7], [99]]


@pytest.mark.parametrize("knobs", [dict(temperature=0.0),
                                   dict(temperature=1.0, top_k=50, top_p=0.9, seed=7),
                                   dict(temperature=0.7, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.2,
                                        frequency_penalty=0.1, seed=3)])
def test_generate_cache_equals_no_cache(knobs):
    m = tiny_gpt().double().eval()
    a = m.generate(PROMPTS, 12, **knobs)
    b = m.generate(PROMPTS, 12, use_cache=False, **knobs)
    assert a == b
    assert [len(r) for r in a] == [12, 12, 12]


def test_generate_float32_greedy_cache_equals_no_cache():
    m = tiny_gpt().eval()
    assert m.generate(PROMPTS, 10, temperature=0.0) == m.generate(PROMPTS, 10, temperature=0.0, use_cache=False)


def test_generate_rows_are_independent_of_the_batch():
    """Per-row seeds: a row's continuation is the same alone or batched with others."""
    m = tiny_gpt().double().eval()
    batch = m.generate(PROMPTS, 8, temperature=1.0, seed=[11, 12, 13])
    for i, p in enumerate(PROMPTS):
        assert m.generate([p], 8, temperature=1.0, seed=[11 + i]) == [batch[i]]
    other = m.generate(PROMPTS, 8, temperature=1.0, seed=[11, 12, 14])
    assert other[:2] == batch[:2]


def test_generate_stop_tokens_and_errors():
    m = tiny_gpt().eval()
    free = m.generate(PROMPTS, 10, temperature=0.0)
    stop = free[1][3]
    out = m.generate(PROMPTS, 10, temperature=0.0, stop_tokens=[stop])
    assert out[1] == free[1][:free[1].index(stop)]
    for row, ref in zip(out, free):
        assert stop not in row and row == ref[:len(row)]
    with pytest.raises(ValueError, match="block_size"):
        m.generate(PROMPTS, 46)
    with pytest.raises(ValueError, match="prompts"):
        m.generate([[]], 3)
    with pytest.raises(ValueError, match="seed"):
        m.generate(PROMPTS, 3, seed=[1, 2])


# ---- BERT ------------------------------------------------------------------------------------


def tiny_bert():
    torch.manual_seed(0)
    return BertMLM(BertConfig(n_layer=2, n_head=4, n_embd=32, max_len=64))


def test_pack():
    ids = torch.arange(12).view(3, 4)
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    lab = ids + 100
    pid, cu, pos, max_len, plab = pack(ids, am, lab)
    assert pid.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert cu.tolist() == [0, 3, 7, 8] and cu.dtype == torch.int32
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert max_len == 4
    assert plab.tolist() == [100, 101, 102, 104, 105, 106, 107, 108]


def test_bert_packed_equals_one_sequence_at_a_time():
    m = tiny_bert().eval()
    ids = torch.randint(0, 256, (3, 20))
    am = torch.ones(3, 20, dtype=torch.long)
    am[0, 13:] = 0
    am[2, 5:] = 0
    with torch.no_grad():
        packed = m(*pack(ids, am))
        rows = []
        for b in range(3):
            n = int(am[b].sum())
            rows.append(m(*pack(ids[b:b + 1, :n], am[b:b + 1, :n])))
    torch.testing.assert_close(packed, torch.cat(rows), atol=1e-5, rtol=1e-5)
    assert packed.shape == (int(am.sum()), 260)


def test_bert_overfits_masked_batch():
    m = tiny_bert()
    ids = torch.randint(0, 256, (4, 32))
    am = torch.ones_like(ids)
    am[1, 20:] = 0
    masked, labels = pk.mlm_mask(ids, mask_token_id=257, vocab_size=260, attention_mask=am, mask_prob=0.3, seed=0)

    def loss():
        _, y, s = m(*pack(masked, am, labels))
        return s / y.numel()

    first, last = _overfit(m, loss, steps=60, lr=1e-2)
    assert last < 0.5 * first, (first, last)


def test_bert_fused_head_loss_equals_the_logits_path():
    m = tiny_bert()
    ids = torch.randint(0, 256, (3, 24))
    am = torch.ones_like(ids)
    am[2, 10:] = 0
    masked, labels = pk.mlm_mask(ids, mask_token_id=257, vocab_size=260, attention_mask=am, mask_prob=0.3, seed=1)
    packed = pack(masked, am, labels)
    _, y, ref = m(*packed)
    ref.backward()
    want = _grads(m)
    m.zero_grad()
    none, y2, loss = m(*packed, return_logits=False)
    loss.backward()
    assert none is None and torch.equal(y, y2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    got = _grads(m)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # the head's loss on encoder states, labels -100 where unlabelled (what a task calls)
    h = m.encode(*packed[:4])
    torch.testing.assert_close(m.loss(h, packed[4]), ref, rtol=1e-5, atol=1e-5)


def test_bert_too_long():
    m = tiny_bert()
    with pytest.raises(ValueError, match="max_len"):
        m(*pack(torch.zeros(1, 65, dtype=torch.long), torch.ones(1, 65)))


# ---- denoisers -------------------------------------------------------------------------------


def tiny_unet(classes=0):
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                           head_dim=8, groups=4, num_classes=classes))


def tiny_dit(classes=0):
    torch.manual_seed(0)
    return DiT(DiTConfig(dim=32, depth=2, heads=4, num_classes=classes))


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
@pytest.mark.parametrize("classes", [0, 10])
def test_denoiser_shapes(make, classes):
    m = make(classes)
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999, 3])
    y = torch.tensor([0, 3, 9, 10, 2]) if classes else None
    out = m(x, t, y)
    assert out.shape == x.shape
    assert m(x, torch.tensor(7.5), y).shape == x.shape          # one (fractional) timestep for the batch
    if classes:
        assert m(x, t).shape == x.shape                          # no labels: the "no class" index


def test_unet_attention_goes_through_pk(monkeypatch):
    calls = []
    orig = pk.flash_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return orig(*a, **k)

    monkeypatch.setattr(pk, "flash_attention", spy)
    tiny_unet()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert calls and all(s[1] in (16, 64) for s in calls)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_denoiser_overfits_one_batch(make):
    m = make(10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 8, 8, generator=g)
    sig = torch.rand(8, generator=g)
    y = torch.arange(8)

    def loss():
        xt, target = pk.add_noise(x0, noise, sig, target="flow")
        return pk.diffusion_loss(m(xt, sig * 1000, y), target)

    first, last = _overfit(m, loss, steps=40, lr=3e-3)
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_gpt_rms_norm_is_nn_rms_norm(dtype, scale):
    """The GPT's norm (pk.rms_norm under nn.RMSNorm's parameters) is nn.RMSNorm: the same eps rule
    (torch takes the epsilon of the math type, float32 for half inputs), output and gradients to
    the dtype's rounding, on activations small enough for eps to matter."""
    from pretrain_kernels.models.gpt import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 48, generator=g) * scale).to(dtype)
    ours, ref = RMSNorm(48).to(dtype), torch.nn.RMSNorm(48).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(48, generator=g) + 0.5)
        ref.weight.copy_(ours.weight)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    dy = torch.randn(6, 48, generator=g).to(dtype)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad / xa.grad.abs().amax(), xb.grad / xb.grad.abs().amax(), rtol=tol, atol=tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=tol, atol=tol * 8)
