"""FlashAttention forward for Hopper GPUs in Pallas Mosaic GPU (wgmma + TMA + warp specialisation).

Same contract as :func:`pallas_kernels._fwd_kernel.flash_fwd` (without segment ids): padded
``q [B, Tq_pad, Hq, D]``, ``k, v [B, Tk_pad, Hkv, D]`` -> ``o`` like ``q`` and
``lse2 [B, Hq, Tq_pad]`` float32 in base-2 units (``+inf`` for rows that see no key). Key columns
``>= st.Tk`` are masked, causal attention is bottom-right aligned, and fully masked key blocks
are skipped with :func:`pallas_kernels._common.kv_block_range`. GQA reads kv head ``h // group``
straight from ``k``/``v`` (never repeated).

Design (FA3-style, one CTA per ``(128-row query block, head, batch)``):

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
  in registers in base 2 (``exp2``, running max ``m`` and sum ``l``), ``P V`` by ``wgmma``,
  releases the V slot, ``o = o * alpha + P V``. Blocks in ``[n_full, n_end)`` get the element
  mask (causal / padded columns), blocks before ``n_full`` skip it.
* epilogue: ``o / l`` is written into the consumer's (now unused) Q SMEM tile and stored with a
  TMA copy, ``lse2`` likewise through a small SMEM vector.

Operand of ``P V``: on the GPU ``P`` is fed to ``wgmma`` from registers (``p_via_smem=False``,
as FA3 does). Mosaic GPU *interpret* mode (CPU) only simulates ``wgmma`` with both operands in
SMEM, so there ``P`` is first stored to a per-consumer SMEM tile (``p_via_smem=True``, the only
choice allowed in interpret mode). That one operand path is the only difference between what the
CPU tests run and what the GPU runs; both lower for CUDA (checked by the tests on CPU).

Not (yet) done, i.e. expect less than FA3: no intra-warpgroup overlap of ``softmax(S_j)`` with
``Q K_{j+1}^T`` and no enforced ping-pong between the two consumers (they overlap only as the
warp schedulers interleave them); each ``wgmma`` is awaited right away.

Supported: bfloat16 / float16, ``D`` in {64, 128}, ``block_q == 128``, ``block_k`` in
{64, 128} (dividing ``Tk_pad``), no segment ids. ``D = 256`` is *not* supported: the consumer
keeps ``o`` and the ``P V`` accumulator in registers (2 x 128 float32 registers per thread at
D=256), which does not fit next to ``S`` under the 255-register limit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import AttnStatic, kv_block_range

__all__ = ["mosaic_flash_fwd", "mosaic_unsupported_reason", "smem_bytes", "MOSAIC_HEAD_DIMS",
           "MOSAIC_DTYPES"]

MOSAIC_HEAD_DIMS = (64, 128)
MOSAIC_DTYPES = ("bfloat16", "float16")
_BLOCK_Q = 128        # two consumer warpgroups x 64 rows
_ROWS = 64            # rows per consumer warpgroup (wgmma M)
_BLOCK_KS = (64, 128)
# Register budget per thread (sum over the 3 warpgroups x 128 threads must stay <= 64K).
_PRODUCER_REGS = 40
_CONSUMER_REGS = 232
_SMEM_LIMIT = 227 * 1024  # H100 / H200 opt-in shared memory per block


def mosaic_unsupported_reason(dtype, D, has_segments) -> str | None:
    """Why the Mosaic GPU forward cannot run this call, or ``None`` if it can."""
    name = jnp.dtype(dtype).name
    if name not in MOSAIC_DTYPES:
        return f"dtype {name} (the Mosaic GPU kernel supports {MOSAIC_DTYPES})"
    if D not in MOSAIC_HEAD_DIMS:
        return f"head_dim {D} (the Mosaic GPU kernel supports {MOSAIC_HEAD_DIMS})"
    if has_segments:
        return "segment_ids (the Mosaic GPU kernel has no segment masking)"
    return None


def smem_bytes(D, block_k, num_slots, dtype, p_via_smem) -> int:
    """SMEM the kernel allocates: Q/O tiles, the K/V ring, P tiles (SMEM variant), lse rows."""
    isz = jnp.dtype(dtype).itemsize
    n = 2 * _ROWS * D * isz + 2 * num_slots * block_k * D * isz + 2 * _ROWS * 4
    if p_via_smem:
        n += 2 * _ROWS * block_k * isz
    return n + 1024  # barriers + alignment slack


def _smem_transforms(minor_dim, dtype):
    """Tiling + swizzle that ``wgmma`` / TMA expect for a 2-D SMEM operand."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_dim * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _check(q, k, v, st: AttnStatic, num_slots, interpret, p_via_smem):
    reason = mosaic_unsupported_reason(q.dtype, st.D, st.has_segments)
    if reason is not None:
        raise ValueError(f"mosaic_flash_fwd does not support {reason}")
    if st.block_q != _BLOCK_Q:
        raise ValueError(f"mosaic_flash_fwd needs block_q == {_BLOCK_Q}, got {st.block_q}")
    if st.block_k not in _BLOCK_KS:
        raise ValueError(f"mosaic_flash_fwd needs block_k in {_BLOCK_KS}, got {st.block_k}")
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
    if smem > _SMEM_LIMIT:
        raise ValueError(f"mosaic_flash_fwd: D={D}, block_k={st.block_k}, num_slots={num_slots} "
                         f"needs {smem} bytes of SMEM > {_SMEM_LIMIT} (H100 per-block limit)")
    if interpret and not p_via_smem:
        raise ValueError("Mosaic GPU interpret mode simulates wgmma only with SMEM operands: "
                         "p_via_smem=False (P from registers) can only run compiled on a GPU")


