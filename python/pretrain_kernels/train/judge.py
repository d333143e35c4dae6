"""Judging generated images: a small CNN classifier trained on the real training images.

Its predictions give the sample metrics (mean confidence, the entropy of the predicted-class
histogram, the share of class-conditional samples classified as their class) and its
penultimate features give a Frechet distance between generated and held-out real images
(the FID recipe with a feature extractor that fits the data: Inception does not see 8x8).
The reference point is the same distance between the real training and held-out images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, size: int, feat: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(64 * (size // 2) ** 2, feat)
        self.cls = nn.Linear(feat, num_classes)

    def features(self, x):
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.cls(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (padding with the background value -1)."""
    B, C, H, W = x.shape
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, dy:dy + H, dx:dx + W]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_cross)


class Judge:
    """Trained once on construction (a few seconds on 8x8 digits), deterministic under seed."""

    def __init__(self, data, *, epochs: int = 20, seed: int = 0):
        if data.train_labels is None:
            raise ValueError("judge: the image data has no labels")
        self.data = data
        C, H, W = data.shape
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = DigitNet(C, data.num_classes, H)
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        x, y = data.train, data.train_labels
        steps = epochs * math.ceil(x.shape[0] / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        self.net.train()
        with torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(x.shape[0], generator=g)
                for i in range(0, x.shape[0], 64):
                    idx = perm[i:i + 64]
                    loss = F.cross_entropy(self.net(_shift(x[idx], g)), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        self.net.eval()
        self.test_accuracy = float((self.predict(data.test).argmax(1) == data.test_labels).float().mean())
        self.test_features = self.features(data.test)
        self.reference_fd = frechet_distance(self.features(data.train), self.test_features)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.softmax(self.net(c.float().cpu()), 1) for c in x.split(512)])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.net.features(c.float().cpu()) for c in x.split(512)]).numpy()

    def unconditional(self, x: torch.Tensor) -> dict:
        """confidence: mean max probability; class_entropy: entropy of the predicted-class
        histogram divided by log(num_classes) (1 = all classes equally often);
        fd: Frechet distance to the held-out images; fd_ratio: fd / real-vs-real distance."""
        x = x.clamp(-1, 1)
        p = self.predict(x)
        hist = torch.bincount(p.argmax(1), minlength=self.data.num_classes).double()
        hist = hist / hist.sum()
        ent = float(-(hist[hist > 0] * hist[hist > 0].log()).sum()) / math.log(self.data.num_classes)
        fd = frechet_distance(self.features(x), self.test_features)
        return {"confidence": float(p.max(1).values.mean()), "class_entropy": ent, "fd": fd,
                "fd_ratio": fd / self.reference_fd}

    def conditional(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """class_accuracy: share of samples classified as the class they were generated for."""
        x = x.clamp(-1, 1)
        p = self.predict(x)
        fd = frechet_distance(self.features(x), self.test_features)
        return {"class_accuracy": float((p.argmax(1) == y.cpu()).float().mean()),
                "confidence": float(p.max(1).values.mean()), "fd": fd, "fd_ratio": fd / self.reference_fd}
