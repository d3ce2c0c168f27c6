"""FlashAttention backward kernels (Pallas, Triton lowering / interpret mode).

Given the forward's ``o``, its per-row ``lse2`` and ``delta = rowsum(dO * O)`` (computed by the
wrapper), the probabilities are recomputed block by block, ``P = exp2(s2 - lse2)``, and

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.

Two kernels, so neither needs atomics:

* dK/dV: grid ``(nk, Hkv, B)``; a program owns one key block of one kv head and loops over the
  ``group`` query heads that share it (the GQA sum happens in registers, K/V are never
  repeated) and over the query blocks that can see the key block (causal skips the rest).
* dQ: grid ``(nq, Hq, B)``; a program owns one query block and loops over the visible key
  blocks, like the forward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention.common import (AttnStatic, dot_nn, dot_nt, kv_block_range,
                                             q_block_index_maps, q_block_range, score_mask)


def _dkdv_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kseg_ref = None
    bq, bk, D = st.block_q, st.block_k, st.D
    k_block = pl.program_id(0)
    k = k_ref[...]                                  # [bk, D]
    v = v_ref[...]
    cols = k_block * bk + jnp.arange(bk, dtype=jnp.int32)
    kv_seg = kseg_ref[...] if st.has_segments else None
    nq = st.Tq_pad // bq
    i_start, i_full = q_block_range(st, k_block)

    def step(i, carry, g, masked):
        # Transposed formulation: every product is [bk, *] so no register tile is transposed.
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), g, :]            # [bq, D]
        do = do_ref[pl.ds(start, bq), g, :]
        lse = lse_ref[g, pl.ds(start, bq)]           # [bq]
        delta = delta_ref[g, pl.ds(start, bq)]
        sT = dot_nt(k, q, st.precision) * st.scale2  # [bk, bq]
        if masked:
            rows = start + jnp.arange(bq, dtype=jnp.int32)
            q_seg = qseg_ref[pl.ds(start, bq)] if st.has_segments else None
            sT = jnp.where(score_mask(st, rows, cols, q_seg, kv_seg, transposed=True), sT, -jnp.inf)
        pT = jnp.exp2(sT - lse[None, :])             # [bk, bq] float32
        dv = dv + dot_nn(pT.astype(do.dtype), do, st.precision)
        dpT = dot_nt(v, do, st.precision)            # [bk, bq]
        dsT = pT * (dpT - delta[None, :])
        dk = dk + dot_nn(dsT.astype(q.dtype), q, st.precision)
        return dk, dv

    def group_step(g, carry):
        carry = jax.lax.fori_loop(i_start, i_full,
                                  functools.partial(step, g=g, masked=True), carry)
        carry = jax.lax.fori_loop(i_full, nq,
                                  functools.partial(step, g=g, masked=False), carry)
        return carry

    carry = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
    if st.group == 1:
        dk, dv = group_step(0, carry)
    else:
        dk, dv = jax.lax.fori_loop(0, st.group, group_step, carry)
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = None
    bq, bk, D = st.block_q, st.block_k, st.D
    nq = st.Tq_pad // bq
    pid = pl.program_id(0)
    q_block = (nq - 1 - pid) if st.causal else pid
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = q_block * bq + jnp.arange(bq, dtype=jnp.int32)
    q_seg = qseg_ref[...] if st.has_segments else None

    def step(j, dq, masked):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot_nt(q, k, st.precision) * st.scale2
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            kv_seg = kseg_ref[pl.ds(start, bk)] if st.has_segments else None
            s = jnp.where(score_mask(st, rows, cols, q_seg, kv_seg), s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = dot_nt(do, v, st.precision)
        ds = p * (dp - delta[:, None])
        return dq + dot_nn(ds.astype(k.dtype), k, st.precision)

    n_full, n_end = kv_block_range(st, q_block)
    dq = jnp.zeros((bq, D), jnp.float32)
    dq = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = jax.lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def flash_bwd(q, k, v, do, lse, delta, q_seg, kv_seg, st: AttnStatic, st_dq: AttnStatic,
              params_dkdv, params_dq):
    """Padded inputs; lse/delta [B, Hq, Tq_pad] float32 -> (dq, dk, dv) in the input dtype."""
    B, Tq_pad, Hq, D = q.shape
    Tk_pad, Hkv = k.shape[1], k.shape[2]
    G, bq, bk = st.group, st.block_q, st.block_k
    nq, nk = Tq_pad // bq, Tk_pad // bk

    # ---- dK / dV ----
    qg_spec = pl.BlockSpec((None, Tq_pad, G, D), lambda j, h, b: (b, 0, h, 0))
    kvb_spec = pl.BlockSpec((None, bk, None, D), lambda j, h, b: (b, j, h, 0))
    stat_spec = pl.BlockSpec((None, G, Tq_pad), lambda j, h, b: (b, h, 0))
    in_specs = [qg_spec, kvb_spec, kvb_spec, qg_spec, stat_spec, stat_spec]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, Tq_pad), lambda j, h, b: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, h, b: (b, j))]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(nk, Hkv, B),
        in_specs=in_specs,
        out_specs=[kvb_spec, kvb_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=st.interpret,
        compiler_params=params_dkdv,
        name="flash_attention_bwd_dkdv",
    )(*args)

    # ---- dQ ----
    st = st_dq
    bq, bk = st.block_q, st.block_k
    nq = Tq_pad // bq
    qidx, lidx, sidx = q_block_index_maps(st, nq)
    qb_spec = pl.BlockSpec((None, bq, None, D), qidx)
    kv_spec = pl.BlockSpec((None, Tk_pad, None, D), lambda i, h, b: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lidx)
    in_specs = [qb_spec, kv_spec, kv_spec, qb_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, bq), sidx),
                     pl.BlockSpec((None, Tk_pad), lambda i, h, b: (b, 0))]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(nq, Hq, B),
        in_specs=in_specs,
        out_specs=qb_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=params_dq,
        name="flash_attention_bwd_dq",
    )(*args)
    return dq, dk, dv
