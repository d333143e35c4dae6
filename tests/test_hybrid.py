"""pk-train hybrid (the GPT decoder on next-token prediction mixed with span infilling through
the prefix-LM mask): the infilling layout against a plain reference, prefix_lens reaching the
attention, the next-token evaluation identical to the GPT task's, exact resume, and both kinds
of generation through pk-generate."""
import json
import os

import pytest
import torch

from pretrain_kernels.models import GPT, GPTConfig
from pretrain_kernels.models import gpt as gpt_module
from pretrain_kernels.train import data as D
from pretrain_kernels.train.cli import generate_main, train_main
from pretrain_kernels.train.loop import TrainConfig, Trainer
from pretrain_kernels.train.tasks import (SIZES, SPAN_STEP, GPTTask, HybridTask, infill_decode_positions,
                                          infill_positions, random_spans, span_infill_example)

from reference import attention_ref, infill_mask_targets_ref, infill_positions_ref, span_infill_ref

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for i, f in enumerate(D.stdlib_files(max_bytes=300_000)):
        with open(f, "rb") as src, open(d / f"f{i:03d}.py", "wb") as dst:
            dst.write(src.read())
    return str(d)


def make_task(text_dir, seed=0, cls=HybridTask, **kw):
    torch.manual_seed(seed)
    return cls(GPTConfig(**SIZES["gpt"]["tiny"]), seq_len=48, data=text_dir, eval_windows=16, **kw)


