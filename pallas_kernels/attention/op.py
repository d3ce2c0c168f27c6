"""Public FlashAttention op: argument checks, padding, the plan and the custom VJP.

``flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, block_q=None,
block_k=None, interpret=None, backend=None) -> o`` computes exactly what
:func:`pallas_kernels.reference_attention` computes (same conventions: ``[B, T, H, D]`` layout,
GQA/MQA by ``h // (Hq // Hkv)``, bottom-right causal alignment, ``segment_ids`` as one
``[B, T]`` array or a ``(q_ids, kv_ids)`` pair, rows with no visible key -> 0), with O(T) memory:
the forward saves only ``o`` and the per-row log-sum-exp, the backward recomputes the scores.

Backends (``backend=``; block-size tables and the auto policy in :mod:`.tuning`):

* ``"triton"``: forward and backward kernels written for Pallas' Triton lowering
  (``triton_fwd.py``, ``triton_bwd.py``); in interpret mode, Pallas' generic interpreter.
* ``"mosaic"``: the Hopper kernels in Pallas Mosaic GPU: forward ``mosaic_fwd.py`` and backward
  ``mosaic_bwd.py`` (TMA, ``wgmma``, warp specialisation; shared helpers in
  ``mosaic_common.py``). Compiled they need a GPU of compute capability 9.x; in interpret mode
  they run in Mosaic GPU interpret mode (``InterpretGPUParams``: simulated SMEM, TMA, barriers
  and warpgroups on CPU). Supports bfloat16 / float16, head dims 64 / 128, no
  ``segment_ids``, ``block_q`` 128 and ``block_k`` 64 / 128; anything else raises
  ``ValueError`` (no silent fallback).
* ``None`` (auto): :func:`.tuning.resolve_backend`: ``"triton"`` until ``tuning.MOSAIC_AUTO``
  is set (after the Mosaic kernels have passed and been measured faster on a Hopper GPU with
  ``experiments/gpu_check.sh``); then ``"mosaic"`` iff compiled on a compute-capability-9.x
  GPU and the call is supported. Always ``"triton"`` in interpret mode. On a TPU host
  (``jax.default_backend() == "tpu"``) auto picks ``"tpu"``.
* ``"tpu"``: forward and backward kernels for Pallas TPU / Mosaic TPU (``tpu_fwd.py``,
  ``tpu_bwd.py``: ``(B, H, q-blocks, k-blocks)`` grids, VMEM scratch, the key axis the
  innermost ``"arbitrary"`` reduction). Off a TPU they run in Pallas TPU interpret mode
  (``pltpu.InterpretParams``: simulated VMEM, grid semantics and scratch on CPU); compiled they
  need a TPU and ``block_q`` / ``block_k`` multiples of 128 (``ValueError`` otherwise). Same
  features as ``"triton"`` (segments, GQA, ragged T; tested with float32 and bfloat16).
  Verified only in interpret mode (no TPU has run it).

``interpret=None`` picks interpret mode iff ``jax.default_backend() != "gpu"`` (for the
``"tpu"`` backend: iff it is not ``"tpu"``); ``interpret=False`` without a GPU (TPU for
``"tpu"``) raises ``RuntimeError``.

Supported (triton): float32 / bfloat16 / float16 inputs (float32 softmax statistics and
accumulation; float32 inputs use exact float32 products, not TF32); head dims 16, 32, 64, 128,
256; any ``Tq``, ``Tk`` (inputs are zero-padded to block multiples and the padding is masked);
block sizes powers of two >= 16. ``sm_scale`` must be a finite number > 0 (``ValueError``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.attention import tuning
from pallas_kernels.attention.common import AttnStatic
from pallas_kernels.attention.mosaic_bwd import mosaic_flash_bwd
from pallas_kernels.attention.mosaic_fwd import mosaic_flash_fwd
from pallas_kernels.attention.reference import check_attention_args
from pallas_kernels.attention.tpu_bwd import tpu_flash_bwd
from pallas_kernels.attention.tpu_fwd import check_tpu_blocks, tpu_flash_fwd
from pallas_kernels.attention.triton_bwd import flash_bwd
from pallas_kernels.attention.triton_fwd import flash_fwd

__all__ = ["flash_attention"]

_HEAD_DIMS = (16, 32, 64, 128, 256)


def _is_pow2(n):
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def _resolve_interpret(interpret, kernel_backend=None):
    if kernel_backend == "tpu":
        return _resolve_tpu_interpret(interpret)
    if kernel_backend == "mosaic" and interpret is False and jax.default_backend() != "gpu":
        raise RuntimeError(
            "flash_attention(backend='mosaic', interpret=False) needs a Hopper GPU for the "
            f"compiled Mosaic GPU kernel, but jax.default_backend() is {jax.default_backend()!r}; "
            "pass interpret=True (or None) to run it in Mosaic GPU interpret mode")
    return resolve_interpret(interpret, "flash_attention")


def _resolve_tpu_interpret(interpret):
    on_tpu = jax.default_backend() == "tpu"
    if interpret is None:
        return not on_tpu
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None, True or False, got {interpret!r}")
    if not interpret and not on_tpu:
        raise RuntimeError(
            "flash_attention(backend='tpu', interpret=False) needs a TPU for the compiled Mosaic "
            f"TPU kernel, but jax.default_backend() is {jax.default_backend()!r}; pass "
            "interpret=True (or None) to run it in Pallas TPU interpret mode")
    return interpret


def _check_block(name, b):
    if b is None:
        return
    if not _is_pow2(b) or b < 16:
        raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    fwd: AttnStatic
    dkdv: AttnStatic
    dq: AttnStatic
    Tq: int
    Tk: int
    backend: str = "triton"   # "triton", "mosaic" or "tpu", forward and backward
    mosaic_schedule: str = "serial"   # Mosaic GPU forward's consumer schedule


def _compiler_params(st: AttnStatic):
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # GPU only
    return pltriton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _pad_seq(x, T_pad):
    T = x.shape[1]
    if T == T_pad:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, T_pad - T)
    return jnp.pad(x, pad)


def _pad_segs(segs, Tq_pad, Tk_pad):
    if segs is None:
        return None, None
    q_seg, kv_seg = segs
    # padded positions are masked by position anyway; distinct ids keep them apart too.
    q_seg = jnp.pad(q_seg, ((0, 0), (0, Tq_pad - q_seg.shape[1])), constant_values=-1)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Tk_pad - kv_seg.shape[1])), constant_values=-2)
    return q_seg, kv_seg


def _forward(q, k, v, q_seg, kv_seg, plan: _Plan):
    st = plan.fwd
    qp, kp, vp = _pad_seq(q, st.Tq_pad), _pad_seq(k, st.Tk_pad), _pad_seq(v, st.Tk_pad)
    if plan.backend == "tpu":
        o, lse = tpu_flash_fwd(qp, kp, vp, q_seg, kv_seg, st)
    elif plan.backend == "mosaic":
        o, lse = mosaic_flash_fwd(qp, kp, vp, st, interpret=st.interpret,
                                  num_slots=st.num_stages, schedule=plan.mosaic_schedule)
    else:
        o, lse = flash_fwd(qp, kp, vp, q_seg, kv_seg, st, _compiler_params(st))
    return o[:, :plan.Tq], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, plan):
    return _forward(q, k, v, q_seg, kv_seg, plan)[0]


def _flash_fwd_rule(q, k, v, q_seg, kv_seg, plan):
    o, lse = _forward(q, k, v, q_seg, kv_seg, plan)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd_rule(plan, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    st = plan.dkdv
    # delta = rowsum(dO * O) in float32, [B, Hq, Tq_pad] (padded rows: dO = 0 -> delta = 0)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = _pad_seq(delta, st.Tq_pad).transpose(0, 2, 1)
    qp, dop = _pad_seq(q, st.Tq_pad), _pad_seq(do.astype(q.dtype), st.Tq_pad)
    kp, vp = _pad_seq(k, st.Tk_pad), _pad_seq(v, st.Tk_pad)
    if plan.backend == "tpu":
        dq, dk, dv = tpu_flash_bwd(qp, kp, vp, dop, lse, delta, q_seg, kv_seg, st, plan.dq)
    elif plan.backend == "mosaic":
        dq, dk, dv = mosaic_flash_bwd(qp, kp, vp, dop, lse, delta, st, interpret=st.interpret,
                                      st_dq=plan.dq)
    else:
        dq, dk, dv = flash_bwd(qp, kp, vp, dop, lse, delta, q_seg, kv_seg, st, plan.dq,
                               _compiler_params(st), _compiler_params(plan.dq))
    return dq[:, :plan.Tq], dk[:, :plan.Tk], dv[:, :plan.Tk], None, None


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


def flash_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None, block_q=None,
                    block_k=None, interpret=None, backend=None):
    """FlashAttention with a custom VJP; same result as ``reference_attention``.

    Args:
      q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``, ``Hq % Hkv == 0``; one float dtype.
      causal: bottom-right aligned causal mask (query ``i`` sees key ``j <= i + Tk - Tq``).
      segment_ids: int ``[B, T]`` (needs ``Tq == Tk``) or a pair ``([B, Tq], [B, Tk])``.
      sm_scale: score scale, default ``1/sqrt(D)``.
      block_q, block_k: block sizes (powers of two >= 16) for all three kernels; ``None`` uses
        the tuned table (:func:`.tuning.kernel_config`).
      interpret: ``None`` (interpret iff no GPU backend; for ``"tpu"``: iff no TPU backend),
        ``True`` or ``False``.
      backend: ``None`` (auto), ``"triton"``, ``"mosaic"`` or ``"tpu"`` (module docstring);
        applies to the forward and the backward. With ``"mosaic"``, ``block_q`` / ``block_k``
        set the forward's blocks (``block_q`` must be 128); the backward uses its own table.
        With ``"tpu"`` they set all three kernels' blocks (multiples of 128 when compiled).

    Returns:
      ``o [B, Tq, Hq, D]`` in ``q.dtype``; differentiable in q, k, v.
    """
    B, Tq, Tk, Hq, Hkv, D, sm_scale, segs = check_attention_args(q, k, v, segment_ids, sm_scale)
    if D not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_HEAD_DIMS} for the Pallas kernel, got {D}")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if backend is not None and backend not in tuning.BACKENDS:
        raise ValueError(f"backend must be None, 'triton', 'mosaic' or 'tpu', got {backend!r}")
    tpu = backend == "tpu" or (backend is None and tuning.on_tpu())
    interpret = _resolve_interpret(interpret, "tpu" if tpu else backend)
    kernel_backend = tuning.resolve_backend(backend, interpret=interpret, dtype=q.dtype, D=D,
                                            has_segments=segs is not None, block_q=block_q,
                                            block_k=block_k)

    if kernel_backend == "tpu":
        check_tpu_blocks(block_q, block_k, interpret=interpret)
        cfgs = [dataclasses.replace(c, block_q=block_q or c.block_q, block_k=block_k or c.block_k)
                for c in tuning.tpu_kernel_config(D, Tq, Tk, interpret=interpret)]
    elif kernel_backend == "mosaic":
        cfgs = [tuning.mosaic_kernel_config(D, Tk, interpret=interpret, block_k=block_k),
                *tuning.mosaic_bwd_kernel_config(D, interpret=interpret)]
    else:
        cfgs = [dataclasses.replace(c, block_q=block_q or c.block_q, block_k=block_k or c.block_k)
                for c in tuning.kernel_config(D, Tq, Tk, interpret=interpret)]
    Tq_pad = -(-Tq // max(c.block_q for c in cfgs)) * max(c.block_q for c in cfgs)
    Tk_pad = -(-Tk // max(c.block_k for c in cfgs)) * max(c.block_k for c in cfgs)

    def static(c):
        return AttnStatic(Tq=Tq, Tk=Tk, Tq_pad=Tq_pad, Tk_pad=Tk_pad, D=D, group=Hq // Hkv,
                          block_q=c.block_q, block_k=c.block_k, causal=causal,
                          has_segments=segs is not None, sm_scale=sm_scale,
                          dtype=jnp.dtype(q.dtype).name, interpret=interpret,
                          num_warps=c.num_warps, num_stages=c.num_stages)

    plan = _Plan(static(cfgs[0]), static(cfgs[1]), static(cfgs[2]), Tq, Tk, kernel_backend,
                 cfgs[0].schedule or "serial")
    q_seg, kv_seg = _pad_segs(segs, Tq_pad, Tk_pad)
    return _flash(q, k, v, q_seg, kv_seg, plan)
