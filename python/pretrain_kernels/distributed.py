"""Context-parallel attention over torch.distributed: ring attention with an lse merge.

Public functions:
  context_parallel_attention  exact attention over a sequence sharded across the ranks of a
                              process group; differentiable
  shard_sequence              a rank's shard of a full sequence, in the zigzag layout
  unshard_sequence            the full sequence back from every rank's shard (all_gather)

The approach. Each of the W ranks of `group` holds a shard of the sequence: its queries and
the keys/values of the same positions. The key/value shards travel round the ring (rank r
sends to r + 1 and receives from r - 1 with isend/irecv, posted before the local kernel call
so the transfer overlaps it); after W - 1 hops every rank has seen every shard. Each step
calls the attention kernel on (local queries, visiting keys) and gets a partial output and
its logsumexp; partial results merge exactly:

    lse = logaddexp(lse_a, lse_b),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

(accumulated in float32, float64 for float64 inputs). The backward recomputes from the saved
output and the merged (global) lse: with the global lse, a block's softmax probabilities are
the global ones, so flash_attn_bwd on each (queries, visiting keys) block gives that block's
exact share of dQ, dK and dV, with no merge. dQ sums locally; the dK/dV accumulators travel
round the ring with their keys (each rank adds its share, then passes it on) and arrive back
at their owner after W hops; the receive of the accumulator overlaps the next block.

Causal attention balances the work with the zigzag layout: the sequence is cut into 2W
chunks and rank r holds chunks r and 2W-1-r (shard_sequence). With the keys of rank j on
rank r (chunks j and 2W-1-j):
  j == r  local causal attention (the two chunks keep their order, so the local causal mask
          is the global one);
  j < r   both query chunks see chunk j in full and nothing of chunk 2W-1-j: all queries
          against the first half of the keys, no mask;
  j > r   chunk r sees nothing (hidden blocks are never computed); chunk 2W-1-r sees both
          key chunks in full: the second half of the queries against all keys, no mask.
Every step is then c x 2c query-key pairs (c = the chunk length) on every rank. Without a
causal mask the layout does not matter (every query sees every key), so the same shards
serve causal and bidirectional layers. A sliding window (dense inputs) is exact too: each
visible pair of (query chunk, key chunk) is a kernel call of its own whose window is the
global one shifted by the distance between the chunks (_Plan.pieces).

Varlen: q, k, v packed (tokens, heads, head_dim) with the int32 cu_seqlens of the local
shard, as flash_attention's varlen form; every sequence of the batch is sharded across the
ranks (shard_sequence(..., cu_seqlens=global)), so each rank holds 1/W of every sequence and
the local cu_seqlens (= global cu_seqlens // W) is the same on every rank; causal needs each
local length even (two chunks per sequence).

Arguments are checked on each rank, then a fixed-size descriptor (shapes, dtype, flags, the
error message if any) is exchanged with one all_gather: a rank's bad argument, or ranks that
disagree, raise on every rank, instead of leaving the others waiting in the ring.
"""
from __future__ import annotations

import math
import struct
import zlib

import torch
import torch.distributed as dist

from .ops.attention import (_check_bool, _check_cu, _check_qkv_shapes, _check_same, _check_softcap,
                            _check_window, _max_seqlen, _NO_WINDOW, _resolve_scale)

__all__ = ["context_parallel_attention", "shard_sequence", "unshard_sequence"]

# message tags: the key/value ring and the dK/dV ring are in flight at the same time
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 0, 1, 2, 3


# ---- the process group and the descriptor exchange -----------------------------------------


