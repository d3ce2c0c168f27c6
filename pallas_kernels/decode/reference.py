"""Plain-JAX decode attention over a KV cache: the reference for the Pallas decode kernel.

Semantics (shared with :func:`pallas_kernels.decode_attention`):

* ``q [B, Tq, Hq, D]`` are the queries of the last ``Tq`` positions already written into the
  cache ``k_cache, v_cache [B, S, Hkv, D]``: query ``i`` of row ``b`` sits at position
  ``lengths[b] - Tq + i``. ``P_b = lengths[b] - Tq`` is the row's committed prefix.
* Query ``i`` sees every prefix position ``j < P_b`` and the new position ``P_b + k``
  (``0 <= k < Tq``) iff ``tree_mask[b, i, k]``; the default (``tree_mask=None``) is causal,
  ``k <= i``. ``tree_mask`` is bool ``[B, Tq, Tq]`` or ``[Tq, Tq]`` (broadcast over the batch);
  token trees for speculative decoding set it to "``k`` is an ancestor of ``i`` or ``i``".
* Positions ``>= lengths[b]`` are never read into the result: the cache there may hold anything
  (stale entries after a rollback, NaN, inf). K/V are zeroed there before use, so even
  non-finite garbage leaves outputs and gradients untouched.
* Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never
  repeated (the query heads are reshaped into ``[Hkv, group]``). MQA is ``Hkv == 1``.
* A query that sees no key (an all-false ``tree_mask`` row over an empty prefix) returns 0.
* ``sm_scale`` defaults to ``1/sqrt(D)`` and must be a finite number > 0 (``ValueError``).
  Scores, softmax statistics and accumulation are float32 (exact float32 products for float32
  inputs; the reference also takes float64 and then accumulates in float64); the output has
  ``q.dtype``.
* ``lengths`` is int ``[B]`` with ``Tq <= lengths[b] <= S``. Concrete values outside that range
  raise ``ValueError``; traced values (under ``jit``) cannot be checked and are clamped into
  ``[Tq, S]``, identically here and in the kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.reference import _check_sm_scale

__all__ = ["reference_decode_attention", "check_decode_args", "visibility_mask"]

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_lengths(lengths, B, Tq, S):
    """int32 ``[B]`` lengths, clamped into ``[Tq, S]``; concrete out-of-range values raise."""
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape {(B,)} ([batch]), got {lengths.shape}")
    try:
        values = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        values = None  # traced under jit: clamped below, cannot be checked
    if values is not None and (values.min() < Tq or values.max() > S):
        raise ValueError(f"lengths must satisfy Tq <= lengths[b] <= S (Tq={Tq}, S={S}: the "
                         f"queries are the last Tq cache entries), got {values.tolist()}")
    return jnp.clip(lengths.astype(jnp.int32), Tq, S)


def _check_tree_mask(tree_mask, B, Tq):
    """``None`` or a bool ``[B, Tq, Tq]`` array (a ``[Tq, Tq]`` mask is broadcast)."""
    if tree_mask is None:
        return None
    tree_mask = jnp.asarray(tree_mask)
    if tree_mask.dtype != jnp.bool_:
        raise TypeError(f"tree_mask must be a bool array, got dtype {tree_mask.dtype}")
    if tree_mask.shape == (Tq, Tq):
        tree_mask = jnp.broadcast_to(tree_mask, (B, Tq, Tq))
    if tree_mask.shape != (B, Tq, Tq):
        raise ValueError(f"tree_mask must have shape {(B, Tq, Tq)} or {(Tq, Tq)} "
                         f"([batch, query, new position]), got {tree_mask.shape}")
    return tree_mask


def check_decode_args(q, k_cache, v_cache, lengths, tree_mask=None, sm_scale=None, *, allow_float64=False):
    """Validates the arguments of a decode-attention call.

    Returns ``(dims, lengths, tree_mask, sm_scale)`` with ``dims = (B, Tq, S, Hq, Hkv, D)``,
    ``lengths`` int32 ``[B]`` clamped into ``[Tq, S]``, ``tree_mask`` ``None`` or bool
    ``[B, Tq, Tq]``, and ``sm_scale`` a float. Raises ``ValueError`` / ``TypeError`` naming the
    problem. float64 only with ``allow_float64`` (the reference; the kernel has no float64 path).
    """
    dtypes = _FLOAT_DTYPES + ((jnp.float64,) if allow_float64 else ())
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                             f"{getattr(x, 'shape', None)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must be {'float64, ' if allow_float64 else ''}float32, bfloat16 or "
                            f"float16, got {x.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape} "
                         f"and {v_cache.shape}")
    B, Tq, Hq, D = q.shape
    Bk, S, Hkv, Dk = k_cache.shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k_cache/v_cache have {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has {D}, k_cache/v_cache have {Dk}")
    if min(B, Tq, S, Hq, Hkv, D) == 0:
        raise ValueError(f"empty dimension in q {q.shape} or k_cache {k_cache.shape}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv}) for "
                         "grouped-query attention")
    if Tq > S:
        raise ValueError(f"Tq ({Tq}) must not exceed the cache length S ({S}): the queries are "
                         "the last Tq positions written into the cache")
    sm_scale = _check_sm_scale(sm_scale, D)
    lengths = _check_lengths(lengths, B, Tq, S)
    tree_mask = _check_tree_mask(tree_mask, B, Tq)
    return (B, Tq, S, Hq, Hkv, D), lengths, tree_mask, sm_scale


def visibility_mask(lengths, tree_mask, Tq, S):
    """Bool ``[B, Tq, S]``: query ``i`` of row ``b`` attends cache position ``j``.

    ``lengths`` int32 ``[B]`` (already in ``[Tq, S]``), ``tree_mask`` ``None`` or bool
    ``[B, Tq, Tq]``.
    """
    pos = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    rel = pos - (lengths - Tq)[:, None, None]          # index among the new positions
    is_new = (rel >= 0) & (rel < Tq)                     # rel < Tq  <=>  pos < lengths
    if tree_mask is None:
        new_ok = rel <= jnp.arange(Tq, dtype=jnp.int32)[None, :, None]
    else:
        idx = jnp.broadcast_to(jnp.clip(rel, 0, Tq - 1), (lengths.shape[0], Tq, S))
        new_ok = jnp.take_along_axis(tree_mask, idx, axis=2)
    return (rel < 0) | (is_new & new_ok)


def decode_reference_core(q, k_cache, v_cache, lengths, tree_mask, sm_scale):
    """The computation of :func:`reference_decode_attention` on validated arguments (also the
    function whose VJP is the decode kernel's backward)."""
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    precision = jax.lax.Precision.HIGHEST if q.dtype in (jnp.float32, jnp.float64) else None
    # zero the cache beyond each row's length: garbage (even NaN) never meets a zero weight.
    valid = (jnp.arange(S, dtype=jnp.int32)[None, :] < lengths[:, None])[:, :, None, None]
    k = jnp.where(valid, k_cache, jnp.zeros((), k_cache.dtype))
    v = jnp.where(valid, v_cache, jnp.zeros((), v_cache.dtype))
    qg = q.reshape(B, Tq, Hkv, G, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc,
                   precision=precision) * sm_scale          # [B, Hkv, G, Tq, S] float32 (or 64)
    mask = visibility_mask(lengths, tree_mask, Tq, S)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)                 # rows that see nothing: exp(-inf) = 0
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bhgqd", p if v.dtype == acc else p.astype(v.dtype), v,
                   preferred_element_type=acc, precision=precision)
    o = o / jnp.where(l == 0.0, 1.0, l)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, Tq, Hq, D).astype(q.dtype)


def reference_decode_attention(q, k_cache, v_cache, lengths, *, tree_mask=None, sm_scale=None):
    """Attention of the last ``Tq`` cache positions over the cache, in plain JAX.

    Args:
      q: ``[B, Tq, Hq, D]``, the queries of positions ``lengths[b] - Tq + i``.
      k_cache, v_cache: ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0``; one float dtype with q.
      lengths: int ``[B]``, ``Tq <= lengths[b] <= S``: entries ``>= lengths[b]`` are ignored.
      tree_mask: ``None`` (causal among the new positions) or bool ``[B, Tq, Tq]`` /
        ``[Tq, Tq]``: query ``i`` sees new position ``k`` iff ``tree_mask[b, i, k]``.
      sm_scale: score scale, default ``1/sqrt(D)``.

    Returns:
      ``o [B, Tq, Hq, D]`` in ``q.dtype`` (0 for a query that sees no key); differentiable in
      q, k_cache, v_cache.
    """
    _, lengths, tree_mask, sm_scale = check_decode_args(q, k_cache, v_cache, lengths, tree_mask,
                                                        sm_scale, allow_float64=True)
    return decode_reference_core(q, k_cache, v_cache, lengths, tree_mask, sm_scale)
