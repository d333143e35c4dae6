"""The transformers integration: attn_implementation="pretrain_kernels" on tiny random Llama,
Mistral and Qwen2 (sliding windows), GPT-2 and BERT models, against the same weights on
transformers' "sdpa"; padding honoured (each padded row equals the row run alone), forward,
backward, generate with the cache, dropout, bf16, and the dense-mask fallback.

Every test that needs transformers takes the `transformers` fixture (tests/conftest.py) and skips
alone without it."""

import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.integrations import transformers as pkt

VOCAB = 97


def build(tf, kind, attn, *, dropout=0.0, seed=0, window=5):
    """A tiny random model of `kind` with attn_implementation `attn` (weights fixed by seed)."""
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout)
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, sliding_window=window,
                               attention_dropout=dropout)
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":  # sliding window on the second layer only
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                             sliding_window=window, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"], attention_dropout=dropout)
        cls = tf.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, attn_pdrop=dropout,
                            resid_pdrop=0.0, embd_pdrop=0.0)
        cls = tf.GPT2LMHeadModel
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128,
                            attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)
        cls = tf.BertForMaskedLM
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn)
    return model.eval()


def pair(tf, kind, **kw):
    """The same weights on "sdpa" and on "pretrain_kernels"."""
    ref = build(tf, kind, "sdpa", **kw)
    ours = build(tf, kind, pkt.NAME, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def batch(B, S, padding, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lens = [S] + [int(x) for x in torch.randint(2, S, (B - 1,), generator=g)]
    for b, n in enumerate(lens):
        if padding == "left":
            mask[b, :S - n] = 0
        elif padding == "right":
            mask[b, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


MODELS = ["llama", "mistral", "qwen2", "gpt2", "bert"]


def test_register_is_idempotent_and_fills_both_interfaces(transformers):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert pkt.register() == "pretrain_kernels"
    assert pkt.register() == "pretrain_kernels"
    assert AttentionInterface._global_mapping["pretrain_kernels"] is pkt.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["pretrain_kernels"] is pkt.attention_mask


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", MODELS)
def test_logits_match_sdpa_fp32(transformers, kind, padding):
    ref, ours = pair(transformers, kind)
    ids, mask = batch(4, 23, padding)
    with torch.no_grad():
        a, b = _logits(ref, ids, mask), _logits(ours, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", MODELS)
def test_padding_is_honoured(transformers, kind, padding):
    """Each padded row gives the logits of its real tokens run alone (no padding in sight)."""
    _, ours = pair(transformers, kind)
    ids, mask = batch(4, 19, padding, seed=2)
    with torch.no_grad():
        full = _logits(ours, ids, mask)
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            alone = _logits(ours, ids[b:b + 1, real], None)[0]
            if padding == "left" and kind in ("gpt2", "bert"):
                # absolute position embeddings: the padded row's positions start at the padding
                continue
            torch.testing.assert_close(full[b, real], alone, rtol=1e-4, atol=1e-4)


def test_left_padding_changes_the_result_without_the_mask(transformers):
    """The test above can fail: dropping the mask moves left-padded logits well beyond the tolerance."""
    _, ours = pair(transformers, "llama")
    ids, mask = batch(4, 19, "left", seed=2)
    with torch.no_grad():
        with_mask, without = _logits(ours, ids, mask), _logits(ours, ids, None)
    real = mask.bool()
    assert (with_mask[real] - without[real]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2", "bert"])
def test_logits_match_sdpa_bf16(transformers, kind):
    ref, ours = pair(transformers, kind)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask = batch(3, 21, "left" if kind != "bert" else "right")
    with torch.no_grad():
        a, b = _logits(ref, ids, mask).float(), _logits(ours, ids, mask).float()
    real = mask.bool()
    err = (a[real] - b[real]).norm() / a[real].norm()
    assert err < 2e-2, err


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_backward_matches_sdpa(transformers, kind, padding):
    ref, ours = pair(transformers, kind)
    ids, mask = batch(3, 17, padding, seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2"])
def test_generate_matches_sdpa(transformers, kind):
    """Greedy generate with the KV cache on a left-padded batch; the Mistral and Qwen2 windows (5)
    are shorter than prompt + new tokens, so the sliding cache and its offsets are exercised."""
    ref, ours = pair(transformers, kind)
    ids, mask = batch(3, 9, "left", seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out_ref = ref.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    out = ours.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(out_ref.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, out_ref.sequences)


def test_generate_matches_running_without_cache(transformers):
    """The cached decode steps equal a full forward over prompt + generated tokens."""
    _, ours = pair(transformers, "mistral")
    ids, mask = batch(2, 8, "left", seed=5)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True, output_logits=True)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = _logits(ours, out.sequences, full_mask)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits[:, 7:-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_sequences_take_the_varlen_path(transformers, kind):
    """position_ids that restart (packed documents, no attention mask, as DataCollatorWithFlattening
    makes them): the mask interface hands the attention cu_seqlens, so each document is attended
    alone; logits and gradients equal sdpa's dense block-diagonal mask and each document run alone
    (Mistral: the sliding window counts inside each document)."""
    from transformers import masking_utils as mu
    ref, ours = pair(transformers, kind, window=4)
    ids, _ = batch(2, 16, "none", seed=6)
    pos = torch.cat([torch.arange(7), torch.arange(5), torch.arange(4)])[None].expand(2, -1)
    seq = mu.find_packed_sequence_indices(pos)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos),
                      mu.packed_sequence_mask_function(seq))
    cu = pkt.attention_mask(2, 16, 16, attention_mask=None, mask_function=fn)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 12, 16, 23, 28, 32]
    a = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    b = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        alone = ours(input_ids=ids[:, 7:12], use_cache=False).logits
    torch.testing.assert_close(b[:, 7:12], alone, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(a)
    ga = torch.autograd.grad((a * g).sum(), list(ref.parameters()))
    gb = torch.autograd.grad((b * g).sum(), list(ours.parameters()))
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_mask_function_shapes(transformers):
    """The mask interface: None without padding, the 2-D padding mask with it, a 4-D bool mask for
    anything else (here an overlay)."""
    from transformers import masking_utils as mu
    am = torch.ones(2, 6, dtype=torch.bool)
    assert pkt.attention_mask(2, 6, 6, attention_mask=am, mask_function=mu.causal_mask_function) is None
    am[0, :2] = False
    m = pkt.attention_mask(2, 6, 6, attention_mask=am, mask_function=mu.causal_mask_function)
    assert m.shape == (2, 6) and torch.equal(m, am)
    m = pkt.attention_mask(2, 6, 6, attention_mask=am, mask_function=mu.sliding_window_causal_mask_function(3))
    assert m.shape == (2, 6)
    holes = am.clone()
    holes[1, 3] = False  # a window over a hole in the middle: dense
    m = pkt.attention_mask(2, 6, 6, attention_mask=holes, mask_function=mu.sliding_window_causal_mask_function(3))
    ref = mu.sdpa_mask(2, 6, 6, attention_mask=holes, mask_function=mu.sliding_window_causal_mask_function(3),
                       allow_is_causal_skip=False)
    assert m.shape == (2, 1, 6, 6) and torch.equal(m, ref)
    overlay = mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: k != 0)
    m = pkt.attention_mask(2, 6, 6, attention_mask=None, mask_function=overlay)
    assert m.shape == (2, 1, 6, 6) and not m[:, :, :, 0].any()


def test_window_hole_matches_sdpa(transformers):
    """Padding inside a row under a sliding window goes to the dense mask and still matches sdpa."""
    ref, ours = pair(transformers, "mistral", window=4)
    ids, mask = batch(2, 12, "none", seed=7)
    mask[1, 5:7] = 0
    with torch.no_grad():
        a, b = _logits(ref, ids, mask), _logits(ours, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_dropout_from_config_in_training(transformers, kind):
    """Training mode applies the config's attention dropout (outputs differ from eval and between
    draws, reproducible under torch.manual_seed); eval mode applies none (equals sdpa)."""
    ref, ours = pair(transformers, kind, dropout=0.3)
    ids, mask = batch(2, 13, "right", seed=8)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, ids, mask)[real], _logits(ref, ids, mask)[real], rtol=1e-4,
                                   atol=1e-4)
        ours.train()
        torch.manual_seed(11)
        a = _logits(ours, ids, mask)
        torch.manual_seed(11)
        b = _logits(ours, ids, mask)
        c = _logits(ours, ids, mask)
        ours.eval()
        e = _logits(ours, ids, mask)
    torch.testing.assert_close(a, b)
    assert (a[real] - c[real]).abs().max() > 1e-3
    assert (a[real] - e[real]).abs().max() > 1e-3


def test_dropout_goes_to_the_kernel(transformers, monkeypatch):
    """With a kernel that has dropout, the module's dropout reaches pk.flash_attention (padded
    and unpadded paths) and no fallback runs."""
    seen = []
    real_fa = pkt.flash_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return real_fa(*args, **kwargs)

    monkeypatch.setattr(pkt, "flash_attention", spy)
    _, ours = pair(transformers, "llama", dropout=0.25)
    ours.train()
    ids, mask = batch(2, 11, "left", seed=9)
    ours(input_ids=ids, attention_mask=mask).logits.sum().backward()
    ours(input_ids=ids).logits.sum().backward()
    assert seen and all(p == 0.25 for p in seen)


def test_trains_a_few_steps(transformers):
    """A tiny Llama trains through the integration: the loss falls on a repeated batch."""
    _, ours = pair(transformers, "llama")
    ours.train()
    ids, mask = batch(4, 16, "left", seed=10)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_unsupported_arguments_raise(transformers):
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="s_aux"):
        pkt.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="attention_mask"):
        pkt.attention_forward(module, q, q, q, torch.ones(1, 5, dtype=torch.bool))


def test_padding_hole_without_window_matches_sdpa(transformers):
    """Padding in the middle of a row (no window): the real tokens are gathered (not one block)."""
    ref, ours = pair(transformers, "llama")
    ids, mask = batch(3, 14, "left", seed=12)
    mask[2, 4:6] = 0
    with torch.no_grad():
        a, b = _logits(ref, ids, mask), _logits(ours, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_chunk_after_cache_matches_sdpa(transformers, kind):
    """Several new tokens against a cache of a left-padded prompt (queries fewer than keys, more
    than one): the gather path, with the Mistral window reaching back into the cache."""
    ref, ours = pair(transformers, kind)
    ids, mask = batch(3, 10, "left", seed=13)
    more = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(14))
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    outs = []
    with torch.no_grad():
        for model in (ref, ours):
            first = model(input_ids=ids, attention_mask=mask, use_cache=True)
            outs.append(model(input_ids=more, attention_mask=full_mask, past_key_values=first.past_key_values,
                              use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
