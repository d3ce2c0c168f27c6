"""FlashAttention backward for Hopper in Pallas Mosaic GPU (wgmma + TMA + warp specialisation).

Same math and conventions as :func:`pallas_kernels.attention.triton_bwd.flash_bwd` (see that
module and ``common.py``): padded inputs, base-2 log-sum-exp ``lse`` (``+inf`` for rows that see no key),
``delta = rowsum(dO * O)``, bottom-right causal alignment, GQA summed over the query heads that
share a kv head without repeating K/V. Probabilities are recomputed block by block,
``P = exp2(s2 - lse)`` with ``s2 = (q . k) * sm_scale * log2(e)``, and

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.

Two kernels (``plgpu.kernel``), so no atomics are needed (a dQ reduction over key blocks would
need float32 atomics in GMEM plus a conversion pass; the separate dQ kernel recomputes ``P`` and
``dP`` once more -- 2 extra matmuls out of 7 -- but is deterministic and keeps every CTA's
writes disjoint; the same choice as the Triton kernels here):

* dK/dV, grid ``(B, Hkv, Tk_pad // block_k)`` (Mosaic GPU launches the last grid axis fastest,
  so consecutive CTAs are consecutive key blocks of one kv head): one CTA owns one key block of one kv head. The
  K and V block stay resident in SMEM. ``block_k // 64`` *consumer* warpgroups each own 64 key
  rows (the M of their wgmmas); one *producer* warpgroup streams, for every query head of the
  GQA group and every query block that can see the key block (causal skips the rest), the
  Q / dO tiles ``[block_q, D]`` and the lse / delta rows ``[block_q]`` by TMA into a
  ``_STAGES``-deep SMEM ring (``full`` barriers signal arrival, ``free`` barriers return a slot
  once every consumer is done with it). A consumer step is the transposed formulation

      S^T = K_c Q^T,  dP^T = V_c dO^T          (wgmma, float32 accumulators [64, block_q])
      P^T = exp2(S^T * scale2 - lse),  dS^T = P^T * (dP^T - delta)
      dV_c += P^T dO,  dK_c += dS^T Q            (wgmma, P^T / dS^T staged through SMEM)

  so no register tile is ever transposed; Q / dO feed the first two wgmmas as transposed SMEM
  operands. dK / dV accumulate in registers over the whole loop and leave through SMEM (the
  K / V buffers are reused) by TMA.
* dQ, grid ``(B, Hq, Tq_pad // block_q)``: one CTA owns one query block; ``block_q // 64``
  consumer warpgroups own 64 query rows each; the producer streams K / V tiles ``[block_k, D]``
  of the visible key blocks: ``S = Q K^T``, ``dP = dO V^T``, ``dQ += dS K`` (dS through SMEM).

Why P^T / dS^T go through SMEM: wgmma reads B from SMEM and A from SMEM or registers. Compiled,
``plgpu.wgmma`` also accepts a register array as A (the Mosaic forward feeds P that way), but GPU
interpret mode only simulates SMEM operands; staging through SMEM keeps one code path that the
CPU tests execute. The round trip costs ~2 x 8 KiB of SMEM stores per step per consumer; a
register-A variant for the GPU is a listed follow-up (docs/benchmarks/attention_mosaic_bwd.md).

wgmma schedule (deferred waits; wgmma groups complete in issue order, each ``plgpu.wgmma``
commits one group, ``wgmma_accumulator_load(acc, wait_n=n)`` returns once at most ``n`` groups
are still in flight). dK/dV consumer, step ``t`` (ring slot ``t % _STAGES``), entering with
``C_{t-1}: dV += P^T_{t-1} dO_{t-1}`` and ``D_{t-1}: dK += dS^T_{t-1} Q_{t-1}`` in flight:

  1. issue ``A: S^T = K_c Q_t^T`` and ``B: dP^T = V_c dO_t^T`` (both read only the ring slot
     and the resident K / V);
  2. read ``S^T`` with ``wait_n=1``: ``C_{t-1}, D_{t-1}, A`` are done, ``B`` may run. Now the
     P^T / dS^T tiles and ring slot ``t-1`` (read by ``C_{t-1}`` / ``D_{t-1}``) are free: slot
     ``t-1`` is released here (its ``free`` arrival), the tiles are overwritten below;
  3. ``P^T = exp2(..)`` (overlaps ``B``), store to the P^T tile, ``commit_smem``, issue
     ``C_t: dV += P^T dO_t``;
  4. read ``dP^T`` with ``wait_n=1``: ``B`` done, ``C_t`` may run;
  5. ``dS^T``, store to the dS^T tile (its last reader ``D_{t-1}`` was awaited in 2),
     ``commit_smem``, issue ``D_t: dK += dS^T Q_t``; ``C_t, D_t`` stay in flight.

The accumulators dK / dV are read once after the loop (``wait_n=0``). So a buffer is only
overwritten after the wgmma that reads it has been awaited, and a ring slot is released only
once every wgmma reading it has completed. The dQ consumer does the same with one
accumulator: issue ``S = Q_c K_j^T`` and ``dP = dO_c V_j^T``, read ``S`` with ``wait_n=1``
(``dQ_{j-1} += dS_{j-1} K_{j-1}`` and ``S`` done: the dS tile and slot ``j-1`` are free,
slot ``j-1`` is released), ``P = exp2(..)`` while ``dP`` runs, read ``dP`` (``wait_n=0``),
store dS, issue ``dQ += dS K_j`` and leave it in flight. What this buys: the ``exp2`` of each
step overlaps one wgmma (``dP^T`` / ``dP``) and the dK (dQ) update of step ``t`` overlaps the
score wgmmas of step ``t+1``, instead of four (three) serial issue-wait round trips per step.
Registers are unchanged (``S^T`` and ``dP^T`` were already live together with ``P^T``). Mosaic
GPU interpret mode runs wgmma synchronously and ignores ``wait_n``: the CPU tests check the
values and the SMEM / barrier protocol (race detector) of this order, not its asynchrony; the
CUDA lowering test checks that both kernels contain ``wgmma.wait_group 1``. Not done: FA3's
ping-pong of the two consumer warpgroups in the backward.

Supported: bfloat16 / float16, head dim 64 or 128 (D=256 does not fit: the dK and dV float32
accumulators alone would take 2 x 64 x 256 / 128 = 256 registers per thread), block sizes 64 or
128 (a multiple of the 64-row wgmma M of one warpgroup), no segment ids.

Testing: ``interpret=True`` runs both kernels in Pallas' GPU interpret mode
(:class:`jax.experimental.pallas.mosaic_gpu.InterpretGPUParams`), which simulates SMEM, TMA,
barriers, wgmma and the concurrently running warpgroups on the CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.common import AttnStatic, kv_block_range, q_block_range
from pallas_kernels.attention.mosaic_common import (CONSUMER_REGS, MOSAIC_BLOCKS, MOSAIC_DTYPES,
                                                    MOSAIC_HEAD_DIMS, PRODUCER_REGS, SMEM_LIMIT,
                                                    WG_ROWS, compiler_params, interpret_params,
                                                    is_hopper, no_hopper_message,
                                                    smem_transforms, visible, wait_slot_free)

__all__ = ["mosaic_flash_bwd", "smem_bytes"]

_WG_ROWS = WG_ROWS   # rows of one warpgroup's wgmma (M)
_STAGES = 2          # depth of the streamed-operand SMEM ring


def smem_bytes(st: AttnStatic, kernel: str) -> int:
    """SMEM the ``"dkdv"`` or ``"dq"`` kernel allocates for ``st`` (16-bit inputs)."""
    bq, bk, D = st.block_q, st.block_k, st.D
    if kernel == "dkdv":
        tiles = 2 * bk * D + 2 * _STAGES * bq * D + 2 * bk * bq   # K, V; Q/dO ring; P^T, dS^T
        rows = 2 * _STAGES * bq                                     # lse / delta ring
    elif kernel == "dq":
        tiles = 2 * bq * D + 2 * _STAGES * bk * D + bq * bk         # Q, dO; K/V ring; dS
        rows = 2 * bq
    else:
        raise ValueError(f"kernel must be 'dkdv' or 'dq', got {kernel!r}")
    return 2 * tiles + 4 * rows + 8 * (1 + 2 * _STAGES)   # + mbarriers


def _check(q, k, v, do, lse, delta, st: AttnStatic, name: str):
    if st.has_segments:
        raise ValueError("mosaic_flash_bwd does not support segment_ids; use the Triton backend")
    if st.dtype not in MOSAIC_DTYPES or q.dtype.name != st.dtype:
        raise TypeError(f"mosaic_flash_bwd supports bfloat16/float16 inputs only; got "
                        f"q.dtype={q.dtype}, st.dtype={st.dtype!r}")
    if not (q.dtype == k.dtype == v.dtype == do.dtype):
        raise TypeError(f"q, k, v, do must share one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}, {do.dtype}")
    if st.D not in MOSAIC_HEAD_DIMS:
        raise ValueError(f"mosaic_flash_bwd supports head_dim {MOSAIC_HEAD_DIMS}, got "
                         f"{st.D} (D=256 does not fit the register budget)")
    for bname, b in (("block_q", st.block_q), ("block_k", st.block_k)):
        if b not in MOSAIC_BLOCKS:
            raise ValueError(f"{name}: {bname} must be one of {MOSAIC_BLOCKS} for the "
                             f"Mosaic GPU backward, got {b}")
    kernel = "dkdv" if name.startswith("dK") else "dq"
    if smem_bytes(st, kernel) > SMEM_LIMIT:
        raise ValueError(f"{name}: block_q={st.block_q}, block_k={st.block_k}, D={st.D} needs "
                         f"{smem_bytes(st, kernel)} bytes of SMEM > {SMEM_LIMIT} on Hopper; use "
                         "smaller blocks (e.g. dK/dV block_q=64, dQ block_k=64 at D=128)")
    B, Tq_pad, Hq, D = q.shape
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must be 4-D with one shape, got {k.shape}, {v.shape}")
    Bk, Tk_pad, Hkv, Dk = k.shape
    if do.shape != q.shape:
        raise ValueError(f"do must have q's shape {q.shape}, got {do.shape}")
    if (Bk, Dk, D) != (B, st.D, st.D) or Hq != Hkv * st.group:
        raise ValueError(f"inconsistent shapes q {q.shape}, k {k.shape} for {st}")
    if (Tq_pad, Tk_pad) != (st.Tq_pad, st.Tk_pad):
        raise ValueError(f"padded lengths ({Tq_pad}, {Tk_pad}) != ({st.Tq_pad}, {st.Tk_pad}) in st")
    if Tq_pad % st.block_q or Tk_pad % st.block_k:
        raise ValueError(f"{name}: Tq_pad={Tq_pad} / Tk_pad={Tk_pad} must be multiples of "
                         f"block_q={st.block_q} / block_k={st.block_k}")
    for sname, s in (("lse", lse), ("delta", delta)):
        if s.shape != (B, Hq, Tq_pad) or s.dtype != jnp.float32:
            raise ValueError(f"{sname} must be float32 [B, Hq, Tq_pad] = {(B, Hq, Tq_pad)}, got "
                             f"{s.dtype} {s.shape}")


def _consumer_rows(wg):
    """Consumer warpgroup ``wg``'s entry: take the registers the producer gave away; returns its
    64 rows (the M of its wgmmas) of the CTA's block."""
    plgpu.set_max_registers(CONSUMER_REGS, action="increase")
    return pl.ds(wg * _WG_ROWS, _WG_ROWS)


