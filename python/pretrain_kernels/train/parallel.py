"""How the trainer spreads a model over processes: FSDP2, activation checkpointing, context
parallelism, and the sharded checkpoints that go with them.

FSDP2 (`--parallel fsdp`). torch.distributed.fsdp.fully_shard is applied to every block of
the model (the entries of model.blocks for the GPT, BERT and DiT; the residual and attention
blocks of the UNet) and then to the root, which holds what is left (embeddings, heads,
final norms). Each rank keeps 1/world of every parameter, of its gradient and of its AdamW
state as DTensors sharded on dim 0; a block's parameters are all-gathered just before its
forward and again before its backward, and its gradients are reduce-scattered (averaged
over ranks) as soon as they are ready. With --dtype bfloat16 the mixed-precision policy
gathers bf16 parameters (half the traffic, bf16 matmuls) while the sharded master weights,
the optimizer and the gradient reduction stay in float32; the loop's bf16 autocast still
runs around the forward, and the model's inputs are not cast (a diffusion timestep keeps
its float32 precision). The loss normalisation of the loop (train/loop.py) does not change: FSDP divides
the reduced gradients by the world size exactly as DDP does.

Activation checkpointing (`--checkpoint-activations`). Each block's forward runs under
torch.utils.checkpoint (non-reentrant): only the block inputs are kept, and the block is
recomputed in the backward pass. The forward method of the block instance is replaced, so
parameter names (state dicts, safetensors files) do not change, and under FSDP the
recomputation finds the block's parameters gathered by FSDP's pre-backward hook. Without
gradients (evaluation, sampling) blocks run plainly.

Context parallelism (`--context-parallel N`, GPT). The processes form a 2-D device mesh
(data x context, init_device_mesh): the N ranks of a context group train on the same
micro-batch, each on its shard of the sequence in the zigzag layout of
pretrain_kernels.distributed.shard_sequence, with the rotary positions of its own tokens
(global positions), and every causal attention layer calls context_parallel_attention on
the context group (the keys and values travel round the ring). The data dimension draws the
micro-batches as without context parallelism. Parameters are replicated (DDP) or sharded
(FSDP) over all the ranks, data x context flattened, since each context rank holds its own
share of every gradient: the gradient average over all ranks, with the loop's loss
normalisation, is again the gradient of the global batch's mean loss. Evaluation runs the
whole sequences with the plain kernel on every rank.

Checkpoints of an FSDP run (`parallel="fsdp"`, whatever the world size) go through
torch.distributed.checkpoint (DCP): model, optimizer (get_state_dict / set_state_dict of
torch.distributed.checkpoint.state_dict) and the EMA, each rank writing its own shards into
out_dir/checkpoint/ (across nodes, out_dir must be a folder every node sees). DCP records the global shape of every tensor, so a run saved by N
processes resumes on M processes (or on one, without a process group): each reader takes
the slices its own shards cover. The full weights are still exported by rank 0 as
model.safetensors (and ema.safetensors), gathered from the shards, so pk-generate,
pk-sample-images and evaluation read an FSDP run like any other. An unsharded checkpoint (a
single-process or DDP run) continues under FSDP (each rank slices the full tensors), and a
sharded one continues without FSDP (it is then saved unsharded).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

CHECKPOINT_DIR = "checkpoint"
PARALLEL_MODES = ("ddp", "fsdp")


def fsdp_api():
    """(fully_shard, MixedPrecisionPolicy): public in torch >= 2.6, under _composable in 2.5."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_type())


def local_shape(t: torch.Tensor) -> torch.Size:
    """The shape of this rank's part of a DTensor (of t itself otherwise)."""
    return t.to_local().shape if is_dtensor(t) else t.shape


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank calls it); t itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one and activation checkpointing recomputes: the entries of
    model.blocks (GPT, BertMLM, DiT), or the residual and attention blocks of a UNet."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    from pretrain_kernels.models.unet import AttnBlock, ResBlock

    return [m for m in model.modules() if isinstance(m, (ResBlock, AttnBlock))]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute every block in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for block in model_blocks(model):
        if getattr(block, "_pk_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._pk_checkpointed = True


def shard_model(model: nn.Module, *, dtype: str = "float32", mesh=None) -> nn.Module:
    """fully_shard every block, then the root (in place; returns the model). dtype "bfloat16":
    bf16 parameters in the forward and backward, float32 gradient reduction. mesh: a 1-D
    DeviceMesh of the ranks that share the parameters (default: all ranks)."""
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw = dict(mp_policy=mp) if mesh is None else dict(mp_policy=mp, mesh=mesh)
    for block in model_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP's counterpart of DDP's no_sync(): skip the reduce-scatter of a micro-batch whose
    gradients are only accumulated."""
    model.set_requires_gradient_sync(sync)


# ---- full (unsharded) weights ----------------------------------------------------------------


def tied_names(model: nn.Module) -> dict[str, str]:
    """{dropped name: kept name} for parameters that several names share (a tied embedding),
    chosen as safetensors' save_model chooses (the first name in sorted order is kept)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = {}
    for names in groups.values():
        keep = sorted(names)[0]
        out.update({n: keep for n in names if n != keep})
    return out


def save_full_safetensors(state: dict, path: str, tied: dict[str, str]) -> None:
    """Write a full state dict as save_model would: one copy of each tied tensor (the dropped
    names are recorded in the metadata, which safetensors' load_model reads back)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in state.items() if k not in tied}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={k: v for k, v in tied.items()} or None)
    os.replace(tmp, path)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on rank 0 (CPU tensors; empty on other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(out_dir: str, model: nn.Module, optimizer, ema=None) -> None:
    """Model, optimizer and EMA shards into out_dir/checkpoint (replaced only once complete)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    final = os.path.join(out_dir, CHECKPOINT_DIR)
    tmp = final + ".tmp"
    if rank == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()


def has_sharded(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, CHECKPOINT_DIR, ".metadata"))


