"""Embedded data that needs no download.

Text: the Python standard library's own .py files (always present with Python), read as
bytes, in a fixed order, with a fixed train/validation split by file. Byte-level tokens
0..255 plus a few special ids (ByteTokenizer).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes 0..255, then PAD, MASK, BOS, EOS. Tokenizer-like enough for pk.MLMCollator."""

    pad_token_id: int = 256
    mask_token_id: int = 257
    bos_token_id: int = 258
    eos_token_id: int = 259
    padding_side: str = "right"

    @property
    def vocab_size(self) -> int:
        return 260

    def __len__(self) -> int:
        return 260

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.mask_token_id, self.bos_token_id, self.eos_token_id]

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return list(text)

    def decode(self, ids, *, mask_char: str = "\u2588") -> str:
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.mask_token_id:
                out.append(mask_char)
            elif 0 <= i < 256:
                out.append(chr(i) if 32 <= i < 127 or i in (9, 10) else "\u00b7")
            # specials other than the mask are dropped
        return "".join(out)


def stdlib_files(max_bytes: int | None = None) -> list[str]:
    """The standard library's .py files (tests and site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "tests",
                                                             "idle_test", "__pycache__", "lib2to3"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(os.path.join(dirpath, f))
    files.sort(key=lambda p: os.path.relpath(p, root))
    if max_bytes is not None:
        out, total = [], 0
        for f in files:
            if total >= max_bytes:
                break
            out.append(f)
            total += os.path.getsize(f)
        files = out
    return files


def _is_validation(path: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(os.path.basename(path).encode()).hexdigest()[:8], 16)
    return (h % 10000) < val_fraction * 10000


def stdlib_corpus(split: str = "train", *, val_fraction: float = 0.05, max_bytes: int | None = None) -> bytes:
    """The stdlib source as one byte string; the split is by file name hash (stable)."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split: expected 'train', 'validation' or 'all', got {split!r}")
    chunks = []
    for f in stdlib_files(max_bytes):
        if split != "all" and _is_validation(f, val_fraction) != (split == "validation"):
            continue
        with open(f, "rb") as fh:
            chunks.append(fh.read())
    return b"\n".join(chunks)


def text_lines(corpus: bytes, *, min_len: int = 24, max_len: int = 96) -> list[bytes]:
    """Non-trivial lines of a corpus (stripped), for displays."""
    out = []
    for line in corpus.split(b"\n"):
        s = line.strip()
        if min_len <= len(s) <= max_len and not s.startswith(b"#"):
            out.append(s)
    return out


def byte_windows(corpus: bytes, n: int, length: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """n random windows of `length` bytes as an int64 tensor [n, length]."""
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    if data.numel() <= length:
        raise ValueError(f"corpus: {data.numel()} bytes is too short for windows of {length}")
    starts = torch.randint(0, data.numel() - length, (n,), generator=generator)
    idx = starts[:, None] + torch.arange(length)[None, :]
    return data[idx].long()
