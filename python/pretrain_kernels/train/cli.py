"""Command-line entry points.

  pk-train mlm|gpt|mdlm|diffusion|flow [options]   train (the defaults are the 10-minute CPU runs)
  pk-generate --checkpoint DIR --prompt TEXT   text from a GPT or hybrid run (every pk.sample knob), or
                                               from an mdlm run by iterative unmasking (pk.unmask_step):
                                               unconditional, after a prompt, or infilling (--infill)
  pk-generate --checkpoint DIR --infill "a ___ b"  a hybrid run fills the holes left to right after its
                                               prefix-LM prefix
  pk-sample-images --checkpoint DIR --out PNG  an image grid from a diffusion / flow run

pk-train writes a run folder (see train/loop.py); under torchrun it trains with DDP (gloo on
CPU, NCCL on GPU), or with FSDP2 given --parallel fsdp (train/parallel.py), each rank on its
share of the same global batch. It refuses an --out that
already holds a run unless --resume (continue it) or --force (start again: the run's files are
removed first). Options of another task (an image option for a text task, and so on) are
usage errors, as are --device values the build or the machine cannot serve (exit status 2).
A --warmup longer than --steps is clipped to --steps, with a notice.

pk-sample-images writes its PNG with the standard library (zlib), no plotting package needed.

Text runs tokenize bytes by default; `--tokenizer bpe [--vocab-size N]` trains a byte-level
BPE on the training text first (train/data.py, needs the `tokenizers` package) and saves it
in the run folder, where --resume, evaluation and pk-generate find it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import zlib

import torch

TASKS = ("mlm", "gpt", "mdlm", "hybrid", "diffusion", "flow")

# Per-task defaults (the calibrated 2-core CPU runs; see README "Training").
DEFAULTS = {
    "gpt": dict(steps=750, batch_size=16, lr=2.5e-3, warmup=100, seq_len=256, eval_every=250, dtype="bfloat16"),
    "hybrid": dict(steps=750, batch_size=16, lr=2.5e-3, warmup=100, seq_len=256, eval_every=250, dtype="bfloat16"),
    "mlm": dict(steps=750, batch_size=24, lr=2e-3, warmup=100, seq_len=256, eval_every=250, dtype="bfloat16"),
    "mdlm": dict(steps=750, batch_size=16, lr=2e-3, warmup=100, seq_len=256, eval_every=250, dtype="bfloat16"),
    "diffusion": dict(steps=2000, batch_size=64, lr=1e-3, warmup=100, eval_every=500, ema=0.999),
    "flow": dict(steps=2000, batch_size=64, lr=1e-3, warmup=100, eval_every=500, ema=0.999),
}
# Options that belong to some tasks only: dest -> (tasks, how the message names them). Their
# parser default is None, so that an option given to another task is seen; TASK_OPTION_DEFAULTS
# fills in the rest after the check.
TASK_OPTIONS = {
    "seq_len": (("gpt", "mlm", "mdlm", "hybrid"), "the text tasks (gpt, mlm, mdlm, hybrid)"),
    "kv_heads": (("gpt", "hybrid"), "gpt, hybrid"),
    "context_parallel": (("gpt",), "gpt"),
    "mask_prob": (("mlm", "hybrid"), "mlm, hybrid"),
    "mask_schedule": (("mlm", "mdlm"), "mlm and mdlm"),
    "eval_t": (("mdlm",), "mdlm"),
    "mix": (("hybrid",), "hybrid"),
    "mask_targets": (("hybrid",), "hybrid"),
    "subs": (("mdlm",), "mdlm"),
    "weighting": (("mdlm",), "mdlm"),
    "span_len": (("hybrid",), "hybrid"),
    "tokenizer": (("gpt", "mlm", "mdlm", "hybrid"), "the text tasks (gpt, mlm, mdlm, hybrid)"),
    "vocab_size": (("gpt", "mlm", "mdlm", "hybrid"), "the text tasks (gpt, mlm, mdlm, hybrid)"),
    "arch": (("diffusion", "flow"), "the image tasks (diffusion, flow)"),
    "uncond": (("diffusion", "flow"), "the image tasks (diffusion, flow)"),
    "p_uncond": (("diffusion", "flow"), "the image tasks (diffusion, flow)"),
    "prediction": (("diffusion",), "diffusion"),
    "schedule": (("diffusion",), "diffusion"),
    "eval_samples": (("diffusion", "flow"), "the image tasks (diffusion, flow)"),
    "guidance": (("diffusion", "flow"), "the image tasks (diffusion, flow)"),
    "coupling": (("flow",), "flow"),
}
# (a dict value: per task)
TASK_OPTION_DEFAULTS = dict(mask_prob={"mlm": 0.15, "hybrid": 0.25}, mask_schedule="constant", eval_t=4, mix=0.3,
                            span_len=3.0, mask_targets=True, subs=False, weighting="t", arch="unet",
                            uncond=False, p_uncond=0.5, prediction="v_prediction", schedule="squaredcos_cap_v2",
                            eval_samples=500, guidance=1.0)
# The files of a run folder (train/loop.py); --force removes them before a new run.
RUN_FILES = ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt", "metrics.jsonl",
             "tokenizer.json", "tokens.pt")
RUN_DIRS = ("checkpoint",)   # the sharded checkpoint of an FSDP run
TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip",
              "eval_every", "save_every", "log_every", "seed", "dtype", "compile", "device", "ema", "parallel",
              "checkpoint_activations", "context_parallel")


def _positive(kind=int):
    def conv(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole' if kind is int else ''} number, got {s!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
        return v
    return conv


def _nonneg(kind=int):
    def conv(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
        if v < 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
        return v
    return conv


def _vocab_size(s):
    from .data import MIN_BPE_VOCAB

    v = _positive()(s)
    if v < MIN_BPE_VOCAB:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_BPE_VOCAB} (256 bytes + 4 special tokens), got {s!r}")
    return v


def _mask_schedule(s):
    from .tasks import MaskSchedule

    try:
        return MaskSchedule.parse(s).spec()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("mask_schedule: ", ""))


def _span_len(s):
    from .tasks import parse_span_len

    try:
        lo, hi = parse_span_len(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("span_len: ", ""))
    return lo if lo == hi else f"{lo:g}:{hi:g}"


def _device_arg(auto: bool = False):
    """--device: cpu, cuda or cuda:N (and auto for pk-train), checked against the build and the
    machine, so that a device they cannot serve is a usage error rather than a traceback."""
    def conv(s):
        if auto and s == "auto":
            return s
        try:
            dev = torch.device(s)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"expected {'auto, ' if auto else ''}cpu, cuda or cuda:N, got {s!r}")
        if dev.type == "cuda":
            import pretrain_kernels

            if not pretrain_kernels.build_info().get("with_cuda"):
                raise argparse.ArgumentTypeError(f"{s!r}: this build of pretrain_kernels has no CUDA kernels "
                                                 "(built CPU-only); use cpu")
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{s!r}: no CUDA device is available on this machine; use cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} CUDA "
                                                 "device(s)")
        return s
    return conv


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pk-train", description="Train an MLM, GPT, masked diffusion LM (mdlm), "
                                "hybrid (next-token + infilling), diffusion or flow-matching model "
                                "on the package's fused ops (embedded data unless --data is given).")
    p.add_argument("task", choices=TASKS, help="objective")
    p.add_argument("--out", help="run folder (default runs/<task>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--force", action="store_true", help="start a new run in an --out that holds one (its run "
                   "files are removed first)")
    p.add_argument("--data", help="text: a folder of text files; images: a folder of images (sub-folders = "
                   "classes) or an .npy array (default: the stdlib source / sklearn digits)")
    p.add_argument("--size", choices=("tiny", "small"), default="small", help="model preset")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive())
    g.add_argument("--batch-size", type=_positive(), help="global batch per optimizer step")
    g.add_argument("--grad-accum", type=_positive())
    g.add_argument("--lr", type=_positive(float))
    g.add_argument("--min-lr-ratio", type=_nonneg(float))
    g.add_argument("--warmup", type=_nonneg())
    g.add_argument("--weight-decay", type=_nonneg(float))
    g.add_argument("--clip", type=_nonneg(float), help="gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16: autocast")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--device", type=_device_arg(auto=True), help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=_positive(), help="torch CPU threads")
    g.add_argument("--parallel", choices=("ddp", "fsdp"), help="under torchrun: ddp (default; the model "
                   "replicated) or fsdp (FSDP2: parameters, gradients, optimizer state and EMA sharded; "
                   "sharded checkpoints that resume on any number of processes)")
    g.add_argument("--checkpoint-activations", action="store_true", default=None,
                   help="recompute each block in the backward pass instead of keeping its activations")
    g.add_argument("--context-parallel", type=_positive(), help="gpt under torchrun: shard each sequence over "
                   "this many ranks (ring attention; a data x context device mesh; default 1)")
    g.add_argument("--ema", type=_nonneg(float), help="decay of an exponential moving average of the weights, "
                   "used for evaluation and sampling (0: off; default 0.999 for diffusion/flow, 0 for text)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=_nonneg())
    g.add_argument("--save-every", type=_nonneg())
    g.add_argument("--log-every", type=_positive())
    g.add_argument("--no-final-eval", action="store_true", help="skip the sample-quality evaluation at the end")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("text models (mlm, gpt, mdlm, hybrid)")
    g.add_argument("--seq-len", type=_positive())
    g.add_argument("--layers", type=_positive())
    g.add_argument("--dim", type=_positive(), help="model width")
    g.add_argument("--heads", type=_positive())
    g.add_argument("--kv-heads", type=_positive(), help="gpt: key/value heads (GQA)")
    g.add_argument("--mask-prob", type=_positive(float), help="mlm, hybrid: the share of hidden tokens "
                   "(default: mlm 0.15, hybrid 0.25)")
    g.add_argument("--mask-schedule", type=_mask_schedule, help="mlm: the training masking rate, mdlm: the upper "
                   "end of the range of t, over the run: constant (default: mlm --mask-prob, mdlm t in (0, 1]), "
                   "constant:v, linear:a:b or cosine:a:b (a at the first step, b at the last; values in (0, 1])")
    g.add_argument("--eval-t", type=_positive(), help="mdlm: stratified rates t per validation window for the "
                   "bound (default 4)")
    g.add_argument("--mix", type=_nonneg(float), help="hybrid: the fraction of infilling examples, the rest "
                   "next-token prediction (default 0.3)")
    g.add_argument("--mask-targets", action=argparse.BooleanOptionalAction, help="hybrid: each mask token of "
                   "an infilling example's prefix also predicts its hole's first token (default on)")
    g.add_argument("--subs", action=argparse.BooleanOptionalAction, help="mdlm: SUBS, the special tokens' "
                   "logits are -inf (never predicted; default off)")
    g.add_argument("--weighting", choices=("t", "count"), help="mdlm: the training loss's weight of a masked "
                   "token: 1/t (t, the default) or (n + 1) / k for k of the row's n tokens masked (count: its mean "
                   "given k, the same expected loss with less noise)")
    g.add_argument("--span-len", type=_span_len, help="hybrid: mean length of a hidden span in tokens "
                   "(default 3), or a range lo:hi from which each infilling example draws its own mean")
    g.add_argument("--tokenizer", choices=("byte", "bpe"), help="byte (default): bytes are tokens; bpe: a "
                   "byte-level BPE trained on the training text (needs the tokenizers package)")
    g.add_argument("--vocab-size", type=_vocab_size, help="bpe vocabulary size, specials included (default 2048)")
    g = p.add_argument_group("image models (diffusion, flow)")
    g.add_argument("--arch", choices=("unet", "dit"), help="default unet")
    g.add_argument("--uncond", action="store_true", default=None, help="no class conditioning")
    g.add_argument("--p-uncond", type=_nonneg(float), help="label dropout: the share of images trained "
                   "as \"no class\" (the unconditional model, also used for classifier-free guidance; default 0.5)")
    g.add_argument("--prediction", choices=("epsilon", "v_prediction"), help="diffusion (default v_prediction)")
    g.add_argument("--schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
                   help="diffusion (default squaredcos_cap_v2)")
    g.add_argument("--eval-samples", type=_positive(), help="default 500")
    g.add_argument("--guidance", type=_positive(float), help="class-conditional eval guidance (default 1.0)")
    g.add_argument("--coupling", choices=("independent", "ot"), help="flow: how noise is paired with images "
                   "(ot: mini-batch optimal transport, straighter paths for few-step sampling; the default)")
    return p


def _build_task(args, p):
    from pretrain_kernels.models import BertConfig, GPTConfig

    from .tasks import SIZES, DenoisingTask, GPTTask, HybridTask, MDLMTask, MLMTask

    d = DEFAULTS[args.task]
    seq_len = args.seq_len or (64 if args.size == "tiny" else d.get("seq_len", 256))
    if args.task in ("gpt", "mlm", "mdlm", "hybrid"):
        tok = dict(tokenizer=args.tokenizer or "byte", vocab_size=args.vocab_size)
        m = dict(SIZES["gpt" if args.task == "hybrid" else args.task][args.size])
        for key, val in (("n_layer", args.layers), ("n_embd", args.dim), ("n_head", args.heads)):
            if val is not None:
                m[key] = val
        if args.task in ("gpt", "hybrid"):
            m["n_kv_head"] = args.kv_heads or (m["n_head"] if args.heads else m["n_kv_head"])
            m["block_size"] = max(m["block_size"], seq_len)
            if args.task == "hybrid":
                return HybridTask(GPTConfig(**m), seq_len=seq_len, mix=args.mix, mask_prob=args.mask_prob,
                                  span_len=args.span_len, mask_targets=args.mask_targets, data=args.data, **tok)
            return GPTTask(GPTConfig(**m), seq_len=seq_len, data=args.data, **tok)
        m["max_len"] = max(m["max_len"], seq_len)
        if args.task == "mdlm":
            return MDLMTask(BertConfig(**m), seq_len=seq_len, data=args.data, eval_t=args.eval_t,
                            mask_schedule=args.mask_schedule, subs=args.subs, weighting=args.weighting, **tok)
        return MLMTask(BertConfig(**m), seq_len=seq_len, min_len=max(1, seq_len // 4), mask_prob=args.mask_prob,
                       data=args.data, mask_schedule=args.mask_schedule, **tok)
    m = dict(SIZES[args.arch][args.size])
    if args.dim is not None:
        m["base_channels" if args.arch == "unet" else "dim"] = args.dim
    if args.layers is not None:
        m["num_res_blocks" if args.arch == "unet" else "depth"] = args.layers
    if args.heads is not None and args.arch == "dit":
        m["heads"] = args.heads
    return DenoisingTask(args.task, arch=args.arch, model_cfg=m, class_cond=not args.uncond, p_uncond=args.p_uncond,
                         prediction=args.prediction, schedule=args.schedule, data=args.data,
                         eval_samples=args.eval_samples, guidance=args.guidance,
                         coupling=args.coupling)


def _describe_run(out: str) -> str:
    """'a finished flow run, step 4 of 4', from its config.json (what is readable of it)."""
    import json

    try:
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        step, steps = int(cfg.get("step", 0)), int(cfg["train"]["steps"])
        kind = cfg["task"]["kind"]
        return f"{'a finished' if step >= steps else 'an unfinished'} {kind} run, step {step} of {steps}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a config.json"


def _describe_parallel(cfg) -> str:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1:
        return ""
    cp = f", context parallel {cfg.context_parallel}" if cfg.context_parallel > 1 else ""
    return f", {world} processes ({cfg.parallel}{cp})"


def _init_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def train_main(argv=None) -> dict:
    from .loop import TrainConfig, Trainer, build_task_from_dir

    p = train_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for dest, (tasks, who) in TASK_OPTIONS.items():
        if getattr(args, dest) is not None and args.task not in tasks:
            p.error(f"--{dest.replace('_', '-')}: only for {who}, not {args.task}")
    for dest, value in TASK_OPTION_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value.get(args.task) if isinstance(value, dict) else value)
    if args.resume and args.force:
        p.error("--force: starts a new run; it cannot go with --resume")
    if args.vocab_size and args.tokenizer != "bpe" and not args.resume:
        p.error("--vocab-size: only with --tokenizer bpe (the byte tokenizer has 260 ids)")
    out = args.out or os.path.join("runs", args.task)
    if not args.resume and os.path.isfile(os.path.join(out, "config.json")):
        if not args.force:
            p.error(f"--out: {out!r} already holds a run ({_describe_run(out)}); pass --resume to continue it or "
                    "--force to start a new run there")
        if int(os.environ.get("RANK", "0")) == 0:
            for f in RUN_FILES:
                if os.path.isfile(os.path.join(out, f)):
                    os.remove(os.path.join(out, f))
            for d in RUN_DIRS:
                if os.path.isdir(os.path.join(out, d)):
                    shutil.rmtree(os.path.join(out, d))
    saved = {}
    try:
        if args.resume:
            if not os.path.isdir(out):
                p.error(f"--resume: run folder {out!r} does not exist")
            task, saved = build_task_from_dir(out)
            if task.name != args.task:
                p.error(f"--resume: {out!r} holds a {task.name} run, not {args.task}")
            if args.tokenizer or args.vocab_size:
                tc = task.tokenizer_config()
                asked = (args.tokenizer or tc["kind"], args.vocab_size or tc["vocab_size"])
                if asked != (tc["kind"], tc["vocab_size"]):
                    p.error(f"--resume: {out!r} was trained with the {tc['kind']} tokenizer of {tc['vocab_size']} ids; "
                            f"a resumed run keeps it")
        else:
            torch.manual_seed(args.seed if args.seed is not None else 0)  # model initialisation
            task = _build_task(args, p)
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        p.error(str(e))
    tc = dict(DEFAULTS[args.task])
    tc.pop("seq_len", None)
    if args.size == "tiny":
        tc.update(steps=20, batch_size=8, warmup=2, eval_every=0)
    tc.update(saved)
    for key in TRAIN_KEYS:
        val = getattr(args, key, None)
        if val is not None:
            tc[key] = val
    tc["progress"] = not args.no_progress
    tc["final_eval"] = not args.no_final_eval
    tc = {k: v for k, v in tc.items() if k in TrainConfig.__dataclass_fields__}
    if tc.get("warmup", 0) > tc.get("steps", TrainConfig.steps):
        print(f"pk-train: warmup of {tc['warmup']} steps is longer than the run ({tc['steps']} steps); "
              f"clipped to {tc['steps']}", file=sys.stderr, flush=True)
        tc["warmup"] = tc["steps"]
    cfg = TrainConfig(**tc)
    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        n = sum(p_.numel() for p_ in task.model.parameters())
        print(f"pk-train {args.task}: {type(task.model).__name__} {n / 1e6:.2f}M parameters, {cfg.steps} steps of "
              f"{cfg.batch_size}, lr {cfg.lr}, {cfg.dtype}, {torch.get_num_threads()} threads{_describe_parallel(cfg)} "
              f"-> {out}", flush=True)
    try:
        trainer = Trainer(task, cfg, out)
    except ValueError as e:
        p.error(str(e))
    history = trainer.train(resume=args.resume)
    evals = [h for h in history if "eval" in h]
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return evals[-1]["eval"] if evals else {}


# ---- pk-generate ---------------------------------------------------------------------------------


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pk-generate", description="Text from a GPT or hybrid run folder (byte or BPE "
                                "tokens, as trained), sampled by pk.sample with a KV cache; or from an mdlm run "
                                "folder, by iterative unmasking with pk.unmask_step.")
    p.add_argument("--checkpoint", required=True, help="a pk-train gpt, hybrid or mdlm run folder")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; gpt default: 'def '; "
                   "mdlm: the prefix kept before --max-new-tokens masked tokens, none: unconditional)")
    p.add_argument("--max-new-tokens", type=_positive(), default=200)
    p.add_argument("--temperature", type=_nonneg(float), default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=_nonneg(), default=0)
    p.add_argument("--top-p", type=_positive(float), default=1.0)
    p.add_argument("--min-p", type=_nonneg(float), default=0.0)
    p.add_argument("--repetition-penalty", type=_positive(float), default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="row i uses seed + i")
    p.add_argument("--stop", default=None, help="stop a row at any of these characters (e.g. $'\\n')")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")
    p.add_argument("--device", type=_device_arg(), default="cpu")
    p.add_argument("--infill", action="append", help="text whose ___ are filled (mdlm and hybrid runs): mdlm: each "
                   "___ becomes --infill-length masked tokens, the rest is kept; hybrid: the holes are decoded in "
                   "order after the text (its prefix), each until eos or --max-new-tokens; \\n, \\t and \\\\ "
                   "read as newline, tab, backslash (repeat for a batch)")
    g = p.add_argument_group("mdlm runs (iterative unmasking)")
    g.add_argument("--infill-length", type=_positive(), help="masked tokens per ___ (default 16)")
    g.add_argument("--steps", type=_positive(), help="unmasking steps; each reveals a share of a row's masked "
                   "tokens, linear in t (default: the largest masked count, one token per step)")
    g.add_argument("--strategy", choices=("confidence", "random"), help="which drawn tokens a step reveals: "
                   "the most probable (default) or a random subset")
    g.add_argument("--num-samples", type=_positive(), help="samples per prompt / infill / unconditional row "
                   "(default 1; sample j of row i uses seed + i * num_samples + j)")
    return p


MDLM_GENERATE_OPTIONS = ("infill", "infill_length", "steps", "strategy", "num_samples")
GPT_GENERATE_OPTIONS = ("stop", "no_cache")


def read_escapes(text: str) -> str:
    """\\n, \\t and \\\\ in text typed on a command line as newline, tab and backslash."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _generate_mdlm(p, args, task) -> list[str]:
    from .tasks import mdlm_generate, mdlm_rows

    for dest in GPT_GENERATE_OPTIONS:
        if getattr(args, dest):
            p.error(f"--{dest.replace('_', '-')}: only for gpt runs; {args.checkpoint!r} holds an mdlm run")
    tok = task.tok
    if args.prompt and any(len(s) == 0 for s in args.prompt):
        p.error("--prompt: prompts must not be empty (no --prompt: unconditional samples)")
    try:
        rows, kinds = mdlm_rows(tok, prompts=args.prompt, infills=[read_escapes(s) for s in args.infill or []],
                                max_new_tokens=args.max_new_tokens, infill_length=args.infill_length or 16,
                                num_samples=args.num_samples or 1)
        task.model.eval()
        outs = mdlm_generate(task, rows, steps=args.steps, strategy=args.strategy or "confidence", seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                             presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    except ValueError as e:
        p.error(str(e))
    texts = []
    for o in outs:
        text = tok.decode_bytes(o).decode("utf-8", errors="replace")
        texts.append(text)
        print(text)
        print("-" * 40)
    return texts


def generate_main(argv=None) -> list[str]:
    from .loop import build_task_from_dir

    p = generate_parser()
    args = p.parse_args(argv)
    if args.top_p > 1.0:
        p.error(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    try:
        task, _ = build_task_from_dir(args.checkpoint, load_data=False, device=args.device)
    except (FileNotFoundError, ValueError, ImportError) as e:
        p.error(str(e))
    if task.name == "mdlm":
        return _generate_mdlm(p, args, task)
    if task.name not in ("gpt", "hybrid"):
        p.error(f"--checkpoint: {args.checkpoint!r} holds a {task.name} run; pk-generate needs a gpt, hybrid or "
                "mdlm run")
    if args.infill and task.name != "hybrid":
        p.error(f"--infill: only for mdlm runs and hybrid runs (trained to infill); {args.checkpoint!r} holds a "
                f"{task.name} run")
    for dest in MDLM_GENERATE_OPTIONS:
        if dest != "infill" and getattr(args, dest) is not None:
            p.error(f"--{dest.replace('_', '-')}: only for mdlm runs; {args.checkpoint!r} holds a {task.name} run")
    if args.infill:
        if args.prompt:
            p.error("--infill: give either --prompt (left to right) or --infill, not both")
        return _infill_main(args, p, task)
    tok = task.tok
    prompts = args.prompt or ["def "]
    if any(len(s) == 0 for s in prompts):
        p.error("--prompt: prompts must not be empty")
    stop_bytes = args.stop.encode("utf-8") if args.stop else b""
    if task.bpe:   # a BPE token may hold a stop character among others: stop on it, cut the text after
        stop = [i for i in range(tok.vocab_size) if any(c in tok.token_bytes(i) for c in stop_bytes)]
    else:
        stop = tok.encode(args.stop) if args.stop else []
    model = task.model.eval()
    try:
        outs = model.generate([tok.encode(s) for s in prompts], args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed, stop_tokens=stop,
                              use_cache=not args.no_cache, keep_stop_token=task.bpe,
                              suppress_tokens=tok.all_special_ids if task.name == "hybrid" else ())
    except ValueError as e:
        p.error(str(e))
    texts = []
    for s, o in zip(prompts, outs):
        new = tok.decode_bytes(o)
        cut = min((k for k in (new.find(bytes([c])) for c in stop_bytes) if k >= 0), default=len(new))
        text = s + new[:cut].decode("utf-8", errors="replace")
        texts.append(text)
        print(text)
        print("-" * 40)
    return texts


def _infill_main(args, p, task) -> list[str]:
    """pk-generate --infill on a hybrid run: the text with each ___ hole replaced by the mask token,
    then bos, is the prefix (attended both ways); the holes are decoded in order, each ending at
    eos, every one after the prefix and the holes before it, at the task's positions (as it trains)."""
    from .tasks import infill_prefix

    tok, model = task.tok, task.model.eval()
    texts = []
    for row, text in enumerate(read_escapes(t) for t in args.infill):
        pieces = text.split("___")
        if len(pieces) < 2:
            p.error(f"--infill: expected at least one ___ hole in {text!r}")
        prefix = infill_prefix(tok, [tok.encode(piece) for piece in pieces])
        stream, spans = list(prefix), []
        for hole in range(len(pieces) - 1):
            room = model.cfg.block_size - len(stream)
            if room < 1:
                p.error(f"--infill: {text!r} with its filled holes exceeds the model's block_size "
                        f"{model.cfg.block_size}")
            n_new = min(args.max_new_tokens, room)
            pos = task.decode_positions(stream, len(prefix), n_new)
            try:
                out = model.generate([stream], n_new, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                     repetition_penalty=args.repetition_penalty,
                                     presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                     seed=args.seed + 1000 * row + hole, stop_tokens=[tok.eos_token_id],
                                     use_cache=not args.no_cache, prefix_lens=[len(prefix)],
                                     positions=None if pos is None else [pos],
                                     suppress_tokens=[i for i in tok.all_special_ids if i != tok.eos_token_id])[0]
            except ValueError as e:
                p.error(str(e))
            spans.append(tok.decode_bytes(out).decode("utf-8", errors="replace"))
            stream += out + [tok.eos_token_id]
        filled = pieces[0] + "".join(s + piece for s, piece in zip(spans, pieces[1:]))
        texts.append(filled)
        print(filled)
        print("-" * 40)
    return texts


# ---- pk-sample-images ----------------------------------------------------------------------------


def sample_images_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pk-sample-images", description="A PNG grid of samples from a diffusion or "
                                "flow-matching run folder, through pk.schedulers.")
    p.add_argument("--checkpoint", required=True, help="a pk-train diffusion/flow run folder")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm", "flow"),
                   help="default: flow for flow runs, ddim for diffusion runs")
    p.add_argument("--steps", type=_positive(), help="default: 4 (flow), 50 (ddim), 1000 (ddpm), 10 (dpm)")
    p.add_argument("--n", type=_positive(), default=100, help="number of images")
    p.add_argument("--nrow", type=_positive(), default=10, help="images per row")
    p.add_argument("--uncond", action="store_true", help="unconditional samples from a class-conditional model")
    p.add_argument("--guidance", type=_positive(float), default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive(), default=4, help="pixel upscaling in the PNG")
    p.add_argument("--weights", choices=("raw", "ema"), help="ema: the run's moving average of the weights (the "
                   "default when the run kept one), raw: the training weights")
    p.add_argument("--device", type=_device_arg(), default="cpu")
    return p


