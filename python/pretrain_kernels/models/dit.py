"""DiT: a diffusion transformer on image patches with adaLN-Zero conditioning (Peebles & Xie).

x_t [B, C, H, W], t [B] (DDPM steps or flow sigma * 1000), optional class ids [B] ->
a prediction with x's shape.

  patchify: a stride-p convolution -> (B, N = (H/p)(W/p), dim), plus fixed 2-D sin-cos positions
  conditioning c = MLP(sinusoidal(t)) (+ class embedding; index num_classes = "no class")
  blocks: x += gate_a * attn(modulate(LN(x), shift_a, scale_a));
          x += gate_m * mlp(modulate(LN(x), shift_m, scale_m)),
          the six vectors regressed from c, initialised to zero (each block starts as identity)
  final: modulate(LN(x)) -> linear to p*p*C per patch (zero-initialised) -> unpatchify
Attention is bidirectional over the patches, layout (B, N, heads, head_dim), through
pk.flash_attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_kernels as pk

from .unet import timestep_embedding


@dataclass
class DiTConfig:
    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    dim: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_2d(n: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for an n x n grid -> [n*n, dim]."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        ang = coord[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):
        B, N, D = x.shape
        sa, ca, ga, sm, cm, gm = self.ada(F.silu(c)).chunk(6, dim=1)
        q, k, v = self.qkv(modulate(self.ln1(x), sa, ca)).view(B, N, 3, self.heads, D // self.heads).unbind(2)
        y = pk.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + ga[:, None] * self.proj(y.reshape(B, N, D))
        return x + gm[:, None] * self.mlp(modulate(self.ln2(x), sm, cm))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        if cfg.dim % cfg.heads or cfg.dim % 4:
            raise ValueError(f"dim {cfg.dim} must divide by heads {cfg.heads} and by 4")
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.grid = cfg.image_size // p
        self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.register_buffer("pos", sincos_2d(self.grid, d), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_f = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, p * p * cfg.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in (self.ada_f, self.out):
                if not any(m is b.ada for b in self.blocks):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for m in (self.ada_f, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        p, n = self.cfg.patch_size, self.grid
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos          # (B, N, dim)
        c = self.t_mlp(timestep_embedding(t, 256))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((B,), self.cfg.num_classes, device=x.device, dtype=torch.long)
            c = c + self.class_emb(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_f(F.silu(c)).chunk(2, dim=1)
        h = self.out(modulate(self.ln_f(h), shift, scale))                # (B, N, p*p*C)
        h = h.view(B, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, C, n * p, n * p)
