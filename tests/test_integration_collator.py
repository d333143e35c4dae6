"""pk.MLMCollator as a transformers user expects it: the same padding, shapes and eligible
positions as transformers' DataCollatorForLanguageModeling on a real (locally built) fast
tokenizer, the same rates over many draws, whole words from the tokenizer's offset_mapping or
word_ids, per-worker seeds in a DataLoader, return_tensors "np", and the examples' other keys
kept. Tests that need transformers skip alone where it is missing."""
import math
import multiprocessing

import numpy as np
import pytest
import torch

import pretrain_kernels as pk
import pretrain_kernels.collator

WORDS = ("the cat sat on mat dog ran far away bird sang loud song tree grew tall green leaf fell down "
         "river flowed past stone bridge old man walked slowly home").split()
SUFFIXES = ("s", "ing", "ed", "er", "ly")
TEXTS = ["the cats sat on the mat", "dogs ran far away, singing loudly", "a bird sang",
         "the old man walked slowly home past the stone bridge.", "trees grew tall; green leaves fell down",
         "river", "the river flowed past the stone bridge and the birds sang a loud song"]


def _tokenizer(padding_side="right"):
    """A WordPiece PreTrainedTokenizerFast built from a vocabulary in this file (no download)."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", ";"] + WORDS
    vocab += ["##" + s for s in SUFFIXES] + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    t = tokenizers.Tokenizer(tokenizers.models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    t.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    t.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side=padding_side)


def _rows(enc):
    """A batch encoding -> the list of per-example dicts a datasets.Dataset hands the collator."""
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(enc["input_ids"]))]


def _hf(tok, **kw):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tok, **kw)


def _binomial_ok(k, n, p, z=5.0):
    """k successes of n draws is within z standard deviations of n * p."""
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# ---- padding, shapes, labels: identical to transformers where nothing is drawn ----------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_padding_matches_transformers(padding_side, return_tensors, pad_to_multiple_of):
    tok = _tokenizer(padding_side)
    examples = _rows(tok(TEXTS, return_special_tokens_mask=True, return_token_type_ids=True))
    kw = dict(mlm_probability=0.0, pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors)
    ours = pk.MLMCollator(tok, **kw)(examples)
    theirs = _hf(tok, **kw)(examples)
    assert set(ours) == set(theirs) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for k in theirs:
        assert type(ours[k]) is type(theirs[k])
        assert tuple(ours[k].shape) == tuple(theirs[k].shape), k
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)
    # causal LM mode and plain lists of ids
    lists = [e["input_ids"] for e in examples]
    for mlm in (False, True):
        kw2 = dict(kw, mlm=mlm)
        a, b = pk.MLMCollator(tok, **kw2)(lists), _hf(tok, **kw2)(lists)
        for k in b:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{k} mlm={mlm}")


def test_masked_positions_and_rates_match_transformers():
    """Over many draws: the positions either collator may mask are the same (every token that is
    neither special nor padding), specials are never masked, the masking rate and the 80/10/10
    split agree with the rates both document."""
    tok = _tokenizer()
    examples = _rows(tok(TEXTS, return_special_tokens_mask=True))
    base = _hf(tok, mlm_probability=0.0)(examples)["input_ids"]
    specials = torch.isin(base, torch.tensor(tok.all_special_ids))
    draws = 400
    for name, coll in (("pk", pk.MLMCollator(tok, seed=1)), ("transformers", _hf(tok, seed=1))):
        ever = torch.zeros_like(base, dtype=torch.bool)
        n_sel = n_mask = n_keep = 0
        for _ in range(draws):
            b = coll(examples)
            sel = b["labels"] != -100
            assert not (sel & specials).any(), f"{name}: a special or padding token was masked"
            assert torch.equal(b["labels"][sel], base[sel]), name
            assert torch.equal(b["input_ids"][~sel], base[~sel]), name
            ever |= sel
            n_sel += int(sel.sum())
            n_mask += int((b["input_ids"][sel] == tok.mask_token_id).sum())
            n_keep += int((b["input_ids"][sel] == base[sel]).sum())
        assert torch.equal(ever, ~specials), f"{name}: the maskable positions differ"
        n_eligible = int((~specials).sum()) * draws
        assert _binomial_ok(n_sel, n_eligible, 0.15), (name, n_sel / n_eligible)
        assert _binomial_ok(n_mask, n_sel, 0.8), (name, n_mask / n_sel)
        # kept = the 10% left alone + random draws that hit the original id (1 / len(tok) of them)
        assert _binomial_ok(n_keep, n_sel, 0.1 + 0.1 / len(tok)), (name, n_keep / n_sel)


# ---- whole words -----------------------------------------------------------------------------


def _hf_word_ids(batch_offsets, batch_special):
    from transformers import DataCollatorForLanguageModeling

    word_ids, _ = DataCollatorForLanguageModeling._calc_word_ids_and_prob_mask(
        np.asarray(batch_offsets), np.asarray(batch_special))
    return torch.as_tensor(word_ids)


def _check_whole_words(word_ids, batches, p, name):
    """Every word is masked as a whole or not at all, distinct words are drawn independently
    (each pair of neighbouring words is split in some draw), and words are masked at rate p."""
    sels = torch.stack([b["labels"] != -100 for b in batches])      # [draws, B, L]
    valid = word_ids >= 0
    assert not (sels & ~valid).any(), f"{name}: a special or padding token was masked"
    n_words = n_masked = 0
    for i in range(word_ids.shape[0]):
        ids = word_ids[i][valid[i]].unique()
        for w in ids.tolist():
            cols = (word_ids[i] == w).nonzero().flatten()
            s = sels[:, i, cols]
            assert (s.all(1) | ~s.any(1)).all(), f"{name}: word {w} of row {i} was masked in part"
            n_words += s.shape[0]
            n_masked += int(s[:, 0].sum())
        for w in ids[:-1].tolist():
            a = sels[:, i, (word_ids[i] == w).nonzero()[0, 0]]
            b = sels[:, i, (word_ids[i] == w + 1).nonzero()[0, 0]]
            assert (a != b).any(), f"{name}: words {w} and {w + 1} of row {i} are always masked together"
    assert _binomial_ok(n_masked, n_words, p), (name, n_masked / n_words)


def test_whole_word_from_offset_mapping_matches_transformers():
    """transformers 5 reads word boundaries from offset_mapping (examples padded at tokenization,
    which its collator needs); pk.MLMCollator reads the same field and forms the same words."""
    tok = _tokenizer()
    enc = tok(TEXTS, return_special_tokens_mask=True, return_offsets_mapping=True, padding="max_length",
              max_length=24, truncation=True)
    examples = _rows(enc)
    word_ids = _hf_word_ids(enc["offset_mapping"], enc["special_tokens_mask"])
    assert (word_ids >= 0).any() and (torch.diff(word_ids, dim=1) == 0).any()  # multi-piece words exist
    draws, p = 300, 0.3
    with pytest.warns(UserWarning):
        theirs = _hf(tok, whole_word_mask=True, mlm_probability=p, seed=0)
    ours = pk.MLMCollator(tok, whole_word_mask=True, mlm_probability=p, mask_replace_prob=1.0,
                          random_replace_prob=0.0, seed=0)
    for name, coll in (("pk", ours), ("transformers", theirs)):
        batches = [coll(examples) for _ in range(draws)]
        assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}, name
        for b in batches[:20]:
            sel = b["labels"] != -100
            assert (b["input_ids"][sel] == tok.mask_token_id).all(), name
        _check_whole_words(word_ids, batches, p, name)


def test_whole_word_from_word_ids_unpadded():
    """BatchEncoding.word_ids() rows (None for special tokens), of different lengths: each word
    as the fast tokenizer split it is masked as a unit; pieces get their own 80/10/10 draw."""
    tok = _tokenizer()
    enc = tok(TEXTS, return_special_tokens_mask=True)
    examples = [dict(e, word_ids=enc.word_ids(i)) for i, e in enumerate(_rows(enc))]
    coll = pk.MLMCollator(tok, whole_word_mask=True, mlm_probability=0.25, seed=3)
    batches = [coll(examples) for _ in range(300)]
    assert "word_ids" not in batches[0]
    L = batches[0]["input_ids"].shape[1]
    word_ids = torch.full((len(TEXTS), L), -1)
    for i in range(len(TEXTS)):
        w = [-1 if x is None else x for x in enc.word_ids(i)]
        word_ids[i, :len(w)] = torch.tensor(w)
    _check_whole_words(word_ids, batches, 0.25, "pk")
    # pieces of one word are replaced independently: some masked word shows [MASK] next to a non-[MASK]
    mixed = False
    for b in batches:
        sel = b["labels"] != -100
        is_mask = b["input_ids"] == tok.mask_token_id
        for i in range(len(TEXTS)):
            for w in word_ids[i][word_ids[i] >= 0].unique().tolist():
                cols = (word_ids[i] == w).nonzero().flatten()
                if len(cols) > 1 and sel[i, cols].all() and is_mask[i, cols].any() and not is_mask[i, cols].all():
                    mixed = True
    assert mixed
    # the same words from offset_mapping where the tokenizer and transformers' rule agree (no punctuation)
    plain = [t for t in TEXTS if not any(c in t for c in ",.;")]
    enc2 = tok(plain, return_offsets_mapping=True)
    a = pk.MLMCollator(tok, whole_word_mask=True, mlm_probability=0.4, seed=5)(
        [dict(e, word_ids=enc2.word_ids(i)) for i, e in enumerate(_rows(tok(plain)))])
    b = pk.MLMCollator(tok, whole_word_mask=True, mlm_probability=0.4, seed=5)(_rows(enc2))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_whole_word_needs_word_boundaries():
    coll = pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50, whole_word_mask=True)
    for examples in ([[5, 6, 7]], [{"input_ids": [5, 6, 7]}]):
        with pytest.raises(ValueError, match="word_ids.*offset_mapping.*word_starts"):
            coll(examples)
    with pytest.raises(ValueError, match=r"examples\[0\]\['offset_mapping'\]"):
        coll([{"input_ids": [5, 6, 7], "offset_mapping": [(0, 1), (1, 2)]}])
    with pytest.raises(ValueError, match=r"examples\[0\]\['word_ids'\]"):
        coll([{"input_ids": [5, 6, 7], "word_ids": [None, 0]}])
    with pytest.raises(ValueError, match="whole_word_mask"):
        pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50, whole_word_mask=True, mlm=False)


# ---- seeds and DataLoader workers ------------------------------------------------------------


class _Same(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return list(range(5, 45))


def _loader(coll, workers):
    return [b["labels"] for b in torch.utils.data.DataLoader(_Same(), batch_size=2, num_workers=workers,
                                                             collate_fn=coll)]


def test_dataloader_workers_draw_their_own_streams():
    """seed=s: worker w draws from seed s + w (transformers' rule), so two workers no longer hand
    out the same masks; batches go round-robin over the workers. One process: seed s itself."""
    kw = dict(mask_token_id=4, pad_token_id=0, vocab_size=100, mlm_probability=0.3)
    coll = pk.MLMCollator(seed=7, **kw)
    coll([[5, 6, 7]])                       # used in the main process first: the workers still reseed
    got = _loader(coll, 2)
    w0, w1 = pk.MLMCollator(seed=7, **kw), pk.MLMCollator(seed=8, **kw)
    ex = [list(range(5, 45))] * 2
    want = [w0(ex)["labels"], w1(ex)["labels"], w0(ex)["labels"], w1(ex)["labels"]]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], got[1])
    single = _loader(pk.MLMCollator(seed=7, **kw), 0)
    ref = pk.MLMCollator(seed=7, **kw)
    assert all(torch.equal(a, ref(ex)["labels"]) for a in single)


def _call_in_child(coll, q):
    try:
        coll([[5, 6, 7]])
        q.put("no error")
    except ValueError as e:
        q.put(str(e))


def test_seeded_collator_in_a_plain_child_process_raises():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_call_in_child, args=(pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50,
                                                                seed=1), q))
    p.start()
    msg = q.get(timeout=60)
    p.join(timeout=60)
    assert "seed" in msg and "DataLoader" in msg


# ---- return_tensors --------------------------------------------------------------------------


def test_return_tensors_np_and_pt():
    kw = dict(mask_token_id=4, pad_token_id=0, vocab_size=100, mlm_probability=0.5, random_replace_prob=0.1)
    ex = [[5, 6, 7, 8, 9, 10], [11, 12]]
    pt = pk.MLMCollator(seed=2, **kw)(ex)
    np_ = pk.MLMCollator(seed=2, return_tensors="np", **kw)(ex)
    per_call = pk.MLMCollator(seed=2, **kw)(ex, return_tensors="np")
    for k in pt:
        for out in (np_, per_call):
            assert isinstance(out[k], np.ndarray) and out[k].dtype == np.int64
            np.testing.assert_array_equal(out[k], pt[k].numpy())
    assert isinstance(pk.MLMCollator(seed=2, return_tensors="np", **kw)(ex, return_tensors="pt")["labels"],
                      torch.Tensor)
    for bad in ("tf", "jax", None, 1):
        with pytest.raises(ValueError, match="return_tensors"):
            pk.MLMCollator(return_tensors=bad, **kw)
    with pytest.raises(ValueError, match="return_tensors"):
        pk.MLMCollator(**kw)(ex, return_tensors="tf")


# ---- the examples' other keys ------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_extra_keys_are_kept(padding_side, return_tensors):
    ex = [{"input_ids": [5, 6, 7], "weights": [0.5, 1.0, 2.0], "label": 1, "pair": [3, 4], "id": "a",
           "tags": ["x"]},
          {"input_ids": [8], "weights": [3.0], "label": 0, "pair": [5, 6], "id": "b", "tags": ["y", "z"]}]
    out = pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50, padding_side=padding_side,
                         return_tensors=return_tensors, seed=0)(ex)
    assert list(out) == ["input_ids", "attention_mask", "weights", "label", "pair", "id", "tags", "labels"]
    weights = [[0.5, 1.0, 2.0], [3.0, 0.0, 0.0]] if padding_side == "right" else [[0.5, 1.0, 2.0], [0.0, 0.0, 3.0]]
    np.testing.assert_array_equal(np.asarray(out["weights"]), np.array(weights, dtype=np.float32))
    assert np.asarray(out["weights"]).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(out["label"]), [1, 0])
    np.testing.assert_array_equal(np.asarray(out["pair"]), [[3, 4], [5, 6]])
    assert out["id"] == ["a", "b"] and out["tags"] == [["x"], ["y", "z"]]
    attn = [[1, 1, 1], [1, 0, 0]] if padding_side == "right" else [[1, 1, 1], [0, 0, 1]]
    np.testing.assert_array_equal(np.asarray(out["attention_mask"]), attn)
    # per-token fields of tensors and arrays, an empty example, and a key examples[0] lacks
    ex2 = [{"input_ids": torch.tensor([5, 6]), "pos": np.array([0, 1])}, {"input_ids": [], "pos": []}]
    out2 = pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50, mlm=False)(ex2)
    assert out2["pos"].dtype == torch.int64 and out2["pos"].tolist() == [[0, 1], [0, 0]]
    with pytest.raises(ValueError, match=r"examples\[1\]: has 'extra'"):
        pk.MLMCollator(mask_token_id=4, pad_token_id=0, vocab_size=50)([{"input_ids": [5]},
                                                                         {"input_ids": [6], "extra": 1}])


def test_extra_keys_against_a_tokenizer_batch():
    """A tokenizer's rows plus a per-example label and a per-token float field, as a user's
    datasets.map would produce; the known fields match transformers' padding exactly."""
    tok = _tokenizer()
    examples = _rows(tok(TEXTS, return_special_tokens_mask=True))
    for i, e in enumerate(examples):
        e["label"] = i % 3
        e["weight"] = [1.0] * len(e["input_ids"])
    out = pk.MLMCollator(tok, mlm_probability=0.0)(examples)
    plain = _hf(tok, mlm_probability=0.0)([{k: e[k] for k in ("input_ids", "attention_mask",
                                                                "special_tokens_mask")} for e in examples])
    for k in plain:
        assert torch.equal(out[k], plain[k]), k
    assert out["label"].tolist() == [i % 3 for i in range(len(TEXTS))]
    assert torch.equal(out["weight"], out["attention_mask"].float())


def test_old_import_paths():
    from pretrain_kernels.integrations.collator import MLMCollator
    from pretrain_kernels.integrations.logits import TopKTopPLogitsWarper

    assert pretrain_kernels.collator.MLMCollator is MLMCollator is pk.MLMCollator
    assert pk.TopKTopPLogitsWarper is TopKTopPLogitsWarper
