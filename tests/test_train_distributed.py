"""The trainer on several processes (gloo, CPU): FSDP2 equals one process with the same global
batch, sharded checkpoints resume on a different number of processes, activation
checkpointing changes nothing but memory, and the CLI flags. Every multi-process case runs
under a deadline (process-group timeout and a join timeout), so a hang fails instead of
blocking the suite."""
import datetime
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pretrain_kernels.models import BertConfig, GPTConfig
from pretrain_kernels.train import data as D
from pretrain_kernels.train import parallel as P
from pretrain_kernels.train.loop import TrainConfig, Trainer
from pretrain_kernels.train.tasks import SIZES, DenoisingTask, GPTTask, MLMTask
from processes import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

DEADLINE_S = 300   # generous: the machine may be shared; the group timeout (60 s) catches a hang sooner


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    for i, f in enumerate(D.stdlib_files(max_bytes=200_000)):
        with open(f, "rb") as src, open(d / f"f{i:03d}.py", "wb") as dst:
            dst.write(src.read())
    return str(d)


def gpt_task(text_dir, seed=0, **model):
    torch.manual_seed(seed)
    cfg = dict(SIZES["gpt"]["tiny"], **model)
    return GPTTask(GPTConfig(**cfg), seq_len=32, data=text_dir, eval_windows=16)


def cfg(**kw):
    c = dict(steps=6, batch_size=8, warmup=2, lr=3e-3, progress=False, log_every=1, final_eval=False)
    c.update(kw)
    return TrainConfig(**c)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def evals(history):
    return [h["eval"] for h in history if "eval" in h]


def run_workers(fn, world, *args):
    """fn(rank, world, store, *args) in `world` spawned processes, failing on a hang."""
    run_ranks(fn, world, (world,) + args, deadline_s=DEADLINE_S)


def _init(rank, world, store):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))


def _fsdp_worker(rank, world, store, text_dir, root):
    """The 2-process side of every FSDP comparison, in one process group (start-up is the
    expensive part): (1) a run with accumulation, clipping, an EMA and evaluations; (2) the
    first 3 steps of a run that one process resumes; (3) the resumption of a run that one
    process started; (4) torch.compile over the sharded, checkpointed model."""
    _init(rank, world, store)
    try:
        out = {}
        tr = Trainer(gpt_task(text_dir), cfg(parallel="fsdp", **EQUAL_KW), os.path.join(root, "fsdp"))
        assert tr.fsdp
        h = tr.train()
        # parameters, AdamW moments and EMA are DTensors, each rank holding a dim-0 shard
        sharded = list(tr.model.parameters()) + tr.ema.avg + [st["exp_avg"] for st in tr.optimizer.state.values()]
        out["equal"] = {"losses": losses(h), "evals": evals(h),
                        "sharded": [(P.is_dtensor(t), tuple(t.shape), tuple(P.local_shape(t))) for t in sharded]}
        out["2to1"] = losses(Trainer(gpt_task(text_dir), cfg(steps=3, **RESUME_KW), os.path.join(root, "a")).train())
        tr = Trainer(gpt_task(text_dir, seed=123), cfg(**RESUME_KW), os.path.join(root, "b"))
        out["1to2"] = losses(tr.train(resume=True))
        tr = Trainer(gpt_task(text_dir, seed=123), cfg(**RESUME_KW), os.path.join(root, "c"))
        out["unsharded_to_fsdp"] = losses(tr.train(resume=True))
        for kind in OTHER_TASKS:
            out[kind] = losses(Trainer(other_task(kind, text_dir), cfg(steps=2, parallel="fsdp", ema=0.9)).train())
        out["bf16"] = losses(Trainer(gpt_task(text_dir), cfg(steps=3, parallel="fsdp", dtype="bfloat16")).train())
        # aot_eager: dynamo and AOT autograd over FSDP's hooks, the pk ops' fake kernels and the
        # checkpointed blocks, without inductor's C++ build (minutes on 2 shared cores)
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
        for compiled in (False, True):
            tr = Trainer(gpt_task(text_dir), cfg(steps=2, parallel="fsdp", checkpoint_activations=True,
                                                 compile=compiled))
            out[f"compile={compiled}"] = losses(tr.train())
        if rank == 0:
            torch.save(out, os.path.join(root, "result.pt"))
    finally:
        torch.distributed.destroy_process_group()


OTHER_TASKS = ("mlm", "diffusion-unet", "flow-dit")


def other_task(kind, text_dir):
    torch.manual_seed(0)
    if kind == "mlm":
        return MLMTask(BertConfig(**SIZES["mlm"]["tiny"]), seq_len=32, min_len=8, data=text_dir, eval_windows=16)
    objective, arch = kind.split("-")
    return DenoisingTask(objective, arch=arch, model_cfg=SIZES[arch]["tiny"], eval_samples=20,
                         coupling="independent")


EQUAL_KW = dict(steps=4, grad_accum=2, ema=0.9, eval_every=2)
RESUME_KW = dict(ema=0.9, parallel="fsdp")


