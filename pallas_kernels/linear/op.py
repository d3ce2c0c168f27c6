"""Public linear-attention op: argument checks, padding, the interpret switch and the custom VJP.

``linear_attention(q, k, v, *, causal=True, chunk_size=64, interpret=None, eps=1e-6) -> o``
computes what :func:`pallas_kernels.reference_linear_attention` computes (normalised linear
attention of feature-mapped ``q, k``; conventions in :mod:`pallas_kernels.linear.reference`)
with the chunked Pallas kernels of :mod:`pallas_kernels.linear.kernel`: O(T) memory and
O(T * C * (Dk + Dv) + T * Dk * Dv) work per (batch, head).

Normalisation: the forward kernel computes the numerator ``N = mask(q k^T) v`` and the
denominator ``d = mask(q k^T) 1`` (carried as a separate float32 state ``z = sum k``, not as a
ones column of ``v``), divides in-kernel (``o = N / (d + eps)``) and also returns ``d``. The
custom VJP saves only ``q, k, v, o`` and ``d`` (no ``[T, T]`` array, no per-chunk states),
converts ``dO`` into the numerator/denominator cotangents ``g = dO / (d + eps)`` and
``gd = -rowsum(dO * o) / (d + eps)`` in plain JAX (O(T) elementwise work), and runs the chunked
Pallas backward kernel (forward-direction state for ``dq``, reverse-direction state for ``dk``
and ``dv``; both recomputed, not stored).

``interpret=None`` picks Pallas interpret mode iff ``jax.default_backend() != "gpu"``;
``interpret=False`` without a GPU raises ``RuntimeError`` (no silent fallback).

Supported: float32 / bfloat16 / float16 inputs (float32 accumulation and state; float32 inputs
use exact float32 products); any ``T`` (zero-padded to a chunk multiple, which is exact: a zero
key adds nothing); any head dims up to 256 (zero-padded to a power of two >= 16, also exact);
``chunk_size`` a power of two >= 16. For ``T < chunk_size`` the chunk shrinks to
``max(16, next_power_of_two(T))`` so short sequences are not padded to a full chunk. The
whole ``[Dk, Dv]`` float32 state of one (batch, head) lives in one program's registers, so
large ``Dk * Dv`` costs occupancy on GPU (there is no ``Dv`` blocking).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.linear.kernel import LinearStatic, linear_bwd, linear_fwd
from pallas_kernels.linear.reference import check_causal, check_eps, check_linear_args

__all__ = ["linear_attention"]

_MAX_HEAD_DIM = 256


def _is_pow2(n):
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and (n & (n - 1)) == 0


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _check_chunk_size(chunk_size):
    if not _is_pow2(chunk_size) or chunk_size < 16:
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")


def _pad(x, T_pad, D_pad):
    """Zero-pads ``[B, T, H, D]`` to ``[B, T_pad, H, D_pad]``."""
    _, T, _, D = x.shape
    if (T, D) == (T_pad, D_pad):
        return x
    return jnp.pad(x, ((0, 0), (0, T_pad - T), (0, 0), (0, D_pad - D)))


def _forward(q, k, v, st: LinearStatic):
    T, Dv = q.shape[1], v.shape[3]
    qp, kp = _pad(q, st.T_pad, st.Dk), _pad(k, st.T_pad, st.Dk)
    o, den = linear_fwd(qp, kp, _pad(v, st.T_pad, st.Dv), st)
    return o[:, :T, :, :Dv], den


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(q, k, v, st):
    return _forward(q, k, v, st)[0]


def _linear_fwd_rule(q, k, v, st):
    o, den = _forward(q, k, v, st)
    return o, (q, k, v, o, den)


def _linear_bwd_rule(st, res, do):
    q, k, v, o, den = res
    T, Dk, Dv = q.shape[1], q.shape[3], v.shape[3]
    inv = 1.0 / (den[:, :, :T].transpose(0, 2, 1) + st.eps)            # [B, T, H] float32
    do = do.astype(jnp.float32)
    g = (do * inv[..., None]).astype(q.dtype)                            # dL/dN
    gd = -jnp.sum(do * o.astype(jnp.float32), axis=-1) * inv             # dL/dd, [B, T, H]
    gd = jnp.pad(gd.transpose(0, 2, 1), ((0, 0), (0, 0), (0, st.T_pad - T)))
    dq, dk, dv = linear_bwd(_pad(q, st.T_pad, st.Dk), _pad(k, st.T_pad, st.Dk),
                            _pad(v, st.T_pad, st.Dv), _pad(g, st.T_pad, st.Dv), gd, st)
    return dq[:, :T, :, :Dk], dk[:, :T, :, :Dk], dv[:, :T, :, :Dv]


_linear.defvjp(_linear_fwd_rule, _linear_bwd_rule)


def linear_attention(q, k, v, *, causal=True, chunk_size=64, interpret=None, eps=1e-6):
    """Chunked causal (or non-causal) linear attention with a custom VJP (Pallas).

    Args:
      q, k: ``[B, T, H, Dk]``, already feature-mapped (non-negative, e.g. ``elu(x) + 1``);
        v: ``[B, T, H, Dv]``; one float dtype (float32, bfloat16 or float16).
      causal: query ``i`` sees keys ``j <= i``; else every key.
      chunk_size: chunk length ``C``, a power of two >= 16 (shrunk for ``T < C``, see module
        docstring). Trades the intra-chunk ``C x C`` work against the number of state steps.
      interpret: ``None`` (interpret iff no GPU backend), ``True`` or ``False``.
      eps: added to the normaliser, a finite number > 0.

    Returns:
      ``o [B, T, H, Dv]`` in ``q.dtype``,
      ``o_i = sum_j (q_i . k_j) v_j / (sum_j q_i . k_j + eps)``; differentiable in q, k, v.

    Raises:
      ValueError / TypeError for bad shapes, dtypes, ``chunk_size``, ``eps`` or ``causal``;
      RuntimeError for ``interpret=False`` without a GPU.
    """
    B, T, H, Dk, Dv = check_linear_args(q, k, v)
    check_causal(causal)
    eps = check_eps(eps)
    _check_chunk_size(chunk_size)
    if max(Dk, Dv) > _MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {_MAX_HEAD_DIM} for the Pallas kernel, got "
                         f"Dk={Dk}, Dv={Dv}")
    interpret = resolve_interpret(interpret, "linear_attention")
    C = min(chunk_size, max(16, _next_pow2(T)))
    st = LinearStatic(T=T, T_pad=-(-T // C) * C, chunk=C, Dk=max(16, _next_pow2(Dk)),
                      Dv=max(16, _next_pow2(Dv)), causal=causal, eps=eps,
                      dtype=jnp.dtype(q.dtype).name, interpret=interpret)
    return _linear(q, k, v, st)
