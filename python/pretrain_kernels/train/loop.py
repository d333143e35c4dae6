"""One training loop for every objective (MLM, GPT, diffusion, flow matching).

A task (train/tasks.py) owns the model, the data and the objective; the loop owns everything
else: AdamW with warmup + cosine decay, gradient accumulation and clipping, bf16 autocast,
optional torch.compile, evaluation every N steps, checkpoints, JSONL metrics, a progress bar,
and DDP.

Determinism. Every step draws one *global* batch from the loop's data generator (a seeded
torch.Generator whose state is checkpointed), identically on every rank, and cuts it into
world_size * grad_accum micro-batches; rank r trains on its own grad_accum of them. Each
micro-batch's summed loss is divided by the item count of the whole global batch (tokens,
masked tokens or images, known before the forward pass) and multiplied by world_size, so
after DDP averages the gradients every run optimises exactly the mean loss of the global
batch: 1 process, 2 processes or 4 accumulation steps give the same updates up to float
summation order. Resuming restores the weights, the optimizer, the step and the generator,
so a resumed run continues to the same losses as an uninterrupted one.

Layout of a run folder (out_dir):
  config.json          task, model and training settings (enough to rebuild the model)
  model.safetensors    weights
  ema.safetensors      the exponential moving average of the weights (with ema > 0): what
                       evaluation, pk-generate and pk-sample-images use
  trainer_state.pt     optimizer state, step, data-generator and torch RNG states
  metrics.jsonl        one line per logged step and per evaluation
  tokenizer.json       text tasks with --tokenizer bpe: the trained tokenizer (the run's
                       config records its kind, vocab size and fingerprint)
  tokens.pt            with bpe: the encoded train/validation text (a cache; safe to delete)

Files a task needs besides its config (the bpe tokenizer) are written by its save_files(out_dir)
before config.json, and build_task_from_dir passes the folder to build_task to read them.

FSDP2 (torch.distributed.fsdp.fully_shard) would slot in where DDP wraps the model: the loss
normalisation and the data layout above do not depend on how parameters are sharded, and the
checkpoint would then gather a full state dict on rank 0 before writing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32          # global batch per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0             # 0: no clipping
    eval_every: int = 0           # 0: evaluate only at the end
    save_every: int = 0           # 0: checkpoint only at the end
    log_every: int = 10
    seed: int = 0
    dtype: str = "float32"        # or "bfloat16" (autocast)
    compile: bool = False
    device: str = "auto"
    progress: bool = True
    final_eval: bool = True       # run the task's full (slow) evaluation at the end
    ema: float = 0.0              # > 0: keep an exponential moving average of the weights with this
                                  # decay (warmed up as min(ema, (1 + step) / (10 + step))) and evaluate it

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            return torch.device("cpu")
        if torch.cuda.is_available():
            rank_local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", rank_local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.device)


# ---- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(out_dir: str, model: torch.nn.Module, task_config: dict, train_cfg: TrainConfig,
                    optimizer=None, step: int = 0, gen: torch.Generator | None = None,
                    ema: "EMA | None" = None) -> None:
    """Write config.json, model.safetensors, ema.safetensors (with an EMA) and (with an
    optimizer) trainer_state.pt."""
    from safetensors.torch import save_model

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_model(model, tmp)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    if ema is not None:
        with ema.swapped_in(model):
            save_model(model, tmp)
        os.replace(tmp, os.path.join(out_dir, "ema.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"task": task_config, "train": train_cfg.to_dict(), "step": step}, f, indent=1)
    if optimizer is not None:
        state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "gen": gen.get_state() if gen is not None else None}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = os.path.join(out_dir, "trainer_state.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(out_dir, "trainer_state.pt"))


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint: folder {ckpt_dir!r} does not exist")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(ckpt_dir, "model.safetensors")):
        raise FileNotFoundError(f"checkpoint: {ckpt_dir!r} has no config.json / model.safetensors "
                                f"(not a pk-train run folder)")
    with open(path) as f:
        return json.load(f)


def load_weights(model: torch.nn.Module, ckpt_dir: str, device="cpu", file: str = "model.safetensors") -> None:
    from safetensors.torch import load_model

    load_model(model, os.path.join(ckpt_dir, file), device=str(device))


def build_task_from_dir(ckpt_dir: str, *, load_data: bool = True, device="cpu", use_ema: bool = True):
    """(task with the checkpoint's weights, saved training settings) from a run folder; the
    EMA weights when the run kept them (use_ema=False: the raw training weights)."""
    from .tasks import build_task

    cfg = read_config(ckpt_dir)
    task = build_task(cfg["task"], load_data=load_data, run_dir=ckpt_dir)
    ema_file = os.path.join(ckpt_dir, "ema.safetensors")
    load_weights(task.model, ckpt_dir, device,
                 "ema.safetensors" if use_ema and os.path.isfile(ema_file) else "model.safetensors")
    task.model.to(device)
    return task, cfg.get("train", {})


# ---- weight averaging -------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers, kept in
    float32: avg <- avg + (1 - d) (w - avg) after every optimizer step, with the decay warmed up
    as d = min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the
    initialisation. Samples from diffusion models are markedly better from the average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema: expected a decay in (0, 1), got {decay}")
        self.decay = decay
        state = model.state_dict()
        self.names = [n for n, t in state.items() if t.is_floating_point()]
        # The model's tensors themselves (optimizer steps and checkpoint loads write them in place).
        self.src = [state[n] for n in self.names]
        self.avg = [t.detach().float().clone() for t in self.src]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.avg, [t.float() for t in self.src], 1.0 - d)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.avg))

    def load_state_dict(self, sd: dict) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"ema: checkpoint lacks {missing[:3]}")
        for a, n in zip(self.avg, self.names):
            a.copy_(sd[n])

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Within the block the model holds the averaged weights; the training weights return after."""
        state = model.state_dict()
        saved = [state[n].detach().clone() for n in self.names]
        with torch.no_grad():
            for n, a in zip(self.names, self.avg):
                state[n].copy_(a)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, w in zip(self.names, saved):
                    state[n].copy_(w)


# ---- the loop ------------------------------------------------------------------------------


class Trainer:
    """trainer = Trainer(task, cfg, out_dir); history = trainer.train(resume=False)"""

    def __init__(self, task, cfg: TrainConfig, out_dir: str | None = None):
        if cfg.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {cfg.steps}")
        if cfg.grad_accum < 1:
            raise ValueError(f"grad_accum: expected >= 1, got {cfg.grad_accum}")
        if cfg.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {cfg.dtype!r}")
        self.rank, self.world = _world()
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size: {cfg.batch_size} must be divisible by world_size x grad_accum "
                             f"= {self.world} x {cfg.grad_accum}")
        self.task, self.cfg, self.out_dir = task, cfg, out_dir
        self.device = _device(cfg)
        self.model = task.model.to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.step = 0
        self.history: list[dict] = []

    # -- helpers --
    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0 and self.out_dir:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        if self.rank == 0 and self.out_dir:
            if hasattr(self.task, "save_files"):
                self.task.save_files(self.out_dir)
            save_checkpoint(self.out_dir, self.task.model, self.task.config(), self.cfg, self.optimizer, self.step,
                            self.gen, self.ema)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> None:
        if not self.out_dir:
            raise ValueError("resume: needs an output folder with a checkpoint")
        read_config(self.out_dir)
        state_path = os.path.join(self.out_dir, "trainer_state.pt")
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"resume: {state_path!r} is missing")
        load_weights(self.task.model, self.out_dir, self.device)
        if self.ema is not None:
            from safetensors.torch import load_file

            ema_path = os.path.join(self.out_dir, "ema.safetensors")
            if not os.path.isfile(ema_path):
                raise FileNotFoundError(f"resume: the run keeps an EMA but {ema_path!r} is missing")
            self.ema.load_state_dict(load_file(ema_path))
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def evaluate(self, final: bool = False) -> dict:
        """The task's metrics, on the averaged weights when the run keeps an EMA."""
        model = self.task.model
        was = model.training
        model.eval()
        swap = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        with torch.no_grad(), self._autocast(), swap:
            metrics = self.task.evaluate(model, self.device)
            if final and self.cfg.final_eval and hasattr(self.task, "final_evaluate"):
                metrics.update(self.task.final_evaluate(model, self.device))
        model.train(was)
        return metrics

    # -- training --
    def train(self, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        if self.out_dir and self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            self.resume()
        elif self.out_dir and self.rank == 0 and os.path.exists(os.path.join(self.out_dir, "metrics.jsonl")):
            os.remove(os.path.join(self.out_dir, "metrics.jsonl"))
        model = self.task.model
        model.train()
        fwd = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            fwd = torch.compile(fwd)
        n_parts = self.world * cfg.grad_accum
        unit = getattr(self.task, "unit", "items")

        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc=self.task.name, dynamic_ncols=True, unit="step")
        t_start = time.perf_counter()
        items_done = 0
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if hasattr(self.task, "set_step"):    # tasks whose data follow a schedule (masking rates)
                self.task.set_step(self.step, cfg.steps)
            batch = self.task.batch(self.gen, cfg.batch_size)
            parts = self.task.split(batch, n_parts)
            total = float(sum(self.task.count(p) for p in parts))
            mine = parts[self.rank * cfg.grad_accum:(self.rank + 1) * cfg.grad_accum]
            loss_sum = torch.zeros((), dtype=torch.float64)
            for i, mb in enumerate(mine):
                mb = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
                sync = self.world == 1 or i == len(mine) - 1
                ctx = contextlib.nullcontext() if sync else fwd.no_sync()
                with ctx:
                    with self._autocast():
                        ls = self.task.loss(fwd, mb)
                    (ls * (self.world / max(total, 1.0))).backward()
                loss_sum += ls.detach().double().cpu()
            if self.world > 1:
                dist.all_reduce(loss_sum)
            gnorm = None
            if cfg.clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.step)
            self.step += 1
            items_done += self.task.items(batch)
            loss = float(loss_sum) / max(total, 1.0)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            elapsed = time.perf_counter() - t_start
            rate = items_done / max(elapsed, 1e-9)
            bar.set_postfix_str(f"loss {loss:.4f} {unit}/s {rate:,.0f}")
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rec = {"step": self.step, "loss": loss, "lr": lr, f"{unit}_per_s": rate, "elapsed_s": elapsed}
                if gnorm is not None:
                    rec["grad_norm"] = gnorm
                self._log(rec)
            else:
                self.history.append({"step": self.step, "loss": loss, "lr": lr})
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                metrics = self.evaluate(final=last)
                self._log({"step": self.step, "eval": metrics, "elapsed_s": time.perf_counter() - t_start})
                if self.rank == 0:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save()
        bar.close()
        return self.history


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