def _resolve_group(group):
    """(group, rank, world) of an initialised process group (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "(or launch with torchrun) first")
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to the ranks it leaves out
        raise ValueError("group: this process is not a member of the group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_FIELDS = 32               # int64 fields of a descriptor
_MESSAGE_BYTES = 320       # the error message, utf-8, truncated


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _exchange(group, world: int, what: str, fields: dict, error: BaseException | None):
    """All-gather each rank's `fields` (name -> int, at most _FIELDS of them) and its error, then
    raise the same way on every rank: a rank whose own check failed re-raises its error, the
    others a ValueError naming that rank and its message; ranks that disagree on a field all
    raise a ValueError naming the field and the values."""
    values = list(fields.values()) if error is None else []
    names = list(fields)
    assert len(values) <= _FIELDS
    msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
    head = struct.pack(f"<qq{_FIELDS}q", int(error is not None), len(msg), *(values + [0] * (_FIELDS - len(values))))
    buf = bytearray(head + msg.ljust(_MESSAGE_BYTES, b"\0"))
    device = _comm_device(group)
    mine = torch.frombuffer(buf, dtype=torch.uint8).to(device)
    every = torch.empty(world * mine.numel(), dtype=torch.uint8, device=device)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(every, mine, group=group)
    rows = every.cpu().view(world, -1).numpy().tobytes()
    size = len(buf)
    decoded = []
    for r in range(world):
        raw = rows[r * size:(r + 1) * size]
        failed, n, *vals = struct.unpack_from(f"<qq{_FIELDS}q", raw)
        text = raw[len(head):len(head) + n].decode(errors="replace")
        decoded.append((failed, text, vals))
    bad = [r for r, (failed, _, _) in enumerate(decoded) if failed]
    if error is not None:
        raise error
    if bad:
        r = bad[0]
        raise ValueError(f"{what}: rank {r} rejected its arguments ({decoded[r][1]})")
    for i, name in enumerate(names):
        got = [vals[i] for _, _, vals in decoded]
        if any(g != got[0] for g in got):
            shown = ", ".join(f"rank {r}: {_show(name, g)}" for r, g in enumerate(got))
            raise ValueError(f"{what}: the ranks must agree on {name}, got {shown}")


def _show(name: str, value: int):
    if name in ("scale", "softcap"):
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if name == "dtype":
        return _DTYPES[value] if 0 <= value < len(_DTYPES) else value
    return value


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
           torch.int8, torch.int16, torch.bool, torch.complex64, torch.complex128]


def _dtype_code(t) -> int:
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)


def _shape_fields(prefix: str, t, ndim: int = 4) -> dict:
    shape = list(t.shape) + [-1] * (ndim - t.dim())
    return {f"{prefix}.dim()": t.dim(), **{f"{prefix}.shape[{i}]": int(s) for i, s in enumerate(shape[:ndim])}}


# ---- the zigzag layout ---------------------------------------------------------------------


def _zigzag_index(lengths: list[int], rank: int, world: int) -> torch.Tensor:
    """Global token indices of rank's shard: for every sequence (of the given lengths, packed
    one after another), its chunks rank and 2W-1-rank of 2W equal chunks."""
    parts, start = [], 0
    for n in lengths:
        c = n // (2 * world)
        parts.append(torch.arange(start + rank * c, start + (rank + 1) * c))
        parts.append(torch.arange(start + (2 * world - 1 - rank) * c, start + (2 * world - rank) * c))
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _check_dim(x, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected a dimension of x (shape {tuple(x.shape)}), got {dim}")
    return dim % x.dim()


def _sequence_lengths(name: str, x, dim: int, cu_seqlens, divisor: int, what: str) -> list[int]:
    """The lengths of the sequences packed along dim (one without cu_seqlens), each checked to
    divide by divisor."""
    n = x.shape[dim]
    if cu_seqlens is None:
        lengths = [n]
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise TypeError(f"cu_seqlens: expected an int32 tensor, got {got}")
        cu = cu_seqlens.tolist()
        if cu_seqlens.dim() != 1 or not cu or cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {n} (the length of {name} along "
                             f"dim {dim}), got {cu if len(cu) <= 16 else cu[:8] + ['...'] + cu[-8:]}")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
    for i, m in enumerate(lengths):
        if m % divisor:
            seq = "" if cu_seqlens is None else f" of sequence {i}"
            raise ValueError(f"{name}: the length{seq} along dim {dim}, {m}, must divide by {what}")
    return lengths


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1, *, cu_seqlens: torch.Tensor | None = None):
    """This rank's shard of the full sequence x, in the zigzag layout of context_parallel_attention.

    x holds the whole sequence along `dim` (the same on every rank); the sequence is cut into
    2 * world_size equal chunks and rank r keeps chunks r and 2 * world_size - 1 - r, in that
    order (so every rank gets the same share of a causal mask's work). With cu_seqlens (int32
    offsets of sequences packed along dim, as flash_attention's varlen form) every sequence is
    sharded that way and the shards are packed in the same order; the local offsets are then
    cu_seqlens // world_size. Each length must divide by 2 * world_size. Differentiable; no
    communication.
    """
    group, rank, world = _resolve_group(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    dim = _check_dim(x, dim)
    lengths = _sequence_lengths("x", x, dim, cu_seqlens, 2 * world, f"2 * world_size = {2 * world}")
    if cu_seqlens is None:
        c = lengths[0] // (2 * world)
        return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim)
    return x.index_select(dim, _zigzag_index(lengths, rank, world).to(x.device))


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, dim, inverse, index):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.dim, ctx.index = group, dim, index
        return torch.cat(parts, dim).index_select(dim, inverse)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.index_select(ctx.dim, ctx.index), None, None, None, None, None


@torch.compiler.disable
def unshard_sequence(x_local: torch.Tensor, group=None, dim: int = 1, *, cu_seqlens: torch.Tensor | None = None):
    """The full sequence from every rank's zigzag shard (the inverse of shard_sequence): an
    all_gather along `dim`, then the chunks put back in order. With cu_seqlens (the local
    shard's offsets, the same on every rank) the shards of every packed sequence are put back
    and the result is packed by cu_seqlens * world_size.

    Collective: every rank of the group calls it, with the same shape and dtype (checked: a
    mismatch raises a ValueError on every rank). Differentiable with the convention of
    torch.distributed.nn.functional.all_gather: the gradient that reaches a rank's shard is
    the sum over the ranks of their gradients with respect to its positions (when every rank
    computes the same loss from the full sequence, divide it by the world size).
    """
    group, rank, world = _resolve_group(group)
    error, lengths = None, []
    fields = {}
    try:
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
        dim = _check_dim(x_local, dim)
        lengths = _sequence_lengths("x_local", x_local, dim, cu_seqlens, 2, "2 (two zigzag chunks per rank)")
        fields = {"dtype": _dtype_code(x_local), "dim": dim, **_shape_fields("x_local", x_local, 8),
                  "cu_seqlens": zlib.crc32(repr(lengths).encode())}
    except Exception as e:  # raised on every rank after the exchange, never on this one alone
        error = e
    _exchange(group, world, "unshard_sequence", fields, error)
    global_lengths = [n * world for n in lengths]
    index = torch.cat([_zigzag_index(global_lengths, r, world) for r in range(world)])
    inverse = torch.argsort(index).to(x_local.device)
    mine = _zigzag_index(global_lengths, rank, world).to(x_local.device)
    return _Unshard.apply(x_local, group, world, dim, inverse, mine)


# ---- ring attention ------------------------------------------------------------------------


class _Plan:
    """What every step of the ring computes on this rank: the group and neighbours, the kernel
    arguments, and how to take and put back the halves of the queries and keys."""

    def __init__(self, group, rank, world, q, causal, scale, softcap, cu_seqlens, max_seqlen, window):
        self.group, self.rank, self.world = group, rank, world
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)
        self.causal, self.scale, self.softcap = causal, scale, softcap
        self.varlen = cu_seqlens is not None
        self.cu, self.max_seqlen = cu_seqlens, max_seqlen
        left, right = window
        if causal:
            right = 0
        # a sliding window (dense only): every pair of chunks is its own kernel call (pieces())
        self.windowed = left >= 0 or (right >= 0 and not causal)
        self.window = (None if left < 0 else left, None if right < 0 else right)
        if not causal and not self.windowed:
            return
        if self.varlen:
            # tokens of the first / second half of every local sequence, in packed order
            cu = cu_seqlens.long()
            t = torch.arange(q.shape[0], device=q.device)
            seq = torch.searchsorted(cu[1:], t, right=True)
            first = (t - cu[seq]) < (cu[seq + 1] - cu[seq]) // 2
            perm = torch.argsort((~first).to(torch.int8), stable=True)
            self.idx = (perm[:q.shape[0] // 2], perm[q.shape[0] // 2:])
            self.cu_half = torch.div(cu_seqlens, 2, rounding_mode="floor")
            self.max_half = max_seqlen // 2 if max_seqlen >= 0 else -1
        else:
            self.c = q.shape[1] // 2

    def pieces(self, step: int):
        """With a sliding window: (q_start, k_start, n, window_left, window_right) of each kernel
        call of a step, one per pair of (query chunk, key chunk) that the window does not hide.
        Query chunk a against key chunk b sees, in chunk coordinates (i, j), the keys
        i + d - left <= j <= i + d + right with d = (a - b) * c: a window shifted by d, which
        the kernel takes directly while both sides stay >= 0. When one side turns negative the
        visible band starts beyond the diagonal, and slicing the queries (or keys) it skips
        brings it back: for d > left, keys j >= m = d - left only and rows i < c - m only, and
        then j' = j - m sees the keys j' >= i (the other bound, j <= i + d + right, holds for
        every key of the chunk, since d >= c); d < -right likewise with the queries."""
        W, r, c = self.world, self.rank, self.c
        j = (r - step) % W
        left, right = self.window
        out = []
        for qh, a in ((0, r), (1, 2 * W - 1 - r)):
            for kh, b in ((0, j), (1, 2 * W - 1 - j)):
                d = (a - b) * c
                lo = None if left is None else left - d    # j >= i - lo
                hi = None if right is None else right + d  # j <= i + hi
                q0, k0, n = qh * c, kh * c, c
                if lo is not None and lo < 0:  # the band starts -lo keys right of the diagonal
                    k0, n, lo, hi = k0 - lo, c + lo, 0, None
                elif hi is not None and hi < 0:  # it ends -hi keys left of it
                    q0, n, lo, hi = q0 - hi, c + hi, None, 0
                if n > 0:
                    out.append((q0, k0, n, -1 if lo is None else lo, -1 if hi is None else hi))
        return out

    def kind(self, step: int) -> str:
        if self.windowed:
            return "pieces"
        if step == 0:
            return "diagonal"
        if not self.causal:
            return "full"
        return "keys_first_half" if (self.rank - step) % self.world < self.rank else "queries_second_half"

    # the halves of a (tokens ...) tensor: dim 1 dense, dim 0 varlen; of an lse: its last dim
    def half(self, x, which: int, lse: bool = False):
        if self.varlen:
            return x.index_select(1 if lse else 0, self.idx[which])
        return x.narrow(2 if lse else 1, which * self.c, self.c)

    def add_half(self, acc, which: int, x):
        if self.varlen:
            acc.index_add_(0, self.idx[which], x.to(acc.dtype))
        else:
            acc.narrow(1, which * self.c, self.c).add_(x)

    def kernel_args(self, kind: str):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_right) of a step."""
        cu, m = self.cu, (self.max_seqlen if self.varlen else -1)
        if kind == "keys_first_half":
            return (cu, self.cu_half, m, self.max_half, -1) if self.varlen else (None, None, -1, -1, -1)
        if kind == "queries_second_half":
            return (self.cu_half, cu, self.max_half, m, -1) if self.varlen else (None, None, -1, -1, -1)
        return cu, cu, m, m, (0 if kind == "diagonal" and self.causal else -1)


def _send_recv(plan, sends, tags):
    """Post isend of each tensor in `sends` to the next rank and irecv of a tensor like it from
    the previous one; returns (received tensors, requests)."""
    recvs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t, plan.next, plan.group, tag) for t, tag in zip(sends, tags)]
    ops += [dist.P2POp(dist.irecv, t, plan.prev, plan.group, tag) for t, tag in zip(recvs, tags)]
    return recvs, dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs:
        r.wait()


