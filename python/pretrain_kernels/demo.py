"""The main job of `make demo`.

Part 1, the fused masking op on real text (the Python standard library's source, as bytes):
masked lines with their labels and the measured mask / replace / random / keep rates on a
large batch, with timings.

Part 2, the three model families trained briefly on the embedded data with the one training
loop (about 10 minutes on 2 CPU cores in all): a BERT-style MLM (masked-byte accuracy beside
the most-frequent-byte baseline, and a line with its masked bytes filled in), a GPT
(validation nats per byte and a text sample through the KV cache and pk.sample, with the
sampling knobs it used), the same encoder as the MLM trained as a masked diffusion LM (its
validation bound in nats per byte beside the GPT's, and a function body filled in by
iterative unmasking with pk.unmask_step), and a class-conditional flow-matching U-Net on the
8x8 digits (samples in 4 fused solver steps judged by a digit classifier, and a PNG grid with
one row per class)."""
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="runs/demo", help="folder for the run folders and the image grid")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (0.02: a smoke run)")
    ap.add_argument("--no-train", action="store_true", help="only the masking part")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    masking_demo(args)
    if not args.no_train:
        training_demo(args)


def masking_demo(args) -> None:

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


# ---- part 2: training ------------------------------------------------------------------------

# Steps per family (8.0 minutes on 2 idle CPU cores in all, evaluations included).
DEMO_STEPS = {"mlm": 300, "gpt": 300, "mdlm": 300, "flow": 1200}
# The GPT sample: a byte model this short-trained falls into loops (a line of "=====") at plain
# temperature sampling; nucleus sampling plus a frequency penalty (each repeat of a byte lowers
# its logit) keeps it on Python.
GPT_SAMPLE_TOKENS = 160
GPT_SAMPLING = dict(temperature=0.7, top_p=0.9, frequency_penalty=0.03)
# The MDLM: windows of MDLM_SEQ_LEN bytes, and a function to fill in, one byte per step in a
# random order (MDLM's own sampler; after a run this short, revealing the most confident first
# fills the blanks with spaces, the surest byte), with a frequency penalty against runs.
MDLM_SEQ_LEN = 128
MDLM_INFILL = "    def __init__(self, ___):\n        self.___ = ___\n\n    def __repr__(self):\n        return ___\n"
MDLM_INFILL_LENGTH = 8
MDLM_SAMPLING = dict(strategy="random", temperature=0.5, frequency_penalty=0.03)


