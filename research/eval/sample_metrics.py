"""Sample-quality metrics between two point clouds (jit-able, float32).

  * ``sliced_wasserstein(key, x, y, num_projections)``: Monte-Carlo sliced W_p over random unit
    directions; each 1-D W_p between equal-size samples is the distance between sorted projections.
  * ``mmd_rbf(x, y, bandwidths)``: unbiased MMD^2 (U-statistic) with a sum of RBF kernels
    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _flat(x):
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def sliced_wasserstein(key, x, y, *, num_projections: int = 256, p: int = 2) -> jax.Array:
    """(E_theta[W_p^p(theta^T x, theta^T y)])^(1/p) with theta uniform on the sphere; x, y [N, ...]."""
    x, y = _flat(x), _flat(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein: x and y need the same shape, got {x.shape} and {y.shape}")
    theta = jax.random.normal(key, (x.shape[1], num_projections), jnp.float32)
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px = jnp.sort(x @ theta, axis=0)
    py = jnp.sort(y @ theta, axis=0)
    return jnp.mean(jnp.abs(px - py) ** p) ** (1.0 / p)


def _sqdist(a, b):
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T, 0.0)


def mmd_rbf(x, y, *, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> jax.Array:
    """Unbiased MMD^2 between samples x [N, ...] and y [M, ...] (N, M >= 2) with summed RBF kernels."""
    x, y = _flat(x), _flat(y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf: need at least 2 samples each, got {n} and {m}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf: dimension mismatch {x.shape[1]} vs {y.shape[1]}")
    h2 = 2.0 * jnp.asarray(bandwidths, jnp.float32) ** 2

    def k(d):
        return jnp.sum(jnp.exp(-d[..., None] / h2), axis=-1)

    kxx = k(_sqdist(x, x))
    kyy = k(_sqdist(y, y))
    kxy = k(_sqdist(x, y))
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return sxx + syy - 2.0 * jnp.mean(kxy)
