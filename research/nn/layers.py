"""Small layers shared by the models: RMSNorm, patchify/unpatchify, MLP, adaLN modulate, and
``dense_dot_general`` (an opt-in ``nn.Dense`` matmul with a CPU-friendly weight gradient, used by
``DiT(custom_matmul_vjp=True)``; it has no forward-mode derivative, see its docstring)."""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

xavier_uniform = nn.initializers.xavier_uniform()


# ---------------------------------------------------------------------------------------------
# The Dense matmul with a hand-written VJP (faster weight gradients on XLA:CPU)
# ---------------------------------------------------------------------------------------------
def _is_dense_dims(lhs, rhs, dimension_numbers) -> bool:
    (lc, rc), (lb, rb) = dimension_numbers
    return (rhs.ndim == 2 and lhs.ndim >= 1 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
            and not tuple(lb) and not tuple(rb))


def _weight_grad_cpu(x2, g2, precision=None):
    # x2 [M, K], g2 [M, N] -> x2^T g2 [K, N]. XLA:CPU hands a dot whose lhs contracts its first
    # axis to Eigen (about 40 % slower on this path), a plain [., M] x [M, .] dot to YNNPACK. So
    # the smaller of the two operands is transposed explicitly (the barrier keeps XLA's algebraic
    # simplifier from folding the transpose back into the dot): x2^T g2 directly, or
    # (g2^T x2)^T with the small [N, K] result transposed back.
    k, n = x2.shape[1], g2.shape[1]
    if k <= n:
        xt = jax.lax.optimization_barrier(jnp.transpose(x2))
        return jax.lax.dot_general(xt, g2, (((1,), (0,)), ((), ())), precision=precision)
    gt = jax.lax.optimization_barrier(jnp.transpose(g2))
    dwt = jax.lax.optimization_barrier(
        jax.lax.dot_general(gt, x2, (((1,), (0,)), ((), ())), precision=precision))
    return jnp.transpose(dwt)


def _weight_grad_default(x2, g2, precision=None):
    return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_matmul(x, w, precision):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _dense_matmul_fwd(x, w, precision):
    return _dense_matmul(x, w, precision), (x, w)


def _dense_matmul_bwd(precision, res, g):
    x, w = res
    # dx = g w^T, as autodiff computes it
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    dw = jax.lax.platform_dependent(x2, g2, cpu=partial(_weight_grad_cpu, precision=precision),
                                    default=partial(_weight_grad_default, precision=precision))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``jax.lax.dot_general`` for ``nn.Dense(..., dot_general=dense_dot_general)``.

    The same forward and the same gradients (up to float32 summation order) as
    ``lax.dot_general``; only the backward's weight gradient ``x^T g`` (contracting the
    flattened batch/token axes) is computed on CPU from an explicitly transposed operand (``x``
    or ``g``, the smaller), which XLA:CPU runs through YNNPACK instead of its slower Eigen path
    for a transposed-lhs dot (one DiT block's fwd+bwd takes about 30 % less time on one core,
    the whole train step 10-25 %; see docs/benchmarks/train_step.md). Other platforms get the
    plain dot. Contractions other than Dense's (last axis of ``lhs`` with axis 0 of a 2-D
    ``rhs``, no batch axes), mixed dtypes and ``preferred_element_type`` fall through to
    ``lax.dot_general`` unchanged.

    Under ``jax.checkpoint`` the matmul is one custom-VJP call, not a ``dot_general``, so the
    ``dots_saveable`` / ``dots_with_no_batch_dims_saveable`` policies would not save it (the DiT
    therefore uses the plain matmul in its blocks under those two policies); name-based policies
    (``checkpoint_name`` on the Dense output) are unaffected.
    """
    if (preferred_element_type is not None or lhs.dtype != rhs.dtype
            or not _is_dense_dims(lhs, rhs, dimension_numbers)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _dense_matmul(lhs, rhs, precision)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learnt scale (init 1); statistics in float32
    (float64 for float64 inputs)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        ft = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(ft)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(ft)).astype(self.dtype)


class Mlp(nn.Module):
    """Dense -> GELU(tanh) -> Dense, xavier_uniform weights, zero biases."""

    hidden_dim: int
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    hidden_name: str | None = None  # checkpoint_name tag for the hidden activation
    custom_matmul_vjp: bool = False  # Dense matmuls through dense_dot_general (False: Flax's default)

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, kernel_init=xavier_uniform, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            dot_general=dense_dot_general if self.custom_matmul_vjp else None,
        )
        h = nn.gelu(dense(self.hidden_dim, "fc1")(x), approximate=True)
        if self.hidden_name:
            h = jax.ad_checkpoint.checkpoint_name(h, self.hidden_name)
        return dense(self.out_dim, "fc2")(h)


def modulate(x, shift, scale):
    """adaLN modulation: x [B, N, D], shift/scale [B, D] -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def patchify(x, patch_size: int):
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; tokens row-major, features (pi, pj, c)."""
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} not divisible by patch_size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, patch_size: int, height: int, width: int, channels: int):
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
    b, n, f = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if n != gh * gw or f != p * p * channels:
        raise ValueError(
            f"tokens {tokens.shape} do not match image {(height, width, channels)} with patch {p}"
        )
    x = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, channels)
