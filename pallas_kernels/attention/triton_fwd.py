"""FlashAttention forward kernel (Pallas, Triton lowering / interpret mode).

Grid ``(nq, Hq, B)``; the query-block axis is first so that programs running together share the
same (batch, head) K/V in L2. For causal attention the query blocks are visited in reverse
(longest rows first) for better load balance. One program owns ``q [bq, D]`` and walks the key
blocks with an online softmax (running max ``m`` and sum ``l`` per row, in base 2), then writes
``o [bq, D]`` and ``lse2 [bq]`` (``+inf`` for rows that see no key).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention.common import (AttnStatic, dot_nn, dot_nt, kv_block_range,
                                             q_block_index_maps, score_mask)


def _fwd_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kseg_ref = None
    nq = st.Tq_pad // st.block_q
    pid = pl.program_id(0)
    q_block = (nq - 1 - pid) if st.causal else pid
    bq, bk, D = st.block_q, st.block_k, st.D

    q = q_ref[...]                                   # [bq, D], input dtype
    rows = q_block * bq + jnp.arange(bq, dtype=jnp.int32)
    q_seg = qseg_ref[...] if st.has_segments else None

    def step(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot_nt(q, k, st.precision) * st.scale2   # [bq, bk] float32, base-2 units
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            kv_seg = kseg_ref[pl.ds(start, bk)] if st.has_segments else None
            s = jnp.where(score_mask(st, rows, cols, q_seg, kv_seg), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        if masked:  # a row may still have seen nothing: keep exp2 arguments finite
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v, st.precision)
        return acc, m_new, l

    carry = (jnp.zeros((bq, D), jnp.float32),
             jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    n_full, n_end = kv_block_range(st, q_block)
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), carry)
    acc, m, l = carry
    empty = l == 0.0
    o = acc / jnp.where(empty, 1.0, l)[:, None]
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def flash_fwd(q, k, v, q_seg, kv_seg, st: AttnStatic, compiler_params):
    """q [B, Tq_pad, Hq, D], k/v [B, Tk_pad, Hkv, D] (padded) -> (o like q, lse2 [B, Hq, Tq_pad])."""
    B, Tq_pad, Hq, D = q.shape
    Tk_pad = k.shape[1]
    nq = Tq_pad // st.block_q
    G = st.group
    bq = st.block_q

    qidx, lidx, sidx = q_block_index_maps(st, nq)
    kv_spec = pl.BlockSpec((None, Tk_pad, None, D), lambda i, h, b: (b, 0, h // G, 0))
    in_specs = [pl.BlockSpec((None, bq, None, D), qidx), kv_spec, kv_spec]
    args = [q, k, v]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, bq), sidx),
                     pl.BlockSpec((None, Tk_pad), lambda i, h, b: (b, 0))]
        args += [q_seg, kv_seg]
    out_specs = [pl.BlockSpec((None, bq, None, D), qidx),
                 pl.BlockSpec((None, None, bq), lidx)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, Hq, Tq_pad), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(nq, Hq, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=st.interpret,
        compiler_params=compiler_params,
        name="flash_attention_fwd",
    )(*args)
