"""Plain-JAX causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Conventions (shared with :func:`pallas_kernels.linear_attention` and the decode step):

* Layout ``[batch, seq, heads, dim]``: ``q, k [B, T, H, Dk]`` already passed through a
  non-negative feature map (e.g. ``jax.nn.elu(x) + 1``); ``v [B, T, H, Dv]``. No grouped-query
  sharing: q, k and v have the same number of heads.
* Normalised linear attention, with ``eps > 0`` added to the normaliser::

      o_i = sum_{j in V(i)} (q_i . k_j) v_j / (sum_{j in V(i)} q_i . k_j + eps)

  where ``V(i) = {j <= i}`` (causal, diagonal included) or all ``j`` (non-causal).
* Computation in float32 (float64 for float64 inputs; exact products); the output has ``q.dtype``.

Three equivalent forms, all differentiable by autodiff:

* :func:`reference_linear_attention`: the quadratic ("parallel") form. Builds the ``[T, T]``
  matrix ``A = q k^T``, masks it, and returns ``(A v) / (A 1 + eps)``. O(T^2) memory; the ground
  truth the kernel is compared with.
* :func:`recurrent_linear_attention`: the RNN form, a ``lax.scan`` over tokens of
  :func:`pallas_kernels.linear.step.linear_attention_step` (state ``S = sum k_j^T v_j``,
  ``z = sum k_j``). Causal only.
* :func:`chunked_linear_attention`: the chunked form the Pallas kernel implements, in plain JAX
  (a ``lax.scan`` over chunks of ``C`` tokens): within a chunk the masked quadratic form, across
  chunks the float32 state ``(S, z)`` of all earlier chunks::

      num_c = mask(q_c k_c^T) v_c + q_c S,    den_c = rowsum(mask(q_c k_c^T)) + q_c . z
      S <- S + k_c^T v_c,                     z <- z + sum_rows(k_c)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["reference_linear_attention", "recurrent_linear_attention",
           "chunked_linear_attention", "check_linear_args", "check_eps"]

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HI = jax.lax.Precision.HIGHEST


def check_eps(eps):
    """Returns ``float(eps)``; it must be a concrete finite number > 0 (else ``ValueError``)."""
    if isinstance(eps, (bool, str, bytes)):
        raise TypeError(f"eps must be a number, got {eps!r}")
    try:
        value = float(eps)
    except TypeError as e:  # a tracer or a non-number: eps is static
        raise TypeError(f"eps must be a concrete (static) number, got {eps!r}") from e
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return value


def check_causal(causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return causal


def check_linear_args(q, k, v, *, allow_float64=False):
    """Validates shapes/dtypes of ``q, k [B, T, H, Dk]``, ``v [B, T, H, Dv]``.

    Returns ``(B, T, H, Dk, Dv)``; raises ``ValueError`` (shapes) or ``TypeError`` (dtypes).
    float64 only with ``allow_float64`` (the plain-JAX forms; the kernel has no float64 path).
    """
    dtypes = _FLOAT_DTYPES + ((jnp.float64,) if allow_float64 else ())
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, dim], got shape "
                             f"{getattr(x, 'shape', None)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must be {'float64, ' if allow_float64 else ''}float32, bfloat16 or "
                            f"float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk], got {q.shape} and "
                         f"{k.shape}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] with (B, T, H) = {(B, T, H)} as in q/k, got "
                         f"{v.shape}")
    Dv = v.shape[3]
    if 0 in (B, T, H, Dk, Dv):
        raise ValueError(f"empty dimension in q {q.shape} or v {v.shape}")
    return B, T, H, Dk, Dv


def _f32(*xs):
    """Upcast to the accumulation dtype: float32, or float64 for float64 inputs."""
    return tuple(x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32) for x in xs)


def reference_linear_attention(q, k, v, *, causal=True, eps=1e-6):
    """Normalised linear attention in its quadratic form (plain JAX, O(T^2) memory).

    Args:
      q, k: ``[B, T, H, Dk]``, feature-mapped (non-negative); v: ``[B, T, H, Dv]``; one dtype.
      causal: query ``i`` sees keys ``j <= i`` (else all keys).
      eps: added to the normaliser, a finite number > 0.

    Returns:
      ``o [B, T, H, Dv]`` in ``q.dtype``.
    """
    check_linear_args(q, k, v, allow_float64=True)
    check_causal(causal)
    eps = check_eps(eps)
    out_dtype = q.dtype
    q, k, v = _f32(q, k, v)
    T = q.shape[1]
    a = jnp.einsum("bihd,bjhd->bhij", q, k, precision=_HI)          # [B, H, T, T]
    if causal:
        a = jnp.where(jnp.tril(jnp.ones((T, T), bool)), a, 0.0)
    num = jnp.einsum("bhij,bjhd->bihd", a, v, precision=_HI)
    den = jnp.sum(a, axis=-1).transpose(0, 2, 1)                     # [B, T, H]
    return (num / (den + eps)[..., None]).astype(out_dtype)


def recurrent_linear_attention(q, k, v, *, eps=1e-6):
    """Causal linear attention as an RNN: ``lax.scan`` of the O(1)-per-token decode step."""
    from pallas_kernels.linear.step import linear_attention_init_state, linear_attention_step

    B, T, H, Dk, Dv = check_linear_args(q, k, v, allow_float64=True)
    eps = check_eps(eps)
    state = linear_attention_init_state(B, H, Dk, Dv)

    def body(state, qkv):
        o_t, state = linear_attention_step(state, *qkv, eps=eps)
        return state, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))             # [T, B, H, D]
    _, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1)


def chunked_linear_attention(q, k, v, *, causal=True, chunk_size=64, eps=1e-6):
    """The chunked algorithm of the Pallas kernel, in plain JAX (``lax.scan`` over chunks).

    ``T`` is zero-padded to a multiple of ``chunk_size``; a zero key row adds nothing to the
    scores, to ``S`` or to ``z``, so the padding needs no mask. Non-causal: one pass sums
    ``S, z`` over all chunks, then ``o = q S / (q . z + eps)``.
    """
    B, T, H, Dk, Dv = check_linear_args(q, k, v, allow_float64=True)
    check_causal(causal)
    eps = check_eps(eps)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    C = chunk_size
    n = -(-T // C)
    out_dtype = q.dtype
    pad = [(0, 0), (0, n * C - T), (0, 0), (0, 0)]
    # [n, B, H, C, D] chunks
    qc, kc, vc = (jnp.pad(x, pad).reshape(B, n, C, H, -1).transpose(1, 0, 3, 2, 4)
                  for x in _f32(q, k, v))
    S0 = jnp.zeros((B, H, Dk, Dv), qc.dtype)
    z0 = jnp.zeros((B, H, Dk), qc.dtype)

    if causal:
        tril = jnp.tril(jnp.ones((C, C), bool))

        def body(carry, x):
            S, z = carry
            qi, ki, vi = x
            a = jnp.where(tril, jnp.einsum("bhid,bhjd->bhij", qi, ki, precision=_HI), 0.0)
            num = (jnp.einsum("bhij,bhjd->bhid", a, vi, precision=_HI)
                   + jnp.einsum("bhid,bhde->bhie", qi, S, precision=_HI))
            den = jnp.sum(a, -1) + jnp.einsum("bhid,bhd->bhi", qi, z, precision=_HI)
            S = S + jnp.einsum("bhjd,bhje->bhde", ki, vi, precision=_HI)
            z = z + jnp.sum(ki, axis=2)
            return (S, z), num / (den + eps)[..., None]

        _, o = jax.lax.scan(body, (S0, z0), (qc, kc, vc))
    else:
        def acc(carry, x):
            S, z = carry
            ki, vi = x
            return (S + jnp.einsum("bhjd,bhje->bhde", ki, vi, precision=_HI),
                    z + jnp.sum(ki, axis=2)), None

        (S, z), _ = jax.lax.scan(acc, (S0, z0), (kc, vc))
        num = jnp.einsum("nbhid,bhde->nbhie", qc, S, precision=_HI)
        den = jnp.einsum("nbhid,bhd->nbhi", qc, z, precision=_HI)
        o = num / (den + eps)[..., None]
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, n * C, H, Dv)[:, :T]
    return o.astype(out_dtype)