def tiny_cfg(**kw):
    cfg = dict(steps=6, batch_size=8, warmup=2, lr=3e-3, progress=False, log_every=1, final_eval=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


# ---- the infilling layout ---------------------------------------------------------------------


@pytest.mark.parametrize("n,n_masked,n_spans", [(1, 1, 1), (7, 3, 2), (40, 6, 3), (129, 20, 7), (9, 5, 5)])
def test_random_spans_and_layout_match_the_reference(n, n_masked, n_spans):
    g = torch.Generator().manual_seed(n * 31 + n_spans)
    for _ in range(20):
        masked = random_spans(n, n_masked, n_spans, g)
        assert masked.shape == (n,) and int(masked.sum()) == n_masked
        starts = masked & ~torch.cat([torch.zeros(1, dtype=torch.bool), masked[:-1]])
        assert int(starts.sum()) == n_spans
        text = torch.randint(0, 256, (n,), generator=g)
        x, y, plen, span = span_infill_example(text, masked, mask_id=257, bos_id=258, eos_id=259)
        stream, ref_plen, hidden_at = span_infill_ref(text.tolist(), masked.tolist(), 257, 258, 259)
        assert x.tolist() == stream[:-1] and plen == ref_plen
        assert y[:plen - 1].eq(-100).all() and y[plen - 1:].tolist() == stream[plen:]
        assert span.nonzero().flatten().add(1).tolist() == hidden_at     # target t is stream[t + 1]
        assert x.numel() == n + 2 * n_spans
        # the hidden tokens, read back in order, are the text's masked tokens
        assert y[span].tolist() == text[masked].tolist()
        xp, yp, _, sp = span_infill_example(text, masked, mask_id=257, bos_id=258, eos_id=259, length=x.numel() + 5)
        assert xp[:x.numel()].equal(x) and yp[x.numel():].eq(-100).all() and not sp[x.numel():].any()
        # mask targets: each mask of the prefix predicts its run's first token, the rest is unchanged
        xm, ym, pm, sm = span_infill_example(text, masked, mask_id=257, bos_id=258, eos_id=259, mask_targets=True,
                                             length=x.numel() + 5)
        assert xm.equal(xp) and pm == plen and sm.equal(sp) and ym[plen - 1:].equal(yp[plen - 1:])
        assert ym[:plen - 1].tolist() == infill_mask_targets_ref(text.tolist(), masked.tolist())
        # GLM's span positions, padding included
        pos = infill_positions(xp, plen, mask_id=257, eos_id=259)
        assert pos.tolist() == infill_positions_ref(stream, ref_plen, 257, 259, xp.numel(), SPAN_STEP)
        assert infill_positions(xp, plen, mask_id=257, eos_id=259, step=1.0).tolist() == \
            infill_positions_ref(stream, ref_plen, 257, 259, xp.numel(), 1.0)
        # a hole's tokens stay between its mask and the text after it
        assert (pos[plen - 1:x.numel()] - pos[plen - 1:x.numel()].floor() < 1).all()
        assert int(pos[plen - 1]) == int((x[:plen - 1] == 257).nonzero()[0])     # bos sits at the first mask


def test_random_spans_rejects_impossible_requests():
    g = torch.Generator()
    with pytest.raises(ValueError, match="spans"):
        random_spans(10, 2, 3, g)
    with pytest.raises(ValueError, match="spans"):
        random_spans(5, 4, 3, g)        # three runs need two gaps


def test_batches_mix_both_kinds(text_dir):
    task = make_task(text_dir, mix=0.5, mask_targets=False)   # mask targets: test_mask_targets_batches_and_no_leak
    b = task.batch(torch.Generator().manual_seed(3), 64)
    T = task.seq_len
    assert b["x"].shape == b["y"].shape == (64, T) and b["prefix_lens"].dtype == torch.int32
    infill = b["prefix_lens"] > 0
    assert 10 < int(infill.sum()) < 54              # binomial(64, 0.5): far inside
    tok = task.tok
    for i in range(64):
        x, y, n = b["x"][i], b["y"][i], int(b["prefix_lens"][i])
        if n == 0:   # next-token: y is x shifted by one
            assert x[1:].equal(y[:-1]) and (y != -100).all()
            continue
        assert x[n - 1] == tok.bos_token_id and int((x[:n] == tok.mask_token_id).sum()) == task.n_spans
        assert y[:n - 1].eq(-100).all() and int((y == tok.eos_token_id).sum()) == task.n_spans
        assert int((y[n - 1:] != tok.eos_token_id).sum()) == task.n_masked
    assert task.count(b) == int((b["y"] != -100).sum())
    # positions: 0, 1, ... in next-token rows, the span positions in infilling rows
    for i in range(64):
        n = int(b["prefix_lens"][i])
        want = (torch.arange(T, dtype=torch.float32) if n == 0 else
                infill_positions(b["x"][i], n, mask_id=tok.mask_token_id, eos_id=tok.eos_token_id))
        assert b["positions"][i].equal(want)
    seq = make_task(text_dir, mix=1.0, span_positions="sequential").batch(torch.Generator().manual_seed(3), 4)
    assert seq["positions"].equal(torch.arange(T, dtype=torch.float32).expand(4, T))
    # mix 0: exactly the GPT task's batches; mix 1: every row infills
    gpt = make_task(text_dir, cls=GPTTask)
    b0 = make_task(text_dir, mix=0.0).batch(torch.Generator().manual_seed(5), 8)
    bg = gpt.batch(torch.Generator().manual_seed(5), 8)
    assert b0["x"].equal(bg["x"]) and b0["y"].equal(bg["y"]) and not b0["prefix_lens"].any()
    assert make_task(text_dir, mix=1.0).batch(torch.Generator().manual_seed(5), 8)["prefix_lens"].all()


def test_mask_targets_batches_and_no_leak(text_dir):
    from pretrain_kernels.train.tasks import build_task

    task = make_task(text_dir, mix=1.0, mask_targets=True)
    plain = make_task(text_dir, mix=1.0, mask_targets=False)
    b, bp = task.batch(torch.Generator().manual_seed(3), 16), plain.batch(torch.Generator().manual_seed(3), 16)
    tok = task.tok
    assert b["x"].equal(bp["x"]) and b["positions"].equal(bp["positions"]) and b["prefix_lens"].equal(bp["prefix_lens"])
    for i in range(16):
        n = int(b["prefix_lens"][i])
        holes = b["x"][i, :n - 1] == tok.mask_token_id
        assert b["y"][i, n - 1:].equal(bp["y"][i, n - 1:]) and b["y"][i, :n - 1][~holes].eq(-100).all()
        # hole k's mask predicts the first token of span k: the token after bos or after the (k-1)-th eos
        after = torch.cat([torch.tensor([n - 1]), n + (b["x"][i, n:] == tok.eos_token_id).nonzero().flatten()])
        assert b["y"][i, :n - 1][holes].equal(b["x"][i, after[:int(holes.sum())] + 1])
    assert task.count(b) == plain.count(bp) + 16 * task.n_spans
    # validation: the same infilling examples with or without them (infill_loss compares)
    for key in ("x", "y", "prefix_lens", "positions", "span"):
        assert task.val_infill[key].equal(plain.val_infill[key])
    # no leak: the prefix's logits (the mask targets' predictions) do not depend on the hidden tokens
    model = task.model.eval()
    x2 = b["x"].clone()
    for i in range(16):
        n = int(b["prefix_lens"][i])
        x2[i, n:] = torch.randint(0, 256, (x2.shape[1] - n,))
    with torch.no_grad():
        l1 = model(b["x"], positions=b["positions"], prefix_lens=b["prefix_lens"])
        l2 = model(x2, positions=b["positions"], prefix_lens=b["prefix_lens"])
    for i in range(16):
        n = int(b["prefix_lens"][i])
        torch.testing.assert_close(l1[i, :n], l2[i, :n])
    # the option is saved and rebuilt; older runs' configs (without it) rebuild without it
    cfg = task.config()
    assert cfg["mask_targets"] is True and build_task(cfg, load_data=False).mask_targets
    del cfg["mask_targets"]
    assert not build_task(cfg, load_data=False).mask_targets


def test_decode_positions_continue_the_hole():
    stream = [5, 257, 6, 257, 7, 258, 1, 2, 259]          # two holes, the first filled, the second to decode
    got = infill_decode_positions(stream, 6, 3, mask_id=257, eos_id=259)
    assert got[:9] == infill_positions(torch.tensor(stream), 6, mask_id=257, eos_id=259).tolist()
    assert got[5:7] == [1.0, 1.0 + SPAN_STEP] and got[8] == 3.0            # bos at the first mask, eos at the second
    assert got[9:] == [3.0 + SPAN_STEP * j for j in (1, 2, 3)]


def test_span_len_range_draws_a_layout_per_example(text_dir):
    from pretrain_kernels.train.tasks import build_task

    task = make_task(text_dir, mix=1.0, span_len="1:4")
    assert task.config()["span_len"] == "1:4" and (task.span_lo, task.span_hi) == (1.0, 4.0)
    b = task.batch(torch.Generator().manual_seed(11), 64)
    tok, T = task.tok, task.seq_len
    layouts = {task.layout(m) for m in torch.linspace(1, 4, 301).tolist()}
    runs = []
    for i in range(64):
        x, y, n = b["x"][i], b["y"][i], int(b["prefix_lens"][i])
        n_spans = int((x[:n] == tok.mask_token_id).sum())
        n_masked = int((y[n - 1:] != tok.eos_token_id).sum())
        # a layout of some mean in [1, 4]: the text, a mask and an eos per run fill the window
        assert (n_spans, n - 1 - n_spans + n_masked, n_masked) in layouts
        assert n - 1 - n_spans + n_masked + 2 * n_spans == T and int((y == tok.eos_token_id).sum()) == n_spans
        runs.append(n_spans)
    lo, hi = task.layout(4.0)[0], task.layout(1.0)[0]
    assert min(runs) >= lo and max(runs) <= hi and len(set(runs)) >= 3 and max(runs) - min(runs) >= (hi - lo) // 2
    again = build_task(task.config(), load_data=False)
    assert again.span_len == "1:4" and (again.span_lo, again.span_hi) == (1.0, 4.0)
    assert again.span_positions == "glm"
    old = {k: v for k, v in task.config().items() if k != "span_positions"}    # a run saved before the option
    assert build_task(old, load_data=False).span_positions == "sequential"
    # a one-point range is the fixed length
    assert make_task(text_dir, span_len="2:2").config()["span_len"] == 2.0


@pytest.mark.parametrize("kw,match", [(dict(mix=1.5), "mix"), (dict(mask_prob=0.0), "mask_prob"),
                                      (dict(span_len=0.5), "span_len"), (dict(mask_prob=0.9, span_len=1.0), "seq_len"),
                                      (dict(span_len="3:2"), "span_len"), (dict(span_len="0.5:2"), "span_len"),
                                      (dict(span_len="a:b"), "span_len"), (dict(span_len="1:2:3"), "span_len"),
                                      (dict(mask_prob=0.9, span_len="1:3"), "seq_len"),
                                      (dict(span_positions="2d"), "span_positions")])
def test_bad_task_arguments(text_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        make_task(text_dir, **kw)


# ---- the model: prefix_lens reaches the attention ------------------------------------------------


def _reference_attention(q, k, v, *, causal=False, prefix_lens=None, **kw):
    assert causal and not kw
    return attention_ref(q, k, v, causal=True, prefix_lens=prefix_lens)[0].to(q.dtype)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gpt_prefix_lens_is_the_prefix_lm_mask(monkeypatch, kv_heads):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_kv_head=kv_heads, n_embd=32)
    model = GPT(cfg).double()
    idx = torch.randint(0, 50, (3, 13))
    plen = torch.tensor([0, 5, 13], dtype=torch.int32)
    got = model(idx, prefix_lens=plen)
    causal = model(idx)
    # the same model with the plain float64 reference attention (prefix-LM mask) in place of the kernel
    fake_pk = type("pk", (), {"flash_attention": staticmethod(_reference_attention),
                              "rotary_embedding": staticmethod(gpt_module.pk.rotary_embedding),
                              "rms_norm": staticmethod(gpt_module.pk.rms_norm),
                              "gelu": staticmethod(gpt_module.pk.gelu)})
    monkeypatch.setattr(gpt_module, "pk", fake_pk)
    monkeypatch.setattr(gpt_module.CausalSelfAttention, "attend",
                        lambda self, q, k, v: _reference_attention(q, k, v, causal=True))
    ref = model(idx, prefix_lens=plen)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(causal, model(idx), rtol=1e-9, atol=1e-9)
    # prefix 0 is causal; a prefix changes what its first tokens see (the mask is not ignored)
    torch.testing.assert_close(got[0], causal[0], rtol=1e-9, atol=1e-9)
    assert (got[1, :4] - causal[1, :4]).abs().amax() > 1e-3
    assert (got[2, 0] - causal[2, 0]).abs().amax() > 1e-3


def test_gpt_generate_with_a_prefix_matches_the_full_forward():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=40, block_size=40, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)).eval()
    with torch.no_grad():     # large random weights: the greedy path is not "repeat the last token"
        for w in model.parameters():
            w.normal_(0, 1.0 if w.dim() > 1 else 0.1).add_(1.0 if w.dim() == 1 else 0.0)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    plen = [4, 3]
    out = model.generate(prompts, 6, temperature=0, prefix_lens=plen)
    again = model.generate(prompts, 6, temperature=0, prefix_lens=plen, use_cache=False)
    assert out == again
    # greedy: each new token is the argmax of the full forward pass with the same prefix mask
    for p, n, o in zip(prompts, plen, out):
        seq = list(p)
        for t in o:
            logits = model(torch.tensor([seq]), prefix_lens=torch.tensor([n], dtype=torch.int32))
            assert int(logits[0, -1].argmax()) == t
            seq.append(t)
    assert out != model.generate(prompts, 6, temperature=0)   # the prefix changes the continuation
    # explicit positions for the prompt and the new tokens (fractional ones too)
    pos = [[0, 1, 2, 1, 2, 3] + [3.25 + 0.25 * j for j in range(6)], [0, 5, 0] + [0.5 * j for j in range(1, 7)]]
    outp = model.generate(prompts, 6, temperature=0, prefix_lens=plen, positions=pos)
    assert outp == model.generate(prompts, 6, temperature=0, prefix_lens=plen, positions=pos, use_cache=False)
    for p, n, q, o in zip(prompts, plen, pos, outp):
        seq = list(p)
        for t in o:
            logits = model(torch.tensor([seq]), positions=torch.tensor([q[:len(seq)]]),
                           prefix_lens=torch.tensor([n], dtype=torch.int32))
            assert int(logits[0, -1].argmax()) == t
            seq.append(t)
    assert outp != out
    assert model.generate(prompts, 6, temperature=0, prefix_lens=plen, positions=[list(range(12)), list(range(9))]) == out
    with pytest.raises(ValueError, match="positions"):
        model.generate(prompts, 2, positions=[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="prefix_lens"):
        model.generate(prompts, 2, prefix_lens=[7, 1])
    # suppressed tokens are never drawn: greedy picks the best of the rest
    banned = sorted({t for o in out for t in o})
    other = model.generate(prompts, 6, temperature=0, prefix_lens=plen, suppress_tokens=banned)
    assert not {t for o in other for t in o} & set(banned)
    seq = list(prompts[0])
    logits = model(torch.tensor([seq]), prefix_lens=torch.tensor([plen[0]], dtype=torch.int32))[0, -1]
    assert other[0][0] == int(logits.index_fill(0, torch.tensor(banned), float("-inf")).argmax())


# ---- training and evaluation --------------------------------------------------------------------


def test_next_token_eval_is_the_gpt_tasks(text_dir):
    hybrid, gpt = make_task(text_dir), make_task(text_dir, cls=GPTTask)
    gpt.model.load_state_dict(hybrid.model.state_dict())
    assert hybrid.val.equal(gpt.val)
    with torch.no_grad():
        h, g = hybrid.evaluate(hybrid.model.eval(), "cpu"), gpt.evaluate(gpt.model.eval(), "cpu")
    assert h["val_loss"] == g["val_loss"]
    assert 0 <= h["masked_accuracy"] <= 1 and h["infill_loss"] > 0


@pytest.mark.parametrize("mask_targets", [False, True])
def test_hybrid_resume_equals_uninterrupted(text_dir, tmp_path, mask_targets):
    losses = lambda hist: [h["loss"] for h in hist if "loss" in h]  # noqa: E731
    kw = dict(mask_targets=mask_targets)
    full = losses(Trainer(make_task(text_dir, **kw), tiny_cfg(), str(tmp_path / "a")).train())
    Trainer(make_task(text_dir, **kw), tiny_cfg(steps=3), str(tmp_path / "c")).train()
    rest = losses(Trainer(make_task(text_dir, seed=7, **kw), tiny_cfg(), str(tmp_path / "c")).train(resume=True))
    assert len(rest) == 3 and rest == pytest.approx(full[3:], rel=1e-6, abs=1e-7)
    assert all(torch.isfinite(torch.tensor(full)))


TINY = ["--size", "tiny", "--batch-size", "8", "--no-progress", "--threads", "1", "--seq-len", "48"]


def test_cli_hybrid_train_resume_generate(text_dir, tmp_path, capsys):
    out = str(tmp_path / "hybrid")
    m = train_main(["hybrid", "--out", out, "--data", text_dir, "--steps", "40", "--lr", "1e-2", "--mix", "0.5",
                    *TINY])
    assert {"val_loss", "masked_accuracy", "infill_loss"} <= set(m)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["task"]["kind"] == "hybrid" and cfg["task"]["mix"] == 0.5
    texts = generate_main(["--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "2"])
    assert len(texts) == 1 and texts[0].startswith("def ")
    args = ["--checkpoint", out, "--infill", "def f(x):\n    ___\n", "--infill", "import ___\nfrom ___ import",
            "--max-new-tokens", "10", "--temperature", "0"]
    filled = generate_main(args)
    assert filled == generate_main(args + ["--no-cache"])
    assert filled[0].startswith("def f(x):\n    ") and filled[0].endswith("\n")
    head, rest = filled[1].split("\n", 1)
    assert head.startswith("import ") and rest.startswith("from ") and rest.endswith(" import")
    train_main(["hybrid", "--out", out, "--resume", "--steps", "42", "--no-progress"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["step"] == 42


@pytest.mark.parametrize("argv,message", [
    (["gpt", "--mix", "0.5"], "--mix: only for hybrid"),
    (["mlm", "--span-len", "3"], "--span-len: only for hybrid"),
    (["hybrid", "--mix", "1.5", "--size", "tiny"], "mix"),
    (["hybrid", "--span-len", "4:2", "--size", "tiny"], "--span-len: expected a mean span length >= 1 or a range"),
    (["gpt", "--mask-targets"], "--mask-targets: only for hybrid"),
    (["mdlm", "--no-mask-targets"], "--mask-targets: only for hybrid"),
])
def test_cli_hybrid_bad_arguments(argv, message, text_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(argv + ["--out", str(tmp_path / "r"), "--data", text_dir])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_span_len_range(text_dir, tmp_path):
    out = str(tmp_path / "hyb")
    m = train_main(["hybrid", "--out", out, "--data", text_dir, "--steps", "2", "--span-len", "1:3.5",
                    "--mask-targets", *TINY])
    assert m["val_loss"] > 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)["task"]
    assert cfg["span_len"] == "1:3.5" and cfg["mask_targets"] is True
    train_main(["hybrid", "--out", out, "--resume", "--steps", "3", "--no-progress"])
    filled = generate_main(["--checkpoint", out, "--infill", "def f(x):\n    ___\n", "--max-new-tokens", "4",
                            "--temperature", "0"])
    assert filled[0].startswith("def f(x):\n    ")


def test_cli_infill_errors(text_dir, tmp_path, capsys):
    gpt = str(tmp_path / "gpt")
    train_main(["gpt", "--out", gpt, "--data", text_dir, "--steps", "2", *TINY])
    hyb = str(tmp_path / "hyb")
    train_main(["hybrid", "--out", hyb, "--data", text_dir, "--steps", "2", *TINY])
    for argv, message in ((["--checkpoint", gpt, "--infill", "a ___ b"], "--infill: only for mdlm runs and hybrid runs"),
                          (["--checkpoint", hyb, "--infill", "no hole"], "at least one ___ hole"),
                          (["--checkpoint", hyb, "--infill", "a ___", "--prompt", "x"], "not both")):
        with pytest.raises(SystemExit) as e:
            generate_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# ---- pk-compare ----------------------------------------------------------------------------------


def test_compare_end_to_end_at_a_tiny_budget(text_dir, tmp_path, capsys):
    from pretrain_kernels.train.compare import DRIFT_LENGTHS, IMAGE_STEPS, compare_main

    out = str(tmp_path / "cmp")
    res = compare_main(["--out", out, "--budget", "0.01", "--size", "tiny", "--data", text_dir, "--no-progress",
                        "--threads", "1"])
    models = res["text"]["models"]
    assert set(models) == {"GPT", "hybrid", "MLM", "MDLM"}
    # the same shape and token budget: GPT and the hybrid are one model, the MLM the same size
    assert models["GPT"]["params"] == models["hybrid"]["params"]
    assert abs(models["MLM"]["params"] / models["GPT"]["params"] - 1) < 0.1
    assert models["MDLM"]["params"] == models["MLM"]["params"]
    for name, m in models.items():
        for key in ("masked_accuracy", "infill_token_accuracy", "infill_exact"):
            assert 0 <= m[key] <= 1, (name, key)
        assert m["train_tokens_per_s"] > 0
    assert models["GPT"]["val_nats_per_byte"] > 0 and models["MLM"]["val_nats_per_byte"] is None
    assert models["MDLM"]["val_nats_per_byte"] > 0
    rows = res["drift"]["rows"]
    assert set(rows) == {"GPT", "hybrid", "real validation text"}
    assert all(set(r) == {str(L) for L in DRIFT_LENGTHS} and all(v > 0 for v in r.values()) for r in rows.values())
    # the repetition of the same samples' bytes, for every row and length the judge scored
    reps = res["drift"]["repetition"]
    assert set(reps) == set(rows) and all(set(reps[k]) == set(rows[k]) for k in rows)
    for name, r in reps.items():
        for L, v in r.items():
            assert set(v) == {"distinct4", "top_byte_share"}, (name, L)
            assert 0 < v["distinct4"] <= 1 and 1 / 256 <= v["top_byte_share"] <= 1, (name, L, v)
    # real source text is varied: most 4-grams distinct, no byte near all of it
    assert all(v["distinct4"] > 0.3 and v["top_byte_share"] < 0.6 for v in reps["real validation text"].values())
    for obj in ("flow", "diffusion"):
        by = res["images"][obj]["by_steps"]
        assert set(by) == {str(s) for s in IMAGE_STEPS}
        assert all(v["fd"] >= 0 and 0 <= v["class_accuracy"] <= 1 for v in by.values())
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["text"]["steps"] == res["text"]["steps"]
    with open(os.path.join(out, "comparison.md")) as f:
        md = f.read()
    for line in ("| GPT |", "| hybrid |", "| MLM |", "| MDLM |", "| real validation text |", "| 50 |", "drift.png",
                 "Repetition of the generated bytes", "means degenerate samples",
                 "| phase | wall | CPU |", "| train hybrid |", "| images: sample diffusion and judge |"):
        assert line in md
    # every phase timed once, wall and CPU seconds, inside the run's own totals
    phases = res["phases"]
    names = [r["phase"] for r in phases]
    assert len(names) == len(set(names)) and {"train GPT", "train MDLM", "train the judge GPT",
                                              "images: train flow"} <= set(names)
    assert all(r["wall_s"] >= 0 and r["cpu_s"] >= 0 for r in phases)
    assert sum(r["wall_s"] for r in phases) <= res["wall_s"] and res["cpu_s"] > 0
    for png in ("drift.png", "images_fd.png", "images_accuracy.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as e:       # a finished comparison is not overwritten by accident
        compare_main(["--out", out, "--size", "tiny"])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err


def test_compare_pieces():
    from pretrain_kernels.train.compare import token_nll

    # sliding-window scoring equals the full forward pass where the sequence fits
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).eval()
    seqs = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(seqs[:, :-1]).transpose(1, 2), seqs[:, 1:], reduction="none")
        nll = token_nll(model, seqs)
    assert nll[:, 0].isnan().all()
    torch.testing.assert_close(nll[:, 1:], full)
    long = torch.randint(0, 30, (2, 53))
    with torch.no_grad():
        nll = token_nll(model, long)
        # token 40 is scored with the context the windows give it: at least half a block
        t = 40
        ctx_ok = [torch.nn.functional.cross_entropy(model(long[:, c:t])[:, -1], long[:, t], reduction="none")
                  for c in range(t - 16, t - 7)]
    assert any(torch.allclose(nll[:, t], v) for v in ctx_ok)
    assert not nll[:, 1:].isnan().any()


def _repetition_reference(data: bytes):
    grams = [data[i:i + 4] for i in range(len(data) - 3)]
    counts = {}
    for b in data:
        counts[b] = counts.get(b, 0) + 1
    return len(set(grams)) / len(grams), max(counts.values()) / len(data)


def test_compare_byte_repetition():
    import random

    from pretrain_kernels.train.compare import DRIFT_LENGTHS, byte_repetition, repetition

    # hand-computed: a constant string has one distinct 4-gram of 61, one byte is all of it
    assert byte_repetition(b"a" * 64) == (1 / 61, 1.0)
    # period 3: the 4-grams abca, bcab, cabc of 57; each byte a third
    assert byte_repetition(b"abc" * 20) == (3 / 57, 1 / 3)
    # period 5 with a repeated byte: 5 distinct 4-grams of 47, "a" 2/5 of the bytes
    assert byte_repetition(b"aabcd" * 10) == (5 / 47, 20 / 50)
    assert byte_repetition(b"abcd") == (1.0, 0.25)
    d4, top = byte_repetition(b"ab")
    assert d4 != d4 and top == 0.5                # no 4-gram: NaN
    rng = random.Random(0)
    for n in (5, 64, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        got, want = byte_repetition(data), _repetition_reference(data)
        assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    # random bytes barely repeat: almost every 4-gram distinct, no byte dominant
    d4, top = byte_repetition(bytes(rng.randrange(256) for _ in range(1000)))
    assert d4 > 0.99 and top < 0.03
    # over a batch: the generated part only (after the prompt), specials dropped, mean over samples
    tok = D.ByteTokenizer()
    prompt = torch.full((3, 4), ord("x"))
    gen = torch.stack([torch.full((64,), ord(" ")), torch.tensor(list(b"abc" * 21 + b"a")),
                       torch.tensor([rng.randrange(256) for _ in range(64)])])
    seqs = torch.cat([prompt, gen], 1)
    seqs[0, 10] = tok.eos_token_id               # a special: 63 bytes in that sample
    r = repetition(seqs, tok, 4)
    assert set(r) == {"64"} and 64 in DRIFT_LENGTHS
    refs = [_repetition_reference(bytes(t for t in s.tolist() if t < 256)) for s in gen.clone().index_put_(
        (torch.tensor([0]), torch.tensor([6])), torch.tensor(tok.eos_token_id))]
    assert r["64"]["distinct4"] == pytest.approx(sum(x[0] for x in refs) / 3)
    assert r["64"]["top_byte_share"] == pytest.approx(sum(x[1] for x in refs) / 3)
    assert refs[0] == (1 / 60, 1.0)


def test_compare_plot_without_matplotlib(tmp_path):
    from pretrain_kernels.train.compare import _plot_fallback

    path = str(tmp_path / "p.png")
    note = _plot_fallback(path, {"a": ([1, 2, 4], [1.0, 2.0, 1.5]), "b": ([1, 2, 4], [0.5, float("nan"), 3.0])}, True)
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (300, 450) and "a: rgb" in note and "b: rgb" in note
    assert (img[..., :3] < 0.99).any(axis=-1).sum() > 300      # lines were drawn


def test_mdlm_unmasking_helpers():
    from pretrain_kernels.models import BertConfig, BertMLM
    from pretrain_kernels.train.compare import _mlm_logits, mdlm_generate, mdlm_infill

    torch.manual_seed(0)
    tok = D.ByteTokenizer()
    model = BertMLM(BertConfig(n_layer=1, n_head=2, n_embd=16, max_len=40)).eval()
    w = torch.randint(0, 256, (3, 30))
    start, span = torch.tensor([5, 9, 12]), torch.tensor([4, 7, 5])
    guesses = mdlm_infill(model, tok, w, start, span)
    assert [len(g) for g in guesses] == span.tolist() and all(t < 256 for g in guesses for t in g)
    # one row, one token: greedy unmasking is the argmax of one pass (special tokens excluded)
    one = mdlm_infill(model, tok, w[:1], torch.tensor([5]), torch.tensor([1]))
    with torch.no_grad():
        logits = _mlm_logits(model, w[:1].clone().index_fill_(1, torch.tensor([5]), tok.mask_token_id))[0, 5]
    assert one == [[int(logits[:256].argmax())]]
    seqs = mdlm_generate(model, tok, w[:, :6], 10, steps=4, seed=1)
    assert seqs.shape == (3, 16) and seqs[:, :6].equal(w[:, :6])
    assert (seqs[:, 6:] < 256).all()              # every position revealed, no special token drawn
    assert seqs.equal(mdlm_generate(model, tok, w[:, :6], 10, steps=4, seed=1))


def test_infill_prefix_is_the_layouts_prefix():
    from pretrain_kernels.train.tasks import infill_prefix

    tok = D.ByteTokenizer()
    text = torch.tensor(list(b"abcdefghij"))
    masked = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    x, _, plen, _ = span_infill_example(text, masked, mask_id=tok.mask_token_id, bos_id=tok.bos_token_id,
                                        eos_id=tok.eos_token_id)
    pieces = [list(b"a"), list(b"def"), list(b"hi"), []]
    assert infill_prefix(tok, pieces) == x[:plen].tolist()
