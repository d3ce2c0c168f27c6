"""Every block-size table of the attention kernels and the backend policy, in one place.

* :data:`GPU_TABLE`: the Triton-lowered kernels (forward, dK/dV, dQ), tuned on an H100.
* :data:`MOSAIC_TABLE` / :data:`MOSAIC_BWD_TABLE`: the Hopper Mosaic GPU forward / backward
  (chosen from the SMEM and register budgets, not yet tuned on a GPU).
* :data:`TPU_TABLE`: the Pallas TPU (Mosaic TPU) kernels (forward, dK/dV, dQ); untuned.
* ``*_INTERPRET``: the small blocks used in interpret mode (CPU tests).
* :data:`MOSAIC_AUTO` and :func:`resolve_backend`: which backend ``backend=None`` picks
  (``"tpu"`` whenever ``jax.default_backend() == "tpu"``).

The tables are module globals read at call time, so ``experiments/bench_attention.py --tune``
(and tests) can install other entries for the rest of a run.
"""
from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.attention.mosaic_common import (MOSAIC_BLOCKS, MOSAIC_BLOCK_Q, is_hopper,
                                                    mosaic_unsupported_reason, no_hopper_message)
from pallas_kernels.attention.mosaic_fwd import SCHEDULES as MOSAIC_SCHEDULES

__all__ = ["KernelConfig", "kernel_config", "mosaic_kernel_config", "mosaic_bwd_kernel_config",
           "tpu_kernel_config", "resolve_backend", "on_tpu", "GPU_TABLE", "MOSAIC_TABLE",
           "MOSAIC_BWD_TABLE", "TPU_TABLE", "MOSAIC_AUTO", "BACKENDS"]

BACKENDS = ("triton", "mosaic", "tpu")

# --------------------------------------------------------------------------------------------
# Triton lowering. Keys: head dim. Values: (block_q, block_k, num_warps, num_stages) for the
# forward, the dK/dV kernel and the dQ kernel. Tuned on an H100 (see
# docs/benchmarks/attention_notes.md); interpret mode only uses the block sizes.
# The jax-triton benchmark baseline (experiments/baselines/jax_triton_fwd.py) uses the forward
# column too.
# --------------------------------------------------------------------------------------------
GPU_TABLE = {
    #        fwd                  dkdv                 dq
    16: ((128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 3)),
    32: ((128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 3)),
    64: ((128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 3)),      # tuned, H100, T=4096
    128: ((128, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)),  # tuned, H100, T=4096
    256: ((64, 32, 4, 2), (32, 32, 4, 1), (32, 32, 4, 1)),      # not tuned (correctness only)
}
INTERPRET_BLOCK = 64

# --------------------------------------------------------------------------------------------
# Mosaic GPU forward: block_q is fixed at 128 (two consumer warpgroups x 64 rows). Keys: head
# dim. Values: (block_k, number of K/V SMEM slots, consumer schedule), the schedule one of
# mosaic_fwd.SCHEDULES ("serial", "overlap", "pingpong", "overlap+pingpong").
# UNTUNED (no GPU yet): block_k / slots chosen from the SMEM budget (227 KiB per block on
# Hopper) and the consumer register budget only; the schedule stays "serial" until the FA3
# schedules have been measured on a GPU. `bench_attention.py --tune --impls mosaic` on a Hopper
# GPU sweeps all three columns.
# --------------------------------------------------------------------------------------------
MOSAIC_TABLE = {
    64: (128, 3, "serial"),    # untuned; SMEM 16 + 96 KiB (+32 KiB P tiles)
    128: (128, 2, "serial"),   # untuned; SMEM 32 + 128 KiB (+32 KiB P tiles)
}
MOSAIC_INTERPRET = (64, 2, "serial")   # interpret mode: small key blocks so short tests wrap

# Mosaic GPU backward. Head dim -> ((block_q, block_k) of the dK/dV kernel, (block_q, block_k)
# of the dQ kernel). Chosen from the SMEM / register budget (see
# docs/benchmarks/attention_mosaic_bwd.md), NOT tuned on a GPU: 128 key (dK/dV) / query (dQ)
# rows = 2 consumer warpgroups per CTA; at D=128 the streamed tile is 64 so that SMEM
# (<= 227 KiB) and the consumer registers (dK + dV accumulators 128 + S^T / dP^T 64 per
# thread) fit.
MOSAIC_BWD_TABLE = {
    64: ((128, 128), (128, 128)),
    128: ((64, 128), (128, 64)),
}
MOSAIC_BWD_INTERPRET = ((64, 64), (64, 64))

# --------------------------------------------------------------------------------------------
# Pallas TPU (Mosaic TPU). Keys: head dim (the block always covers the full D). Values:
# (block_q, block_k) of the forward, the dK/dV kernel and the dQ kernel; compiled, every block
# must be a multiple of 128 (the lane width). UNTUNED (no TPU yet): chosen so that the float32
# score tile [bq, bk] stays <= 512 KiB of VMEM next to the double-buffered inputs; to be swept
# on a TPU. Other head dims use the D=128 row. Interpret mode uses TPU_INTERPRET_BLOCK
# (clipped to the sequence length; smaller blocks are fine there).
# --------------------------------------------------------------------------------------------
TPU_TABLE = {
    #        fwd          dkdv         dq
    64: ((256, 512), (256, 256), (256, 256)),    # untuned
    128: ((256, 512), (256, 256), (256, 256)),   # untuned
}
TPU_INTERPRET_BLOCK = 128

