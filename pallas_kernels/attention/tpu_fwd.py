"""FlashAttention forward kernel for Pallas TPU (Mosaic TPU), plus the helpers the TPU
backward shares.

Layout: the wrapper transposes ``[B, T, H, D]`` to ``[B, H, T, D]`` so that every block's last
two dims are ``(rows, D)``: ``rows`` is a multiple of 8 (a multiple of 128 when compiled, see
:func:`check_tpu_blocks`) and ``D`` is the full head dim, which satisfies the TPU block rule
(last two block dims divisible by ``(8, 128)`` or equal to the array's).

Grid ``(B, Hq, nq, nk)`` with dimension semantics ``(parallel, parallel, parallel,
arbitrary)``: the key-block axis is the innermost reduction. VMEM scratch holds the running max
``m`` and sum ``l`` (``[bq, 128]``, lane-replicated) and the float32 accumulator ``acc [bq, D]``;
they are reset at ``k == 0`` and the output ``o`` and the per-row log-sum-exp are written at the
last key block. Scores are in base-2 units (``common.py``), so ``lse2 = m + log2(l)``; rows that
see no key get ``o = 0`` and ``lse2 = +inf`` (so the backward's ``exp2(s2 - lse2)`` is 0).
Key blocks a query block cannot see (causal) are skipped with ``pl.when``, and their index map
is clamped to the last visible block so the pipeline issues no DMA for them. Blocks entirely
visible and free of padding skip the element mask.

Row statistics leave the kernel as ``[B, H, Tq_pad, 128]`` (lane-replicated, a legal and
lane-dense block); the wrapper keeps lane 0. Segment ids enter as ``q [B, Tq_pad, 128]``
(lane-broadcast) and ``kv [B, 8, Tk_pad]`` (sublane-broadcast) for the same reason.

Verified only in Pallas TPU interpret mode (``pltpu.InterpretParams``) on CPU: no TPU was
available, so the Mosaic TPU lowering, VMEM budgets and speed are untested.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.common import AttnStatic, dot_nn, dot_nt, kv_block_range

__all__ = ["tpu_flash_fwd", "check_tpu_blocks", "LANES", "SUBLANES"]

LANES = 128
SUBLANES = 8


def check_tpu_blocks(block_q, block_k, *, interpret):
    """Eager check of user block sizes for the compiled TPU kernel: multiples of 128."""
    if interpret:
        return
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and b % LANES != 0:
            raise ValueError(f"flash_attention(backend='tpu') needs {name} to be a multiple of "
                             f"{LANES} when compiled for TPU, got {b}")


def interpret_arg(st: AttnStatic):
    """``interpret=`` for ``pl.pallas_call``: TPU interpret mode, or compiled Mosaic TPU."""
    return pltpu.InterpretParams() if st.interpret else False


def compiler_params(n_parallel: int, n_arbitrary: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def to_bhtd(x):
    return jnp.transpose(x, (0, 2, 1, 3))


def lanes(x, n):
    """A lane-replicated ``[rows, 128]`` value as a ``[rows, n]`` operand: tiled when n is a
    multiple of 128, sliced when n < 128 (as the official Pallas TPU kernel does), else lane 0
    broadcast (unreachable with TPU-legal blocks and head dims <= 128 or multiples of 128)."""
    if n % LANES == 0:
        return x if n == LANES else jnp.tile(x, (1, n // LANES))
    if n < LANES:
        return x[:, :n]
    return x[:, :1]


def segment_layouts(q_seg, kv_seg):
    """``[B, Tq_pad]``, ``[B, Tk_pad]`` -> ``[B, Tq_pad, 128]``, ``[B, 8, Tk_pad]``."""
    B, Tq_pad = q_seg.shape
    Tk_pad = kv_seg.shape[1]
    return (jnp.broadcast_to(q_seg[:, :, None], (B, Tq_pad, LANES)),
            jnp.broadcast_to(kv_seg[:, None, :], (B, SUBLANES, Tk_pad)))


def block_mask(st: AttnStatic, q_block, k_block, qseg=None, kseg=None):
    """Visibility ``[bq, bk]`` of query block ``q_block`` x key block ``k_block`` (2-D iotas;
    ``qseg`` lane-replicated ``[bq, 128]``, ``kseg`` sublane-replicated ``[8, bk]``)."""
    bq, bk = st.block_q, st.block_k
    rows = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = k_block * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = cols < st.Tk
    if st.causal:
        mask = mask & (cols <= rows + st.offset)
    if st.has_segments:
        mask = mask & (lanes(qseg, bk) == kseg[:1, :])
    return mask


def last_visible_k(st: AttnStatic, q_block):
    """Index of the last key block query block ``q_block`` needs (>= 0): the clamp target."""
    _, n_end = kv_block_range(st, q_block)
    return jnp.maximum(n_end - 1, 0)


def _fwd_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qseg_ref = kseg_ref = None
    i, j = pl.program_id(2), pl.program_id(3)
    bk = st.block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = dot_nt(q, k, st.precision) * st.scale2           # [bq, bk] float32, base 2
        if masked:
            qseg = qseg_ref[...] if st.has_segments else None
            kseg = kseg_ref[...] if st.has_segments else None
            s = jnp.where(block_mask(st, i, j, qseg, kseg), s, -jnp.inf)
        m_prev = m_sc[...]                                    # [bq, 128]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        if masked:  # a row may still have seen nothing: keep exp2 arguments finite
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m_prev - m_use)                      # [bq, 128]
        p = jnp.exp2(s - lanes(m_use, bk))
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        acc_sc[...] = (acc_sc[...] * lanes(alpha, acc_sc.shape[1])
                       + dot_nn(p.astype(v.dtype), v, st.precision))

    n_full, n_end = kv_block_range(st, i)
    pl.when(j < n_full)(functools.partial(step, masked=False))
    pl.when((j >= n_full) & (j < n_end))(functools.partial(step, masked=True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        empty = l == 0.0
        o = acc_sc[...] / lanes(jnp.where(empty, 1.0, l), acc_sc.shape[1])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def tpu_flash_fwd(q, k, v, q_seg, kv_seg, st: AttnStatic):
    """Padded ``q [B, Tq_pad, Hq, D]``, ``k/v [B, Tk_pad, Hkv, D]`` (segment ids ``[B, T_pad]``
    or None) -> ``(o [B, Tq_pad, Hq, D], lse2 [B, Hq, Tq_pad] float32)``."""
    B, Tq_pad, Hq, D = q.shape
    Tk_pad = k.shape[1]
    G, bq, bk = st.group, st.block_q, st.block_k
    nq, nk = Tq_pad // bq, Tk_pad // bk

    def kv_idx(b, h, i, j):
        return b, h // G, jnp.minimum(j, last_visible_k(st, i)), 0

    in_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, D), kv_idx),
                pl.BlockSpec((None, None, bk, D), kv_idx)]
    args = [to_bhtd(q), to_bhtd(k), to_bhtd(v)]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_idx(b, h, i, j)[2]))]
        args += list(segment_layouts(q_seg, kv_seg))
    out_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, Hq, Tq_pad, D), q.dtype),
                 jax.ShapeDtypeStruct((B, Hq, Tq_pad, LANES), jnp.float32)]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(B, Hq, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=compiler_params(3, 1),
        interpret=interpret_arg(st),
        name="tpu_flash_attention_fwd",
    )(*args)
    return to_bhtd(o), lse[..., 0]
