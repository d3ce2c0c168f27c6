"""Tokenizers for the language models: bytes and byte-level BPE, behind one small protocol.

Every tokenizer has ``vocab_size``, ``bos_id`` / ``eos_id`` (int or ``None``),
``encode(text, *, bos=False, eos=False) -> int32 [n]`` and ``decode(ids) -> str``. ``encode`` never
adds special tokens unless asked, and ``decode(encode(s)) == s`` for every string ``s``
(both tokenizers work on UTF-8 bytes, so nothing is out of vocabulary). ``decode`` accepts
arbitrary ids: special and out-of-range ids are dropped and invalid UTF-8 becomes U+FFFD.

* :class:`ByteTokenizer`: ids ``0..255`` are the UTF-8 bytes, ``BOS = 256``, ``EOS = 257``
  (vocabulary 258). There is no pad token: packed rows mark padding with ``segment_ids == 0``
  (:mod:`research.data.packing`), so any id (e.g. ``0``) can be the pad value.
* :class:`BPETokenizer`: Hugging Face ``tokenizers`` byte-level BPE (GPT-2 style ByteLevel
  pre-tokenizer and decoder, no normaliser, no prefix space) trained on your texts. Ids
  ``0, 1`` are ``<|bos|>``, ``<|eos|>``; then the 256 byte symbols; then the merges. The
  literal strings ``"<|bos|>"`` in *text* are encoded as ordinary text, never as specials.

Compare models with different tokenizers in bits per byte: :func:`bits_per_byte` turns the
summed next-token NLL (nats) over a text into bits per UTF-8 byte of that text.
"""
from __future__ import annotations

import math
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "TOKENIZERS",
    "get_tokenizer",
    "bits_per_byte",
    "count_bytes",
    "tokens_per_byte",
]

TOKENIZERS = ("byte", "bpe")
BOS_TOKEN, EOS_TOKEN = "<|bos|>", "<|eos|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the LM code needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return text


def _with_specials(ids: np.ndarray, tok, bos: bool, eos: bool) -> np.ndarray:
    parts = [ids]
    if bos:
        parts.insert(0, np.array([tok.bos_id], np.int32))
    if eos:
        parts.append(np.array([tok.eos_id], np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False) if len(parts) > 1 else ids


def _as_ids(ids) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of token ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"decode expects integer token ids, got dtype {a.dtype}")
    return a.astype(np.int64)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = BOS, 257 = EOS (vocab_size 258)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """UTF-8 bytes of ``text`` as int32 ids (optionally framed by BOS / EOS)."""
        ids = np.frombuffer(_check_text(text).encode("utf-8"), np.uint8).astype(np.int32)
        return _with_specials(ids, self, bos, eos)

    def decode(self, ids) -> str:
        """Text of the byte ids in ``ids``; other ids (specials, out of range) are dropped."""
        a = _as_ids(ids)
        a = a[(a >= 0) & (a < 256)]
        return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``); build with :meth:`train` or :meth:`load`."""

    def __init__(self, hf_tokenizer):
        """Wraps a ``tokenizers.Tokenizer`` (use :meth:`train` / :meth:`load` instead)."""
        self._tok = hf_tokenizer
        # specials only come from explicit bos=/eos=, never from matching strings in the text
        self._tok.encode_special_tokens = True
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.bos_id = hf_tokenizer.token_to_id(BOS_TOKEN)
        self.eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              max_token_length: int | None = None) -> "BPETokenizer":
        """Trains byte-level BPE on ``texts``.

        Args:
          texts: training documents (strings).
          vocab_size: target vocabulary including the 2 specials and 256 byte symbols, so at
            least 258. The result can be smaller if the texts run out of pairs seen
            ``min_frequency`` times; read ``.vocab_size`` for the real size.
          min_frequency: a pair must occur this often to be merged.
          max_token_length: optional cap on a token's length in characters.

        Training is deterministic for the same texts and settings.
        """
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (2 specials + 256 byte symbols), "
                             f"got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=int(min_frequency), show_progress=False,
            special_tokens=[BOS_TOKEN, EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            max_token_length=max_token_length)
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Token ids of ``text`` as int32 (optionally framed by BOS / EOS)."""
        ids = np.asarray(self._tok.encode(_check_text(text), add_special_tokens=False).ids,
                         dtype=np.int32)
        return _with_specials(ids, self, bos, eos)

    def decode(self, ids) -> str:
        """Text of ``ids``; special and out-of-range ids are dropped, bad UTF-8 -> U+FFFD."""
        a = _as_ids(ids)
        a = a[(a >= 0) & (a < self.vocab_size)]
        return self._tok.decode(a.tolist(), skip_special_tokens=True)

    def save(self, path: str) -> None:
        """Writes the tokenizer as ``tokenizers`` JSON (``tokenizer.json`` format)."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        """Reads a tokenizer written by :meth:`save` (or any byte-level ``tokenizer.json``)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def get_tokenizer(name: str, train_texts: Sequence[str] | None = None,
                  vocab_size: int | None = None, **train_options) -> Tokenizer:
    """Registry entry: ``"byte"`` -> :class:`ByteTokenizer`; ``"bpe"`` -> BPE trained on
    ``train_texts`` with ``vocab_size`` (both required; ``train_options`` go to
    :meth:`BPETokenizer.train`)."""
    if name == "byte":
        if vocab_size is not None and vocab_size != ByteTokenizer.vocab_size:
            raise ValueError(f"the byte tokenizer has vocab_size 258, got vocab_size={vocab_size}")
        return ByteTokenizer()
    if name == "bpe":
        if train_texts is None or vocab_size is None:
            raise ValueError("the 'bpe' tokenizer needs train_texts and vocab_size")
        return BPETokenizer.train(train_texts, vocab_size, **train_options)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}")


def count_bytes(texts: Iterable[str]) -> int:
    """Total UTF-8 bytes of ``texts`` (the denominator of bits per byte)."""
    return sum(len(t.encode("utf-8")) for t in texts)


def tokens_per_byte(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Tokens per UTF-8 byte of ``texts`` (1.0 for bytes; lower = more compression)."""
    num_bytes = count_bytes(texts)
    if num_bytes == 0:
        raise ValueError("texts hold no bytes")
    return sum(int(tokenizer.encode(t).size) for t in texts) / num_bytes


def bits_per_byte(total_nll_nats, total_bytes) -> float:
    """Bits per byte from a summed next-token NLL: ``total_nll_nats / ln(2) / total_bytes``.

    Args:
      total_nll_nats: the sum over all predicted tokens of ``-log p(token)`` in nats (not the
        mean: multiply a mean NLL per token by the number of predicted tokens).
      total_bytes: UTF-8 bytes of the text those tokens encode (:func:`count_bytes`).

    Independent of the tokenizer, so byte and BPE models are comparable. A uniform model over
    256 bytes has ``total_nll_nats = n * ln(256)`` on ``n`` bytes: exactly 8 bits per byte.
    """
    nll, num_bytes = float(total_nll_nats), float(total_bytes)
    if not math.isfinite(nll) or nll < 0:
        raise ValueError(f"total_nll_nats must be a finite sum of NLLs >= 0, got {nll}")
    if not num_bytes > 0:
        raise ValueError(f"total_bytes must be > 0, got {total_bytes}")
    return nll / math.log(2) / num_bytes