def _fwd_body(q_ref, k_ref, v_ref, o_ref, lse_ref,
              q_smem, k_smem, v_smem, p_smem, lse_smem,
              q_bar, k_full, v_full, k_free, v_free, *, st: AttnStatic, num_slots: int):
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

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

        def load(j, carry):
            slot = jax.lax.rem(j, S)
            rows = pl.ds(pl.multiple_of(j * bk, bk), bk)

            @pl.when(j >= S)   # slot used before: wait until both consumers released it
            def _():
                plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, hk, :], k_smem.at[slot], k_full.at[slot])

            @pl.when(j >= S)
            def _():
                plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hk, :], v_smem.at[slot], v_full.at[slot])
            return carry

        jax.lax.fori_loop(0, n_end, load, None)

        # Drain: observe the last release of each used slot, so that every barrier phase is
        # waited on exactly once (the interpreter checks this when the barriers are freed).
        def drain(j, carry):
            slot = jax.lax.rem(j, S)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            return carry

        jax.lax.fori_loop(jnp.maximum(n_end - S, 0), n_end, drain, None)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
        r0 = q_block * _BLOCK_Q + wg * _ROWS
        q_tile = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, _ROWS), h, :], q_tile, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        row_layout = plgpu.Layout.WGMMA.reduce(1)

        def step(j, carry, masked):
            o, m, l = carry
            slot = jax.lax.rem(j, S)

            plgpu.barrier_wait(k_full.at[slot])

            def qk(acc):
                plgpu.wgmma(acc, q_tile, k_smem.at[slot].T)
                return acc[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * st.scale2                                  # base-2 units
            if masked:  # iotas built here, not hoisted: no registers held in unmasked steps
                wgmma_layout = plgpu.Layout.WGMMA
                cols = j * bk + plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 1,
                                                       layout=wgmma_layout)
                vis = cols < st.Tk
                if st.causal:
                    rows = r0 + plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 0,
                                                       layout=wgmma_layout)
                    vis = vis & (cols <= rows + st.offset)
                s = jnp.where(vis, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # a row may have seen no key yet (masked blocks only): keep exp2 arguments finite
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s - m_use[:, None])
            l = l * alpha + jnp.sum(p, axis=1)
            p = p.astype(dtype)

            plgpu.barrier_wait(v_full.at[slot])
            if p_smem is not None:
                p_smem.at[wg][...] = p
                plgpu.commit_smem()                            # visible to the tensor core
                p_op = p_smem.at[wg]
            else:
                p_op = p

            def pv(acc):
                plgpu.wgmma(acc, p_op, v_smem.at[slot])
                return acc[...]

            pv_val = pl.run_scoped(pv, plgpu.ACC((_ROWS, st.D), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            o = o * alpha[:, None] + pv_val
            return o, m_new, l

        o0 = plgpu.layout_cast(jnp.zeros((_ROWS, st.D), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
        carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), (o0, m0, l0))
        o, m, l = jax.lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), carry)

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


def mosaic_flash_fwd(q, k, v, st: AttnStatic, *, interpret: bool, num_slots: int = 2,
                     p_via_smem: bool | None = None):
    """q [B, Tq_pad, Hq, D], k/v [B, Tk_pad, Hkv, D] (padded) -> (o like q, lse2 [B, Hq, Tq_pad]).

    Args:
      st: static plan (``block_q`` must be 128, ``has_segments`` False).
      interpret: run in Mosaic GPU interpret mode (CPU) instead of compiling for a Hopper GPU.
      num_slots: depth of the K/V SMEM ring.
      p_via_smem: feed ``P`` to the ``P V`` wgmma from SMEM instead of registers; ``None``
        picks SMEM in interpret mode (the only option there) and registers when compiled.
    """
    if p_via_smem is None:
        p_via_smem = bool(interpret)
    _check(q, k, v, st, num_slots, interpret, p_via_smem)
    B, Tq_pad, Hq, D = q.shape
    nq = Tq_pad // _BLOCK_Q
    dtype = q.dtype
    bk, S = st.block_k, num_slots
    tD = _smem_transforms(D, dtype)
    scratch = [
        plgpu.SMEM((2, _ROWS, D), dtype, transforms=tD),          # q tiles (then o tiles)
        plgpu.SMEM((S, bk, D), dtype, transforms=tD),             # k ring
        plgpu.SMEM((S, bk, D), dtype, transforms=tD),             # v ring
        (plgpu.SMEM((2, _ROWS, bk), dtype, transforms=_smem_transforms(bk, dtype))
         if p_via_smem else None),                                # p tiles
        plgpu.SMEM((2, _ROWS), jnp.float32),                      # lse2 rows
        plgpu.Barrier(num_arrivals=1, num_barriers=2),            # q loaded
        plgpu.Barrier(num_arrivals=1, num_barriers=S),            # k slot full
        plgpu.Barrier(num_arrivals=1, num_barriers=S),            # v slot full
        plgpu.Barrier(num_arrivals=2, num_barriers=S),            # k slot free
        plgpu.Barrier(num_arrivals=2, num_barriers=S),            # v slot free
    ]
    if not p_via_smem:
        del scratch[3]

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, *refs):
        if not p_via_smem:
            refs = refs[:3] + (None,) + refs[3:]
        _fwd_body(q_ref, k_ref, v_ref, o_ref, lse_ref, *refs, st=st, num_slots=S)

    body.__name__ = "mosaic_flash_fwd"
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((B, Hq, Tq_pad), jnp.float32)),
        scratch_types=scratch,
        grid=(nq, Hq, B),
        grid_names=("qb", "h", "b"),
        num_threads=3,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return kernel(q, k, v)
