"""Helpers shared by the FlashAttention kernel bodies (traced inside the kernels).

Notation: a query block ``i`` covers rows ``[i*bq, (i+1)*bq)``, a key block ``j`` covers columns
``[j*bk, (j+1)*bk)``. Arrays are padded to block multiples; ``Tq``/``Tk`` are the true lengths.
Causal visibility is bottom-right aligned: row ``r`` sees column ``c`` iff ``c <= r + off`` with
``off = Tk - Tq``. Scores are kept in base-2 units: ``s2 = (q . k) * sm_scale * log2(e)``, so the
softmax uses ``exp2`` and the saved log-sum-exp is ``lse2 = log2(sum_c exp2(s2))``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class AttnStatic:
    """Static (hashable) description of one attention call, shared by all kernels."""

    Tq: int           # true query length
    Tk: int           # true key length
    Tq_pad: int       # padded to a multiple of block_q
    Tk_pad: int       # padded to a multiple of block_k
    D: int
    group: int        # Hq // Hkv
    block_q: int
    block_k: int
    causal: bool
    has_segments: bool
    sm_scale: float
    dtype: str        # input dtype name
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None

    @property
    def offset(self) -> int:
        return self.Tk - self.Tq

    @property
    def scale2(self) -> float:
        return self.sm_scale * LOG2E

    @property
    def precision(self):
        # float32 inputs: exact float32 products (Triton would otherwise use TF32).
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

    @property
    def k_tail(self) -> bool:
        return self.Tk % self.block_k != 0


def dot_nt(a, b, precision):
    """``a @ b.T`` with float32 accumulation; a [M, K], b [N, K]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
    """``a @ b`` with float32 accumulation; a [M, K], b [K, N]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):
    """``a.T @ b`` with float32 accumulation; a [K, M], b [K, N]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _floordiv_nonneg(x, d):
    return jnp.maximum(x, 0) // d


def _cdiv_nonneg(x, d):
    return (jnp.maximum(x, 0) + d - 1) // d


def kv_block_range(st: AttnStatic, q_block):
    """For query block ``q_block``: ``(n_full, n_end)``.

    Key blocks ``[0, n_full)`` are visible to every row of the query block (no mask needed);
    blocks ``[n_full, n_end)`` need the element mask; blocks ``>= n_end`` are fully masked and
    skipped.
    """
    nk = st.Tk_pad // st.block_k
    nk_in_bounds = st.Tk // st.block_k  # blocks with no padded column
    r0 = q_block * st.block_q
    if st.causal:
        # last visible column of the first row is r0 + off -> blocks fully left of it.
        n_full = jnp.minimum(_floordiv_nonneg(r0 + st.offset + 1, st.block_k), nk_in_bounds)
        n_end = jnp.minimum(_cdiv_nonneg(r0 + st.block_q + st.offset, st.block_k), nk)
    else:
        n_full = jnp.int32(nk_in_bounds)
        n_end = jnp.int32(nk)
    if st.has_segments:
        n_full = jnp.int32(0)
    n_full = jnp.minimum(n_full, n_end)
    return n_full.astype(jnp.int32), n_end.astype(jnp.int32)


def q_block_range(st: AttnStatic, k_block):
    """For key block ``k_block``: ``(i_start, i_full)``.

    Query blocks ``[0, i_start)`` see none of it (skipped), ``[i_start, i_full)`` need the mask,
    ``[i_full, nq)`` see all of it.
    """
    nq = st.Tq_pad // st.block_q
    c0 = k_block * st.block_k
    if st.causal:
        i_start = jnp.minimum(_floordiv_nonneg(c0 - st.offset, st.block_q), nq)
        i_full = jnp.minimum(_cdiv_nonneg(c0 + st.block_k - 1 - st.offset, st.block_q), nq)
    else:
        i_start = jnp.int32(0)
        i_full = jnp.int32(0)
    if st.has_segments:
        i_full = jnp.int32(nq)
    elif st.k_tail:  # only the last key block holds padded columns
        i_full = jnp.where(k_block == st.Tk_pad // st.block_k - 1, nq, i_full)
    i_full = jnp.maximum(i_full, i_start)
    return i_start.astype(jnp.int32), i_full.astype(jnp.int32)


def score_mask(st: AttnStatic, rows, cols, q_seg=None, kv_seg=None, transposed=False):
    """Boolean visibility for absolute row/col indices: ``[len(rows), len(cols)]``, or
    ``[len(cols), len(rows)]`` when ``transposed`` (built directly, no transpose op)."""
    if transposed:
        r, c = rows[None, :], cols[:, None]
    else:
        r, c = rows[:, None], cols[None, :]
    mask = c < st.Tk
    if st.causal:
        mask = mask & (c <= r + st.offset)
    if st.has_segments:
        qs, ks = (q_seg[None, :], kv_seg[:, None]) if transposed else (q_seg[:, None], kv_seg[None, :])
        mask = mask & (qs == ks)
    return mask


def q_block_index_maps(st: AttnStatic, nq: int):
    """Index maps over the grid ``(i, h, b)`` of a kernel that owns one query block: for the
    ``[B, T, H, D]`` tile, the ``[B, H, T]`` row statistics and the ``[B, T]`` segment ids.
    Causal grids visit the query blocks in reverse (longest rows first, better load balance)."""
    blk = (lambda i: nq - 1 - i) if st.causal else (lambda i: i)
    return (lambda i, h, b: (b, blk(i), h, 0),
            lambda i, h, b: (b, h, blk(i)),
            lambda i, h, b: (b, blk(i)))
