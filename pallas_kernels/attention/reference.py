"""Plain-JAX multi-head attention: the reference for the Pallas kernels and the ``xla`` path.

Conventions (shared with :func:`pallas_kernels.flash_attention`):

* Layout ``[batch, seq, heads, head_dim]``: ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]``.
* Grouped-query attention when ``Hq % Hkv == 0``: query head ``h`` reads kv head
  ``h // (Hq // Hkv)`` (MQA is ``Hkv == 1``). K and V are never repeated: the query heads are
  reshaped into ``[Hkv, group]``.
* ``causal=True`` uses bottom-right alignment (as FlashAttention-2 does): query ``i`` attends
  key ``j`` iff ``j <= i + (Tk - Tq)``. For ``Tq == Tk`` this is the usual lower triangle; for
  ``Tq > Tk`` the first ``Tq - Tk`` queries see no key at all.
* ``segment_ids``: either one int array ``[B, T]`` (needs ``Tq == Tk``) or a pair
  ``(q_segment_ids [B, Tq], kv_segment_ids [B, Tk])``; query ``i`` attends key ``j`` only if
  their ids are equal (packed sequences; padding gets its own id).
* A query row with no visible key gets output zeros (not NaN) and zero gradients.
* ``sm_scale`` defaults to ``1 / sqrt(D)``; given, it must be a finite number > 0 (else
  ``ValueError``, raised eagerly, before any tracing). Scores, softmax statistics and accumulation are
  float32; the output has ``q.dtype``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["reference_attention", "attention_mask", "check_attention_args"]

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _normalize_segment_ids(segment_ids, B, Tq, Tk):
    """Returns ``(q_seg [B, Tq], kv_seg [B, Tk])`` int32 or ``None``; raises on bad input."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids as a pair must be (q_segment_ids, kv_segment_ids)")
        q_seg, kv_seg = segment_ids
    else:
        if Tq != Tk:
            raise ValueError(
                f"a single segment_ids array needs Tq == Tk (got Tq={Tq}, Tk={Tk}); "
                "pass a pair (q_segment_ids, kv_segment_ids) for cross-attention")
        q_seg = kv_seg = segment_ids
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    for name, s, T in (("q_segment_ids", q_seg, Tq), ("kv_segment_ids", kv_seg, Tk)):
        if s.shape != (B, T):
            raise ValueError(f"{name} must have shape {(B, T)} ([batch, seq]), got {s.shape}")
        if not jnp.issubdtype(s.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {s.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def check_attention_args(q, k, v, segment_ids=None, sm_scale=None, *, allow_float64=False):
    """Validates shapes/dtypes; returns ``(B, Tq, Tk, Hq, Hkv, D, sm_scale, segs)``.

    ``segs`` is ``None`` or the normalised pair ``(q_seg, kv_seg)``. float64 inputs are accepted
    only with ``allow_float64`` (the plain-JAX reference; the kernels have no float64 path).
    """
    dtypes = _FLOAT_DTYPES + ((jnp.float64,) if allow_float64 else ())
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                             f"{getattr(x, 'shape', None)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must be {'float64, ' if allow_float64 else ''}float32, bfloat16 or "
                            f"float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k/v have {Dk}")
    if Tq == 0 or Tk == 0 or D == 0 or Hq == 0 or Hkv == 0:
        raise ValueError(f"empty dimension in q {q.shape} or k {k.shape}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv}) for "
                         "grouped-query attention")
    sm_scale = _check_sm_scale(sm_scale, D)
    segs = _normalize_segment_ids(segment_ids, B, Tq, Tk)
    return B, Tq, Tk, Hq, Hkv, D, sm_scale, segs


def _check_sm_scale(sm_scale, D):
    """``1/sqrt(D)`` for ``None``; else ``float(sm_scale)``, which must be finite and > 0."""
    if sm_scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(sm_scale, (bool, str, bytes)):
        raise TypeError(f"sm_scale must be a number, got {sm_scale!r}")
    try:
        value = float(sm_scale)
    except TypeError as e:  # a tracer or a non-number: the scale is static
        raise TypeError(f"sm_scale must be a concrete (static) number or None, got "
                        f"{sm_scale!r}") from e
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"sm_scale must be a finite number > 0 (or None for 1/sqrt(head_dim)), "
                         f"got {sm_scale!r}")
    return value


def attention_mask(Tq, Tk, *, causal=False, segs=None):
    """Boolean visibility mask ``[B or 1, Tq, Tk]`` (True = attend), or ``None`` if all visible."""
    mask = None
    if causal:
        qi = jnp.arange(Tq)[:, None]
        kj = jnp.arange(Tk)[None, :]
        mask = (kj <= qi + (Tk - Tq))[None]
    if segs is not None:
        q_seg, kv_seg = segs
        seg_mask = q_seg[:, :, None] == kv_seg[:, None, :]
        mask = seg_mask if mask is None else (mask & seg_mask)
    return mask


def reference_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None):
    """Softmax attention ``softmax(sm_scale * q k^T + mask) v`` in plain JAX.

    Args:
      q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0``.
      causal: bottom-right aligned causal mask (see module docstring).
      segment_ids: ``[B, T]`` int (Tq == Tk) or a pair ``([B, Tq], [B, Tk])``.
      sm_scale: score scale, default ``1/sqrt(D)``.

    Returns:
      ``o [B, Tq, Hq, D]`` in ``q.dtype``. Rows with no visible key are zeros. Statistics and
      accumulation in float32 (float64 for float64 inputs).
    """
    B, Tq, Tk, Hq, Hkv, D, sm_scale, segs = check_attention_args(q, k, v, segment_ids, sm_scale,
                                                                 allow_float64=True)
    G = Hq // Hkv
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    precision = jax.lax.Precision.HIGHEST if q.dtype in (jnp.float32, jnp.float64) else None
    qg = q.reshape(B, Tq, Hkv, G, D)
    # scores [B, Hkv, G, Tq, Tk] in float32
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc,
                   precision=precision) * sm_scale
    mask = attention_mask(Tq, Tk, causal=causal, segs=segs)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows: exp(-inf - 0) = 0
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)  # [B, Hkv, G, Tq, 1]
    o = jnp.einsum("bhgqk,bkhd->bhgqd", p if v.dtype == acc else p.astype(v.dtype), v,
                   preferred_element_type=acc, precision=precision)
    o = o / jnp.where(l == 0.0, 1.0, l)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, Tq, Hq, D)
    return o.astype(q.dtype)