def _rows(x, lse_to_tokens: bool):
    """An lse (batch, heads, seq) or (heads, tokens) as a broadcastable (..., tokens, heads, 1)."""
    return (x.transpose(-1, -2) if lse_to_tokens else x).unsqueeze(-1)


def _merge(acc_out, acc_lse, out, lse):
    """The exact merge of two partial attentions over disjoint key sets, into acc_out (in place)
    and the returned lse (rows that see no key at all keep lse -inf and output 0)."""
    new = torch.logaddexp(acc_lse, lse)
    base = new.masked_fill(torch.isneginf(new), 0)
    acc_out.mul_(_rows(torch.exp(acc_lse - base), True))
    acc_out.addcmul_(out, _rows(torch.exp(lse - base), True))
    return new


def _ring_forward(plan, q, k, v):
    fwd = torch.ops.pretrain_kernels.flash_attn_fwd
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_out = acc_lse = None
    if plan.windowed:
        acc_out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        acc_lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=acc_dtype, device=q.device)
    kc, vc = k, v
    for step in range(plan.world):
        reqs = []
        if step < plan.world - 1:
            (kn, vn), reqs = _send_recv(plan, (kc, vc), (_TAG_K, _TAG_V))
        kind = plan.kind(step)
        if kind == "pieces":
            for q0, k0, n, left, right in plan.pieces(step):
                out, lse = fwd(q.narrow(1, q0, n), kc.narrow(1, k0, n), vc.narrow(1, k0, n), None, None, None, -1, -1,
                               plan.scale, left, right, True, plan.softcap)
                lse_rows = acc_lse.narrow(2, q0, n)
                lse_rows.copy_(_merge(acc_out.narrow(1, q0, n), lse_rows, out, lse))
            _wait(reqs)
            if reqs:
                kc, vc = kn, vn
            continue
        cu_q, cu_k, mq, mk, right = plan.kernel_args(kind)
        if kind == "keys_first_half":
            out, lse = fwd(q, plan.half(kc, 0), plan.half(vc, 0), cu_q, cu_k, None, mq, mk, plan.scale, -1, right,
                           True, plan.softcap)
        elif kind == "queries_second_half":
            out, lse = fwd(plan.half(q, 1), kc, vc, cu_q, cu_k, None, mq, mk, plan.scale, -1, right, True,
                           plan.softcap)
        else:
            out, lse = fwd(q, kc, vc, cu_q, cu_k, None, mq, mk, plan.scale, -1, right, True, plan.softcap)
        if acc_out is None:
            acc_out, acc_lse = out.to(acc_dtype), lse
        elif kind == "queries_second_half":  # a view of the rows (dense) or a copy put back (varlen)
            rows = plan.half(acc_out, 1)
            lse_rows = _merge(rows, plan.half(acc_lse, 1, lse=True), out, lse)
            if plan.varlen:
                acc_out.index_copy_(0, plan.idx[1], rows)
                acc_lse.index_copy_(1, plan.idx[1], lse_rows)
            else:
                plan.half(acc_lse, 1, lse=True).copy_(lse_rows)
        else:
            acc_lse = _merge(acc_out, acc_lse, out, lse)
        del out, lse
        _wait(reqs)
        if reqs:
            kc, vc = kn, vn
    return acc_out.to(q.dtype), acc_lse


