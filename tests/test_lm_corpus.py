"""Corpora (by-document splits), tokenizers (byte / byte-level BPE), chunking and bits/byte."""
import math

import numpy as np
import pytest

from research.data.corpus import (CORPORA, chunk_tokens, corpus_documents, corpus_stats,
                                  load_corpus, split_names)
from research.data.packing import pack_sequences
from research.lm.tokenizer import (BPETokenizer, ByteTokenizer, Tokenizer, bits_per_byte,
                                   count_bytes, get_tokenizer, tokens_per_byte)

UNICODE = ("naïve café — Σ∫ 日本語のテキスト 🙂👩‍👩‍👧 🇫🇷 \u200b\r\n\tend  "
           "literal <|bos|> and <|eos|> stay text")


@pytest.fixture(scope="module")
def pydoc_split():
    return load_corpus("pydoc", split="train"), load_corpus("pydoc", split="val")


@pytest.fixture(scope="module")
def bpe(pydoc_split):
    train, _ = pydoc_split
    return {v: BPETokenizer.train(train, v) for v in (512, 1024)}


# ---------------------------------------------------------------- corpora and splits

@pytest.mark.parametrize("name", CORPORA)
def test_split_deterministic_disjoint_covering(name):
    train, val = split_names(name, 0.1, 0)
    assert (train, val) == split_names(name, 0.1, 0)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(corpus_documents(name))
    assert train == sorted(train) and val == sorted(val)
    docs = corpus_documents(name)
    assert load_corpus(name, split="val") == [docs[k] for k in val]
    assert load_corpus(name, split="train") == [docs[k] for k in train]
    assert load_corpus(name, split="all") == [docs[k] for k in sorted(docs)]


def test_split_changes_with_seed_and_fraction():
    base = split_names("pydoc", 0.1, 0)[1]
    assert any(split_names("pydoc", 0.1, s)[1] != base for s in (1, 2, 3))
    n = len(corpus_documents("pydoc"))
    assert len(split_names("pydoc", 0.3, 0)[1]) == round(0.3 * n)
    # tiny and huge fractions still leave one document on each side
    for frac in (1e-6, 1 - 1e-6):
        tr, va = split_names("sklearn", frac, 0)
        assert len(tr) >= 1 and len(va) >= 1


def test_corpus_counts():
    pydoc = corpus_documents("pydoc")
    assert len(pydoc) > 50 and sum(map(len, pydoc.values())) > 300_000
    sk = corpus_documents("sklearn")
    assert len(sk) >= 5 and "iris" in sk and sum(map(len, sk.values())) > 10_000
    for name in CORPORA:
        st = corpus_stats(name)
        for key in ("documents", "characters", "bytes"):
            assert st["train"][key] + st["val"][key] == st["all"][key]
        assert st["all"]["bytes"] >= st["all"]["characters"]
        assert st["val"]["documents"] == len(split_names(name, 0.1, 0)[1])