@pytest.fixture(scope="module")
def fsdp_runs(text_dir, tmp_path_factory):
    """Runs folder and the 2-process results; one process starts runs "b" (sharded) and "c"
    (unsharded) before them."""
    root = tmp_path_factory.mktemp("fsdp")
    Trainer(gpt_task(text_dir), cfg(steps=3, **RESUME_KW), str(root / "b")).train()
    Trainer(gpt_task(text_dir), cfg(steps=3, ema=0.9), str(root / "c")).train()    # unsharded (ddp)
    assert not os.path.isdir(root / "c" / "checkpoint")
    assert os.path.isfile(root / "b" / "checkpoint" / ".metadata")
    run_workers(_fsdp_worker, 2, str(root / "store"), text_dir, str(root))
    return root, torch.load(root / "result.pt")


def load(path):
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_weights(a, b, atol=2e-5, rtol=1e-4):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# ---- FSDP2 == one process --------------------------------------------------------------------


def test_fsdp_two_processes_equal_one(text_dir, fsdp_runs, tmp_path):
    """2 processes sharding the model (with gradient accumulation, clipping and an EMA) give the
    losses, evaluation metrics, weights and averaged weights of 1 process on the whole batch."""
    root, res = fsdp_runs
    fsdp = res["equal"]
    h = Trainer(gpt_task(text_dir), cfg(**EQUAL_KW), str(tmp_path / "single")).train()
    assert len(fsdp["losses"]) == 4
    assert all(is_d for is_d, _, _ in fsdp["sharded"])
    assert all(local[0] == (full[0] + 1) // 2 and local[1:] == full[1:] for _, full, local in fsdp["sharded"])
    assert fsdp["losses"] == pytest.approx(losses(h), rel=1e-5)
    assert len(fsdp["evals"]) == 2
    for a, b in zip(fsdp["evals"], evals(h)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    # the sharded run exports the full weights and the full average, as a single process does
    for f in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(load(str(root / "fsdp" / f)), load(str(tmp_path / "single" / f)))
    assert os.path.isfile(root / "fsdp" / "checkpoint" / ".metadata")
    # and pk-generate's loader reads it (the tied embedding is one tensor in the file)
    from pretrain_kernels.train.loop import build_task_from_dir

    task, _ = build_task_from_dir(str(root / "fsdp"), load_data=False)
    assert task.model.lm_head.weight is task.model.wte.weight
    assert len({"lm_head.weight", "wte.weight"} & set(load(str(root / "fsdp" / "model.safetensors")))) == 1


def test_fsdp_resume_on_another_world_size(text_dir, fsdp_runs, tmp_path):
    """A sharded checkpoint of 2 processes resumes on 1, one of 1 process resumes on 2, and an
    unsharded (single-process, --parallel ddp) one on 2 FSDP processes; all continue to the
    losses, weights and EMA of an uninterrupted single-process run."""
    root, res = fsdp_runs
    full = Trainer(gpt_task(text_dir), cfg(ema=0.9), str(tmp_path / "full"))
    full_losses = losses(full.train())
    assert res["2to1"] == pytest.approx(full_losses[:3], rel=1e-5)
    resumed = Trainer(gpt_task(text_dir, seed=123), cfg(**RESUME_KW), str(root / "a"))
    assert losses(resumed.train(resume=True)) == pytest.approx(full_losses[3:], rel=1e-5)
    assert res["1to2"] == pytest.approx(full_losses[3:], rel=1e-5)
    # an unsharded single-process checkpoint continued by 2 FSDP processes
    assert res["unsharded_to_fsdp"] == pytest.approx(full_losses[3:], rel=1e-5)
    for run in ("a", "b", "c"):
        for f in ("model.safetensors", "ema.safetensors"):
            assert_same_weights(load(str(root / run / f)), load(str(tmp_path / "full" / f)))
        with open(root / run / "config.json") as f:
            assert json.load(f)["step"] == 6


@pytest.mark.parametrize("kind", OTHER_TASKS)
def test_fsdp_other_models_equal_one(kind, text_dir, fsdp_runs):
    """The BERT (packed varlen batches, decoder tied to the embedding), the UNet (residual and
    attention blocks sharded one by one) and the DiT under FSDP with an EMA: the losses of one
    process."""
    _, res = fsdp_runs
    single = losses(Trainer(other_task(kind, text_dir), cfg(steps=2, ema=0.9)).train())
    assert len(res[kind]) == 2
    assert res[kind] == pytest.approx(single, rel=1e-5)


def test_sharded_run_continued_without_fsdp(text_dir, tmp_path):
    """A sharded checkpoint resumed with --parallel ddp continues exactly and is then saved
    unsharded (its checkpoint/ folder removed, so the run folder holds one checkpoint)."""
    full = losses(Trainer(gpt_task(text_dir), cfg(ema=0.9), str(tmp_path / "full")).train())
    Trainer(gpt_task(text_dir), cfg(steps=3, **RESUME_KW), str(tmp_path / "run")).train()
    assert os.path.isdir(tmp_path / "run" / "checkpoint")
    rest = losses(Trainer(gpt_task(text_dir, seed=123), cfg(ema=0.9), str(tmp_path / "run")).train(resume=True))
    assert rest == pytest.approx(full[3:], rel=1e-5)
    assert not os.path.exists(tmp_path / "run" / "checkpoint")
    assert "optimizer" in torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)


def test_fsdp_bfloat16_parameters(text_dir, fsdp_runs):
    """--dtype bfloat16 under FSDP (bf16 parameters in the forward and backward, float32 master
    weights and reductions) follows the single-process autocast run to bf16 rounding."""
    _, res = fsdp_runs
    single = losses(Trainer(gpt_task(text_dir), cfg(steps=3, dtype="bfloat16")).train())
    assert len(res["bf16"]) == 3 and all(map(math.isfinite, res["bf16"]))
    assert res["bf16"] == pytest.approx(single, rel=2e-2)


def test_fsdp_compile_and_checkpointing(fsdp_runs):
    """torch.compile over the sharded model with activation checkpointing trains like eager."""
    _, res = fsdp_runs
    assert len(res["compile=True"]) == 2
    assert res["compile=True"] == pytest.approx(res["compile=False"], rel=1e-4)


# ---- activation checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt", "unet", "dit"])
def test_checkpoint_activations_changes_nothing(kind, text_dir):
    def task():
        if kind == "gpt":
            return gpt_task(text_dir, n_kv_head=1)
        torch.manual_seed(0)
        return DenoisingTask("flow", arch=kind, model_cfg=SIZES[kind]["tiny"], eval_samples=20,
                             coupling="independent")

    a, b = task(), task()
    la = losses(Trainer(a, cfg(steps=3)).train())
    lb = losses(Trainer(b, cfg(steps=3, checkpoint_activations=True)).train())
    assert lb == pytest.approx(la, rel=1e-6)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert set(a.model.state_dict()) == set(b.model.state_dict())   # names unchanged


# ---- errors ----------------------------------------------------------------------------------


def test_parallel_errors(text_dir, tmp_path):
    with pytest.raises(ValueError, match="parallel"):
        Trainer(gpt_task(text_dir), cfg(parallel="zero"))
    with pytest.raises(ValueError, match="context_parallel: expected a divisor of the number of processes"):
        Trainer(gpt_task(text_dir), cfg(context_parallel=2))
    from pretrain_kernels.train.cli import train_main

    with pytest.raises(SystemExit):
        train_main(["gpt", "--parallel", "zero", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        train_main(["mlm", "--context-parallel", "2", "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


# ---- the command line under torchrun -----------------------------------------------------------


def test_cli_force_removes_the_sharded_checkpoint(text_dir, tmp_path):
    from pretrain_kernels.train.cli import train_main

    args = ["gpt", "--size", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--data", text_dir,
            "--no-progress", "--threads", "1", "--no-final-eval", "--out", str(tmp_path / "run")]
    train_main(args + ["--parallel", "fsdp"])
    assert os.path.isfile(tmp_path / "run" / "checkpoint" / ".metadata")
    train_main(args + ["--force"])
    assert not os.path.exists(tmp_path / "run" / "checkpoint")


def _jsonl_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_cli_fsdp_context_parallel_four_processes(text_dir, tmp_path):
    """pk-train gpt --parallel fsdp --context-parallel 2 --checkpoint-activations under torchrun
    with 4 processes (a 2 x 2 data x context mesh: each sequence split over 2 ranks, ring
    attention) gives the losses and metrics of one process; the run then resumes on one
    process from its sharded checkpoint, and pk-generate reads it."""
    from pretrain_kernels.train.cli import generate_main, train_main

    args = ["gpt", "--size", "tiny", "--batch-size", "4", "--seq-len", "32", "--data", text_dir, "--no-progress",
            "--threads", "1", "--no-final-eval", "--dtype", "float32", "--log-every", "1", "--steps", "3"]
    out = str(tmp_path / "cp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "pretrain_kernels.train.cli", *args, "--out", out, "--parallel", "fsdp", "--context-parallel", "2",
           "--checkpoint-activations"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train_main(args + ["--out", str(tmp_path / "one")])
    got, want = _jsonl_losses(out), _jsonl_losses(str(tmp_path / "one"))
    assert sorted(got) == [1, 2, 3]
    assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)], rel=1e-5)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [r["eval"] for r in map(json.loads, f) if "eval" in r][-1]
    assert metrics == pytest.approx(single, rel=1e-5)
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)["train"]
    assert (saved["parallel"], saved["context_parallel"], saved["checkpoint_activations"]) == ("fsdp", 2, True)
    assert os.path.isfile(os.path.join(out, "checkpoint", ".metadata"))
    # 4 processes -> 1
    resumed = [a if a != "3" else "4" for a in args]
    train_main(resumed + ["--out", out, "--resume", "--context-parallel", "1"])
    assert sorted(_jsonl_losses(out)) == [1, 2, 3, 4]
    texts = generate_main(["--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "4"])
    assert len(texts) == 1 and texts[0].startswith("def ")