# ------------------------------------------------------------------------------------------
# dK / dV
# ------------------------------------------------------------------------------------------
def _dkdv_kernel(q_g, k_g, v_g, do_g, lse_g, delta_g, dk_g, dv_g,
                 k_s, v_s, q_s, do_s, lse_s, dl_s, pT_s, dsT_s, kv_bar, full, free,
                 *, st: AttnStatic):
    bq, bk, D, G = st.block_q, st.block_k, st.D, st.group
    nc = bk // _WG_ROWS
    nq = st.Tq_pad // bq
    nq_full = st.Tq // bq                        # query blocks with no padded row
    kb, h, b, wg = (jax.lax.axis_index(n) for n in ("kb", "h", "b", "wg"))
    i_start, i_full = q_block_range(st, kb)
    n_i = nq - i_start                          # query blocks per head
    n_steps = G * n_i
    dt = q_g.dtype

    @pl.when(wg == nc)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
        kv_rows = pl.ds(kb * bk, bk)
        plgpu.copy_gmem_to_smem(k_g.at[b, kv_rows, h, :], k_s, kv_bar)
        plgpu.copy_gmem_to_smem(v_g.at[b, kv_rows, h, :], v_s, kv_bar)

        def issue(t, _):
            slot = t % _STAGES
            g = t // n_i
            i = i_start + t % n_i
            hq = h * G + g
            rows = pl.ds(i * bq, bq)
            wait_slot_free(free, t, _STAGES)
            plgpu.copy_gmem_to_smem(q_g.at[b, rows, hq, :], q_s.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(do_g.at[b, rows, hq, :], do_s.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(lse_g.at[b, hq, rows], lse_s.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(delta_g.at[b, hq, rows], dl_s.at[slot], full.at[slot])
            return ()

        jax.lax.fori_loop(0, n_steps, issue, ())

    @pl.when(wg < nc)
    def _consumer():
        c, my_rows = wg, _consumer_rows(wg)
        k_c, v_c = k_s.at[my_rows], v_s.at[my_rows]
        pT_c, dsT_c = pT_s.at[c], dsT_s.at[c]
        plgpu.barrier_wait(kv_bar)

        def run(dk_acc, dv_acc):
            def step(i, t, masked):
                # Deferred waits (module docstring, "wgmma schedule"). In flight on entry:
                # dV_{t-1} += P^T dO, dK_{t-1} += dS^T Q (issued in that order by step t-1).
                slot = t % _STAGES
                plgpu.barrier_wait(full.at[slot])
                q_t, do_t = q_s.at[slot], do_s.at[slot]

                def scores(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_c, q_t.T)                          # S^T = K_c Q^T
                    plgpu.wgmma(dp_acc, v_c, do_t.T)                        # dP^T = V_c dO^T
                    # wait_n=1: dV_{t-1}, dK_{t-1}, S^T done; dP^T may still run. So pT_c,
                    # dsT_c and ring slot t-1 (read by dV_{t-1} / dK_{t-1}) are free again.
                    sT = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                    # The last _STAGES arrivals would complete phases nobody waits for.
                    plgpu.barrier_arrive(free.at[(t + _STAGES - 1) % _STAGES],
                                         predicate=(t > 0) & (t - 1 + _STAGES < n_steps))
                    sT = sT * st.scale2                                     # [64, bq]
                    lse = plgpu.load(lse_s.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    if masked:
                        vis = visible(st, i * bq, kb * bk + c * _WG_ROWS, (_WG_ROWS, bq),
                                      transposed=True, mask_rows=True)
                        sT = jnp.where(vis, sT, -jnp.inf)
                    pT = jnp.exp2(sT - lse[None, :])       # overlaps dP^T on the tensor cores
                    pT_c[...] = pT.astype(dt)
                    plgpu.commit_smem()                    # visible to the tensor core
                    plgpu.wgmma(dv_acc, pT_c, do_t)                         # dV += P^T dO
                    # wait_n=1: dP^T done; dV_t may still run (it reads pT_c, do_t).
                    dpT = plgpu.wgmma_accumulator_load(dp_acc, wait_n=1)
                    return pT, dpT

                pT, dpT = pl.run_scoped(scores, plgpu.ACC((_WG_ROWS, bq), jnp.float32),
                                        plgpu.ACC((_WG_ROWS, bq), jnp.float32))
                delta = plgpu.load(dl_s.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                dsT = pT * (dpT - delta[None, :])
                dsT_c[...] = dsT.astype(dt)          # dK_{t-1} (its last reader) was awaited
                plgpu.commit_smem()
                plgpu.wgmma(dk_acc, dsT_c, q_t)                             # dK += dS^T Q
                # dV_t and dK_t stay in flight into step t + 1 (or the final loads below).
                return t + 1

            def head(g, t):
                # query blocks [i_start, i_full): causal/k-tail mask; [i_full, mid): none;
                # [mid, nq): rows >= Tq (query padding) masked.
                mid = jnp.maximum(i_full, nq_full)
                t = jax.lax.fori_loop(i_start, i_full, functools.partial(step, masked=True), t)
                t = jax.lax.fori_loop(i_full, mid, functools.partial(step, masked=False), t)
                return jax.lax.fori_loop(mid, nq, functools.partial(step, masked=True), t)

            jax.lax.fori_loop(0, G, head, jnp.int32(0))
            dk = plgpu.wgmma_accumulator_load(dk_acc)      # wait_n=0: every group done
            dv = plgpu.wgmma_accumulator_load(dv_acc)
            # No release after the loop: the arrivals of the last _STAGES steps are
            # predicated off above (nobody waits for them).
            # K_c / V_c are no longer read (all wgmmas awaited): reuse them as output staging.
            k_c[...] = (dk * st.sm_scale).astype(dt)
            v_c[...] = dv.astype(dt)
            plgpu.commit_smem()
            out_rows = pl.ds(kb * bk + c * _WG_ROWS, _WG_ROWS)
            plgpu.copy_smem_to_gmem(k_c, dk_g.at[b, out_rows, h, :])
            plgpu.copy_smem_to_gmem(v_c, dv_g.at[b, out_rows, h, :])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(run, plgpu.ACC((_WG_ROWS, D), jnp.float32),
                      plgpu.ACC((_WG_ROWS, D), jnp.float32))


def _dkdv_call(q, k, v, do, lse, delta, st: AttnStatic, interpret):
    B, Tq_pad, Hq, D = q.shape
    Tk_pad, Hkv = k.shape[1], k.shape[2]
    bq, bk, dt = st.block_q, st.block_k, q.dtype
    nc = bk // _WG_ROWS
    tD, tq = smem_transforms(D, dt), smem_transforms(bq, dt)
    scratch = [
        plgpu.SMEM((bk, D), dt, transforms=tD),                   # k_s
        plgpu.SMEM((bk, D), dt, transforms=tD),                   # v_s
        plgpu.SMEM((_STAGES, bq, D), dt, transforms=tD),          # q_s
        plgpu.SMEM((_STAGES, bq, D), dt, transforms=tD),          # do_s
        plgpu.SMEM((_STAGES, bq), jnp.float32),                   # lse_s
        plgpu.SMEM((_STAGES, bq), jnp.float32),                   # dl_s
        plgpu.SMEM((nc, _WG_ROWS, bq), dt, transforms=tq),        # pT_s
        plgpu.SMEM((nc, _WG_ROWS, bq), dt, transforms=tq),        # dsT_s
        plgpu.Barrier(num_arrivals=2),                            # kv_bar: K and V landed
        plgpu.Barrier(num_arrivals=4, num_barriers=_STAGES),      # full: q, do, lse, delta
        plgpu.Barrier(num_arrivals=nc, num_barriers=_STAGES),     # free: every consumer done
    ]
    out = [jax.ShapeDtypeStruct(k.shape, dt), jax.ShapeDtypeStruct(v.shape, dt)]
    kern = plgpu.kernel(
        functools.partial(_dkdv_kernel, st=st), out_type=out, scratch_types=scratch,
        grid=(B, Hkv, Tk_pad // bk), grid_names=("b", "h", "kb"),   # last axis fastest
        num_threads=nc + 1, thread_name="wg", compiler_params=compiler_params(),
        interpret=interpret, kernel_name="flash_attention_bwd_dkdv_mosaic")
    return kern(q, k, v, do, lse, delta)


# ------------------------------------------------------------------------------------------
# dQ
# ------------------------------------------------------------------------------------------
def _dq_kernel(q_g, k_g, v_g, do_g, lse_g, delta_g, dq_g,
               q_s, do_s, lse_s, dl_s, k_s, v_s, ds_s, q_bar, full, free, *, st: AttnStatic):
    bq, bk, D, G = st.block_q, st.block_k, st.D, st.group
    nc = bq // _WG_ROWS
    nq = st.Tq_pad // bq
    pid, hq, b, wg = (jax.lax.axis_index(n) for n in ("qb", "h", "b", "wg"))
    # causal: heaviest query blocks (most visible keys) first.
    qb = (nq - 1 - pid) if st.causal else pid
    h = hq // G
    n_full, n_end = kv_block_range(st, qb)
    dt = q_g.dtype

    @pl.when(wg == nc)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
        rows = pl.ds(qb * bq, bq)
        for src, dst in ((q_g.at[b, rows, hq, :], q_s), (do_g.at[b, rows, hq, :], do_s),
                         (lse_g.at[b, hq, rows], lse_s), (delta_g.at[b, hq, rows], dl_s)):
            plgpu.copy_gmem_to_smem(src, dst, q_bar)     # the CTA's query block, once

        def issue(j, _):
            slot = j % _STAGES
            wait_slot_free(free, j, _STAGES)
            cols = pl.ds(j * bk, bk)
            plgpu.copy_gmem_to_smem(k_g.at[b, cols, h, :], k_s.at[slot], full.at[slot])
            plgpu.copy_gmem_to_smem(v_g.at[b, cols, h, :], v_s.at[slot], full.at[slot])
            return ()

        jax.lax.fori_loop(0, n_end, issue, ())

    @pl.when(wg < nc)
    def _consumer():
        c, my_rows = wg, _consumer_rows(wg)
        q_c, do_c, ds_c = q_s.at[my_rows], do_s.at[my_rows], ds_s.at[c]
        plgpu.barrier_wait(q_bar)
        lse = plgpu.load(lse_s.at[my_rows], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(dl_s.at[my_rows], layout=plgpu.Layout.WGMMA.reduce(1))

        def run(dq_acc):
            def step(j, carry, masked):
                # In flight on entry: dQ_{j-1} += dS K_{j-1} (issued by step j-1).
                slot = j % _STAGES
                plgpu.barrier_wait(full.at[slot])
                k_t, v_t = k_s.at[slot], v_s.at[slot]

                def scores(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, q_c, k_t.T)                          # S = Q_c K^T
                    plgpu.wgmma(dp_acc, do_c, v_t.T)                        # dP = dO_c V^T
                    # wait_n=1: dQ_{j-1} and S done, dP may still run: ds_c and ring slot
                    # j-1 (K_{j-1}, read by dQ_{j-1}) are free again.
                    s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                    plgpu.barrier_arrive(free.at[(j + _STAGES - 1) % _STAGES],
                                         predicate=(j > 0) & (j - 1 + _STAGES < n_end))
                    s = s * st.scale2                                       # [64, bk]
                    if masked:
                        vis = visible(st, qb * bq + c * _WG_ROWS, j * bk, (_WG_ROWS, bk))
                        s = jnp.where(vis, s, -jnp.inf)
                    p = jnp.exp2(s - lse[:, None])          # overlaps dP on the tensor cores
                    return p, dp_acc[...]                   # wait_n=0: dP done

                p, dp = pl.run_scoped(scores, plgpu.ACC((_WG_ROWS, bk), jnp.float32),
                                      plgpu.ACC((_WG_ROWS, bk), jnp.float32))
                ds = p * (dp - delta[:, None])
                ds_c[...] = ds.astype(dt)            # dQ_{j-1} (its last reader) was awaited
                plgpu.commit_smem()
                plgpu.wgmma(dq_acc, ds_c, k_t)                              # dQ += dS K
                # dQ_j stays in flight into step j + 1 (or the final load below).
                return carry

            jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), ())
            jax.lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), ())
            dq = plgpu.wgmma_accumulator_load(dq_acc)      # wait_n=0: every group done
            q_c[...] = (dq * st.sm_scale).astype(dt)   # Q_c no longer read: output staging
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_c, dq_g.at[b, pl.ds(qb * bq + c * _WG_ROWS, _WG_ROWS), hq, :])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(run, plgpu.ACC((_WG_ROWS, D), jnp.float32))


def _dq_call(q, k, v, do, lse, delta, st: AttnStatic, interpret):
    B, Tq_pad, Hq, D = q.shape
    bq, bk, dt = st.block_q, st.block_k, q.dtype
    nc = bq // _WG_ROWS
    tD = smem_transforms(D, dt)
    scratch = [
        plgpu.SMEM((bq, D), dt, transforms=tD),                   # q_s
        plgpu.SMEM((bq, D), dt, transforms=tD),                   # do_s
        plgpu.SMEM((bq,), jnp.float32),                           # lse_s
        plgpu.SMEM((bq,), jnp.float32),                           # dl_s
        plgpu.SMEM((_STAGES, bk, D), dt, transforms=tD),          # k_s
        plgpu.SMEM((_STAGES, bk, D), dt, transforms=tD),          # v_s
        plgpu.SMEM((nc, _WG_ROWS, bk), dt, transforms=smem_transforms(bk, dt)),   # ds_s
        plgpu.Barrier(num_arrivals=4),                            # q_bar: q, do, lse, delta
        plgpu.Barrier(num_arrivals=2, num_barriers=_STAGES),      # full: k, v
        plgpu.Barrier(num_arrivals=nc, num_barriers=_STAGES),     # free
    ]
    kern = plgpu.kernel(
        functools.partial(_dq_kernel, st=st), out_type=jax.ShapeDtypeStruct(q.shape, dt),
        scratch_types=scratch, grid=(B, Hq, Tq_pad // bq), grid_names=("b", "h", "qb"),
        num_threads=nc + 1, thread_name="wg", compiler_params=compiler_params(),
        interpret=interpret, kernel_name="flash_attention_bwd_dq_mosaic")
    return kern(q, k, v, do, lse, delta)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------
def _mosaic_flash_bwd(q, k, v, do, lse, delta, st: AttnStatic, st_dq: AttnStatic | None,
                      interpret):
    """No backend check: also used to lower the compiled kernels for CUDA on a CPU host."""
    st_dq = st if st_dq is None else st_dq
    _check(q, k, v, do, lse, delta, st, "dK/dV kernel")
    _check(q, k, v, do, lse, delta, st_dq, "dQ kernel")
    params = interpret_params(interpret)
    dk, dv = _dkdv_call(q, k, v, do, lse, delta, st, params)
    dq = _dq_call(q, k, v, do, lse, delta, st_dq, params)
    return dq, dk, dv


def mosaic_flash_bwd(q, k, v, do, lse, delta, st: AttnStatic, *, interpret: bool,
                     st_dq: AttnStatic | None = None):
    """FlashAttention backward by Hopper Mosaic GPU kernels; conventions of ``flash_bwd``.

    Args:
      q, do: ``[B, Tq_pad, Hq, D]``; k, v: ``[B, Tk_pad, Hkv, D]``; bfloat16 or float16, padded
        with zeros to ``st.Tq_pad`` / ``st.Tk_pad`` (padded key columns and query rows are
        masked).
      lse: ``[B, Hq, Tq_pad]`` float32 base-2 log-sum-exp (``+inf`` for rows seeing no key).
      delta: ``[B, Hq, Tq_pad]`` float32, ``rowsum(dO * O)``.
      st: static description; its ``block_k`` is the dK/dV kernel's key block (64 or 128 =
        1 or 2 consumer warpgroups) and ``block_q`` the query tile it streams.
      interpret: ``True`` runs in GPU interpret mode (any host, slow); ``False`` compiles for
        a Hopper GPU (compute capability 9.x) and raises ``RuntimeError`` elsewhere.
      st_dq: optional static description for the dQ kernel (its ``block_q`` = 64 or 128 query
        rows per CTA, ``block_k`` the streamed key tile); defaults to ``st``.

    Returns:
      ``(dq, dk, dv)`` with the shapes and dtype of ``q``, ``k``, ``v``. Rows of ``dq`` past
      ``st.Tq`` and of ``dk`` / ``dv`` past ``st.Tk`` are unspecified (the caller slices them
      off); the true rows do not depend on the padding's values.
    """
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {interpret!r}")
    if not interpret and not is_hopper():
        raise RuntimeError(no_hopper_message("mosaic_flash_bwd(interpret=False)"))
    return _mosaic_flash_bwd(q, k, v, do, lse, delta, st, st_dq, interpret)
