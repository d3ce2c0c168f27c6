"""Helpers shared by the Hopper Mosaic GPU kernels (``mosaic_fwd.py``, ``mosaic_bwd.py``).

The one Hopper check (:func:`is_hopper`), what the kernels support, the register / SMEM
budgets, the SMEM operand layout ``wgmma`` / TMA expect, a wgmma into a fresh accumulator, the
element mask in the wgmma register layout, the producer's wait for a free ring slot and the
compile / interpret parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["is_hopper", "no_hopper_message", "mosaic_unsupported_reason", "MOSAIC_DTYPES",
           "MOSAIC_HEAD_DIMS", "MOSAIC_BLOCK_Q", "MOSAIC_BLOCKS"]

MOSAIC_DTYPES = ("bfloat16", "float16")
# D=256 does not fit: the dK and dV float32 accumulators of the backward alone would take
# 2 x 64 x 256 / 128 = 256 registers per consumer thread. (The compiled forward keeps o in
# the P V accumulator, 128 registers at D=256, so it alone might fit at block_k=64: untested.)
MOSAIC_HEAD_DIMS = (64, 128)
WG_ROWS = 64                 # rows of one warpgroup's wgmma (M)
MOSAIC_BLOCK_Q = 128         # forward: two consumer warpgroups x 64 rows
MOSAIC_BLOCKS = (64, 128)    # block sizes: multiples of WG_ROWS that fit the budgets
# setmaxnreg budget per thread: 40 * 128 + 232 * 256 <= 65536 registers per SM.
PRODUCER_REGS = 40
CONSUMER_REGS = 232
SMEM_LIMIT = 232448          # dynamic SMEM per CTA on H100 / H200 (227 KiB), as Mosaic GPU checks


def is_hopper() -> bool:
    """Whether the default JAX backend is a GPU of compute capability 9.x (H100 / H200)."""
    if jax.default_backend() != "gpu":
        return False
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    return cc.split(".")[0] == "9"


def no_hopper_message(what: str) -> str:
    dev = jax.devices()[0]
    return (f"{what} needs a Hopper GPU (compute capability 9.x), but the default device is "
            f"{dev.device_kind!r} (platform {dev.platform!r}, compute capability "
            f"{getattr(dev, 'compute_capability', None)!r}); pass interpret=True for Mosaic GPU "
            "interpret mode or use backend='triton'")


def mosaic_unsupported_reason(dtype, D, has_segments) -> str | None:
    """Why the Mosaic GPU kernels cannot run this call, or ``None`` if they can."""
    name = jnp.dtype(dtype).name
    if name not in MOSAIC_DTYPES:
        return f"dtype {name} (the Mosaic GPU kernel supports {MOSAIC_DTYPES})"
    if D not in MOSAIC_HEAD_DIMS:
        return f"head_dim {D} (the Mosaic GPU kernel supports {MOSAIC_HEAD_DIMS})"
    if has_segments:
        return "segment_ids (the Mosaic GPU kernel has no segment masking)"
    return None


def smem_transforms(minor_dim: int, dtype):
    """Tiling + swizzle that ``wgmma`` / TMA expect for a 2-D SMEM operand."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor_dim * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def matmul(a, b_ref, shape):
    """``a @ b`` by one wgmma into a fresh float32 accumulator, awaited; returns the registers.
    ``a`` is an SMEM ref (or, compiled only, a register array); ``b_ref`` an SMEM ref."""
    def body(acc):
        plgpu.wgmma(acc, a, b_ref)
        return plgpu.wgmma_accumulator_load(acc)
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def visible(st, row0, col0, shape, *, transposed=False, mask_rows=False):
    """Element mask in the wgmma register layout: ``rows = row0 + i``, ``cols = col0 + j`` over
    ``shape`` (rows along axis 1 when ``transposed``). Hides padded key columns (``>= Tk``),
    the causal upper triangle (bottom-right aligned) and, with ``mask_rows``, padded query rows.
    Build it inside the masked branch only (no registers held in unmasked steps)."""
    row_axis, col_axis = (1, 0) if transposed else (0, 1)
    iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
    cols = col0 + iota(col_axis)
    vis = cols < st.Tk
    if st.causal or mask_rows:
        rows = row0 + iota(row_axis)
        if mask_rows:
            vis = vis & (rows < st.Tq)
        if st.causal:
            vis = vis & (cols <= rows + st.offset)
    return vis


def wait_slot_free(free, t, num_slots):
    """Producer, before refilling ring slot ``t % num_slots`` at step ``t``: wait until the
    consumers released it (not on the first pass over the ring)."""
    @pl.when(t >= num_slots)
    def _():
        plgpu.barrier_wait(free.at[jax.lax.rem(t, num_slots)])


def compiler_params():
    return plgpu.CompilerParams(approx_math=True)


def interpret_params(interpret, detect_races=False):
    """``plgpu.kernel(interpret=...)``: Mosaic GPU interpret mode (CPU) or ``None`` (compiled)."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams(detect_races=detect_races) if interpret else None