def _block_backward(plan, kind, step, q, kc, vc, out, lse, dout, dlse, dq, dkv_reqs, dk_in, dv_in, acc_dtype):
    """One step of the backward without a window: adds the block's dQ into dq and returns the
    dK/dV accumulators with the block's share added (waiting for the incoming ones first)."""
    bwd = torch.ops.pretrain_kernels.flash_attn_bwd
    cu_q, cu_k, mq, mk, right = plan.kernel_args(kind)
    args = (cu_q, cu_k, None, mq, mk, plan.scale, -1, right, True, plan.softcap)
    if kind == "keys_first_half":
        dq_b, dk_b, dv_b = bwd(dout, q, plan.half(kc, 0), plan.half(vc, 0), out, lse, dlse, *args)
    elif kind == "queries_second_half":
        dlse_h = None if dlse is None else plan.half(dlse, 1, lse=True).contiguous()
        dq_b, dk_b, dv_b = bwd(plan.half(dout, 1), plan.half(q, 1), kc, vc, plan.half(out, 1),
                               plan.half(lse, 1, lse=True).contiguous(), dlse_h, *args)
    else:
        dq_b, dk_b, dv_b = bwd(dout, q, kc, vc, out, lse, dlse, *args)
    if kind == "queries_second_half":
        plan.add_half(dq, 1, dq_b)
    else:
        dq.add_(dq_b)
    del dq_b
    # this block's share of dK/dV, added to the accumulator that arrived with these keys
    if step == 0:  # the diagonal block covers every key
        return dk_b.to(acc_dtype), dv_b.to(acc_dtype)
    _wait(dkv_reqs)
    if kind == "keys_first_half":
        plan.add_half(dk_in, 0, dk_b)
        plan.add_half(dv_in, 0, dv_b)
    else:
        dk_in.add_(dk_b)
        dv_in.add_(dv_b)
    return dk_in, dv_in