def test_corpus_bad_inputs():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikipedia", split="train")
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("pydoc", split="test")
    for frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            load_corpus("pydoc", split="train", val_fraction=frac)
    with pytest.raises(TypeError, match="val_fraction"):
        split_names("pydoc", "0.1", 0)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_corpus():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 258
    for doc in load_corpus("pydoc", split="all"):
        ids = tok.encode(doc)
        assert ids.dtype == np.int32 and ids.max() < 256
        assert tok.decode(ids) == doc
    ids = tok.encode(UNICODE, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and len(ids) == len(UNICODE.encode()) + 2
    assert tok.decode(ids) == UNICODE
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_byte_tokenizer_decodes_arbitrary_ids():
    tok = ByteTokenizer()
    assert tok.decode([256, 104, 105, 257, -3, 10_000]) == "hi"
    assert tok.decode(tok.encode("日")[:2]) == "\ufffd"  # truncated UTF-8 does not crash


def test_bpe_round_trips_unseen_validation_text(bpe, pydoc_split):
    _, val = pydoc_split
    for tok in bpe.values():
        assert isinstance(tok, Tokenizer)
        for doc in val:
            ids = tok.encode(doc)
            assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < tok.vocab_size
            assert tok.decode(ids) == doc
        assert tok.decode(tok.encode(UNICODE)) == UNICODE
        # specials only when asked for; literal special strings encode as plain text
        assert tok.bos_id not in tok.encode(UNICODE) and tok.eos_id not in tok.encode(UNICODE)
        framed = tok.encode(UNICODE, bos=True, eos=True)
        assert framed[0] == tok.bos_id and framed[-1] == tok.eos_id
        assert tok.decode(framed) == UNICODE
        assert tok.decode([-1, tok.bos_id, tok.vocab_size + 5]) == ""


def test_bpe_compresses(bpe, pydoc_split):
    # measured on this split: 0.463 (vocab 512), 0.352 (1024); bytes alone = 1.0
    _, val = pydoc_split
    assert bpe[512].vocab_size == 512 and bpe[1024].vocab_size == 1024
    tpb = {v: tokens_per_byte(tok, val) for v, tok in bpe.items()}
    assert tpb[512] < 0.55 and tpb[1024] < 0.42 and tpb[1024] < tpb[512]
    assert tokens_per_byte(ByteTokenizer(), val) == 1.0


def test_bpe_save_load_and_determinism(bpe, pydoc_split, tmp_path):
    train, val = pydoc_split
    tok = bpe[512]
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (tok.vocab_size, tok.bos_id,
                                                                 tok.eos_id)
    again = BPETokenizer.train(train, 512)
    for doc in val + [UNICODE]:
        assert np.array_equal(loaded.encode(doc), tok.encode(doc))
        assert np.array_equal(again.encode(doc), tok.encode(doc))


def test_get_tokenizer_and_bad_inputs(pydoc_split):
    train, _ = pydoc_split
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    small = get_tokenizer("bpe", train_texts=train[:5], vocab_size=300)
    assert isinstance(small, BPETokenizer) and small.vocab_size <= 300
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs train_texts and vocab_size"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size 258"):
        get_tokenizer("byte", vocab_size=1000)
    with pytest.raises(ValueError, match=">= 258"):
        BPETokenizer.train(train, 100)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        BPETokenizer.train([], 512)
    with pytest.raises(TypeError, match="expects a str"):
        ByteTokenizer().encode(b"bytes")
    with pytest.raises(ValueError, match="1-D"):
        ByteTokenizer().decode(np.zeros((2, 2), np.int32))


# ---------------------------------------------------------------- chunking and bits/byte

@pytest.mark.parametrize("max_len", [3, 4, 7, 64])
def test_chunk_tokens(max_len):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 258, n).astype(np.int32) for n in (0, 1, 2, 3, 5, 8, 9, 65, 129, 200)]
    pieces = chunk_tokens(docs, max_len)
    assert all(2 <= len(p) <= max_len and p.dtype == np.int32 for p in pieces)
    # pieces come document by document; rebuild each document >= 2 tokens long
    it = iter(pieces)
    for doc in docs:
        if len(doc) < 2:
            continue
        got = []
        while sum(map(len, got)) < len(doc):
            got.append(next(it))
        np.testing.assert_array_equal(np.concatenate(got), doc)
    assert next(it, None) is None
    batch = pack_sequences(pieces, max_len)
    assert int((batch.segment_ids != 0).sum()) == sum(map(len, pieces))


def test_chunk_tokens_real_corpus_and_bad_inputs(bpe):
    docs = [bpe[512].encode(d) for d in load_corpus("sklearn", split="all")]
    pieces = chunk_tokens(docs, 128)
    assert sum(map(len, pieces)) == sum(map(len, docs))
    with pytest.raises(ValueError, match="max_len must be >= 3"):
        chunk_tokens(docs, 2)
    with pytest.raises(ValueError, match="1-D"):
        chunk_tokens([np.zeros((2, 3), np.int32)], 8)
    with pytest.raises(TypeError, match="integer token ids"):
        chunk_tokens([np.zeros(4, np.float32)], 8)


def test_bits_per_byte_closed_forms():
    n = 1000
    assert bits_per_byte(n * math.log(256), n) == pytest.approx(8.0, rel=1e-12)
    # byte model uniform over 258 tokens: log2(258) bits per byte
    assert bits_per_byte(n * math.log(258), n) == pytest.approx(math.log2(258), rel=1e-12)
    # a BPE model at 0.5 tokens/byte with uniform 1024-way predictions: 0.5 * 10 bits/byte
    assert bits_per_byte(500 * math.log(1024), 1000) == pytest.approx(5.0, rel=1e-12)
    assert bits_per_byte(np.float32(0.0), 10) == 0.0
    assert count_bytes(["é", "ab"]) == 4
    with pytest.raises(ValueError, match="total_bytes"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="total_nll_nats"):
        bits_per_byte(float("nan"), 10)
    with pytest.raises(ValueError, match="no bytes"):
        tokens_per_byte(ByteTokenizer(), [""])
