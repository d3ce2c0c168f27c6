"""Sequence packing: variable-length documents into fixed-length rows with segment ids.

A packed batch has three ``[num_rows, row_length]`` int32 arrays:

* ``tokens``: the documents' tokens laid end to end, ``pad_id`` after the last document of a row.
* ``segment_ids``: ``1, 2, 3, ...`` numbering the documents inside each row, ``0`` = padding.
  Attention only between equal ids (``pallas_kernels.reference_attention`` /
  ``flash_attention`` take them directly), so padding only ever sees padding and no softmax row
  is empty.
* ``positions``: position inside the document, restarting at ``0`` for each document
  (``0`` on padding), for positional embeddings.

Bin assignment (the bin-packing heuristics, ``O(n log n)`` / ``O(n * rows)``):

* ``"first_fit"``: each document goes to the first row that still has room.
* ``"best_fit"``: each document goes to the row it fills most tightly (least room left after).

With ``sort=True`` documents are placed longest first (first-fit/best-fit *decreasing*), which
packs tighter; the order of documents inside a row is always their arrival order.

Losses ignore padding with :func:`next_token_targets` (target mask that is zero on padding and
on the last token of each document, so no document predicts its neighbour's first token) and
:func:`masked_mean`.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "PackedBatch",
    "pack_sequences",
    "assign_rows",
    "packing_efficiency",
    "packing_report",
    "next_token_targets",
    "masked_mean",
]

PACKING_METHODS = ("first_fit", "best_fit")


class PackedBatch(NamedTuple):
    """Packed rows. All arrays ``[num_rows, row_length]`` int32 except ``placement``.

    ``placement[i] = (row, start)`` says where document ``i`` (input order) was put.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    placement: np.ndarray  # [num_docs, 2] int64: (row, start column)

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.segment_ids)


