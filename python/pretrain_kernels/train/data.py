"""Embedded data that needs no download, and the two text tokenizers.

Text: the Python standard library's own .py files (always present with Python), read as
bytes, in a fixed order, with a fixed train/validation split by file.

Tokenizers (same interface: pad/mask/bos/eos ids, vocab_size, all_special_ids, encode,
decode, decode_bytes, token_nbytes):
  ByteTokenizer  bytes 0..255 plus PAD, MASK, BOS, EOS (256..259); the default.
  BPETokenizer   byte-level BPE trained locally with the `tokenizers` library on the train
                 split of the corpus (deterministic, nothing downloaded): the specials at
                 ids 0..3, the 256 byte symbols, then the merges. Pre-tokenization splits
                 after every newline and then as GPT-2 does (ByteLevel regex), so a corpus
                 cut into chunks at line ends encodes to exactly the ids of the whole text;
                 encode_corpus() encodes a corpus once per process that way (batch encoding,
                 cached in memory and, in a run folder, in tokens.pt). Every token stands for
                 a fixed byte string, so token_nbytes turns a loss per token into a loss per
                 byte comparable with the byte model. Text that is not valid UTF-8 is read
                 with U+FFFD in place of the bad bytes (the standard library has none).
"""
from __future__ import annotations

import functools
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

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (specials dropped)."""
        return bytes(i for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) if 0 <= i < 256)

    @property
    def token_nbytes(self) -> torch.Tensor:
        """Bytes per token id, int64 [vocab_size] (1 for a byte, 0 for a special)."""
        return (torch.arange(260) < 256).long()


# ---- byte-level BPE ------------------------------------------------------------------------------

BPE_SPECIALS = ("<pad>", "<mask>", "<bos>", "<eos>")
MIN_BPE_VOCAB = 256 + len(BPE_SPECIALS)   # every byte and the specials (no merges)


def _require_tokenizers():
    """The `tokenizers` module, or an ImportError that says how to get it. Its thread pool
    follows torch's thread count unless RAYON_NUM_THREADS is set."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("--tokenizer bpe needs the 'tokenizers' package: pip install tokenizers "
                          "(or pip install 'pretrain-kernels[train]')") from e
    os.environ.setdefault("RAYON_NUM_THREADS", str(torch.get_num_threads()))
    return tokenizers


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _chunks(text: str, size: int = 1 << 16):
    """text cut into pieces of about `size` characters, each ending at a newline (or the end)."""
    i = 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        yield text[i:j]
        i = j


class BPETokenizer:
    """Byte-level BPE over a `tokenizers.Tokenizer`; build with BPETokenizer.train(corpus,
    vocab_size) or BPETokenizer.from_file(path). Tokenizer-like enough for pk.MLMCollator."""

    padding_side = "right"

    def __init__(self, tok):
        tok.encode_special_tokens = True          # "<mask>" in the text is text, not the mask id
        self._tok = tok
        ids = [tok.token_to_id(s) for s in BPE_SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer: expected the special tokens {BPE_SPECIALS}, found "
                             f"{[s for s, i in zip(BPE_SPECIALS, ids) if i is not None]}")
        self.pad_token_id, self.mask_token_id, self.bos_token_id, self.eos_token_id = ids
        self.vocab_size = tok.get_vocab_size()
        from_symbol = {c: b for b, c in enumerate(_byte_symbols())}
        self._bytes = [b""] * self.vocab_size
        for s, i in tok.get_vocab().items():
            if i not in ids:
                self._bytes[i] = bytes(from_symbol[c] for c in s)
        self._nbytes = torch.tensor([len(b) for b in self._bytes], dtype=torch.int64)
        self.sha1 = hashlib.sha1(tok.to_str().encode()).hexdigest()

    @classmethod
    def train(cls, corpus: bytes, vocab_size: int = 2048) -> "BPETokenizer":
        """Learn merges on `corpus` up to vocab_size ids (specials and the 256 bytes included;
        fewer when the corpus runs out of pairs). Deterministic for a given corpus."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"vocab_size: expected an integer >= {MIN_BPE_VOCAB} (256 bytes + "
                             f"{len(BPE_SPECIALS)} special tokens), got {vocab_size!r}")
        tk = _require_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split("\n", behavior="merged_with_previous"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS),
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        tok.train_from_iterator(_chunks(corpus.decode("utf-8", errors="replace")), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: {path!r} does not exist")
        return cls(_require_tokenizers().Tokenizer.from_file(path))

    def save(self, path: str) -> None:
        """Write the tokenizer JSON (loadable by tokenizers.Tokenizer.from_file and by
        transformers' PreTrainedTokenizerFast(tokenizer_file=...))."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._tok.to_str())
        os.replace(tmp, path)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.mask_token_id, self.bos_token_id, self.eos_token_id]

    @property
    def token_nbytes(self) -> torch.Tensor:
        """Bytes per token id, int64 [vocab_size] (0 for the specials)."""
        return self._nbytes

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (specials dropped)."""
        return b"".join(self._bytes[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)
                        if 0 <= i < self.vocab_size)

    def decode(self, ids, *, mask_char: str = "\u2588") -> str:
        """Text for display: UTF-8 (bad sequences as U+FFFD), the mask as mask_char, other
        specials dropped."""
        out, run = [], []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.mask_token_id:
                out += [self.decode_bytes(run).decode("utf-8", errors="replace"), mask_char]
                run = []
            else:
                run.append(i)
        out.append(self.decode_bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_corpus(self, corpus: bytes) -> torch.Tensor:
        """The whole corpus as one 1-D int32 id tensor, encoded in line-aligned chunks by
        tokenizers' batch encoder (identical to encoding it in one piece); cached per process."""
        key = (self.sha1, hashlib.sha1(corpus).hexdigest())
        hit = _ENCODED.get(key)
        if hit is None:
            import numpy as np

            batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)   # no offsets: faster
            encs = batch(list(_chunks(corpus.decode("utf-8", errors="replace"))), add_special_tokens=False)
            arr = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encs] or [np.zeros(0, np.int32)])
            hit = torch.from_numpy(arr)
            remember_encoding(key, hit)
        return hit


