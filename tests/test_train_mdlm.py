"""pk-train mdlm (masked diffusion LM) and --mask-schedule: the low-discrepancy rates, the
masking and the 1/t-weighted bound against plain PyTorch, the fixed stratified validation
estimate, resume = uninterrupted, the schedules' per-row rates, and the CLI."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from pretrain_kernels.models import BertConfig, GPTConfig
from pretrain_kernels.train import data as D
from pretrain_kernels.train.cli import train_main
from pretrain_kernels.train.loop import TrainConfig, Trainer
from pretrain_kernels.train.tasks import (SIZES, GPTTask, MaskSchedule, MDLMTask, MLMTask, dense_pack,
                                          low_discrepancy_t)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for i, f in enumerate(D.stdlib_files(max_bytes=400_000)):
        with open(f, "rb") as src, open(d / f"f{i:03d}.py", "wb") as dst:
            dst.write(src.read())
    return str(d)


def mdlm_task(text_dir, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("eval_windows", 16)
    return MDLMTask(BertConfig(**SIZES["mdlm"]["tiny"]), seq_len=32, data=text_dir, **kw)


def mlm_task(text_dir, seed=0, **kw):
    torch.manual_seed(seed)
    return MLMTask(BertConfig(**SIZES["mlm"]["tiny"]), seq_len=32, min_len=8, data=text_dir, eval_windows=16, **kw)


def tiny_cfg(**kw):
    cfg = dict(steps=6, batch_size=8, warmup=2, lr=3e-3, progress=False, log_every=1, final_eval=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


# ---- the rates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,t_max", [(1, 1.0), (7, 1.0), (16, 0.4), (129, 1.0)])
def test_low_discrepancy_t_one_rate_per_stratum(n, t_max):
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        t = low_discrepancy_t(u, n, t_max=t_max, eps=1e-3)
        assert t.dtype == torch.float32 and t.shape == (n,)
        ref = [max(1e-3, t_max * ((u + i / n) % 1.0)) for i in range(n)]
        torch.testing.assert_close(t.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        # exactly one rate in each of the n equal strata of (0, t_max]
        strata = torch.floor(t.double() / t_max * n).clamp_max(n - 1).long()
        assert sorted(strata.tolist()) == list(range(n))
    assert float(low_discrepancy_t(0.0, 4, eps=1e-3)[0]) == pytest.approx(1e-3)      # clamped away from 0


def test_draw_t_is_uniform_over_batches(text_dir):
    task = mdlm_task(text_dir)
    g = torch.Generator().manual_seed(0)
    t = torch.cat([task.draw_t(g, 8) for _ in range(500)]).double()
    # each batch has one rate per eighth; across batches the rates are uniform on (0, 1]
    assert abs(float(t.mean()) - 0.5) < 0.01
    counts = torch.histc(t, bins=10, min=0, max=1)
    expected = t.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9          # chi-square, 9 degrees of freedom, p = 0.001


# ---- masking schedules --------------------------------------------------------------------------


@pytest.mark.parametrize("spec,values", [
    ("constant", [None, None, None]),
    ("constant:0.3", [0.3, 0.3, 0.3]),
    ("linear:0.5:0.1", [0.5, 0.3, 0.1]),
    ("linear:0.2:1", [0.2, 0.6, 1.0]),
    ("cosine:0.4:0.2", [0.4, 0.3, 0.2]),
])
def test_mask_schedule_parse_and_values(spec, values):
    s = MaskSchedule.parse(spec)
    assert MaskSchedule.parse(s.spec()) == s
    for p, want in zip((0.0, 0.5, 1.0), values):
        assert s.value(p, 0.77) == pytest.approx(0.77 if want is None else want)
    if spec.startswith("cosine"):         # slow at both ends: a quarter of the way is under a quarter
        assert s.value(0.25, 0.0) == pytest.approx(0.4 - 0.2 * (1 - math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("spec,match", [
    ("linear", "expected 'constant'"), ("linear:0.1", "expected 'constant'"), ("cosine:1:2:3", "expected"),
    ("step:0.1:0.2", "expected"), ("linear:0:0.5", r"in \(0, 1\]"), ("linear:0.5:1.5", r"in \(0, 1\]"),
    ("linear:a:0.5", "not a number"), ("constant:-1", r"in \(0, 1\]"),
])
def test_mask_schedule_bad_specs(spec, match):
    with pytest.raises(ValueError, match="mask_schedule: .*" + match):
        MaskSchedule.parse(spec)
    with pytest.raises(TypeError, match="mask_schedule"):
        MaskSchedule.parse(0.5)


def test_mlm_schedule_gives_per_row_rates(text_dir):
    const = mlm_task(text_dir)
    assert const.mask_rates(8) == 0.15          # a bare constant keeps the float path
    b1, b2 = const.batch(torch.Generator().manual_seed(1), 8), mlm_task(text_dir).batch(
        torch.Generator().manual_seed(1), 8)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    task = mlm_task(text_dir, mask_schedule="linear:0.6:0.1")
    g = torch.Generator().manual_seed(0)
    for step, want in ((0, 0.6), (50, 0.35), (100, 0.1)):
        task.set_step(step, 100)
        rates = task.mask_rates(512)
        assert rates.dtype == torch.float32 and rates.shape == (512,)
        assert torch.allclose(rates, torch.full((512,), want))
        b = task.batch(g, 512)
        n = int(b["attention_mask"].sum())
        k = int((b["labels"] != -100).sum())
        assert abs(k - want * n) < 5 * math.sqrt(n * want * (1 - want)), (step, k / n)
    # validation stays at mask_prob whatever the schedule
    assert torch.equal(task.val["labels"], const.val["labels"])


# ---- the MDLM task ------------------------------------------------------------------------------


def test_mdlm_batch_masks_every_selected_token_at_its_row_rate(text_dir):
    task = mdlm_task(text_dir)
    g = torch.Generator().manual_seed(3)
    b = task.batch(g, 256)
    ids = task._windows(task.train_ids, 256, 32, torch.Generator().manual_seed(3))   # the same draws
    sel = b["labels"] != -100
    mask_id = task.tok.mask_token_id
    assert torch.equal(b["input_ids"][sel], torch.full_like(b["input_ids"][sel], mask_id))
    assert torch.equal(b["labels"][sel], ids[sel])
    assert torch.equal(b["input_ids"][~sel], ids[~sel])
    # per-row counts follow the row's t: binomial(32, t) on every row, 5 sigma
    k, t = sel.sum(1).double(), b["t"].double()
    assert (torch.abs(k - 32 * t) <= 5 * torch.sqrt(32 * t * (1 - t)) + 1).all()
    assert abs(float(k.sum()) - float(32 * t.sum())) < 5 * math.sqrt(float((32 * t * (1 - t)).sum()))


def _reference_bound(model, mb):
    """sum over rows of (1/t_row) * summed cross-entropy at the masked tokens, float64."""
    tot = torch.zeros((), dtype=torch.float64)
    for i in range(mb["input_ids"].shape[0]):
        row = mb["input_ids"][i:i + 1]
        ids, cu, pos, L = dense_pack(row)
        logits = model(ids, cu, pos, L)
        lab = mb["labels"][i]
        sel = lab != -100
        ce = F.cross_entropy(logits[sel].double(), lab[sel], reduction="sum")
        tot = tot + ce / mb["t"][i].double()
    return tot


def test_mdlm_loss_is_the_weighted_bound(text_dir):
    task = mdlm_task(text_dir)
    model = task.model.double()
    b = task.batch(torch.Generator().manual_seed(7), 6)
    with torch.no_grad():
        got = task.loss(model, b)
        ref = _reference_bound(model, b)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-8)
    assert task.count(b) == 6 * 32


def test_subs_never_predicts_the_special_tokens(text_dir):
    from pretrain_kernels.models import BertMLM
    from pretrain_kernels.train.tasks import build_task

    task, plain = mdlm_task(text_dir, subs=True), mdlm_task(text_dir)
    special = task.tok.all_special_ids
    model, ref = task.model.double(), plain.model.double()
    assert set(model.state_dict()) == set(ref.state_dict())       # the mask is not saved with the weights
    ref.load_state_dict(model.state_dict())
    b = task.batch(torch.Generator().manual_seed(7), 6)
    ids, cu, pos, L = dense_pack(b["input_ids"])
    with torch.no_grad():
        logits, want = model(ids, cu, pos, L), ref(ids, cu, pos, L)
        assert torch.isneginf(logits[:, special]).all()
        want[:, special] = float("-inf")
        torch.testing.assert_close(logits, want)
        # the bound: the 1/t-weighted cross-entropy of the masked logits (fused and unfused), never above
        # the plain model's
        lab = b["labels"].reshape(-1)
        sel = lab != -100
        w = (1.0 / b["t"].double())[:, None].expand(6, 32).reshape(-1)[sel]
        ce = F.cross_entropy(want[sel], lab[sel], reduction="none")
        expect = (ce * w).sum()
        torch.testing.assert_close(task.loss(model, b).double(), expect, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(task._bound(model, b)[2].double(), expect, rtol=1e-6, atol=1e-8)
        assert (ce <= F.cross_entropy(ref(ids, cu, pos, L)[sel], lab[sel], reduction="none") + 1e-12).all()
    # saved in the config and rebuilt (runs saved before it rebuild without it)
    cfg = task.config()
    assert cfg["subs"] is True and build_task(cfg, load_data=False).model.logit_mask is not None
    del cfg["subs"]
    assert build_task(cfg, load_data=False).model.logit_mask is None
    m = BertMLM(BertConfig(**SIZES["mdlm"]["tiny"]))
    with pytest.raises(ValueError, match="ids"):
        m.never_predict([300])
    assert m.never_predict([]).logit_mask is None


def test_count_weighting_is_the_mean_of_one_over_t_given_the_count(text_dir):
    task = mdlm_task(text_dir, weighting="count")
    b = task.batch(torch.Generator().manual_seed(5), 8)
    k = (b["labels"] != -100).sum(1)
    assert task.count_weights(b).tolist() == pytest.approx([33 / max(int(x), 1) for x in k])
    # a special token the text holds (never masked) does not count among a row's n tokens
    b2 = {key: v.clone() for key, v in b.items()}
    free = (b2["labels"][0] == -100).nonzero().flatten()[0]
    b2["input_ids"][0, free] = task.tok.eos_token_id
    assert float(task.count_weights(b2)[0]) == pytest.approx(32 / max(int(k[0]), 1))
    # E[1/t | k] for t uniform and k ~ binomial(n, t): the Beta(k + 1, n - k + 1) posterior, integrated numerically
    t = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:]
    n = 32
    for kk in (1, 2, 7, 32):
        like = t ** kk * (1 - t) ** (n - kk)
        assert float((like / t).sum() / like.sum()) == pytest.approx((n + 1) / kk, rel=1e-3)
    # the loss: the count-weighted cross-entropy of the masked tokens
    model = task.model.double()
    with torch.no_grad():
        got = task.loss(model, b)
        ids, cu, pos, L = dense_pack(b["input_ids"])
        logits = model(ids, cu, pos, L)
        lab = b["labels"].reshape(-1)
        sel = lab != -100
        w = task.count_weights(b).double()[:, None].expand(8, 32).reshape(-1)[sel]
        ref = (F.cross_entropy(logits[sel], lab[sel], reduction="none") * w).sum()
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-8)
        # validation is the same bound whatever the training weighting
        plain = mdlm_task(text_dir)
        plain.model.load_state_dict(task.model.state_dict())
        assert plain.evaluate(plain.model.double(), "cpu") == task.evaluate(model, "cpu")
    with pytest.raises(ValueError, match="weighting"):
        mdlm_task(text_dir, weighting="flat")
    with pytest.raises(ValueError, match="weighting 'count' needs t uniform"):
        mdlm_task(text_dir, weighting="count", mask_schedule="linear:0.3:1")


def test_mdlm_validation_is_a_fixed_stratified_estimate(text_dir):
    task = mdlm_task(text_dir, eval_t=3)
    t = task.val["t"].reshape(16, 3).double()
    for k in range(3):
        assert ((t[:, k] >= max(k / 3, 1e-3) - 1e-7) & (t[:, k] < (k + 1) / 3)).all()
    # the scored tokens are the GPT's predicted tokens of the same validation windows
    torch.manual_seed(0)
    gpt = GPTTask(GPTConfig(**SIZES["gpt"]["tiny"]), seq_len=32, data=text_dir, eval_windows=16)
    truth = gpt.val[:, 1:].repeat_interleave(3, dim=0)
    sel = task.val["labels"] != -100
    assert torch.equal(task.val["labels"][sel], truth[sel])
    assert torch.equal(task.val["input_ids"][~sel], truth[~sel])
    model = task.model.double().eval()
    with torch.no_grad():
        m1, m2 = task.evaluate(model, "cpu"), task.evaluate(model, "cpu")
        ref = float(_reference_bound(model, task.val)) / 3 / (16 * 32)
    assert m1 == m2
    assert m1["val_loss"] == pytest.approx(ref, rel=1e-6)
    assert m1["val_bits_per_byte"] == pytest.approx(ref / math.log(2))
    # an untrained model is about uniform over the 260 byte ids, and the bound's estimate is its cross-entropy
    assert abs(m1["val_loss"] - math.log(260)) < 0.5
    assert mdlm_task(text_dir, eval_t=3).val["t"].tolist() == task.val["t"].tolist()   # the same every build


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", ["mdlm", "mdlm-subs", "mdlm-schedule", "mlm-schedule"])
def test_resume_equals_uninterrupted(kind, text_dir, tmp_path):
    def make(seed=0):
        if kind == "mdlm":
            return mdlm_task(text_dir, seed)
        if kind == "mdlm-subs":
            return mdlm_task(text_dir, seed, subs=True, weighting="count")
        if kind == "mdlm-schedule":
            return mdlm_task(text_dir, seed, mask_schedule="cosine:0.3:1")
        return mlm_task(text_dir, seed, mask_schedule="linear:0.5:0.15")

    full = losses(Trainer(make(), tiny_cfg(), str(tmp_path / "a")).train())
    # the same 6-step run (the schedule spans 6 steps), stopped after its step-3 checkpoint
    task = make()
    draw, calls = task.batch, []

    def batch(gen, n):
        calls.append(n)
        if len(calls) == 4:
            raise Interrupted
        return draw(gen, n)
    task.batch = batch
    part = Trainer(task, tiny_cfg(save_every=3), str(tmp_path / "c"))
    with pytest.raises(Interrupted):
        part.train()
    rest = losses(Trainer(make(seed=123), tiny_cfg(), str(tmp_path / "c")).train(resume=True))
    assert len(full) == 6 and len(rest) == 3
    assert rest == pytest.approx(full[3:], rel=1e-6, abs=1e-7)
    assert losses(part.history) == pytest.approx(full[:3], rel=1e-6)


def test_schedule_changes_training_and_is_saved(text_dir, tmp_path):
    plain = losses(Trainer(mdlm_task(text_dir), tiny_cfg(steps=4)).train())
    sched = losses(Trainer(mdlm_task(text_dir, mask_schedule="linear:0.2:1"), tiny_cfg(steps=4)).train())
    assert plain != sched
    from pretrain_kernels.train.loop import build_task_from_dir

    Trainer(mdlm_task(text_dir, mask_schedule="linear:0.2:1"), tiny_cfg(steps=2), str(tmp_path / "r")).train()
    task, _ = build_task_from_dir(str(tmp_path / "r"))
    assert task.mask_schedule == MaskSchedule("linear", 0.2, 1.0) and task.name == "mdlm"


def test_mdlm_trains(text_dir):
    h = Trainer(mdlm_task(text_dir), tiny_cfg(steps=30, eval_every=15, lr=1e-2, batch_size=16)).train()
    evals = [x["eval"] for x in h if "eval" in x]
    # from the uniform 5.56 nats to about the byte frequencies (3.2-3.3 nats on this text) in 30 tiny steps
    assert len(evals) == 2 and max(evals[0]["val_loss"], evals[1]["val_loss"]) < math.log(260) - 2


# ---- CLI -----------------------------------------------------------------------------------------

TINY = ["--size", "tiny", "--steps", "4", "--batch-size", "4", "--no-progress", "--threads", "1"]


def test_cli_mdlm_train_and_resume(text_dir, tmp_path):
    out = str(tmp_path / "mdlm")
    m = train_main(["mdlm", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32", "--eval-t", "2",
                    "--mask-schedule", "linear:0.5:1"])
    assert m["val_loss"] > 0 and 0 <= m["masked_accuracy"] <= 1
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)["task"]
    assert cfg["kind"] == "mdlm" and cfg["mask_schedule"] == "linear:0.5:1" and cfg["eval_t"] == 2
    train_main(["mdlm", "--out", out, "--resume", "--steps", "6", "--no-progress"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["step"] == 6
    # the MDLM options of the objectives' comparison: saved, kept on resume
    out = str(tmp_path / "mdlm-subs")
    train_main(["mdlm", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32", "--subs", "--weighting", "count"])
    train_main(["mdlm", "--out", out, "--resume", "--steps", "5", "--no-progress"])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["step"] == 5 and cfg["task"]["subs"] is True and cfg["task"]["weighting"] == "count"
    from pretrain_kernels.train.cli import generate_main

    texts = generate_main(["--checkpoint", out, "--infill", "def f(x):\\n    ___\\n", "--infill-length", "5"])
    assert len(texts) == 1 and texts[0].startswith("def f(x):\n    ") and texts[0].endswith("\n")


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train_main(argv + ["--no-progress"])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["mlm", "--mask-schedule", "linear:0.1"], "--mask-schedule: expected 'constant'"),
    (["mdlm", "--mask-schedule", "cosine:0:1"], r"--mask-schedule: expected rates in (0, 1]"),
    (["gpt", "--mask-schedule", "constant"], "--mask-schedule: only for mlm and mdlm"),
    (["mdlm", "--mask-prob", "0.2"], "--mask-prob: only for mlm"),
    (["mlm", "--eval-t", "3"], "--eval-t: only for mdlm"),
    (["hybrid", "--subs"], "--subs: only for mdlm"),
    (["gpt", "--weighting", "count"], "--weighting: only for mdlm"),
    (["mdlm", "--weighting", "count", "--mask-schedule", "linear:0.3:1", "--size", "tiny"],
     "weighting 'count' needs t uniform"),
    (["mdlm", "--eval-t", "0"], "--eval-t: expected a number > 0"),
])
def test_cli_mdlm_bad_arguments(argv, message, capsys):
    assert message in _error(capsys, argv)


# ---- generation: iterative unmasking --------------------------------------------------------------


@pytest.fixture(scope="module")
def mdlm_run(text_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "mdlm")
    train_main(["mdlm", "--out", out, "--data", text_dir, *TINY, "--seq-len", "48"])
    return out


def test_unmask_reveals_on_the_linear_schedule(mdlm_run, monkeypatch):
    import pretrain_kernels as pk
    from pretrain_kernels.train.loop import build_task_from_dir

    task, _ = build_task_from_dir(mdlm_run, load_data=False)
    tok, model = task.tok, task.model.eval()
    M = tok.mask_token_id
    prompt = tok.encode("import os\n")
    rows = [prompt + [M] * 13, [M] * 7 + tok.encode(" = 1\n") + [M] * 4, [M] * 23]
    L = max(len(r) for r in rows)
    x = torch.full((3, L), tok.pad_token_id)
    am = torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)], am[i, :len(r)] = torch.tensor(r), 1
    seen = []
    real = pk.unmask_step

    def spy(logits, tokens, **kw):
        out = real(logits, tokens, **kw)
        seen.append(((tokens == M).sum(1).tolist(), kw["num_reveal"].tolist(), (out == M).sum(1).tolist()))
        return out
    monkeypatch.setattr(pk, "unmask_step", spy)
    steps = 5
    out = model.unmask(x, mask_token_id=M, steps=steps, attention_mask=am, seed=11, banned_ids=tok.all_special_ids)
    assert len(seen) == steps
    counts = [13, 11, 23]
    for s, (before, n, after) in enumerate(seen):
        want_after = [m * (steps - s - 1) // steps for m in counts]
        assert before == [m * (steps - s) // steps for m in counts]
        assert after == want_after and n == [b - a for b, a in zip(before, want_after)]
    # every mask filled with a non-special token; the kept text and the padding unchanged
    keep = x != M
    assert torch.equal(out[keep], x[keep])
    assert not torch.isin(out[am.bool()], torch.tensor(tok.all_special_ids)).any()
    monkeypatch.setattr(pk, "unmask_step", real)
    # deterministic, and row i with seed 11 is the row alone with seed 11 + i
    again = model.unmask(x, mask_token_id=M, steps=steps, attention_mask=am, seed=11, banned_ids=tok.all_special_ids)
    assert torch.equal(out, again)
    alone = model.unmask(x[2:, :len(rows[2])], mask_token_id=M, steps=steps, seed=13, banned_ids=tok.all_special_ids)
    assert torch.equal(alone[0], out[2, :len(rows[2])])
    other = model.unmask(x, mask_token_id=M, steps=steps, attention_mask=am, seed=12, banned_ids=tok.all_special_ids)
    assert not torch.equal(other, out)
    # one step reveals everything at once; the random strategy fills every mask too
    for kw in (dict(steps=1), dict(steps=3, strategy="random", temperature=0.0),
               dict(steps=40, top_k=5, repetition_penalty=1.3)):
        y = model.unmask(x, mask_token_id=M, attention_mask=am, seed=0, banned_ids=tok.all_special_ids, **kw)
        assert not (y[am.bool()] == M).any() and torch.equal(y[keep], x[keep])
    with pytest.raises(ValueError, match="steps"):
        model.unmask(x, mask_token_id=M, steps=0)
    with pytest.raises(ValueError, match="max_len"):
        model.unmask(torch.full((1, 65), M), mask_token_id=M, steps=2)


def test_generate_mdlm_unconditional_prompted_infill(mdlm_run, capsys):
    from pretrain_kernels.train.cli import generate_main
    from pretrain_kernels.train.tasks import mdlm_generate, mdlm_rows
    from pretrain_kernels.train.loop import build_task_from_dir

    task, _ = build_task_from_dir(mdlm_run, load_data=False)
    tok = task.tok
    # unconditional: --max-new-tokens bytes, --num-samples rows of different seeds
    texts = generate_main(["--checkpoint", mdlm_run, "--max-new-tokens", "24", "--num-samples", "2", "--seed", "4"])
    rows, kinds = mdlm_rows(tok, max_new_tokens=24, num_samples=2)
    assert kinds == ["unconditional"] * 2
    outs = mdlm_generate(task, rows, seed=4, temperature=0.8)        # pk-generate's default temperature
    assert all(len(o) == 24 and all(0 <= t < 256 for t in o) for o in outs) and outs[0] != outs[1]
    assert texts == [tok.decode_bytes(o).decode("utf-8", errors="replace") for o in outs]
    # prompted: the prefix kept, then the drawn text
    texts = generate_main(["--checkpoint", mdlm_run, "--prompt", "def f(x):", "--prompt", "import",
                           "--max-new-tokens", "16", "--steps", "4", "--temperature", "0.7", "--top-p", "0.9"])
    assert texts[0].startswith("def f(x):") and texts[1].startswith("import")
    # infilling: escapes read, the text around each ___ kept, --infill-length masks per ___
    texts = generate_main(["--checkpoint", mdlm_run, "--infill", "def f(x):\\n    ___\\n    return ___\\n",
                           "--infill-length", "6", "--strategy", "random"])
    rows, kinds = mdlm_rows(tok, infills=["def f(x):\n    ___\n    return ___\n"], infill_length=6)
    assert kinds == ["infill"] and sum(t == tok.mask_token_id for t in rows[0]) == 12
    out = mdlm_generate(task, rows, strategy="random", temperature=0.8)[0]
    want = tok.encode("def f(x):\n    ") + [None] * 6 + tok.encode("\n    return ") + [None] * 6 + tok.encode("\n")
    assert len(out) == len(want) and all(w is None or o == w for o, w in zip(out, want))
    assert texts == [tok.decode_bytes(out).decode("utf-8", errors="replace")]
    err = capsys.readouterr().err
    assert not err


@pytest.mark.parametrize("argv,message", [
    (["--infill", "no blanks here"], "infill 'no blanks here': expected at least one ___"),
    (["--stop", "\n"], "--stop: only for gpt runs"),
    (["--no-cache"], "--no-cache: only for gpt runs"),
    (["--max-new-tokens", "65"], "exceeds the model's max_len 64"),
    (["--prompt", ""], "--prompt: prompts must not be empty"),
])
def test_generate_mdlm_errors(mdlm_run, argv, message, capsys):
    from pretrain_kernels.train.cli import generate_main

    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", mdlm_run, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generate_gpt_refuses_mdlm_options(text_dir, tmp_path, capsys):
    from pretrain_kernels.train.cli import generate_main

    out = str(tmp_path / "gpt")
    train_main(["gpt", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32"])
    for opt in (["--steps", "3"], ["--infill", "a___b"], ["--strategy", "random"], ["--num-samples", "2"]):
        with pytest.raises(SystemExit):
            generate_main(["--checkpoint", out, *opt])
        assert f"{opt[0]}: only for mdlm runs" in capsys.readouterr().err


def test_mdlm_bpe_train_and_infill(text_dir, tmp_path):
    from pretrain_kernels.train.cli import generate_main

    out = str(tmp_path / "bpe")
    m = train_main(["mdlm", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32", "--tokenizer", "bpe",
                    "--vocab-size", "300"])
    assert m["val_bytes_per_token"] > 1.2 and m["val_loss"] < m["val_nats_per_token"]
    texts = generate_main(["--checkpoint", out, "--infill", "x = ___\\nprint(x)\\n", "--infill-length", "4"])
    assert texts[0].startswith("x = ") and texts[0].endswith("\nprint(x)\n")
