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


# ---- user text ---------------------------------------------------------------------------------


def text_folder_files(path: str) -> list[str]:
    """Every regular, non-hidden file under `path` (recursively, sorted) that does not look
    binary (no NUL byte in its first 8 KiB). Clear errors for a missing folder or no files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data: {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"--data: {path!r} is not a folder (expected a folder of text files)")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if f.startswith(".") or not os.path.isfile(full) or os.path.getsize(full) == 0:
                continue
            with open(full, "rb") as fh:
                if b"\0" in fh.read(8192):
                    continue
            files.append(full)
    if not files:
        raise ValueError(f"--data: no non-empty text files found in {path!r}")
    return sorted(files, key=lambda p: os.path.relpath(p, path))


def folder_corpus(path: str, split: str = "train", *, val_fraction: float = 0.05) -> bytes:
    """A folder of text files as one byte string, split by file name hash like stdlib_corpus.
    With a single file (or when the hash puts every file on one side) the split is by bytes:
    the last val_fraction of the concatenation is the validation part."""
    if split not in ("train", "validation"):
        raise ValueError(f"split: expected 'train' or 'validation', got {split!r}")
    files = text_folder_files(path)
    parts = {"train": [], "validation": []}
    for f in files:
        with open(f, "rb") as fh:
            parts["validation" if _is_validation(f, val_fraction) else "train"].append(fh.read())
    if parts["train"] and parts["validation"]:
        return b"\n".join(parts[split])
    data = b"\n".join(parts["train"] + parts["validation"])
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut] if split == "train" else data[cut:]


# ---- images ------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Images scaled to [-1, 1], float32 [N, C, H, W], with optional int64 labels [N]."""

    train: torch.Tensor
    train_labels: torch.Tensor | None
    test: torch.Tensor
    test_labels: torch.Tensor | None
    num_classes: int
    name: str

    @property
    def shape(self) -> tuple:
        return tuple(self.train.shape[1:])


def _split_images(x: torch.Tensor, y: torch.Tensor | None, num_classes: int, name: str, n_test: int) -> ImageData:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData(x[tr].contiguous(), None if y is None else y[tr].contiguous(), x[te].contiguous(),
                     None if y is None else y[te].contiguous(), num_classes, name)


def digits(n_test: int = 300) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes, values 0..16), scaled to
    [-1, 1]; a fixed held-out set of n_test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return _split_images(x, y, 10, "digits", n_test)


_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_images(path: str, *, test_fraction: float = 0.1) -> ImageData:
    """User images: an .npy array [N, H, W] or [N, C, H, W] (any numeric range: scaled by its
    min and max to [-1, 1]), or a folder of image files, all the same size; when the files sit
    in sub-folders, each sub-folder is a class."""
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"--data: {path!r} does not exist")
    y, classes = None, 0
    if os.path.isfile(path):
        if not path.endswith(".npy"):
            raise ValueError(f"--data: expected a folder of images or an .npy array, got the file {path!r}")
        arr = np.load(path)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or arr.shape[0] == 0:
            raise ValueError(f"--data: expected an array [N, H, W] or [N, C, H, W] with N > 0, got shape {arr.shape}")
        x = torch.tensor(arr, dtype=torch.float32)
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / max(hi - lo, 1e-12) * 2 - 1
    else:
        from PIL import Image

        entries = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.lower().endswith(_IMAGE_EXT):
                    entries.append(os.path.join(dirpath, f))
        if not entries:
            raise ValueError(f"--data: no image files ({', '.join(_IMAGE_EXT)}) found in {path!r}")
        rel_dirs = sorted({os.path.dirname(os.path.relpath(e, path)) for e in entries})
        labelled = all(d != "" for d in rel_dirs)
        imgs = [Image.open(e) for e in entries]
        mode = "L" if all(im.mode in ("L", "1", "I", "I;16") for im in imgs) else "RGB"
        arrs = [np.asarray(im.convert(mode), dtype=np.float32) for im in imgs]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"--data: images in {path!r} have different sizes {sorted({a.shape for a in arrs})[:3]}")
        x = torch.tensor(np.stack(arrs))
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = x / 127.5 - 1
        if labelled:
            y = torch.tensor([rel_dirs.index(os.path.dirname(os.path.relpath(e, path))) for e in entries])
            classes = len(rel_dirs)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"--data: need at least 2 images, found {n} in {path!r}")
    return _split_images(x.contiguous(), y, classes, os.path.basename(path.rstrip("/")),
                         max(1, int(n * test_fraction)))