def _check_lengths(lengths: Sequence[int], row_length: int) -> np.ndarray:
    if not isinstance(row_length, (int, np.integer)) or row_length <= 0:
        raise ValueError(f"row_length must be a positive int, got {row_length!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and lengths.min() <= 0:
        bad = int(np.argmin(lengths))
        raise ValueError(f"every sequence needs at least one token; sequence {bad} has length "
                         f"{int(lengths[bad])}")
    if lengths.size and lengths.max() > row_length:
        bad = int(np.argmax(lengths))
        raise ValueError(f"sequence {bad} has length {int(lengths[bad])} > row_length={row_length}; "
                         "split long documents into chunks first")
    return lengths


def assign_rows(lengths: Sequence[int], row_length: int, *, method: str = "first_fit",
                sort: bool = False) -> tuple[np.ndarray, int]:
    """Bin-packs sequence lengths into rows of capacity ``row_length``.

    Args:
      lengths: ``[n]`` positive ints, each ``<= row_length``.
      row_length: capacity of a row (tokens).
      method: ``"first_fit"`` or ``"best_fit"``.
      sort: place longest first (the "decreasing" variants).

    Returns:
      ``(row_of [n] int64, num_rows)``: the row each sequence goes to.
    """
    if method not in PACKING_METHODS:
        raise ValueError(f"unknown packing method {method!r}; choose one of {PACKING_METHODS}")
    lengths = _check_lengths(lengths, row_length)
    n = lengths.size
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(n)
    row_of = np.empty(n, dtype=np.int64)
    if method == "first_fit":
        # remaining capacity per row; vectorised scan for the first row with enough room
        remaining = np.empty(0, dtype=np.int64)
        for i in order:
            fits = np.flatnonzero(remaining >= lengths[i])
            if fits.size:
                r = int(fits[0])
            else:
                r = remaining.size
                remaining = np.append(remaining, row_length)
            remaining[r] -= lengths[i]
            row_of[i] = r
        return row_of, int(remaining.size)
    # best fit: sorted list of (remaining, row) -> the smallest remaining that still fits
    free: list[tuple[int, int]] = []
    num_rows = 0
    for i in order:
        length = int(lengths[i])
        j = bisect.bisect_left(free, (length, -1))
        if j < len(free):
            rem, r = free.pop(j)
        else:
            rem, r = row_length, num_rows
            num_rows += 1
        row_of[i] = r
        if rem - length > 0:
            bisect.insort(free, (rem - length, r))
    return row_of, num_rows


def pack_sequences(sequences: Sequence[Sequence[int]], row_length: int, *,
                   method: str = "first_fit", sort: bool = False, pad_id: int = 0,
                   min_rows: int | None = None) -> PackedBatch:
    """Packs token sequences into ``[num_rows, row_length]`` rows.

    Args:
      sequences: list of 1-D integer token sequences (each ``1 <= len <= row_length``).
      row_length: tokens per row.
      method: ``"first_fit"`` or ``"best_fit"`` (see module docstring).
      sort: longest first (first-fit / best-fit decreasing).
      pad_id: token written into padding positions.
      min_rows: pad the result with all-padding rows up to this many (fixed batch shapes).

    Returns:
      :class:`PackedBatch` with ``tokens``, ``segment_ids`` (1.. per row, 0 = padding),
      ``positions`` (restart at 0 per document) and ``placement``.
    """
    seqs = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"sequence {i} must be 1-D, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"sequence {i} must hold integer token ids, got dtype {a.dtype}")
        seqs.append(a.astype(np.int64))
    row_of, num_rows = assign_rows([len(s) for s in seqs], row_length, method=method, sort=sort)
    if min_rows is not None:
        if min_rows < num_rows:
            raise ValueError(f"min_rows={min_rows} but the sequences need {num_rows} rows")
        num_rows = min_rows
    tokens = np.full((num_rows, row_length), pad_id, dtype=np.int32)
    segment_ids = np.zeros((num_rows, row_length), dtype=np.int32)
    positions = np.zeros((num_rows, row_length), dtype=np.int32)
    fill = np.zeros(num_rows, dtype=np.int64)
    count = np.zeros(num_rows, dtype=np.int64)
    placement = np.zeros((len(seqs), 2), dtype=np.int64)
    for i, s in enumerate(seqs):  # arrival order inside each row
        r, start = int(row_of[i]), int(fill[row_of[i]])
        n = s.size
        tokens[r, start:start + n] = s
        count[r] += 1
        segment_ids[r, start:start + n] = count[r]
        positions[r, start:start + n] = np.arange(n)
        fill[r] += n
        placement[i] = (r, start)
    return PackedBatch(tokens, segment_ids, positions, placement)


def packing_efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of positions holding real tokens (``segment_ids != 0``)."""
    segment_ids = np.asarray(segment_ids)
    if segment_ids.size == 0:
        raise ValueError("segment_ids is empty")
    return float(np.mean(segment_ids != 0))


def packing_report(lengths: Sequence[int], row_length: int) -> dict[str, dict[str, float]]:
    """Rows and efficiency for every method, with and without sorting, plus one-doc-per-row.

    Returns ``{name: {"rows": int, "efficiency": float}}`` with names like
    ``"first_fit"``, ``"best_fit_decreasing"`` and ``"no_packing"``.
    """
    lengths = _check_lengths(lengths, row_length)
    total = int(lengths.sum())
    out = {"no_packing": {"rows": int(lengths.size),
                          "efficiency": total / max(1, lengths.size * row_length)}}
    for method in PACKING_METHODS:
        for sort in (False, True):
            _, rows = assign_rows(lengths, row_length, method=method, sort=sort)
            name = method + ("_decreasing" if sort else "")
            out[name] = {"rows": rows, "efficiency": total / max(1, rows * row_length)}
    return out


def next_token_targets(tokens, segment_ids):
    """Shifted targets and a loss mask for causal LM training on packed rows.

    Position ``i`` predicts token ``i + 1`` only if both belong to the same (non-padding)
    document. Works on numpy and jax arrays.

    Args:
      tokens, segment_ids: ``[B, T]``.

    Returns:
      ``(targets [B, T], mask [B, T] float32)``; the last column's target is ``tokens[:, -1]``
      with mask 0.
    """
    xp = _array_module(tokens)
    if tokens.shape != segment_ids.shape or tokens.ndim != 2:
        raise ValueError(f"tokens and segment_ids must both be [B, T], got {tokens.shape} and "
                         f"{segment_ids.shape}")
    targets = xp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    nxt = xp.concatenate([segment_ids[:, 1:], xp.zeros_like(segment_ids[:, :1])], axis=1)
    mask = (segment_ids != 0) & (nxt == segment_ids)
    return targets, mask.astype(xp.float32)


def masked_mean(values, mask):
    """``sum(values * mask) / max(sum(mask), 1)`` (token-weighted mean over real tokens)."""
    xp = _array_module(values)
    if values.shape != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} must have the same shape")
    mask = mask.astype(values.dtype)
    return xp.sum(values * mask) / xp.maximum(xp.sum(mask), 1)


def _array_module(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp
