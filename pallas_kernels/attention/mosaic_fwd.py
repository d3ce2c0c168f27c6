"""FlashAttention forward for Hopper GPUs in Pallas Mosaic GPU (wgmma + TMA + warp specialisation).

Same contract as :func:`pallas_kernels.attention.triton_fwd.flash_fwd` (without segment ids): padded
``q [B, Tq_pad, Hq, D]``, ``k, v [B, Tk_pad, Hkv, D]`` -> ``o`` like ``q`` and
``lse2 [B, Hq, Tq_pad]`` float32 in base-2 units (``+inf`` for rows that see no key). Key columns
``>= st.Tk`` are masked, causal attention is bottom-right aligned, and fully masked key blocks
are skipped with :func:`pallas_kernels.attention.common.kv_block_range`. GQA reads kv head ``h // group``
straight from ``k``/``v`` (never repeated).

Design (FA3-style, one CTA per ``(batch, head, 128-row query block)``, grid ``(B, Hq, nq)``:
Mosaic GPU makes the last grid axis the fastest, so consecutive CTAs are consecutive query
blocks of one head; compiled with ``approx_math=True``):

* three warpgroups (``plgpu.kernel(num_threads=3)``): warpgroups 0 and 1 are *consumers*, each
  owning 64 query rows; warpgroup 2 is the *producer*. The producer gives registers away
  (``set_max_registers(.., "decrease")``), the consumers take them.
* the producer streams the key/value blocks ``[block_k, D]`` by TMA
  (``copy_gmem_to_smem``) into a ring of ``num_slots`` SMEM slots; one "full" barrier per slot
  and tensor (K, V) signals arrival, one "free" barrier per slot and tensor (two arrivals, one
  per consumer) signals that both consumers are done with it, so the producer can refill it.
  K and V have separate barriers, so ``S = Q K^T`` starts before V has landed.
* each consumer loads its Q tile once by TMA, then per key block: ``S = Q K^T`` by ``wgmma``
  (float32 accumulator, K transposed through the SMEM ref), releases the K slot, online softmax
  in registers in base 2 (``exp2``, running max ``m`` and sum ``l``), ``o = o * alpha + P V``
  by ``wgmma``, releases the V slot. Blocks in ``[n_full, n_end)`` get the element mask
  (causal / padded columns), blocks before ``n_full`` skip it.
* the running output (``o_in_acc``, compiled default): ``o`` is kept in the ``P V`` wgmma's
  float32 accumulator: before each ``P V`` wgmma the accumulator is set to ``o * alpha``
  (``acc[...] = ..``, ``wgmma_accumulator_store``), the wgmma adds ``P V`` in place and the
  awaited accumulator is the new ``o`` (attention_mgpu.py does the same with
  ``pl.run_state(..)(plgpu.ACC.init(o))``). One ``[64, D]`` float32 tile per consumer
  warpgroup instead of two (``o`` plus a fresh ``P V`` result added to it): 64 registers per
  thread fewer at D=128 (32 at D=64) while a ``P V`` wgmma is in flight. Mosaic GPU
  interpret mode cannot store into an accumulator (JAX 0.11.2: ``ValueError: Accumulator
  shape (6,) does not match value shape``), so there (``o_in_acc=False``, the only choice in
  interpret mode) ``P V`` goes into a fresh zero accumulator and ``o = o * alpha + PV`` is
  added in registers; both forms lower for CUDA (tested on CPU).
* epilogue: ``o / l`` is written into the consumer's (now unused) Q SMEM tile and stored with a
  TMA copy, ``lse2`` likewise through a small SMEM vector.

Operand of ``P V``: on the GPU ``P`` is fed to ``wgmma`` from registers (``p_via_smem=False``,
as FA3 does). Mosaic GPU *interpret* mode (CPU) only simulates ``wgmma`` with both operands in
SMEM, so there ``P`` is first stored to a per-consumer SMEM tile (``p_via_smem=True``, the only
choice allowed in interpret mode). That operand path and ``o_in_acc`` (above) are the only
differences between what the CPU tests run and what the GPU runs; all four combinations lower
for CUDA (checked by the tests on CPU).

Consumer schedules (static ``schedule=`` argument, :data:`SCHEDULES`):

* ``"serial"`` (default): per key block ``j``: issue ``S_j = Q K_j^T``, await it, softmax, issue
  ``P_j V_j``, await it. The tensor cores idle during the softmax unless the warp schedulers
  happen to interleave the other consumer's GEMMs.
* ``"overlap"`` (FA3 intra-warpgroup pipelining): the loop is rotated so that one step issues
  ``S_{j+1} = Q K_{j+1}^T`` *and then* ``P_j V_j`` (two wgmma groups in flight), awaits only the
  first (``wgmma_wait``-style ``wgmma_accumulator_load(.., wait_n=1)``), does the softmax of
  ``S_{j+1}`` while ``P_j V_j`` still runs on the tensor cores, then awaits ``P_j V_j``.
* ``"pingpong"`` (FA3 inter-warpgroup ping-pong): the same rotated loop, each step issues
  ``P_j V_j`` and ``S_{j+1}`` and awaits both, but the issue of each step's GEMMs is a critical
  section handed back and forth between the two consumers by two mbarriers ("turn" tokens), so
  the tensor cores run one consumer's GEMMs while the other does its softmax.
* ``"overlap+pingpong"``: both.

The rotated schedules peel a prologue (``S_0``, always with the element mask) and an epilogue
(``P_{n-1} V_{n-1}``); a query block that sees no key at all still runs one fully masked key
block (``max(n_end, 1)`` blocks, the producer loads block 0), which gives ``l = 0`` -> ``o = 0``,
``lse2 = +inf`` like the serial loop with zero trips. All schedules compute the same values up to
float32 summation order (the o update is ``o * alpha + PV`` in every schedule, in place in the
accumulator or in registers by ``o_in_acc``). None of the
schedules has run on a GPU yet; expected speeds and the register risk of ``"overlap"`` at
D=128 / block_k=128 are in docs/benchmarks/attention_notes.md.

Supported: bfloat16 / float16, ``D`` in {64, 128}, ``block_q == 128``, ``block_k`` in
{64, 128} (dividing ``Tk_pad``), no segment ids. ``D = 256`` is *not* supported. With ``o``
in the ``P V`` accumulator it might now fit the forward at block_k=64 (``o`` 128 + ``S`` 32 +
``P`` 16 = 176 of the 232 consumer registers per thread; it was 2 x 128 + 48 before), but
it is not enabled: nothing was tested at D=256 and the backward cannot take it (dK + dV
alone are 256 registers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.common import AttnStatic, kv_block_range
from pallas_kernels.attention.mosaic_common import (CONSUMER_REGS, MOSAIC_BLOCK_Q, MOSAIC_BLOCKS,
                                                    PRODUCER_REGS, SMEM_LIMIT, WG_ROWS,
                                                    compiler_params, interpret_params, matmul,
                                                    mosaic_unsupported_reason, smem_transforms,
                                                    visible, wait_slot_free)

__all__ = ["mosaic_flash_fwd", "smem_bytes", "SCHEDULES"]

_BLOCK_Q = MOSAIC_BLOCK_Q  # two consumer warpgroups x 64 rows
_ROWS = WG_ROWS            # rows per consumer warpgroup (wgmma M)
# Consumer schedules (module docstring): (intra-warpgroup overlap, inter-warpgroup ping-pong).
_SCHEDULE_FLAGS = {
    "serial": (False, False),
    "overlap": (True, False),
    "pingpong": (False, True),
    "overlap+pingpong": (True, True),
}
SCHEDULES = tuple(_SCHEDULE_FLAGS)


def smem_bytes(D, block_k, num_slots, dtype, p_via_smem) -> int:
    """SMEM the kernel allocates: Q/O tiles, the K/V ring, P tiles (SMEM variant), lse rows."""
    isz = jnp.dtype(dtype).itemsize
    n = 2 * _ROWS * D * isz + 2 * num_slots * block_k * D * isz + 2 * _ROWS * 4
    if p_via_smem:
        n += 2 * _ROWS * block_k * isz
    return n + 1024  # barriers + alignment slack


def _check(q, k, v, st: AttnStatic, num_slots, interpret, p_via_smem, schedule):
    if schedule not in _SCHEDULE_FLAGS:
        raise ValueError(f"mosaic_flash_fwd: schedule must be one of {SCHEDULES}, "
                         f"got {schedule!r}")
    reason = mosaic_unsupported_reason(q.dtype, st.D, st.has_segments)
    if reason is not None:
        raise ValueError(f"mosaic_flash_fwd does not support {reason}")
    if st.block_q != _BLOCK_Q:
        raise ValueError(f"mosaic_flash_fwd needs block_q == {_BLOCK_Q}, got {st.block_q}")
    if st.block_k not in MOSAIC_BLOCKS:
        raise ValueError(f"mosaic_flash_fwd needs block_k in {MOSAIC_BLOCKS}, got {st.block_k}")
    B, Tq_pad, Hq, D = q.shape
    if (Tq_pad, D) != (st.Tq_pad, st.D) or Tq_pad % _BLOCK_Q:
        raise ValueError(f"q shape {q.shape} does not match the static plan {st}")
    if k.shape != v.shape or k.shape[1] != st.Tk_pad or st.Tk_pad % st.block_k:
        raise ValueError(f"k/v shapes {k.shape}, {v.shape} do not match the static plan {st}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Hq != k.shape[2] * st.group:
        raise ValueError(f"Hq={Hq} != Hkv={k.shape[2]} x group={st.group}")
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    smem = smem_bytes(D, st.block_k, num_slots, q.dtype, p_via_smem)
    if smem > SMEM_LIMIT:
        raise ValueError(f"mosaic_flash_fwd: D={D}, block_k={st.block_k}, num_slots={num_slots} "
                         f"needs {smem} bytes of SMEM > {SMEM_LIMIT} (Hopper per-block limit)")
    if interpret and not p_via_smem:
        raise ValueError("Mosaic GPU interpret mode simulates wgmma only with SMEM operands: "
                         "p_via_smem=False (P from registers) can only run compiled on a GPU")


def _softmax_step(s, m, l, j, r0, st: AttnStatic, masked):
    """Online-softmax update for key block ``j`` from the raw scores ``s = Q K_j^T``.

    Returns ``(m_new, l_new, alpha, p)``: running max and sum, the rescale factor
    ``alpha = exp2(m - m_new)`` of everything accumulated before block ``j``, and the
    probabilities ``p`` (float32) relative to ``m_new``.
    """
    bk = st.block_k
    s = s * st.scale2                                  # base-2 units
    if masked:  # iotas built here, not hoisted: no registers held in unmasked steps
        s = jnp.where(visible(st, r0, j * bk, (_ROWS, bk)), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # a row may have seen no key yet (masked blocks only): keep exp2 arguments finite
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    return m_new, l, alpha, p


def _pv_init(acc, o, alpha, o_in_acc):
    """Before the ``P V`` wgmma into ``acc``: with ``o_in_acc`` (compiled only) the accumulator
    starts as the rescaled running output ``o * alpha`` (``acc[...] = ..``, i.e.
    ``wgmma_accumulator_store``), so the wgmma accumulates ``o_j = o_{j-1} alpha_j + P_j V_j``
    in place and no second ``[64, D]`` float32 tile is live. Otherwise ``acc`` stays zero (the
    fresh accumulator of ``run_scoped``) and :func:`_pv_result` adds it to ``o * alpha``."""
    if o_in_acc:
        acc[...] = o * alpha[:, None]


def _pv_result(val, o, alpha, o_in_acc):
    """The new running output from the awaited ``P V`` accumulator value ``val``."""
    return val if o_in_acc else o * alpha[:, None] + val


def _fwd_body(q_ref, k_ref, v_ref, o_ref, lse_ref,
              q_smem, k_smem, v_smem, p_smem, lse_smem,
              q_bar, k_full, v_full, k_free, v_free, turn, *, st: AttnStatic, num_slots: int,
              schedule: str, o_in_acc: bool):
    dtype = q_ref.dtype
    bk, S = st.block_k, num_slots
    nq = st.Tq_pad // _BLOCK_Q
    pid = jax.lax.axis_index("qb")
    h = jax.lax.axis_index("h")
    b = jax.lax.axis_index("b")
    q_block = (nq - 1 - pid) if st.causal else pid     # causal: longest rows first
    hk = h // st.group
    n_full, n_end = kv_block_range(st, q_block)
    wg = jax.lax.axis_index("wg")
    overlap, pingpong = _SCHEDULE_FLAGS[schedule]
    # The rotated (non-serial) loops always run >= 1 key block (a fully masked one when the
    # query block sees no key), so the producer then loads block 0 too.
    n_blocks = n_end if schedule == "serial" else jnp.maximum(n_end, 1)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")

        def load(j, carry):
            slot = jax.lax.rem(j, S)
            rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
            wait_slot_free(k_free, j, S)   # slot used before: both consumers released it
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk, :], k_smem.at[slot], k_full.at[slot])
            wait_slot_free(v_free, j, S)
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk, :], v_smem.at[slot], v_full.at[slot])
            return carry

        jax.lax.fori_loop(0, n_blocks, load, None)

        # Drain: observe the last release of each used slot, so that every barrier phase is
        # waited on exactly once (the interpreter checks this when the barriers are freed).
        def drain(j, carry):
            slot = jax.lax.rem(j, S)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            return carry

        jax.lax.fori_loop(jnp.maximum(n_blocks - S, 0), n_blocks, drain, None)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        r0 = q_block * _BLOCK_Q + wg * _ROWS
        q_tile = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, _ROWS), h, :], q_tile, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        o0 = plgpu.layout_cast(jnp.zeros((_ROWS, st.D), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
        consumer = _consumer_serial if schedule == "serial" else _consumer_rotated
        o, m, l = consumer(q_tile, k_smem, v_smem, p_smem, k_full, v_full, k_free, v_free, turn,
                           wg=wg, r0=r0, n_full=n_full, n_blocks=n_blocks, init=(o0, m0, l0),
                           st=st, num_slots=S, overlap=overlap, pingpong=pingpong,
                           o_in_acc=o_in_acc)

        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o = o / l_safe[:, None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))
        # Q's SMEM tile is free now (every wgmma reading it has been awaited): reuse it for o.
        q_tile[...] = o.astype(dtype)
        lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(r0, _ROWS), h, :])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, _ROWS)])
        plgpu.wait_smem_to_gmem(0)


def _consumer_serial(q_tile, k_smem, v_smem, p_smem, k_full, v_full, k_free, v_free, turn, *,
                     wg, r0, n_full, n_blocks, init, st, num_slots, overlap, pingpong, o_in_acc):
    """``schedule="serial"``: every wgmma is awaited right after it is issued."""
    del turn, overlap, pingpong
    dtype, bk, S = k_smem.dtype, st.block_k, num_slots

    def step(j, carry, masked):
        o, m, l = carry
        slot = jax.lax.rem(j, S)

        plgpu.barrier_wait(k_full.at[slot])
        s = matmul(q_tile, k_smem.at[slot].T, (_ROWS, bk))
        plgpu.barrier_arrive(k_free.at[slot])
        m_new, l, alpha, p = _softmax_step(s, m, l, j, r0, st, masked)
        p = p.astype(dtype)

        plgpu.barrier_wait(v_full.at[slot])
        if p_smem is not None:
            p_smem.at[wg][...] = p
            plgpu.commit_smem()                            # visible to the tensor core
            p_op = p_smem.at[wg]
        else:
            p_op = p

        def pv(acc):
            _pv_init(acc, o, alpha, o_in_acc)
            plgpu.wgmma(acc, p_op, v_smem.at[slot])
            return acc[...]                                # wait_n=0

        pv_val = pl.run_scoped(pv, plgpu.ACC((_ROWS, st.D), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        return _pv_result(pv_val, o, alpha, o_in_acc), m_new, l

    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), init)
    return jax.lax.fori_loop(n_full, n_blocks, functools.partial(step, masked=True), carry)


def _consumer_rotated(q_tile, k_smem, v_smem, p_smem, k_full, v_full, k_free, v_free, turn, *,
                      wg, r0, n_full, n_blocks, init, st, num_slots, overlap, pingpong,
                      o_in_acc):
    """``schedule`` in {"overlap", "pingpong", "overlap+pingpong"}: FA3's rotated loop.

    Step ``j`` (for ``j`` in ``[0, n_blocks - 1)``) enters holding ``P_j`` (registers, or the
    consumer's P SMEM tile), the statistics ``m_j, l_j`` and ``alpha_j`` (the rescale that
    belongs to ``P_j V_j``) and ``o_{j-1}``; it issues ``P_j V_j`` and ``S_{j+1} = Q K_{j+1}^T``
    and leaves with ``P_{j+1}, m_{j+1}, l_{j+1}, alpha_{j+1}`` and
    ``o_j = o_{j-1} * alpha_j + P_j V_j`` (with ``o_in_acc`` the PV accumulator is set to
    ``o_{j-1} * alpha_j`` before the step's wgmmas are issued, so ``o`` lives in the
    accumulator that is in flight across the ``wait_n=1``). Prologue: ``S_0`` -> ``P_0``; epilogue:
    ``o_{n-1} = o_{n-2} * alpha_{n-1} + P_{n-1} V_{n-1}``.

    wgmma groups complete in issue order (each ``plgpu.wgmma`` commits one group), so with
    two groups in flight ``wgmma_accumulator_load(acc, wait_n=1)`` returns once the *older* one
    is done. Which accumulators / operands are live across that wait is spelled out at each
    wait below. (Mosaic GPU interpret mode runs wgmma synchronously and ignores ``wait_n``, so
    the CPU tests cannot catch a wrong ``wait_n``: this ordering is checked by reasoning only.)

    Ping-pong: ``turn[w]`` (1 arrival) is consumer ``w``'s token. The GEMM *issue* of each
    stage (prologue, each step, epilogue: ``n_blocks + 1`` stages per consumer) is bracketed by
    ``barrier_wait(turn[wg])`` ... ``barrier_arrive(turn[1 - wg])``; consumer 1 hands consumer 0
    the first token. So issues strictly alternate 0, 1, 0, 1, ... and the tensor cores run one
    consumer's GEMMs while the other one does its softmax. Both consumers run the same number
    of stages (same ``n_blocks``), so ``turn[1]`` completes exactly as often as consumer 1
    waits on it and ``turn[0]`` once more (consumer 1's last hand-over): consumer 0 waits on
    that final phase after its epilogue. Strict alternation also means no ``turn`` barrier is
    ever arrived on twice before its waiter saw the previous phase. The TMA "full" barriers
    are awaited *before* taking the token, so a consumer never holds the token while waiting
    for memory (no cycle with the producer: the slots a stage needs were released by both
    consumers in earlier stages, which never wait on a token held by a later stage).
    """
    dtype, bk, S, D = k_smem.dtype, st.block_k, num_slots, st.D
    o, m, l = init

    def acquire():
        if pingpong:
            plgpu.barrier_wait(turn.at[wg])

    def hand_over():
        if pingpong:
            plgpu.barrier_arrive(turn.at[1 - wg])

    def stash(p):
        """P (input dtype) -> what the next ``P V`` wgmma reads: registers, or the P SMEM tile.

        With the SMEM tile, callers only stash after the previous ``P V`` that read the tile
        has been awaited (wait_n=0): the tile is overwritten here.
        """
        if p_smem is None:
            return p
        p_smem.at[wg][...] = p
        plgpu.commit_smem()                                # visible to the tensor core
        return None

    def p_operand(p):
        return p if p_smem is None else p_smem.at[wg]

    if pingpong:
        @pl.when(wg == 1)
        def _first_token():
            plgpu.barrier_arrive(turn.at[0])

    # ---- prologue: S_0 (always masked: block 0 may be partly or fully masked) ----
    plgpu.barrier_wait(k_full.at[0])
    acquire()

    def qk0(acc):
        plgpu.wgmma(acc, q_tile, k_smem.at[0].T)
        hand_over()
        return acc[...]                                    # wait_n=0: S_0 done

    s = pl.run_scoped(qk0, plgpu.ACC((_ROWS, bk), jnp.float32))
    plgpu.barrier_arrive(k_free.at[0])
    m, l, alpha, p = _softmax_step(s, m, l, 0, r0, st, masked=True)
    p = stash(p.astype(dtype))

    # ---- steady state ----
    def step(j, carry, masked):
        o, m, l, alpha, p = carry
        slot, nslot = jax.lax.rem(j, S), jax.lax.rem(j + 1, S)
        plgpu.barrier_wait(k_full.at[nslot])
        plgpu.barrier_wait(v_full.at[slot])
        acquire()

        def gemms(s_acc, pv_acc):
            _pv_init(pv_acc, o, alpha, o_in_acc)   # o_in_acc: pv_acc = o_{j-1} * alpha_j
            if overlap:
                plgpu.wgmma(s_acc, q_tile, k_smem.at[nslot].T)    # group A: S_{j+1}
                plgpu.wgmma(pv_acc, p_operand(p), v_smem.at[slot])  # group B: P_j V_j
                hand_over()
                # wait_n=1: group A (older) complete, group B may still run. Live across
                # this wait and still owned by the tensor core: pv_acc (being written), the
                # P_j operand (registers, or the P SMEM tile) and V slot `slot`. Ours again:
                # s_acc and K slot `nslot`, so K is released now, before the softmax.
                s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                plgpu.barrier_arrive(k_free.at[nslot])
                # softmax(S_{j+1}) runs while P_j V_j is on the tensor cores; it writes only
                # fresh registers (never P_j's, never the P SMEM tile: see stash below).
                m_new, l_new, alpha_new, p_new = _softmax_step(s, m, l, j + 1, r0, st, masked)
                p_new = p_new.astype(dtype)
                pv = pv_acc[...]                                   # wait_n=0: group B done
            else:
                plgpu.wgmma(pv_acc, p_operand(p), v_smem.at[slot])  # P_j V_j
                plgpu.wgmma(s_acc, q_tile, k_smem.at[nslot].T)    # S_{j+1}
                hand_over()
                pv = plgpu.wgmma_accumulator_load(pv_acc, wait_n=0)  # both groups done
                s = s_acc[...]
                plgpu.barrier_arrive(k_free.at[nslot])
                m_new, l_new, alpha_new, p_new = _softmax_step(s, m, l, j + 1, r0, st, masked)
                p_new = p_new.astype(dtype)
            # every group of this step is complete: V slot and P_j (registers / tile) are free
            plgpu.barrier_arrive(v_free.at[slot])
            return pv, m_new, l_new, alpha_new, p_new

        pv, m_new, l_new, alpha_new, p_new = pl.run_scoped(
            gemms, plgpu.ACC((_ROWS, bk), jnp.float32), plgpu.ACC((_ROWS, D), jnp.float32))
        return _pv_result(pv, o, alpha, o_in_acc), m_new, l_new, alpha_new, stash(p_new)

    mid = jnp.maximum(n_full - 1, 0)          # steps before `mid` compute unmasked S_{j+1}
    carry = (o, m, l, alpha, p)
    carry = jax.lax.fori_loop(0, mid, functools.partial(step, masked=False), carry)
    o, m, l, alpha, p = jax.lax.fori_loop(mid, n_blocks - 1, functools.partial(step, masked=True),
                                          carry)

    # ---- epilogue: P_{n-1} V_{n-1} ----
    slot = jax.lax.rem(n_blocks - 1, S)
    plgpu.barrier_wait(v_full.at[slot])
    acquire()

    def pv_last(acc):
        _pv_init(acc, o, alpha, o_in_acc)
        plgpu.wgmma(acc, p_operand(p), v_smem.at[slot])
        hand_over()
        return acc[...]                                    # wait_n=0

    pv = pl.run_scoped(pv_last, plgpu.ACC((_ROWS, D), jnp.float32))
    plgpu.barrier_arrive(v_free.at[slot])
    o = _pv_result(pv, o, alpha, o_in_acc)
    if pingpong:
        @pl.when(wg == 0)
        def _last_token():                                 # consumer 1's final hand-over
            plgpu.barrier_wait(turn.at[0])
    return o, m, l


def mosaic_flash_fwd(q, k, v, st: AttnStatic, *, interpret: bool, num_slots: int = 2,
                     p_via_smem: bool | None = None, schedule: str = "serial",
                     detect_races: bool = False, o_in_acc: bool | None = None):
    """q [B, Tq_pad, Hq, D], k/v [B, Tk_pad, Hkv, D] (padded) -> (o like q, lse2 [B, Hq, Tq_pad]).

    Args:
      st: static plan (``block_q`` must be 128, ``has_segments`` False).
      interpret: run in Mosaic GPU interpret mode (CPU) instead of compiling for a Hopper GPU.
      num_slots: depth of the K/V SMEM ring.
      p_via_smem: feed ``P`` to the ``P V`` wgmma from SMEM instead of registers; ``None``
        picks SMEM in interpret mode (the only option there) and registers when compiled.
      schedule: consumer schedule, one of :data:`SCHEDULES` (module docstring): ``"serial"``,
        ``"overlap"`` (intra-warpgroup: ``Q K_{j+1}^T`` issued before ``softmax(S_j)``'s
        ``P_j V_j`` is awaited), ``"pingpong"`` (the two consumers' GEMM issues alternate)
        or ``"overlap+pingpong"``.
      o_in_acc: keep the running output in the ``P V`` wgmma accumulator (rescaled by
        ``alpha`` and accumulated into in place) instead of in a separate register tile that
        the fresh ``P V`` result is added to; ``None`` picks in place when compiled and the
        separate tile in interpret mode (the only option there: the interpreter does not
        simulate accumulator stores).
      detect_races: interpret mode only: run the interpreter's happens-before race detector
        (``InterpretGPUParams(detect_races=True)``; races are reported by
        ``jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call.get_races()``).
    """
    if p_via_smem is None:
        p_via_smem = bool(interpret)
    if o_in_acc is None:
        o_in_acc = not interpret
    if interpret and o_in_acc:
        raise ValueError("Mosaic GPU interpret mode does not simulate stores into a wgmma "
                         "accumulator: o_in_acc=True can only run compiled on a GPU")
    _check(q, k, v, st, num_slots, interpret, p_via_smem, schedule)
    if detect_races and not interpret:
        raise ValueError("detect_races=True needs interpret=True (it is a feature of Mosaic GPU "
                         "interpret mode)")
    pingpong = _SCHEDULE_FLAGS[schedule][1]
    B, Tq_pad, Hq, D = q.shape
    nq = Tq_pad // _BLOCK_Q
    dtype = q.dtype
    bk, S = st.block_k, num_slots
    tD = smem_transforms(D, dtype)
    scratch = [
        plgpu.SMEM((2, _ROWS, D), dtype, transforms=tD),          # q tiles (then o tiles)
        plgpu.SMEM((S, bk, D), dtype, transforms=tD),             # k ring
        plgpu.SMEM((S, bk, D), dtype, transforms=tD),             # v ring
        (plgpu.SMEM((2, _ROWS, bk), dtype, transforms=smem_transforms(bk, dtype))
         if p_via_smem else None),                                # p tiles
        plgpu.SMEM((2, _ROWS), jnp.float32),                      # lse2 rows
        plgpu.Barrier(num_arrivals=1, num_barriers=2),            # q loaded
        plgpu.Barrier(num_arrivals=1, num_barriers=S),            # k slot full
        plgpu.Barrier(num_arrivals=1, num_barriers=S),            # v slot full
        plgpu.Barrier(num_arrivals=2, num_barriers=S),            # k slot free
        plgpu.Barrier(num_arrivals=2, num_barriers=S),            # v slot free
        (plgpu.Barrier(num_arrivals=1, num_barriers=2)            # ping-pong turn tokens
         if pingpong else None),
    ]
    present = [x is not None for x in scratch]
    scratch = [x for x in scratch if x is not None]

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, *refs):
        it = iter(refs)
        refs = [next(it) if here else None for here in present]
        _fwd_body(q_ref, k_ref, v_ref, o_ref, lse_ref, *refs, st=st, num_slots=S,
                  schedule=schedule, o_in_acc=o_in_acc)

    body.__name__ = "mosaic_flash_fwd"
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((B, Hq, Tq_pad), jnp.float32)),
        scratch_types=scratch,
        # Mosaic GPU launches the LAST grid axis fastest (blockIdx.x): consecutive CTAs are
        # consecutive query blocks of one (batch, head), which share that head's K/V in L2.
        grid=(B, Hq, nq),
        grid_names=("b", "h", "qb"),
        num_threads=3,
        thread_name="wg",
        compiler_params=compiler_params(),   # approx exp2 / division, as the backward
        interpret=interpret_params(interpret, detect_races),
    )
    return kernel(q, k, v)
