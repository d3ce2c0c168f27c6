"""Benchmark baseline: a hand-written Triton FlashAttention forward, called from JAX through
``jax_triton.triton_call``.

Not one of our kernels (those are in ``pallas_kernels/attention/``): a second GPU path next to the
Pallas kernels, so ``experiments/bench_attention.py`` can compare Pallas-generated and hand-written
Triton code. Forward only (no VJP), no segment ids. Same conventions as
:func:`pallas_kernels.reference_attention`: ``[B, T, H, D]`` layout, GQA by ``h // group``,
bottom-right causal alignment, rows with no visible key -> 0, any ``Tq``/``Tk`` (masked loads).

``triton`` and ``jax_triton`` are imported lazily, on the first call, and only on a GPU backend;
there is no interpret mode (``jax_triton`` has none), so this is GPU-only. ``jax_triton`` is not in
the GPU image (``experiments/gpu_check.sh`` does not use this baseline); carry it as a wheel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.reference import check_attention_args
from pallas_kernels.attention.tuning import GPU_TABLE

__all__ = ["triton_flash_forward"]

# head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the Pallas forward's table entries
_TABLE = {D: fwd for D, (fwd, _dkdv, _dq) in GPU_TABLE.items()}


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows, Tk, scale2, OFF,
              BLOCK_N: tl.constexpr, STRIDE_T: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr):
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = cols[:, None] < Tk
            k = tl.load(k_ptrs + start * STRIDE_T, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs + start * STRIDE_T, mask=kv_ok, other=0.0)
        else:
            k = tl.load(k_ptrs + start * STRIDE_T)
            v = tl.load(v_ptrs + start * STRIDE_T)
        s = tl.dot(q, tl.trans(k)) * scale2
        if MASKED:
            ok = cols[None, :] < Tk
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + OFF)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _fwd(Q, K, V, scale2, O,  # jax_triton appends the outputs after the inputs
             TQ: tl.constexpr, TK: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
             D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
        scale2 = scale2.to(tl.float32)
        NUM_M: tl.constexpr = (TQ + BLOCK_M - 1) // BLOCK_M
        GROUP: tl.constexpr = HQ // HKV
        OFF: tl.constexpr = TK - TQ
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = NUM_M - 1 - pid_m
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        kvh = h // GROUP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dcol = tl.arange(0, D)
        q_ptrs = Q + b * (TQ * HQ * D) + h * D + rows[:, None] * (HQ * D) + dcol[None, :]
        q = tl.load(q_ptrs, mask=rows[:, None] < TQ, other=0.0)
        kv_off = b * (TK * HKV * D) + kvh * D + tl.arange(0, BLOCK_N)[:, None] * (HKV * D) \
            + dcol[None, :]
        k_ptrs = K + kv_off
        v_ptrs = V + kv_off
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        r0 = pid_m * BLOCK_M
        if CAUSAL:
            hi = tl.minimum(tl.maximum(r0 + BLOCK_M + OFF, 0), TK)
            full_hi = tl.minimum(tl.maximum(r0 + OFF + 1, 0) // BLOCK_N * BLOCK_N,
                                 TK // BLOCK_N * BLOCK_N)
        else:
            hi = TK
            full_hi = TK // BLOCK_N * BLOCK_N
        for start in tl.range(0, full_hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows, TK, scale2,
                                  OFF, BLOCK_N, HKV * D, False, CAUSAL)
        for start in tl.range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows, TK, scale2,
                                  OFF, BLOCK_N, HKV * D, True, CAUSAL)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        o_ptrs = O + b * (TQ * HQ * D) + h * D + rows[:, None] * (HQ * D) + dcol[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=rows[:, None] < TQ)

    return _fwd


def triton_flash_forward(q, k, v, *, causal=False, sm_scale=None, block_m=None, block_n=None,
                         num_warps=None, num_stages=None):
    """Forward attention ``o [B, Tq, Hq, D]`` through our Triton kernel (GPU only, bf16/fp16)."""
    if jax.default_backend() != "gpu":
        raise RuntimeError("triton_flash_forward needs a GPU backend (jax-triton has no "
                           f"interpret mode); jax.default_backend() is {jax.default_backend()!r}")
    B, Tq, Tk, Hq, Hkv, D, sm_scale, _ = check_attention_args(q, k, v, None, sm_scale)
    if D not in _TABLE:
        raise ValueError(f"head_dim must be one of {tuple(_TABLE)}, got {D}")
    if q.dtype == jnp.float32:
        raise TypeError("triton_flash_forward supports bfloat16 and float16 inputs")
    import jax_triton as jt

    bm, bn, w, s = _TABLE[D]
    bm, bn = block_m or bm, block_n or bn
    grid = (-(-Tq // bm), Hq, B)
    return jt.triton_call(
        q, k, v, np.float32(sm_scale * math.log2(math.e)),  # fp32 scalar, not fp64
        kernel=_kernel(),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid,
        num_warps=num_warps or w,
        num_stages=num_stages or s,
        TQ=Tq, TK=Tk, HQ=Hq, HKV=Hkv, D=D, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn,
    )