def _train(task, steps, batch, lr, out, args, dtype="float32"):
    from pretrain_kernels.train.loop import TrainConfig, Trainer

    cfg = TrainConfig(steps=max(2, int(steps * args.scale)), batch_size=batch, lr=lr, dtype=dtype,
                      warmup=max(1, min(100, int(steps * args.scale) // 10)), eval_every=0, log_every=10,
                      seed=args.seed, progress=not args.no_progress)
    t = time.perf_counter()
    hist = Trainer(task, cfg, out).train()
    return hist[-1]["eval"] if "eval" in hist[-1] else [h for h in hist if "eval" in h][-1]["eval"], \
        time.perf_counter() - t, cfg.steps


def training_demo(args) -> None:
    import os

    from pretrain_kernels.models import BertConfig, GPTConfig, pack
    from pretrain_kernels.train.cli import save_grid
    from pretrain_kernels.train.tasks import SIZES, DenoisingTask, GPTTask, MDLMTask, MLMTask, sample_images

    tok = ByteTokenizer()
    os.makedirs(args.out, exist_ok=True)
    print(f"\n==== training the three families (and a masked diffusion LM) on {torch.get_num_threads()} CPU threads "
          f"(run folders in {args.out}/) ====")

    # -- MLM --
    torch.manual_seed(args.seed)
    mlm = MLMTask(BertConfig(**SIZES["mlm"]["small"]), seq_len=128, min_len=32, eval_windows=128)
    print(f"\nMLM: BertMLM {mlm.model.num_params() / 1e6:.2f}M parameters, packed varlen batches masked by "
          f"pk.mlm_mask")
    m, secs, steps = _train(mlm, DEMO_STEPS["mlm"], 24, 2e-3, os.path.join(args.out, "mlm"), args, "bfloat16")
    print(f"MLM after {steps} steps ({secs:.0f}s): masked-byte accuracy {m['masked_accuracy']:.3f} "
          f"(most-frequent-byte baseline {m['baseline_accuracy']:.3f}), loss {m['val_loss']:.3f} nats")
    val = mlm.val
    row = 0
    n = int(val["attention_mask"][row].sum())
    mlm.model.eval()
    with torch.no_grad():
        ids, cu, pos, ml, labels = pack(val["input_ids"][row:row + 1, :n], val["attention_mask"][row:row + 1, :n],
                                        val["labels"][row:row + 1, :n])
        logits, _, _ = mlm.model(ids, cu, pos, ml, labels)
    filled = ids.clone()
    filled[labels != -100] = logits.argmax(-1)
    truth = ids.clone()
    truth[labels != -100] = labels[labels != -100]
    print("  input     | " + tok.decode(ids[:100]).replace("\n", "\u21b5"))
    print("  predicted | " + tok.decode(filled[:100]).replace("\n", "\u21b5"))
    print("  truth     | " + tok.decode(truth[:100]).replace("\n", "\u21b5"))

    # -- GPT --
    torch.manual_seed(args.seed)
    gpt = GPTTask(GPTConfig(**SIZES["gpt"]["small"]), seq_len=256, eval_windows=128)
    print(f"\nGPT: {gpt.model.num_params() / 1e6:.2f}M parameters, causal pk.flash_attention")
    m, secs, steps = _train(gpt, DEMO_STEPS["gpt"], 16, 2e-3, os.path.join(args.out, "gpt"), args, "bfloat16")
    print(f"GPT after {steps} steps ({secs:.0f}s): validation {m['val_loss']:.3f} nats/byte "
          f"({m['val_bits_per_byte']:.2f} bits; the corpus' unigram entropy is 3.24 nats)")
    gpt.model.eval()
    prompt = "def __init__(self"
    t = time.perf_counter()
    out = gpt.model.generate([tok.encode(prompt)], GPT_SAMPLE_TOKENS, seed=args.seed, **GPT_SAMPLING)[0]
    dt = time.perf_counter() - t
    knobs = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in GPT_SAMPLING.items())
    print(f"sample (pk.sample: {knobs}; KV cache, {len(out) / dt:.0f} tokens/s):")
    print("  | " + (prompt + bytes(x for x in out if x < 256).decode("utf-8", "replace")).replace("\n", "\n  | "))
    gpt_nats, gpt_steps = m["val_loss"], steps

    # -- masked diffusion LM --
    torch.manual_seed(args.seed)
    mdlm = MDLMTask(BertConfig(**SIZES["mdlm"]["small"]), seq_len=MDLM_SEQ_LEN, eval_windows=128)
    print(f"\nMDLM: the MLM's encoder ({mdlm.model.num_params() / 1e6:.2f}M parameters) as a masked diffusion LM: "
          f"per-row rates t through pk.mlm_mask, loss the 1/t-weighted bound")
    m, secs, steps = _train(mdlm, DEMO_STEPS["mdlm"], 16, 2e-3, os.path.join(args.out, "mdlm"), args, "bfloat16")
    print(f"MDLM after {steps} steps of 16 x {MDLM_SEQ_LEN} bytes ({secs:.0f}s): validation bound "
          f"{m['val_loss']:.3f} nats/byte on the GPT's validation split (an upper bound on its exact "
          f"nats/byte; the GPT above: {gpt_nats:.3f} exact, {gpt_steps} steps of 16 x 256)")
    from pretrain_kernels.train.tasks import mdlm_generate, mdlm_rows

    mdlm.model.eval()
    rows, _ = mdlm_rows(tok, infills=[MDLM_INFILL], infill_length=MDLM_INFILL_LENGTH)
    t = time.perf_counter()
    filled = mdlm_generate(mdlm, rows, seed=args.seed, **MDLM_SAMPLING)[0]
    dt = time.perf_counter() - t
    n_masked = sum(r == tok.mask_token_id for r in rows[0])
    knobs = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in MDLM_SAMPLING.items())
    print(f"infilling: each ___ is {MDLM_INFILL_LENGTH} masked bytes, filled by pk.unmask_step in {n_masked} steps "
          f"({knobs}; {dt:.1f}s):")
    print("  template | " + MDLM_INFILL.replace("\n", "\n           | ").rstrip("| ").rstrip())
    text = tok.decode_bytes(filled).decode("utf-8", "replace")
    print("  filled   | " + text.replace("\n", "\n           | ").rstrip("| ").rstrip())

    # -- flow matching on digits --
    torch.manual_seed(args.seed)
    flow = DenoisingTask("flow", arch="unet", model_cfg=SIZES["unet"]["small"], class_cond=True, eval_samples=500)
    print(f"\nFlow matching: class-conditional U-Net {flow.model.num_params() / 1e6:.2f}M parameters on the 8x8 digits "
          f"(pk.add_noise target='flow', pk.diffusion_loss)")
    m, secs, steps = _train(flow, DEMO_STEPS["flow"], 64, 1e-3, os.path.join(args.out, "flow"), args)
    print(f"flow after {steps} steps ({secs:.0f}s, samples judged by a CNN with {m['judge_test_accuracy']:.3f} "
          f"held-out accuracy):")
    for k in ("flow4", "flow50"):
        print(f"  {k[4:]:>2} Euler steps: conditional {m[k + '_cond_class_accuracy']:.3f} classified as their class; "
              f"unconditional confidence {m[k + '_uncond_confidence']:.3f}, class entropy "
              f"{m[k + '_uncond_class_entropy']:.3f} log 10, Frechet distance {m[k + '_uncond_fd']:.1f} "
              f"(real vs real {m['reference_fd']:.1f})")
    x = sample_images(flow, flow.model.eval(), 100, sampler="flow", steps=4, labels=torch.arange(100) // 10,
                      seed=args.seed)
    path = os.path.join(args.out, "digits.png")
    save_grid(x, path, nrow=10, scale=4)
    print(f"wrote {path}: 10 samples per class (rows 0..9), 4 pk.flow_match_step steps each")


if __name__ == "__main__":
    main()