_ENCODED: dict = {}   # (tokenizer sha1, corpus sha1) -> ids


def remember_encoding(key: tuple[str, str], ids: torch.Tensor) -> None:
    if len(_ENCODED) >= 8:
        _ENCODED.pop(next(iter(_ENCODED)))
    _ENCODED[key] = ids


def save_token_cache(path: str, tok: BPETokenizer, corpora: list[bytes]) -> None:
    """Write the ids of `corpora` (as encode_corpus returns them) to `path`, for
    load_token_cache in a later process; int16 when the vocabulary allows."""
    small = tok.vocab_size <= 2**15
    data = {"tokenizer_sha1": tok.sha1, "ids": {}}
    for c in corpora:
        ids = tok.encode_corpus(c)
        data["ids"][hashlib.sha1(c).hexdigest()] = ids.to(torch.int16) if small else ids
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_token_cache(path: str, tok: BPETokenizer) -> bool:
    """Make encode_corpus() find the encodings saved in `path` (written for this tokenizer);
    False when there is no such file or it belongs to another tokenizer."""
    if not os.path.isfile(path):
        return False
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    if not isinstance(data, dict) or data.get("tokenizer_sha1") != tok.sha1:
        return False
    for corpus_sha1, ids in data["ids"].items():
        remember_encoding((tok.sha1, corpus_sha1), ids.to(torch.int32))
    return True


def make_tokenizer(kind: str, corpus: bytes | None = None, vocab_size: int | None = None):
    """"byte" -> ByteTokenizer(); "bpe" -> BPETokenizer trained on `corpus` (vocab_size
    default 2048)."""
    if kind == "byte":
        if vocab_size not in (None, 260):
            raise ValueError(f"vocab_size: the byte tokenizer has 260 ids, got {vocab_size}; use the bpe tokenizer "
                             f"for another size")
        return ByteTokenizer()
    if kind == "bpe":
        if corpus is None:
            raise ValueError("tokenizer: training a bpe tokenizer needs the training text")
        return BPETokenizer.train(corpus, 2048 if vocab_size is None else vocab_size)
    raise ValueError(f"tokenizer: expected 'byte' or 'bpe', got {kind!r}")


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


def token_windows(ids: torch.Tensor, n: int, length: int, *, generator: torch.Generator | None = None,
                  unit: str = "tokens") -> torch.Tensor:
    """n random windows of `length` consecutive entries of a 1-D id tensor, as int64 [n, length].
    On a uint8 tensor of a corpus' bytes it draws exactly what byte_windows draws."""
    if ids.numel() <= length:
        raise ValueError(f"corpus: {ids.numel()} {unit} is too short for windows of {length}")
    starts = torch.randint(0, ids.numel() - length, (n,), generator=generator)
    idx = starts[:, None] + torch.arange(length)[None, :]
    return ids[idx].long()


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