def load_sharded(out_dir: str, model: nn.Module, optimizer, ema=None) -> None:
    """Read out_dir/checkpoint into the model, optimizer and EMA as they are sharded now (any
    world size, or no process group at all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()   # the EMA's own tensors: DCP reads into them in place
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=os.path.join(out_dir, CHECKPOINT_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into_sharded(model: nn.Module, optimizer, ema, model_sd: dict, optim_sd: dict,
                           ema_sd: dict | None) -> None:
    """Load an unsharded checkpoint (model.safetensors, the optimizer.state_dict() of a single
    process or DDP run, ema.safetensors) into a sharded model: each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tied = tied_names(model)

    def untie(sd):
        sd = dict(sd)
        for dropped, kept in tied.items():
            if dropped not in sd and kept in sd:
                sd[dropped] = sd[kept]
            elif kept not in sd and dropped in sd:
                sd[kept] = sd[dropped]
        return sd

    # optimizer.state_dict() numbers the parameters in param-group order; DCP names them
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = {"state": {fqns[i]: st for i, st in optim_sd["state"].items()},
           "param_groups": [dict(g, params=[fqns[i] for i in g["params"]]) for g in optim_sd["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=untie(model_sd), optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))
    if ema is not None:
        ema_sd = untie(ema_sd)
        for n, a in zip(ema.names, ema.avg):
            full = ema_sd[n].to(device=a.device, dtype=a.dtype)
            if is_dtensor(a):
                try:
                    from torch.distributed.tensor import distribute_tensor
                except ImportError:  # torch 2.5
                    from torch.distributed._tensor import distribute_tensor
                full = distribute_tensor(full, a.device_mesh, a.placements)
            a.copy_(full)


# ---- context parallelism ---------------------------------------------------------------------


class ContextParallel:
    """Runs a model's causal attention layers (modules with an `attend(q, k, v)` method, as
    the GPT's) through context_parallel_attention on `group` inside active(), and cuts a
    micro-batch's sequences into this rank's zigzag shard (shard())."""

    def __init__(self, model: nn.Module, group):
        from pretrain_kernels.distributed import context_parallel_attention

        self.group, self.world = group, dist.get_world_size(group)
        self.on = False
        layers = [m for m in model.modules() if callable(getattr(type(m), "attend", None))]
        if not layers:
            raise ValueError(f"context_parallel: {type(model).__name__} has no attention layer that can run on a "
                             "sharded sequence (only the GPT's causal attention can)")
        for m in layers:
            plain = m.attend

            def attend(q, k, v, _plain=plain):
                if self.on:
                    return context_parallel_attention(q, k, v, self.group, causal=True)
                return _plain(q, k, v)

            m.attend = attend

    @contextlib.contextmanager
    def active(self):
        """Forward and backward passes inside run on the sharded sequence (with activation
        checkpointing the backward recomputes attention, so it belongs inside too)."""
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def shard(self, mb: dict) -> dict:
        """This rank's part of a micro-batch of sequences {name: [B, T, ...]}: every tensor cut
        along dim 1, plus "positions" [T / N], the global positions of the local tokens."""
        from pretrain_kernels.distributed import shard_sequence

        out = {k: shard_sequence(v, self.group, dim=1) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        T = next(v for v in mb.values() if isinstance(v, torch.Tensor)).shape[1]
        device = next(v for v in mb.values() if isinstance(v, torch.Tensor)).device
        out["positions"] = shard_sequence(torch.arange(T, device=device), self.group, dim=0)
        return out
