"""LM training rows and evaluation in bits per byte.

Every document is tokenised, cut into chunks of at most ``row_length - 1`` tokens
(``research.data.corpus.chunk_tokens``) and each chunk gets a BOS token in front, so **every
document token is predicted exactly once** (the BOS predicts the first token; the context
restarts at chunk boundaries). Rows are then built in one of two modes:

* ``"packed"``: chunks bin-packed into rows (best-fit decreasing) with ``segment_ids`` /
  per-document ``positions`` (``research.data.packing``); attention and loss stay inside each
  chunk, so a packed row gives each chunk exactly the loss it has alone.
* ``"single"``: one chunk per row, right-padded. Needed by ``attention="linear"``, whose
  recurrent state cannot be reset inside a row (causal attention never lets the trailing
  padding reach a real token).

Bits per byte (:func:`evaluate_bits_per_byte`) is ``sum of the NLL of every document token /
ln 2 / UTF-8 bytes of the documents``: independent of the tokenizer, so byte and BPE models
compare directly.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from research.data.corpus import chunk_tokens
from research.data.packing import next_token_targets, pack_sequences
from research.lm.config import LMConfig
from research.lm.model import apply_logits
from research.lm.tokenizer import count_bytes

__all__ = ["ROW_MODES", "tokenize_chunks", "make_rows", "evaluate_bits_per_byte"]

ROW_MODES = ("packed", "single")


def tokenize_chunks(tokenizer, texts, row_length: int) -> list[np.ndarray]:
    """Each text tokenised, split into chunks of <= row_length - 1 tokens, BOS prepended."""
    if not isinstance(row_length, int) or row_length < 4:
        raise ValueError(f"row_length must be an int >= 4, got {row_length!r}")
    if tokenizer.bos_id is None:
        raise ValueError(f"{tokenizer!r} has no BOS token; the LM rows need one")
    docs = [tokenizer.encode(t) for t in texts]
    chunks = chunk_tokens(docs, row_length - 1)
    bos = np.array([tokenizer.bos_id], np.int32)
    return [np.concatenate([bos, c.astype(np.int32)]) for c in chunks]


def make_rows(chunks, row_length: int, mode: str = "packed") -> dict[str, np.ndarray]:
    """Rows {"tokens", "segment_ids", "positions"} ([R, row_length] int32) from BOS-led chunks."""
    if mode == "packed":
        pb = pack_sequences(chunks, row_length, method="best_fit", sort=True)
        return {"tokens": pb.tokens, "segment_ids": pb.segment_ids, "positions": pb.positions}
    if mode != "single":
        raise ValueError(f"row mode must be one of {ROW_MODES}, got {mode!r}")
    tokens = np.zeros((len(chunks), row_length), np.int32)
    seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
    for i, c in enumerate(chunks):
        if len(c) > row_length:
            raise ValueError(f"chunk {i} has {len(c)} tokens > row_length={row_length}")
        tokens[i, :len(c)], seg[i, :len(c)], pos[i, :len(c)] = c, 1, np.arange(len(c))
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_sum(params, cfg: LMConfig, batch):
    seg = batch["segment_ids"]
    logits = apply_logits(params, cfg, batch["tokens"], positions=batch["positions"],
                          segment_ids=None if cfg.attention == "linear" else seg)
    targets, mask = next_token_targets(batch["tokens"], seg)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


def evaluate_bits_per_byte(params, cfg: LMConfig, tokenizer, texts, *, row_length: int, batch_size: int = 16,
                           mode: str | None = None) -> dict:
    """``{"bits_per_byte", "nll_per_token", "tokens", "bytes"}`` of ``texts`` under the model.

    ``mode`` defaults to "packed" for softmax attention and "single" for linear attention."""
    mode = mode or ("single" if cfg.attention == "linear" else "packed")
    rows = make_rows(tokenize_chunks(tokenizer, texts, row_length), row_length, mode)
    n = rows["tokens"].shape[0]
    pad = (-n) % batch_size
    rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}  # all-padding rows add nothing
    total, count = 0.0, 0.0
    for i in range(0, n + pad, batch_size):
        s, c = _nll_sum(params, cfg, {k: jnp.asarray(v[i:i + batch_size]) for k, v in rows.items()})
        total, count = total + float(s), count + float(c)
    nbytes = count_bytes(texts)
    return {"bits_per_byte": total / math.log(2) / nbytes, "nll_per_token": total / max(count, 1),
            "tokens": int(count), "bytes": int(nbytes)}