def png_bytes(rgb) -> bytes:
    """An 8-bit RGB PNG of a uint8 array [H, W, 3], written with zlib (no imaging package)."""
    import numpy as np

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected a [H, W, 3] array, got shape {rgb.shape}")
    H, W, _ = rgb.shape
    raw = np.concatenate([np.zeros((H, 1), np.uint8), rgb.reshape(H, W * 3)], axis=1)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)    # 8 bits, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + chunk(b"IEND", b""))


def save_grid(x: torch.Tensor, path: str, nrow: int = 10, scale: int = 4) -> None:
    """Images [N, C, H, W] in [-1, 1] -> one PNG (nearest-neighbour upscaled, 1 px gaps)."""
    import numpy as np

    x = ((x.clamp(-1, 1) + 1) / 2).float()
    N, C, H, W = x.shape
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    H, W = H * scale, W * scale
    rows = (N + nrow - 1) // nrow
    grid = np.ones((rows * (H + 2) + 2, nrow * (W + 2) + 2, 3), dtype=np.float32)
    for i in range(N):
        r, c = divmod(i, nrow)
        img = x[i].permute(1, 2, 0).numpy()
        img = np.repeat(img, 3, axis=2) if C == 1 else img[..., :3]
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = png_bytes(np.rint(grid * 255).astype(np.uint8))
    with open(path, "wb") as f:
        f.write(data)


