"""pretrain_kernels.integrations.transformers.apply_kernels: tiny random Llama, Mistral (sliding
window), Qwen2 (sliding window on one layer), Qwen3 (norms on the heads) and Gemma models with
their RMSNorms, SwiGLU MLPs, rotary embedding and causal-LM loss on the package's kernels,
against the same weights unpatched: logits, loss and every parameter gradient (fp32, and under
bf16 autocast), padded and unpadded batches, on both "sdpa" and "pretrain_kernels" attention;
generate gives the same tokens; the patches land where they should and nowhere else; a second
call changes nothing; the patched model deep-copies and pickles.

Every test that needs transformers takes the `transformers` fixture (tests/conftest.py) and skips
alone without it."""
import copy

import pytest
import torch

from pretrain_kernels.integrations import transformers as pkt

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(tf, kind, attn, *, seed=0, window=5):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(num_key_value_heads=2, **common), tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(num_key_value_heads=1, sliding_window=window, **common), tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=window,
                             max_window_layers=1, layer_types=["full_attention", "sliding_attention"], **common)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen3":  # q_norm / k_norm on the heads, sliding window on the second layer
        cfg = tf.Qwen3Config(num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=window,
                             max_window_layers=1, layer_types=["full_attention", "sliding_attention"], **common)
        cls = tf.Qwen3ForCausalLM
    elif kind == "gemma":
        cfg, cls = tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **common), tf.GemmaForCausalLM
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn)
    # random norm weights, so that a norm patched with the wrong convention shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if kind == "gemma" else 1.0))
    return model.eval()


def pair(tf, kind, attn, **kw):
    ref = build(tf, kind, attn, **kw)
    ours = pkt.apply_kernels(copy.deepcopy(ref))
    return ref, ours


