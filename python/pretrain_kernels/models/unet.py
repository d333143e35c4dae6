"""U-Net denoiser (the DDPM architecture, sized for small images).

x_t [B, C, H, W] and a timestep t [B] (integer DDPM steps, or flow-matching sigma * 1000) ->
a prediction with x's shape (epsilon, v or the flow velocity, as the objective chooses).

  timestep -> sinusoidal features -> MLP -> temb (+ class embedding when class-conditional;
              the extra class index num_classes is "no class", for classifier-free guidance)
  encoder:  conv_in, then per level: num_res_blocks residual blocks (+ self-attention at the
            resolutions in attn_resolutions), then a stride-2 downsample (not after the last)
  middle:   residual block, self-attention, residual block
  decoder:  per level in reverse: num_res_blocks + 1 residual blocks on the concatenation
            with the matching encoder activation (+ attention), then a nearest-neighbour 2x
            upsample and conv (not after the top level)
  out:      GroupNorm, SiLU, conv to the input channels (zero-initialised)

Residual blocks add a per-channel scale and shift from temb between their two convolutions.
Self-attention treats the H*W positions as a sequence, (B, H*W, heads, head_dim), and runs
through pk.flash_attention.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_kernels as pk


@dataclass
class UNetConfig:
    image_size: int = 8
    in_channels: int = 1
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (4, 2)     # image sizes that get self-attention
    head_dim: int = 32
    num_classes: int = 0                 # > 0: class-conditional
    groups: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"], d["attn_resolutions"] = list(self.channel_mult), list(self.attn_resolutions)
        return d


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the spatial positions, through pk.flash_attention."""

    def __init__(self, ch: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.permute(1, 0, 4, 2, 3).unbind(0)          # each (B, HW, heads, head_dim)
        y = pk.flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
        y = y.permute(0, 2, 3, 1).reshape(B, C, H, W)
        return x + self.proj(y)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.groups
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, res, cur = [ch], cfg.image_size, ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(cur, ch * mult, temb_dim, g)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, cfg.head_dim, g))
                self.down.append(blocks)
                skips.append(cur)
            if level != len(cfg.channel_mult) - 1:
                if res % 2:
                    raise ValueError(f"image_size {cfg.image_size} cannot be halved {len(cfg.channel_mult) - 1} times")
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, g), AttnBlock(cur, cfg.head_dim, g),
                                  ResBlock(cur, cur, temb_dim, g)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, temb_dim, g)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, cfg.head_dim, g))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, blocks, h, temb):
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] (or one value), y [B] class ids (num_classes = unconditional)."""
        B = x.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        temb = self.temb(timestep_embedding(t, self.cfg.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((B,), self.cfg.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