def sample_images_main(argv=None) -> str:
    from .loop import build_task_from_dir
    from .tasks import sample_images

    p = sample_images_parser()
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        p.error(f"--out: expected a .png path, got {args.out!r}")
    if args.weights == "ema" and os.path.isfile(os.path.join(args.checkpoint, "model.safetensors")) \
            and not os.path.isfile(os.path.join(args.checkpoint, "ema.safetensors")):
        p.error(f"--weights ema: {args.checkpoint!r} kept no moving average (trained with --ema 0); "
                "use --weights raw")
    try:
        task, _ = build_task_from_dir(args.checkpoint, load_data=False, device=args.device,
                                      use_ema=args.weights != "raw")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if task.name not in ("diffusion", "flow"):
        p.error(f"--checkpoint: {args.checkpoint!r} holds a {task.name} run; pk-sample-images needs diffusion/flow")
    weights = "raw" if args.weights == "raw" or not os.path.isfile(os.path.join(args.checkpoint,
                                                                               "ema.safetensors")) else "ema"
    sampler = args.sampler or ("flow" if task.name == "flow" else "ddim")
    steps = args.steps or {"flow": 4, "ddim": 50, "ddpm": 1000, "dpm": 10}[sampler]
    labels = None
    if task.class_cond and not args.uncond:
        labels = (torch.arange(args.n) // max(1, args.n // task.num_classes)).clamp_max(task.num_classes - 1)
    try:
        x = sample_images(task, task.model.eval(), args.n, sampler=sampler, steps=steps, labels=labels,
                          guidance=args.guidance, seed=args.seed, device=args.device)
    except ValueError as e:
        p.error(str(e))
    save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {args.n} samples ({sampler}, {steps} steps, {weights} weights"
          f"{', class rows' if labels is not None else ''}) to {args.out}")
    return args.out


# console scripts (their return value is the exit status)
def pk_train() -> int:
    train_main()
    return 0


def pk_generate() -> int:
    generate_main()
    return 0


def pk_sample_images() -> int:
    sample_images_main()
    return 0


if __name__ == "__main__":
    sys.exit(pk_train())
