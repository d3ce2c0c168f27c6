"""Split-K decode-attention kernel (flash-decoding), Pallas Triton lowering / interpret mode.

Grid ``(B, Hkv, num_splits)``. One program owns one kv head of one batch row and one split of
that row's cache. Its query tile holds all ``G = Hq // Hkv`` query heads of the group times the
``Tq`` queries, ``R = Tq * G`` rows laid out ``r = t * G + g`` (padded to ``R_pad``, a power of
two >= 16, for ``tl.dot``), so each K/V block is loaded once per kv-head group, not once per
query head.

Splitting. The split plan adapts to each row's length at run time: row ``b`` has
``n_b = cdiv(lengths[b], block_k)`` live key blocks, cut into ``num_splits`` contiguous chunks
of ``cdiv(n_b, num_splits)`` blocks; split ``s`` walks its chunk ``[lo, hi)`` (possibly empty)
with an online softmax. Blocks past ``lengths[b]`` are never loaded, so the work follows the
actual lengths rather than the cache capacity ``S``.

Masking. With ``P = lengths[b] - Tq`` (the committed prefix), blocks ``[lo, mid)`` with
``mid = P // block_k`` lie wholly inside the prefix, are visible to every query and run
unmasked; blocks ``[mid, hi)`` build the element mask. Column ``c`` is visible to row ``r``
(query ``t = r // G``) iff ``c < P`` or ``0 <= c - P < Tq`` and new position ``c - P`` is
allowed: ``c - P <= t`` (causal default), or bit ``c - P`` of the row's tree bitmask (the
bool ``tree_mask[b, t, :]`` packed by the op into ``W = cdiv(Tq, 32)`` int32 words). In masked
blocks V is also zeroed at ``c >= lengths[b]``, so garbage (even NaN/inf) beyond the length
cannot leak through ``0 * garbage``.

Outputs per split: ``o`` normalised by the split's own sum (float32, ``[R_pad, D]``) and
``lse2 = m + log2(l)`` in base-2 units (``-inf`` when the split saw no key). The op combines the
splits with a log-sum-exp reduction.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention.common import LOG2E, dot_nn, dot_nt


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
    """Static (hashable) description of one decode-attention call."""

    Tq: int
    G: int              # Hq // Hkv
    R_pad: int          # Tq * G rows padded to a power of two >= 16
    S_pad: int          # cache length padded to a multiple of block_k
    D: int
    block_k: int
    num_splits: int
    tree_words: int     # int32 words per row of the packed tree mask; 0 = causal default
    sm_scale: float
    dtype: str          # input dtype name
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2

    @property
    def scale2(self) -> float:
        return self.sm_scale * LOG2E

    @property
    def precision(self):
        # float32 inputs: exact float32 products (Triton would otherwise use TF32).
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _visible(st: DecodeStatic, t, cols, prefix, length, bits_ref):
    """Bool ``[R_pad, bk]``: row (query ``t``) sees absolute cache column ``cols``."""
    c = cols[None, :]
    rel = c - prefix                                   # index among the new positions
    in_new = (rel >= 0) & (c < length)                 # c < length  <=>  rel < Tq
    if st.tree_words == 0:
        new_ok = rel <= t[:, None]
    else:
        relc = jnp.clip(rel, 0, st.Tq - 1)
        shift = jnp.bitwise_and(relc, 31)
        new_ok = None
        for w in range(st.tree_words):                 # static: cdiv(Tq, 32) words, usually 1
            word = bits_ref[w, :]                      # [R_pad] int32
            bit = jnp.bitwise_and(jnp.right_shift(word[:, None], shift), 1) != 0
            if st.tree_words > 1:
                bit = bit & (jnp.right_shift(relc, 5) == w)
            new_ok = bit if new_ok is None else (new_ok | bit)
    return (rel < 0) | (in_new & new_ok)


def _decode_kernel(*refs, st: DecodeStatic):
    if st.tree_words:
        q_ref, k_ref, v_ref, len_ref, bits_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, len_ref, o_ref, lse_ref = refs
        bits_ref = None
    bk, D = st.block_k, st.D
    split = pl.program_id(2)
    length = len_ref[()]                                # int32, in [Tq, S]
    prefix = length - st.Tq
    n_live = (length + bk - 1) // bk                    # key blocks holding cache entries
    per_split = (n_live + st.num_splits - 1) // st.num_splits
    lo = jnp.minimum(split * per_split, n_live)
    hi = jnp.minimum(lo + per_split, n_live)
    mid = jnp.clip(prefix // bk, lo, hi)                # [lo, mid): wholly inside the prefix

    q = q_ref[...]                                      # [R_pad, D], input dtype
    t = jax.lax.broadcasted_iota(jnp.int32, (st.R_pad,), 0) // st.G   # query index per row

    def step(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot_nt(q, k, st.precision) * st.scale2  # [R_pad, bk] float32, base 2
        if masked:
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
            s = jnp.where(_visible(st, t, cols, prefix, length, bits_ref), s, -jnp.inf)
            v = jnp.where((cols < length)[:, None], v, jnp.zeros((), v.dtype))
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # row saw nothing yet
        else:
            m_new = m_use = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v, st.precision)
        return acc, m_new, l

    carry = (jnp.zeros((st.R_pad, D), jnp.float32),
             jnp.full((st.R_pad,), -jnp.inf, jnp.float32),
             jnp.zeros((st.R_pad,), jnp.float32))
    carry = jax.lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(mid, hi, functools.partial(step, masked=True), carry)
    acc, m, l = carry
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def decode_partials(q_rows, k, v, lengths, tree_bits, st: DecodeStatic, compiler_params):
    """One split-K pass.

    Args:
      q_rows: ``[B, Hkv, R_pad, D]`` (row ``t * G + g`` = query ``t`` of group head ``g``).
      k, v: ``[B, S_pad, Hkv, D]`` (the cache, padded to a multiple of ``block_k``).
      lengths: int32 ``[B]`` in ``[Tq, S]``.
      tree_bits: ``None`` or int32 ``[B, W, R_pad]``, the packed tree mask per row.

    Returns:
      ``(o [B, Hkv, num_splits, R_pad, D] float32, lse2 [B, Hkv, num_splits, R_pad] float32)``.
    """
    B, Hkv, R_pad, D = q_rows.shape
    S_pad = k.shape[1]
    ns = st.num_splits
    kv_spec = pl.BlockSpec((None, S_pad, None, D), lambda b, h, s: (b, 0, h, 0))
    in_specs = [pl.BlockSpec((None, None, R_pad, D), lambda b, h, s: (b, h, 0, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None,), lambda b, h, s: (b,))]
    args = [q_rows, k, v, lengths]
    if st.tree_words:
        in_specs.append(pl.BlockSpec((None, st.tree_words, R_pad), lambda b, h, s: (b, 0, 0)))
        args.append(tree_bits)
    out_specs = [pl.BlockSpec((None, None, None, R_pad, D), lambda b, h, s: (b, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, R_pad), lambda b, h, s: (b, h, s, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, ns, R_pad, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, ns, R_pad), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=(B, Hkv, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=compiler_params,
        name="decode_attention_split_k",
    )(*args)
