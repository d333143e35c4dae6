"""Training loop and CLI: schedule, resume = uninterrupted, accumulation and DDP (2 gloo CPU
processes) = one process with the same global batch, the entry points end to end on tiny
settings, user data, clear errors, and the image judge."""
import json
import os

import numpy as np
import pytest
import torch

from pretrain_kernels.models import BertConfig, GPTConfig
from pretrain_kernels.train import data as D
from pretrain_kernels.train.cli import generate_main, sample_images_main, train_main
from pretrain_kernels.train.loop import TrainConfig, Trainer, lr_at
from pretrain_kernels.train.tasks import SIZES, DenoisingTask, GPTTask, MLMTask
from processes import run_ranks


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small folder of text files (so tests do not read the whole standard library)."""
    d = tmp_path_factory.mktemp("text")
    for i, f in enumerate(D.stdlib_files(max_bytes=400_000)):
        with open(f, "rb") as src, open(d / f"f{i:03d}.py", "wb") as dst:
            dst.write(src.read())
    return str(d)


def make_task(kind, text_dir, seed=0):
    torch.manual_seed(seed)
    tok = dict(tokenizer="bpe", vocab_size=300) if kind.endswith("-bpe") else {}
    if kind.startswith("gpt"):
        return GPTTask(GPTConfig(**SIZES["gpt"]["tiny"]), seq_len=32, data=text_dir, eval_windows=16, **tok)
    if kind.startswith("mlm"):
        return MLMTask(BertConfig(**SIZES["mlm"]["tiny"]), seq_len=32, min_len=8, data=text_dir, eval_windows=16,
                       **tok)
    return DenoisingTask(kind, arch="dit" if kind == "flow" else "unet", model_cfg=SIZES["dit" if kind == "flow"
                         else "unet"]["tiny"], eval_samples=20)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def tiny_cfg(**kw):
    cfg = dict(steps=6, batch_size=8, warmup=2, lr=3e-3, progress=False, log_every=1, final_eval=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


# ---- loop ------------------------------------------------------------------------------------


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


@pytest.mark.parametrize("kind", ["gpt", "mlm", "diffusion", "gpt-bpe"])
def test_resume_equals_uninterrupted(kind, text_dir, tmp_path):
    full = losses(Trainer(make_task(kind, text_dir), tiny_cfg(), str(tmp_path / "a")).train())
    Trainer(make_task(kind, text_dir), tiny_cfg(steps=6, save_every=3), str(tmp_path / "b")).train()
    # rebuild from scratch at step 3: a fresh (differently initialised) model, then resume
    part = Trainer(make_task(kind, text_dir), tiny_cfg(steps=3), str(tmp_path / "c"))
    part.train()
    resumed = Trainer(make_task(kind, text_dir, seed=123), tiny_cfg(), str(tmp_path / "c"))
    rest = losses(resumed.train(resume=True))
    assert len(full) == 6 and len(rest) == 3
    assert rest == pytest.approx(full[3:], rel=1e-6, abs=1e-7)
    assert losses(part.history) == pytest.approx(full[:3], rel=1e-6)
    with open(tmp_path / "c" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-1] == 6 and 3 in steps


def test_ema_average_resume_and_loading(tmp_path):
    from safetensors.torch import load_file

    from pretrain_kernels.train.loop import EMA, build_task_from_dir

    # the average follows the documented recurrence on the weights after each step
    task = make_task("diffusion", None)
    tr = Trainer(task, tiny_cfg(steps=3, ema=0.9), str(tmp_path / "a"))
    snaps, avg = [], {n: t.double().clone() for n, t in task.model.state_dict().items()}
    orig_update = tr.ema.update

    def spy(step):
        orig_update(step)
        snaps.append((step, {n: t.double().clone() for n, t in task.model.state_dict().items()}))
    tr.ema.update = spy
    tr.train()
    for step, w in snaps:
        d = min(0.9, (1 + step) / (10 + step))
        avg = {n: avg[n] + (1 - d) * (w[n] - avg[n]) for n in avg}
    saved = load_file(str(tmp_path / "a" / "ema.safetensors"))
    raw = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert set(saved) == set(raw)
    diff = 0.0
    for n, t in saved.items():
        torch.testing.assert_close(t.double(), avg[n], rtol=1e-5, atol=1e-6)
        diff = max(diff, float((t - raw[n]).abs().max()))
    assert diff > 0       # the average is not the last weights
    # evaluation swaps the average in and the training weights back out
    before = {n: t.clone() for n, t in task.model.state_dict().items()}
    with tr.ema.swapped_in(task.model):
        torch.testing.assert_close(task.model.state_dict()["conv_in.weight"], saved["conv_in.weight"])
    for n, t in task.model.state_dict().items():
        assert torch.equal(t, before[n])
    # run folders load the average by default, the raw weights on request
    loaded, _ = build_task_from_dir(str(tmp_path / "a"), load_data=False)
    assert torch.equal(loaded.model.state_dict()["conv_in.weight"], saved["conv_in.weight"])
    loaded, _ = build_task_from_dir(str(tmp_path / "a"), load_data=False, use_ema=False)
    assert torch.equal(loaded.model.state_dict()["conv_in.weight"], raw["conv_in.weight"])
    # resume continues the average exactly
    full = Trainer(make_task("diffusion", None), tiny_cfg(steps=6, ema=0.9), str(tmp_path / "b"))
    full.train()
    Trainer(make_task("diffusion", None), tiny_cfg(steps=3, ema=0.9), str(tmp_path / "c")).train()
    Trainer(make_task("diffusion", None, seed=5), tiny_cfg(steps=6, ema=0.9), str(tmp_path / "c")).train(resume=True)
    a, b = load_file(str(tmp_path / "b" / "ema.safetensors")), load_file(str(tmp_path / "c" / "ema.safetensors"))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ema"):
        EMA(task.model, 1.0)


def test_compile_trains_like_eager(text_dir):
    # --compile: the whole model (pk ops included, through their fake kernels) under
    # torch.compile gives the eager losses up to float reassociation
    eager = losses(Trainer(make_task("gpt", text_dir), tiny_cfg(steps=3)).train())
    compiled = losses(Trainer(make_task("gpt", text_dir), tiny_cfg(steps=3, compile=True)).train())
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_grad_accum_equals_one_big_batch(text_dir):
    a = losses(Trainer(make_task("mlm", text_dir), tiny_cfg(steps=4)).train())
    b = losses(Trainer(make_task("mlm", text_dir), tiny_cfg(steps=4, grad_accum=4)).train())
    assert b == pytest.approx(a, rel=1e-5)


def test_loss_falls_and_eval_runs(text_dir):
    h = Trainer(make_task("gpt", text_dir), tiny_cfg(steps=30, eval_every=15, lr=1e-2)).train()
    ls = losses(h)
    assert np.mean(ls[-5:]) < np.mean(ls[:5]) - 0.5
    evals = [x["eval"] for x in h if "eval" in x]
    assert len(evals) == 2 and evals[1]["val_loss"] < evals[0]["val_loss"]


def _ddp_worker(rank, world, store, text_dir, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        task = make_task("mlm", text_dir)
        h = Trainer(task, tiny_cfg(steps=4)).train()
        if rank == 0:
            torch.save({"losses": losses(h), "state": task.model.state_dict()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one(text_dir, tmp_path):
    """2 CPU processes (gloo), each on half of the global batch == 1 process on all of it."""
    out = str(tmp_path / "ddp.pt")
    run_ranks(_ddp_worker, 2, (2, str(tmp_path / "store"), text_dir, out))
    ddp = torch.load(out)
    task = make_task("mlm", text_dir)
    single = losses(Trainer(task, tiny_cfg(steps=4)).train())
    assert ddp["losses"] == pytest.approx(single, rel=1e-5)
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, atol=2e-5, rtol=1e-4, msg=k)


def test_bfloat16_autocast_trains(text_dir):
    ls = losses(Trainer(make_task("gpt", text_dir), tiny_cfg(steps=12, dtype="bfloat16", lr=1e-2)).train())
    assert all(np.isfinite(ls)) and ls[-1] < ls[0]


def test_trainer_argument_errors(text_dir):
    t = make_task("gpt", text_dir)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(t, tiny_cfg(batch_size=6, grad_accum=4))
    with pytest.raises(ValueError, match="dtype"):
        Trainer(t, tiny_cfg(dtype="float16"))
    with pytest.raises(ValueError, match="steps"):
        Trainer(t, tiny_cfg(steps=0))


# ---- CLI -------------------------------------------------------------------------------------


TINY = ["--size", "tiny", "--steps", "4", "--batch-size", "4", "--no-progress", "--threads", "1"]


def test_cli_gpt_train_then_generate(text_dir, tmp_path, capsys):
    out = str(tmp_path / "gpt")
    metrics = train_main(["gpt", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32"])
    assert "val_loss" in metrics
    for f in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(out, f))
    texts = generate_main(["--checkpoint", out, "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "10",
                           "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3"])
    assert len(texts) == 2 and texts[0].startswith("def ") and texts[1].startswith("import")
    again = generate_main(["--checkpoint", out, "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "10",
                           "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3",
                           "--no-cache"])
    assert again == texts
    # resume continues to more steps
    metrics = train_main(["gpt", "--out", out, "--resume", "--steps", "6", "--no-progress"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["step"] == 6


def test_cli_mlm(text_dir, tmp_path):
    m = train_main(["mlm", "--out", str(tmp_path / "mlm"), "--data", text_dir, *TINY])
    assert 0 <= m["masked_accuracy"] <= 1 and 0 <= m["baseline_accuracy"] <= 1


@pytest.mark.parametrize("task,arch,sampler", [("flow", "dit", None), ("diffusion", "unet", "dpm"),
                                               ("diffusion", "unet", "ddpm")])
def test_cli_denoising_train_then_sample(task, arch, sampler, tmp_path):
    out = str(tmp_path / task)
    m = train_main([task, "--arch", arch, "--out", out, *TINY, "--no-final-eval"])
    assert m["val_loss"] > 0
    png = str(tmp_path / "grid.png")
    args = ["--checkpoint", out, "--out", png, "--n", "20", "--steps", "3", "--nrow", "10", "--scale", "2"]
    sample_images_main(args + (["--sampler", sampler] if sampler else []))
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (2 * 18 + 2, 10 * 18 + 2)


def test_cli_user_images_npy_and_folder(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (20, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "imgs.npy", arr)
    m = train_main(["flow", "--out", str(tmp_path / "a"), "--data", str(tmp_path / "imgs.npy"), *TINY, "--arch",
                    "dit"])
    assert "val_loss" in m and not any(k.endswith("class_accuracy") for k in m)
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "folder" / c)
        for i in range(5):
            Image.fromarray(arr[i]).save(tmp_path / "folder" / c / f"{i}.png")
    data = D.load_images(str(tmp_path / "folder"))
    assert data.num_classes == 2 and data.train.shape[1:] == (1, 8, 8)
    assert data.train.min() >= -1 and data.train.max() <= 1


def _error(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bert"], "invalid choice"),
    (["gpt", "--steps", "0"], "--steps: expected a number > 0"),
    (["gpt", "--lr", "abc"], "--lr"),
    (["gpt", "--dtype", "float16"], "invalid choice"),
    (["gpt", "--data", "/nonexistent/folder"], "does not exist"),
    (["diffusion", "--data", "/nonexistent/images.npy"], "does not exist"),
])
def test_cli_bad_arguments(argv, message, capsys):
    assert message in _error(capsys, train_main, argv + ["--no-progress"])


def test_cli_empty_or_binary_data_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no non-empty text files" in _error(capsys, train_main, ["gpt", "--data", str(tmp_path / "empty")])
    assert "no image files" in _error(capsys, train_main, ["flow", "--data", str(tmp_path / "empty")])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2" * 100)
    assert "no non-empty text files" in _error(capsys, train_main, ["mlm", "--data", str(tmp_path / "bin")])
    (tmp_path / "file.txt").write_text("hello")
    assert "not a folder" in _error(capsys, train_main, ["gpt", "--data", str(tmp_path / "file.txt")])


def test_cli_bad_checkpoints(tmp_path, capsys, text_dir):
    assert "does not exist" in _error(capsys, generate_main, ["--checkpoint", str(tmp_path / "none")])
    assert "does not exist" in _error(capsys, train_main, ["gpt", "--resume", "--out", str(tmp_path / "none")])
    (tmp_path / "notarun").mkdir()
    assert "not a pk-train run" in _error(capsys, sample_images_main, ["--checkpoint", str(tmp_path / "notarun")])
    out = str(tmp_path / "gpt")
    train_main(["gpt", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32"])
    assert "needs diffusion/flow" in _error(capsys, sample_images_main, ["--checkpoint", out])
    assert "expected a .png" in _error(capsys, sample_images_main, ["--checkpoint", out, "--out", "x.jpg"])
    assert "holds a gpt run" in _error(capsys, train_main, ["mlm", "--resume", "--out", out])
    assert "--top-p" in _error(capsys, generate_main, ["--checkpoint", out, "--top-p", "1.5"])
    assert "exceeds block_size" in _error(capsys, generate_main, ["--checkpoint", out, "--max-new-tokens", "64"])


# ---- tokenizers --------------------------------------------------------------------------------

BPE = ["--tokenizer", "bpe", "--vocab-size", "300"]


def test_byte_path_draws_the_byte_windows(text_dir):
    """The byte tokenizer draws exactly what data.byte_windows draws (the original data path)."""
    t = make_task("gpt", text_dir)
    assert not t.bpe and t.model_cfg.vocab_size == 260 and t.tokenizer_config() == {"kind": "byte", "vocab_size": 260}
    b = t.batch(torch.Generator().manual_seed(5), 8)
    w = D.byte_windows(D.folder_corpus(text_dir, "train"), 8, 33, generator=torch.Generator().manual_seed(5))
    assert torch.equal(b["x"], w[:, :-1]) and torch.equal(b["y"], w[:, 1:])
    val = D.byte_windows(D.folder_corpus(text_dir, "validation"), 16, 33, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(t.val, val)
    with torch.no_grad():
        assert set(t.evaluate(t.model, "cpu")) == {"val_loss", "val_bits_per_byte"}


def test_bpe_tokenizer_round_trip(text_dir, tmp_path):
    train, val = D.folder_corpus(text_dir, "train"), D.folder_corpus(text_dir, "validation")
    tok = D.BPETokenizer.train(train, 300)
    assert tok.vocab_size == 300 and len(tok) == 300
    assert tok.sha1 == D.BPETokenizer.train(train, 300).sha1          # deterministic
    assert tok.all_special_ids == [tok.pad_token_id, tok.mask_token_id, tok.bos_token_id, tok.eos_token_id]
    assert sorted(tok.all_special_ids) == [0, 1, 2, 3]
    # unseen text: the validation files, non-ASCII text, and special-token names as plain text
    for text in (val.decode("utf-8")[:5000], "naïve café — ∑ 日本語\r\n\tx = '<mask>' + \"<pad>\"\n\n\n  "):
        ids = tok.encode(text)
        assert not set(ids) & set(tok.all_special_ids)
        assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode("utf-8")
        assert int(tok.token_nbytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.decode(tok.encode("ab") + [tok.mask_token_id] + tok.encode("cd") + [tok.pad_token_id]) == "ab\u2588cd"
    import pretrain_kernels as pk

    batch = pk.MLMCollator(tok, mlm_probability=0.5)([tok.encode("x = 1"), tok.encode("def f(a, b): return a")])
    assert batch["input_ids"].shape == batch["labels"].shape and int((batch["input_ids"] == 0).sum()) > 0
    # the corpus encoder: line-aligned batches give exactly the ids of the whole text, BPE compresses
    ids = tok.encode_corpus(val)
    assert ids.tolist() == tok.encode(val) and tok.encode_corpus(val) is ids   # cached
    assert tok.decode_bytes(ids) == val and ids.numel() < 0.8 * len(val)
    # saved and reloaded: same tokenizer, same ids; the token cache round trips
    tok.save(str(tmp_path / "tokenizer.json"))
    again = D.BPETokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.sha1 == tok.sha1 and again.encode(val.decode()) == ids.tolist()
    D.save_token_cache(str(tmp_path / "tokens.pt"), tok, [val])
    D._ENCODED.clear()
    assert D.load_token_cache(str(tmp_path / "tokens.pt"), again)
    assert torch.equal(again.encode_corpus(val), ids)
    with pytest.raises(ValueError, match="vocab_size: expected an integer >= 260"):
        D.BPETokenizer.train(train, 259)


def test_bpe_gpt_eval_is_per_byte(text_dir):
    t = make_task("gpt-bpe", text_dir)
    assert t.bpe and t.model_cfg.vocab_size == 300 and t.model.lm_head.weight.shape[0] == 300
    with torch.no_grad():
        m = t.evaluate(t.model, "cpu")
    nbytes = sum(len(t.tok.decode_bytes(w[1:])) for w in t.val)
    assert m["val_bytes_per_token"] == pytest.approx(nbytes / t.val[:, 1:].numel())
    assert m["val_bytes_per_token"] > 1.2
    assert m["val_loss"] == pytest.approx(m["val_nats_per_token"] / m["val_bytes_per_token"])
    assert m["val_bits_per_byte"] == pytest.approx(m["val_loss"] / np.log(2))
    # an untrained model is about uniform over the 300 tokens
    assert abs(m["val_nats_per_token"] - np.log(300)) < 0.3


def test_cli_gpt_bpe_train_resume_generate(text_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "gpt")
    metrics = train_main(["gpt", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32", *BPE])
    assert metrics["val_bytes_per_token"] > 1.2 and metrics["val_loss"] < metrics["val_nats_per_token"]
    for f in ("tokenizer.json", "tokens.pt", "config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(out, f))
    with open(os.path.join(out, "config.json")) as f:
        task_cfg = json.load(f)["task"]
    assert task_cfg["tokenizer"]["kind"] == "bpe" and task_cfg["tokenizer"]["vocab_size"] == 300
    assert task_cfg["model"]["vocab_size"] == 300

    # from here on, nothing may train a tokenizer or encode the corpus again
    def boom(*a, **k):
        raise AssertionError("retrained or re-encoded")
    monkeypatch.setattr(D, "_chunks", boom)
    D._ENCODED.clear()
    from pretrain_kernels.train.loop import build_task_from_dir

    task, _ = build_task_from_dir(out)
    tok = task.tok
    assert task.bpe and tok.sha1 == task_cfg["tokenizer"]["sha1"]
    args = ["--checkpoint", out, "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "12", "--seed", "3"]
    texts = generate_main(args)
    raw = task.model.generate([tok.encode("def "), tok.encode("import os")], 12, temperature=0.8, seed=3)
    assert texts == ["def " + tok.decode_bytes(raw[0]).decode("utf-8", errors="replace"),
                     "import os" + tok.decode_bytes(raw[1]).decode("utf-8", errors="replace")]
    assert generate_main(args + ["--no-cache"]) == texts
    # --stop: the text up to the first stop character, also inside a multi-byte token
    stopped = generate_main(args + ["--stop", " e"])
    assert stopped != texts
    for full, cut in zip(texts, stopped):
        rest = full[len("def ") if full.startswith("def ") else len("import os"):]
        head = full[:len(full) - len(rest)]
        k = min((i for i in (rest.find(" "), rest.find("e")) if i >= 0), default=len(rest))
        assert cut == head + rest[:k]
    # a stop character at the end of a longer token: the token's text before it is kept
    raw = task.model.generate([tok.encode("def ")], 40, temperature=0.8, seed=3)[0]
    seen = b""
    for j, t in enumerate(raw):
        tb = tok.token_bytes(t)
        c = tb[-1:]
        if len(tb) >= 2 and 33 <= tb[-1] < 127 and c not in seen + tb[:-1]:
            break
        seen += tb
    else:
        pytest.fail("no multi-byte token in the sample")
    assert task.model.generate([tok.encode("def ")], 40, temperature=0.8, seed=3, stop_tokens=[t],
                               keep_stop_token=True)[0] == raw[:j + 1]
    cut = generate_main(["--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "40", "--seed", "3",
                         "--stop", c.decode()])
    assert cut == ["def " + (seen + tb[:-1]).decode("utf-8", errors="replace")]
    # resume continues from the saved tokenizer and token cache
    train_main(["gpt", "--out", out, "--resume", "--steps", "6", "--no-progress"])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["step"] == 6 and cfg["task"]["tokenizer"] == task_cfg["tokenizer"]


def test_cli_mlm_bpe(text_dir, tmp_path):
    out = str(tmp_path / "mlm")
    m = train_main(["mlm", "--out", out, "--data", text_dir, *TINY, *BPE])
    for k in ("masked_token_accuracy", "most_frequent_token_accuracy"):
        assert 0 <= m[k] <= 1
    assert m["val_loss"] == pytest.approx(m["val_nats_per_token"] / m["masked_bytes_per_token"])
    assert "masked_accuracy" not in m and isinstance(m["most_frequent_token"], str)
    from pretrain_kernels.train.loop import build_task_from_dir

    task, _ = build_task_from_dir(out)
    assert task.model.cfg.vocab_size == task.tok.vocab_size == 300
    # masking: labels only on real, non-special tokens; no special drawn as a random replacement
    b = task.batch(torch.Generator().manual_seed(0), 2048)
    sel = b["labels"] != -100
    specials = torch.tensor(task.tok.all_special_ids)
    assert sel.any() and not torch.isin(b["labels"][sel], specials).any()
    masked = b["input_ids"][sel]
    replaced = masked != task.tok.mask_token_id
    assert replaced.any() and not torch.isin(masked[replaced], specials).any()
    assert torch.equal(b["input_ids"][b["attention_mask"] == 0],
                       torch.full_like(b["input_ids"][b["attention_mask"] == 0], task.tok.pad_token_id))


def test_cli_bpe_errors(text_dir, tmp_path, capsys, monkeypatch):
    assert "--vocab-size: expected at least 260" in _error(capsys, train_main, ["gpt", "--tokenizer", "bpe",
                                                                                 "--vocab-size", "100"])
    assert "only with --tokenizer bpe" in _error(capsys, train_main, ["gpt", "--vocab-size", "512"])
    assert "only for the text tasks" in _error(capsys, train_main, ["flow", "--tokenizer", "bpe"])
    out = str(tmp_path / "byte")
    train_main(["gpt", "--out", out, "--data", text_dir, *TINY, "--seq-len", "32"])
    assert "a resumed run keeps it" in _error(capsys, train_main, ["gpt", "--out", out, "--resume", *BPE])
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    assert "needs the 'tokenizers' package" in _error(capsys, train_main, ["gpt", "--data", text_dir, *BPE])


# ---- data and judge --------------------------------------------------------------------------


def test_folder_corpus_split(text_dir):
    tr, va = D.folder_corpus(text_dir, "train"), D.folder_corpus(text_dir, "validation")
    assert len(tr) > 10 * len(va) > 0
    assert va not in tr


def test_ot_coupling_is_an_optimal_permutation_within_labels():
    import itertools

    from pretrain_kernels.train.tasks import ot_pair

    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(13, 1, 2, 2, generator=g), torch.randn(13, 1, 2, 2, generator=g)
    y = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0, 1, 0, 1, 1, 3])
    out = ot_pair(x0, noise, y)
    flat = lambda t: [tuple(r) for r in t.flatten(1).tolist()]
    for label in y.unique().tolist():
        idx = (y == label).nonzero().flatten()
        # the same noise draws, only reordered inside the label group
        assert sorted(flat(out[idx])) == sorted(flat(noise[idx]))
        best = min(sum(float((x0[i] - noise[j]).pow(2).sum()) for i, j in zip(idx.tolist(), perm))
                   for perm in itertools.permutations(idx.tolist()))
        got = float((x0[idx] - out[idx]).pow(2).sum())
        assert got == pytest.approx(best, rel=1e-6)
    # and it beats the independent pairing on a whole batch
    x0, noise = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g)
    zeros = torch.zeros(64, dtype=torch.long)
    assert (x0 - ot_pair(x0, noise, zeros)).pow(2).sum() < 0.9 * (x0 - noise).pow(2).sum()
    with pytest.raises(ValueError, match="coupling"):
        DenoisingTask("diffusion", coupling="ot", load_data=False, image_shape=(1, 8, 8), num_classes=10)


def test_ot_batches_keep_standard_normal_noise_and_shorten_paths():
    task = DenoisingTask("flow", model_cfg=SIZES["unet"]["tiny"], eval_samples=20)
    assert task.coupling == "ot"
    indep = DenoisingTask("flow", model_cfg=SIZES["unet"]["tiny"], eval_samples=20, coupling="independent")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noise, cost_ot, cost_indep = [], 0.0, 0.0
    for _ in range(12):
        b, c = task.batch(g1, 64), indep.batch(g2, 64)
        noise.append(b["noise"])
        cost_ot += float((b["x0"] - b["noise"]).pow(2).sum())
        cost_indep += float((c["x0"] - c["noise"]).pow(2).sum())
    z = torch.cat(noise).flatten()          # 49152 draws
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert cost_ot < 0.9 * cost_indep
    # deterministic under the generator
    a, b = task.batch(torch.Generator().manual_seed(5), 64), task.batch(torch.Generator().manual_seed(5), 64)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_digits_split_and_judge():
    from pretrain_kernels.train.judge import Judge, frechet_distance

    d = D.digits()
    assert d.train.shape == (1497, 1, 8, 8) and d.test.shape == (300, 1, 8, 8)
    assert float(d.train.min()) == -1.0 and float(d.train.max()) == 1.0
    j = Judge(d, epochs=10)
    assert j.test_accuracy >= 0.95
    f = j.features(d.test)
    assert abs(frechet_distance(f, f)) < 1e-3 * j.reference_fd
    real = j.conditional(d.test, d.test_labels)
    assert real["class_accuracy"] == pytest.approx(j.test_accuracy)
    noise = j.unconditional(torch.rand(300, 1, 8, 8) * 2 - 1)
    assert noise["fd"] > 5 * j.reference_fd
