"""FlashAttention backward kernels for Pallas TPU (Mosaic TPU).

Given the forward's ``lse2`` and ``delta = rowsum(dO * O)`` (computed by the wrapper in
``op.py``), the probabilities are recomputed block by block, ``P = exp2(s2 - lse2)``, and

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.

Two kernels, so neither needs atomics (layouts and block rules as in ``tpu_fwd.py``):

* dK/dV: grid ``(B, Hkv, nk, group, nq)``, semantics ``(parallel, parallel, parallel,
  arbitrary, arbitrary)``: one key block of one kv head accumulates in VMEM scratch
  (``dk``, ``dv`` float32 ``[bk, D]``) over the ``group`` query heads that share it (the GQA
  sum; q head ``hkv * group + g``) and over the query blocks; query blocks that cannot see the
  key block (causal) are skipped with ``pl.when`` and their index map is clamped.
* dQ: grid ``(B, Hq, nq, nk)``, semantics ``(parallel, parallel, parallel, arbitrary)``, like
  the forward, with a float32 ``dq [bq, D]`` scratch.

``lse2`` and ``delta`` enter lane-replicated ``[B, Hq, Tq_pad, 128]``. Padded query rows have
``dO = 0`` and ``delta = 0``, so they add nothing; padded key columns are masked.

Verified only in Pallas TPU interpret mode (``pltpu.InterpretParams``) on CPU: no TPU was
available, so the Mosaic TPU lowering (in particular the ``[bq, bk]`` transposes of P and dS),
VMEM budgets and speed are untested.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.common import (AttnStatic, dot_nn, dot_nt, kv_block_range,
                                             q_block_range)
from pallas_kernels.attention.tpu_fwd import (LANES, SUBLANES, block_mask, compiler_params,
                                              interpret_arg, lanes, last_visible_k,
                                              segment_layouts, to_bhtd)

__all__ = ["tpu_flash_bwd"]


def _probs(st, q, k, lse, i, j, masked, qseg_ref, kseg_ref):
    """``P [bq, bk]`` float32 of query block ``i`` x key block ``j``."""
    s = dot_nt(q, k, st.precision) * st.scale2
    if masked:
        qseg = qseg_ref[...] if st.has_segments else None
        kseg = kseg_ref[...] if st.has_segments else None
        s = jnp.where(block_mask(st, i, j, qseg, kseg), s, -jnp.inf)
    return jnp.exp2(s - lanes(lse, st.block_k))


def _dkdv_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dk_ref, dv_ref, dk_sc, dv_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        qseg_ref = kseg_ref = None
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probs(st, q, k, lse_ref[...], i, j, masked, qseg_ref, kseg_ref)   # [bq, bk]
        dv_sc[...] += dot_nn(p.T.astype(do.dtype), do, st.precision)
        dp = dot_nt(do, v, st.precision)                                      # [bq, bk]
        ds = p * (dp - lanes(delta_ref[...], st.block_k))
        dk_sc[...] += dot_nn(ds.T.astype(q.dtype), q, st.precision)

    i_start, i_full = q_block_range(st, j)
    pl.when((i >= i_start) & (i < i_full))(functools.partial(step, masked=True))
    pl.when(i >= i_full)(functools.partial(step, masked=False))

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * st.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, st: AttnStatic):
    if st.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
         dq_ref, dq_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
        qseg_ref = kseg_ref = None
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        p = _probs(st, q, k, lse_ref[...], i, j, masked, qseg_ref, kseg_ref)
        dp = dot_nt(do, v, st.precision)
        ds = p * (dp - lanes(delta_ref[...], st.block_k))
        dq_sc[...] += dot_nn(ds.astype(k.dtype), k, st.precision)

    n_full, n_end = kv_block_range(st, i)
    pl.when(j < n_full)(functools.partial(step, masked=False))
    pl.when((j >= n_full) & (j < n_end))(functools.partial(step, masked=True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * st.sm_scale).astype(dq_ref.dtype)


def _stat_layout(x):
    """``[B, Hq, Tq_pad]`` float32 -> lane-replicated ``[B, Hq, Tq_pad, 128]``."""
    return jnp.broadcast_to(x.astype(jnp.float32)[..., None], (*x.shape, LANES))


def tpu_flash_bwd(q, k, v, do, lse, delta, q_seg, kv_seg, st: AttnStatic, st_dq: AttnStatic):
    """Padded ``[B, T_pad, H, D]`` inputs; ``lse``/``delta`` ``[B, Hq, Tq_pad]`` float32 ->
    ``(dq, dk, dv)`` in the input dtype and layout."""
    B, Tq_pad, Hq, D = q.shape
    Tk_pad, Hkv = k.shape[1], k.shape[2]
    G = st.group
    qh, kh, vh, doh = to_bhtd(q), to_bhtd(k), to_bhtd(v), to_bhtd(do)
    lse4, delta4 = _stat_layout(lse), _stat_layout(delta)
    segs = segment_layouts(q_seg, kv_seg) if st.has_segments else ()

    # ---- dK / dV ----
    bq, bk = st.block_q, st.block_k
    nq, nk = Tq_pad // bq, Tk_pad // bk
    nq_last = nq - 1

    def q_idx(j, i):  # skipped (invisible) query blocks re-use the first visible one
        i_start, _ = q_block_range(st, j)
        return jnp.maximum(i, jnp.minimum(i_start, nq_last))

    row_spec = pl.BlockSpec((None, None, bq, D),
                            lambda b, h, j, g, i: (b, h * G + g, q_idx(j, i), 0))
    stat_spec = pl.BlockSpec((None, None, bq, LANES),
                             lambda b, h, j, g, i: (b, h * G + g, q_idx(j, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, j, g, i: (b, h, j, 0))
    in_specs = [row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, j, g, i: (b, q_idx(j, i), 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, h, j, g, i: (b, 0, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(B, Hkv, nk, G, nq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype),
                   jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        compiler_params=compiler_params(3, 2),
        interpret=interpret_arg(st),
        name="tpu_flash_attention_bwd_dkdv",
    )(qh, kh, vh, doh, lse4, delta4, *segs)

    # ---- dQ ----
    st = st_dq
    bq, bk = st.block_q, st.block_k
    nq, nk = Tq_pad // bq, Tk_pad // bk

    def kv_idx(b, h, i, j):
        return b, h // G, jnp.minimum(j, last_visible_k(st, i)), 0

    row_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    stat_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), kv_idx)
    in_specs = [row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec]
    if st.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk),
                                  lambda b, h, i, j: (b, 0, kv_idx(b, h, i, j)[2]))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(B, Hq, nq, nk),
        in_specs=in_specs,
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        compiler_params=compiler_params(3, 1),
        interpret=interpret_arg(st),
        name="tpu_flash_attention_bwd_dq",
    )(qh, kh, vh, doh, lse4, delta4, *segs)
    return to_bhtd(dq), to_bhtd(dk), to_bhtd(dv)
