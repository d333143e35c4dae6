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


@pytest.mark.parametrize("kind", ["mdlm", "mdlm-schedule", "mlm-schedule"])
def test_resume_equals_uninterrupted(kind, text_dir, tmp_path):
    def make(seed=0):
        if kind == "mdlm":
            return mdlm_task(text_dir, seed)
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
    (["mdlm", "--eval-t", "0"], "--eval-t: expected a number > 0"),
])
def test_cli_mdlm_bad_arguments(argv, message, capsys):
    assert message in _error(capsys, argv)