def _pieces_backward(plan, step, q, kc, vc, out, lse, dout, dlse, dq, dkv_reqs, dk_in, dv_in, acc_dtype):
    """_block_backward with a sliding window: one kernel call per piece (plan.pieces)."""
    bwd = torch.ops.pretrain_kernels.flash_attn_bwd
    parts = []
    for q0, k0, n, left, right in plan.pieces(step):
        def rows(x, dim=1):
            return x.narrow(dim, q0, n)
        dq_b, dk_b, dv_b = bwd(rows(dout), rows(q), kc.narrow(1, k0, n), vc.narrow(1, k0, n), rows(out),
                               rows(lse, 2).contiguous(), None if dlse is None else rows(dlse, 2).contiguous(),
                               None, None, None, -1, -1, plan.scale, left, right, True, plan.softcap)
        rows(dq).add_(dq_b)
        parts.append((k0, n, dk_b, dv_b))
    if step == 0:
        dk_in = torch.zeros(kc.shape, dtype=acc_dtype, device=kc.device)
        dv_in = torch.zeros(vc.shape, dtype=acc_dtype, device=vc.device)
    else:
        _wait(dkv_reqs)
    for k0, n, dk_b, dv_b in parts:
        dk_in.narrow(1, k0, n).add_(dk_b)
        dv_in.narrow(1, k0, n).add_(dv_b)
    return dk_in, dv_in


