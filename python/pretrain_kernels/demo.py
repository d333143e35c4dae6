"""The main job of `make demo`: the fused masking op on real text (the Python standard
library's source, as bytes). Shows masked lines with their labels and the measured
mask / replace / random / keep rates on a large batch, with timings."""
from __future__ import annotations

import argparse
import time

import torch

import pretrain_kernels as pk
from pretrain_kernels.train.data import ByteTokenizer, byte_windows, stdlib_corpus, text_lines


def _show(tok: ByteTokenizer, title: str, ids, masked, labels) -> None:
    print(f"\n{title}")
    for row in range(ids.shape[0]):
        keep = ids[row] < 256
        orig = tok.decode(ids[row][keep])
        shown = tok.decode(masked[row][keep])
        lab = "".join(tok.decode([int(x)]) if int(x) != -100 else " " for x in labels[row][keep])
        print(f"  text   | {orig}")
        print(f"  input  | {shown}")
        print(f"  labels | {lab}")


def _torch_composite(ids, special, mask_id, vocab, p=0.15):
    """What a user writes without the fused op (transformers-style, several passes)."""
    probs = torch.full(ids.shape, p)
    probs.masked_fill_(torch.isin(ids, special), 0.0)
    sel = torch.bernoulli(probs).bool()
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & sel
    out = ids.masked_fill(replaced, mask_id)
    rnd = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & sel & ~replaced
    out = torch.where(rnd, torch.randint(vocab, ids.shape), out)
    return out, labels


def _time(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)

    info = pk.build_info()
    print(f"pretrain-kernels {pk.__version__}: torch {info['torch_runtime_version']}, CUDA kernels "
          f"{'compiled for sm ' + info['cuda_archs'] if info['with_cuda'] else 'not built'}, "
          f"GPU {'present' if torch.cuda.is_available() else 'absent'}")
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    corpus = stdlib_corpus("train")
    print(f"corpus: Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library source, "
          f"{len(corpus) / 1e6:.1f} MB of bytes (read in {time.perf_counter() - t0:.1f}s)")

    g = torch.Generator().manual_seed(args.seed)
    lines = text_lines(corpus)
    pick = torch.randint(0, len(lines), (args.lines,), generator=g).tolist()
    examples = [[tok.bos_token_id] + list(lines[i]) + [tok.eos_token_id] for i in pick]

    coll = pk.MLMCollator(tok, mlm_probability=0.15, seed=args.seed)
    batch = coll(examples)
    ids = coll._pad(examples, tok.pad_token_id, batch["input_ids"].shape[1])
    _show(tok, "pk.MLMCollator (mlm_probability=0.15, 80% mask / 10% random / 10% keep; "
               "\u2588 = [MASK]):", ids, batch["input_ids"], batch["labels"])

    # Whole-word masking: a word starts after a space or punctuation.
    ws = torch.ones_like(ids, dtype=torch.bool)
    prev = ids[:, :-1]
    cur = ids[:, 1:]
    is_word = lambda t: ((t >= 48) & (t <= 57)) | ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122)) | (t == 95)
    ws[:, 1:] = ~(is_word(prev) & is_word(cur))
    m, lab = pk.mlm_mask(ids, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                         special_token_ids=tok.all_special_ids, attention_mask=batch["attention_mask"],
                         word_starts=ws, mask_prob=0.25, exact_count=True, seed=args.seed)
    _show(tok, "pk.mlm_mask whole words, exact count (25% of the words):", ids, m, lab)
    m, lab = pk.span_mask(ids, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                          special_token_ids=tok.all_special_ids, attention_mask=batch["attention_mask"],
                          mask_prob=0.2, seed=args.seed)
    _show(tok, "pk.span_mask (SpanBERT spans, 20% of the bytes):", ids, m, lab)

    # Rates on a large batch.
    B, L = args.batch, args.seq_len
    big = byte_windows(corpus, B, L, generator=g)
    special = torch.tensor(tok.all_special_ids)
    out, labels = pk.mlm_mask(big, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                              special_token_ids=tok.all_special_ids, seed=args.seed)
    sel = labels != -100
    n_sel = int(sel.sum())
    n_mask = int((out[sel] == tok.mask_token_id).sum())
    n_keep = int((out[sel] == big[sel]).sum())
    n_rand = n_sel - n_mask - n_keep
    print(f"\nmeasured on {B} x {L} bytes ({B * L:,} tokens), mask_prob 0.15:")
    print(f"  selected {n_sel / big.numel():7.4f}   (expected 0.1500)")
    print(f"  -> mask  {n_mask / n_sel:7.4f}   (expected 0.8000)")
    print(f"  -> random{n_rand / n_sel:7.4f}   (expected {0.1 * (1 - 1 / 256):.4f}: a random byte can equal the "
          f"original)")
    print(f"  -> keep  {n_keep / n_sel:7.4f}   (expected {0.1 + 0.1 / 256:.4f})")

    fused = _time(lambda: pk.mlm_mask(big, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                                      special_token_ids=tok.all_special_ids))
    comp = _time(lambda: _torch_composite(big, special, tok.mask_token_id, len(tok)))
    print(f"\ntime per batch on {torch.get_num_threads()} CPU threads: pk.mlm_mask {fused * 1e3:.2f} ms, "
          f"torch composite {comp * 1e3:.2f} ms ({comp / fused:.1f}x)")
    if torch.cuda.is_available() and info["with_cuda"]:
        gb = big.cuda()
        pk.mlm_mask(gb, mask_token_id=tok.mask_token_id, vocab_size=len(tok), seed=1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            pk.mlm_mask(gb, mask_token_id=tok.mask_token_id, vocab_size=len(tok), seed=1)
        torch.cuda.synchronize()
        print(f"on {torch.cuda.get_device_name()}: {(time.perf_counter() - t) / 20 * 1e6:.1f} us per batch")


if __name__ == "__main__":
    main()