def batch(B, S, padding, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lens = [S] + [int(x) for x in torch.randint(3, S, (B - 1,), generator=g)]
    for b, n in enumerate(lens):
        if padding == "left":
            mask[b, :S - n] = 0
        elif padding == "right":
            mask[b, n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(model, ids, mask, *, autocast=False):
    """(logits at the real tokens, loss, {name: grad}) of one forward + backward."""
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[mask.bool()].float(), loss.detach(), grads


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "pretrain_kernels"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_patched_equals_unpatched_fp32(transformers, kind, attn, padding):
    ref, ours = pair(transformers, kind, attn)
    ids, mask = batch(3, 13, padding)
    l0, loss0, g0 = run(ref, ids, mask)
    l1, loss1, g1 = run(ours, ids, mask)
    torch.testing.assert_close(l1, l0, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == len(list(ref.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_patched_equals_unpatched_bf16_autocast(transformers, kind, padding):
    ref, ours = pair(transformers, kind, "pretrain_kernels")
    ids, mask = batch(3, 13, padding)
    l0, loss0, g0 = run(ref, ids, mask, autocast=True)
    l1, loss1, g1 = run(ours, ids, mask, autocast=True)
    assert rel(l1, l0) < 2e-2, rel(l1, l0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-3)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert rel(g1[name], g0[name]) < 6e-2, (name, rel(g1[name], g0[name]))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_gives_the_same_tokens(transformers, kind):
    ref, ours = pair(transformers, kind, "pretrain_kernels")
    ids, mask = batch(3, 9, "left", seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_patches_land_on_the_known_modules(transformers):
    model = build(transformers, "qwen2", "pretrain_kernels")
    n_layers = model.config.num_hidden_layers
    assert pkt.apply_kernels(model) is model
    kinds = [getattr(m, "_pk_kernel", None) for m in model.modules()]
    assert kinds.count("rms_norm") == 2 * n_layers + 1
    assert kinds.count("swiglu") == n_layers and kinds.count("rope") == n_layers
    assert kinds.count("cross_entropy") == 1 and model._pk_kernel == "cross_entropy"
    ids, mask = batch(2, 7, "right")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    names = {e.name for e in prof.events()}
    for op in ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rotary_embedding",
               "linear_cross_entropy"):
        assert f"pretrain_kernels::{op}" in names, op


def test_options_and_second_call(transformers):
    ref = build(transformers, "llama", "sdpa")
    model = pkt.apply_kernels(copy.deepcopy(ref), rope=False, cross_entropy=False)
    kinds = {getattr(m, "_pk_kernel", None) for m in model.modules()}
    assert kinds == {None, "rms_norm", "swiglu"}
    forwards = [m.forward for m in model.modules() if hasattr(m, "_pk_kernel")]
    pkt.apply_kernels(model, rope=False, cross_entropy=False)
    assert forwards == [m.forward for m in model.modules() if hasattr(m, "_pk_kernel")]
    pkt.apply_kernels(model)  # a later call adds what the first left out
    kinds = {getattr(m, "_pk_kernel", None) for m in model.modules()}
    assert kinds == {None, "rms_norm", "swiglu", "rope", "cross_entropy"}
    ids, mask = batch(2, 8, "none")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=2e-5, atol=2e-5)


def test_unknown_models_are_left_alone(transformers):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()
    pkt.apply_kernels(model)
    assert not any(hasattr(m, "_pk_kernel") or "forward" in vars(m) for m in model.modules())
    # Gemma's gelu MLP is not a SwiGLU: left alone, the rest patched
    gemma = pkt.apply_kernels(build(transformers, "gemma", "sdpa"))
    kinds = [getattr(m, "_pk_kernel", None) for m in gemma.modules()]
    assert "swiglu" not in kinds and "rms_norm" in kinds and "rope" in kinds


def test_loss_semantics(transformers):
    ref, ours = pair(transformers, "llama", "pretrain_kernels")
    ids, mask = batch(3, 10, "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None  # no [tokens, vocab] logits
        full = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(full.logits, want.logits, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
        # num_items_in_batch (gradient accumulation): the sum over that count
        n = torch.tensor(7)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss,
                                   ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss,
                                   rtol=1e-5, atol=1e-6)
        # shift_labels given: used as is
        shifted = torch.roll(labels, -1, dims=1)
        torch.testing.assert_close(ours(input_ids=ids, labels=labels, shift_labels=shifted).loss,
                                   ref(input_ids=ids, labels=labels, shift_labels=shifted).loss, rtol=1e-5, atol=1e-6)
        # positional arguments and tuples, as transformers takes them
        tup = ours(ids, mask, labels=labels, return_dict=False)
        torch.testing.assert_close(tup[0], want.loss, rtol=1e-5, atol=1e-6)


def test_signature_copy_and_pickle(transformers):
    import inspect
    import pickle

    ref, ours = pair(transformers, "llama", "pretrain_kernels")
    # generate reads forward's signature (attention_mask, position_ids, logits_to_keep)
    params = inspect.signature(ours.forward).parameters
    assert {"input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep", "return_logits"} <= set(params)
    norm = ours.model.norm
    assert list(inspect.signature(norm.forward).parameters) == ["hidden_states"]
    ids, mask = batch(2, 9, "left", seed=3)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=ids).loss
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert clone.model.norm.forward.module is clone.model.norm
            assert clone.forward.module is clone and clone._pk_kernel == "cross_entropy"
            torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask, labels=ids).loss, want,
                                       rtol=1e-5, atol=1e-6)


def test_custom_loss_keeps_transformers_forward(transformers):
    ref, ours = pair(transformers, "llama", "pretrain_kernels")
    ids, mask = batch(2, 8, "none")

    def doubled(logits, labels, vocab_size, **kw):
        from transformers.loss.loss_utils import ForCausalLMLoss
        return 2 * ForCausalLMLoss(logits, labels, vocab_size, **kw)

    ours.loss_function = doubled
    with torch.no_grad():
        out = ours(input_ids=ids, labels=ids)
        assert out.logits is not None  # transformers' forward ran
        torch.testing.assert_close(out.loss, 2 * ref(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