def _ring_backward(plan, q, k, v, out, lse, dout, dlse):
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kc, vc = k, v
    dkv_reqs, dk_in, dv_in = [], None, None
    for step in range(plan.world):
        kv_reqs = []
        if step < plan.world - 1:
            (kn, vn), kv_reqs = _send_recv(plan, (kc, vc), (_TAG_K, _TAG_V))
        kind = plan.kind(step)
        if kind == "pieces":
            dk, dv = _pieces_backward(plan, step, q, kc, vc, out, lse, dout, dlse, dq, dkv_reqs, dk_in, dv_in,
                                      acc_dtype)
        else:
            dk, dv = _block_backward(plan, kind, step, q, kc, vc, out, lse, dout, dlse, dq, dkv_reqs, dk_in, dv_in,
                                     acc_dtype)
        del dk_in, dv_in
        _wait(kv_reqs)
        if kv_reqs:
            kc, vc = kn, vn
        if plan.world > 1:  # on to the next rank; the last hop brings each accumulator home
            (dk_in, dv_in), dkv_reqs = _send_recv(plan, (dk, dv), (_TAG_DK, _TAG_DV))
        else:
            dk_in, dv_in = dk, dv
        del dk, dv
    _wait(dkv_reqs)
    return dq.to(q.dtype), dk_in.to(k.dtype), dv_in.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = _ring_forward(plan, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(ctx.plan, q, k, v, out, lse, dout.contiguous(),
                                    None if dlse is None else dlse.contiguous())
        return dq, dk, dv, None


def _check_attention_args(q, k, v, causal, scale, softcap, cu_seqlens, max_seqlen, return_lse, window):
    """The local checks; returns (causal, scale, softcap, max_seqlen, window, cu_seqlens lengths)."""
    _check_same(q, k, v)
    causal = _check_bool("causal", causal)
    left, right = _check_window(window)
    if causal:
        right = 0
    windowed = left >= 0 or (right >= 0 and not causal)
    _check_bool("return_lse", return_lse)
    varlen = cu_seqlens is not None
    D = _check_qkv_shapes(q, k, v, varlen, tokens="tokens")
    lengths = []
    if varlen:
        _check_cu("cu_seqlens", cu_seqlens, q.device)
        if not q.shape[0] == k.shape[0] == v.shape[0]:
            raise ValueError(f"q, k, v: expected the same token count (one shard of the same sequences), got "
                             f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        lengths = _sequence_lengths("q", q, 0, cu_seqlens, 2 if causal else 1,
                                    "2: causal attention uses the zigzag layout of two chunks per rank "
                                    "(shard_sequence; each global length must divide by 2 * world_size)")
        if windowed:
            raise ValueError(f"window: a sliding window is not offered with cu_seqlens (varlen), got {window}")
    else:
        if not q.shape[0] == k.shape[0] == v.shape[0]:
            raise ValueError(f"batch: q, k, v must match, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k, v: expected the same sequence length, got {k.shape[1]} and {v.shape[1]}")
        if causal or windowed:
            what = "causal attention" if causal else "a sliding window"
            if k.shape[1] != q.shape[1]:
                raise ValueError(f"q, k: {what} over context parallel shards is self-attention: expected the same "
                                 f"local sequence length, got {q.shape[1]} and {k.shape[1]}")
            if q.shape[1] % 2:
                raise ValueError(f"q: {what} uses the zigzag layout of two chunks per rank (shard_sequence): the "
                                 f"local sequence length must be even (the global one must divide by 2 * "
                                 f"world_size), got {q.shape[1]}")
    scale = _resolve_scale(scale, D, q.dtype)
    softcap = _check_softcap(softcap, q.dtype)
    max_seqlen = _max_seqlen("max_seqlen", max_seqlen)
    return causal, scale, softcap, max_seqlen, (left, right), lengths


@torch.compiler.disable
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = True,
                               scale=None, softcap: float | None = None, cu_seqlens: torch.Tensor | None = None,
                               max_seqlen: int | None = None, return_lse: bool = False, window=_NO_WINDOW):
    """Exact attention over a sequence sharded across the ranks of `group`, differentiable.

    q: (batch, seqlen_local, heads, head_dim), k, v: (batch, seqlen_local, kv_heads,
    head_dim) (GQA when kv_heads divides heads): this rank's shard of the sequence, as
    shard_sequence(x, group, dim=1) cuts it (for causal=True the zigzag layout is required:
    rank r holds chunks r and 2W-1-r of 2W; without a causal mask any split works, as long as
    q and k/v come from the same split). Varlen: q, k, v (tokens_local, heads, head_dim) with
    cu_seqlens, the int32 offsets of the local shard (every sequence sharded across the ranks:
    shard_sequence(x, group, dim=0, cu_seqlens=global_cu), local offsets global_cu //
    world_size, the same on every rank); max_seqlen: optional bound of the local lengths.
    group: a torch.distributed ProcessGroup (None: the default group).
    causal, scale (default 1 / sqrt(head_dim)) and softcap (None: off) as in
    pk.flash_attention, applied to the whole sequence: the result is the local shard of
    pk.flash_attention(full q, full k, full v, ...), to rounding (the partial results merge in
    float32, float64 for float64 inputs). window=(left, right): a sliding window over the global
    positions as in pk.flash_attention (-1: unbounded; causal sets right = 0), dense inputs
    only, in the zigzag layout; each pair of chunks is then its own kernel call, with the
    window shifted by the distance between the chunks, and the pairs the window hides are
    skipped. ALiBi, prefix_lens and dropout depend on global positions or indices and are not
    offered.
    Returns out shaped like q, and with return_lse=True also the global lse of the local rows:
    (batch, heads, seqlen_local), or (heads, tokens_local) for varlen (float32; float64 for
    float64 inputs), differentiable.

    Collective: every rank of the group calls it with the same shapes, dtype and arguments;
    a rank's bad argument, or ranks that disagree, raise on every rank (one all_gather of a
    small descriptor checks this before the ring starts; its result is read on the host, so
    on a GPU each call synchronises once, and varlen reads cu_seqlens on the host). The
    backward is collective too: every rank must backpropagate through the result. torch.compile runs it eagerly (a graph
    break: the descriptor check reads values on the host, and the ring is a sequence of
    point-to-point transfers that the compiled graph would not overlap any better).
    """
    group, rank, world = _resolve_group(group)
    error, fields, checked = None, {}, None
    try:
        checked = _check_attention_args(q, k, v, causal, scale, softcap, cu_seqlens, max_seqlen, return_lse, window)
        causal_, scale_, softcap_, max_seqlen_, window_, lengths = checked
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        fields = {"dtype": _dtype_code(q), "device type": int(q.device.type == "cuda"),
                  **_shape_fields("q", q), **_shape_fields("k", k), **_shape_fields("v", v),
                  "causal": int(causal_), "scale": _float_bits(scale_), "softcap": _float_bits(softcap_),
                  "cu_seqlens": zlib.crc32(repr(lengths).encode()) if cu_seqlens is not None else -1,
                  "max_seqlen": max_seqlen_, "window left": window_[0], "window right": window_[1],
                  "requires_grad": int(grad)}
    except Exception as e:  # raised on every rank after the exchange, never on this one alone
        error = e
    _exchange(group, world, "context_parallel_attention", fields, error)
    causal, scale, softcap, max_seqlen, window, _ = checked
    plan = _Plan(group, rank, world, q, causal, scale, softcap, cu_seqlens, max_seqlen, window)
    k, v = k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _RingAttention.apply(q, k, v, plan)
    else:
        out, lse = _ring_forward(plan, q, k, v)
    return (out, lse) if return_lse else out