# Auto-select the Mosaic kernels on Hopper? Off until they have run on a GPU and measured faster
# (experiments/gpu_check.sh): then set True, and auto picks "mosaic" iff compiled on a compute
# capability 9.x GPU and the call is supported.
MOSAIC_AUTO = False


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_q: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None
    schedule: str | None = None    # Mosaic GPU forward only (mosaic_fwd.SCHEDULES)


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def kernel_config(D, Tq, Tk, *, interpret):
    """Default ``(fwd, dkdv, dq)`` :class:`KernelConfig` of the Triton-lowered kernels."""
    def clip(b, T):
        return max(16, min(b, next_pow2(T)))

    if interpret:
        c = KernelConfig(clip(INTERPRET_BLOCK, Tq), clip(INTERPRET_BLOCK, Tk))
        return c, c, c
    return tuple(KernelConfig(clip(bq, Tq), clip(bk, Tk), w, s) for bq, bk, w, s in GPU_TABLE[D])


def mosaic_kernel_config(D, Tk, *, interpret, block_k=None):
    """``KernelConfig`` of the Mosaic GPU forward (``num_stages`` = number of K/V SMEM slots,
    ``schedule`` = consumer schedule, see :data:`pallas_kernels.attention.mosaic_fwd.SCHEDULES`)."""
    bk, slots, schedule = MOSAIC_INTERPRET if interpret else MOSAIC_TABLE[D]
    if schedule not in MOSAIC_SCHEDULES:
        raise ValueError(f"Mosaic GPU table entry for D={D}: schedule {schedule!r} is not one "
                         f"of {MOSAIC_SCHEDULES}")
    bk = max(64, min(bk, next_pow2(Tk))) if block_k is None else block_k
    return KernelConfig(MOSAIC_BLOCK_Q, bk, None, slots, schedule)


def mosaic_bwd_kernel_config(D, *, interpret):
    """``(dkdv, dq)`` :class:`KernelConfig` of the Mosaic GPU backward."""
    bkv, bdq = MOSAIC_BWD_INTERPRET if interpret else MOSAIC_BWD_TABLE[D]
    return KernelConfig(*bkv), KernelConfig(*bdq)


def tpu_kernel_config(D, Tq, Tk, *, interpret):
    """Default ``(fwd, dkdv, dq)`` :class:`KernelConfig` of the Pallas TPU kernels (compiled:
    clipped to the sequence length but never below 128)."""
    lo = 16 if interpret else 128

    def clip(b, T):
        return max(lo, min(b, next_pow2(T)))

    if interpret:
        c = KernelConfig(clip(TPU_INTERPRET_BLOCK, Tq), clip(TPU_INTERPRET_BLOCK, Tk))
        return c, c, c
    return tuple(KernelConfig(clip(bq, Tq), clip(bk, Tk)) for bq, bk in
                 TPU_TABLE.get(D, TPU_TABLE[128]))


def on_tpu():
    """True iff JAX's default backend is a TPU (read at call time)."""
    return jax.default_backend() == "tpu"


def _mosaic_reason(dtype, D, has_segments, block_q, block_k):
    """Why the Mosaic GPU kernels cannot take this call (``None``: they can)."""
    reason = mosaic_unsupported_reason(dtype, D, has_segments)
    if reason is None and block_q is not None and block_q != MOSAIC_BLOCK_Q:
        reason = f"block_q={block_q} (the Mosaic GPU kernel needs block_q={MOSAIC_BLOCK_Q})"
    if reason is None and block_k is not None and block_k not in MOSAIC_BLOCKS:
        reason = f"block_k={block_k} (the Mosaic GPU kernel needs block_k in {MOSAIC_BLOCKS})"
    return reason


def resolve_backend(backend, *, interpret, dtype, D, has_segments=False, block_q=None,
                    block_k=None):
    """The backend ``flash_attention`` uses (forward and backward): ``"triton"``, ``"mosaic"``
    or ``"tpu"``.

    ``backend=None`` picks ``"tpu"`` iff ``jax.default_backend() == "tpu"`` (compiled or
    interpret). Otherwise it picks ``"mosaic"`` iff :data:`MOSAIC_AUTO` is set (it is not until the
    kernels are verified on a GPU), the call is compiled (``interpret=False``) on a GPU of
    compute capability 9.x and the call is supported by the Mosaic kernels. An explicit
    ``"mosaic"`` that cannot run raises (``ValueError`` for unsupported inputs,
    ``RuntimeError`` for a compiled call without a Hopper GPU).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton', 'mosaic' or 'tpu', got {backend!r}")
    if backend == "tpu" or (backend is None and on_tpu()):
        return "tpu"
    reason = _mosaic_reason(dtype, D, has_segments, block_q, block_k)
    if backend is None:
        use = MOSAIC_AUTO and not interpret and reason is None and is_hopper()
        return "mosaic" if use else "triton"
    if backend == "mosaic":
        if reason is not None:
            raise ValueError(f"flash_attention(backend='mosaic') does not support {reason}; "
                             "use backend='triton' (or None to choose automatically)")
        if not interpret and not is_hopper():
            raise RuntimeError(no_hopper_message("flash_attention(backend='mosaic', "
                                                 "interpret=False)"))
    return backend
