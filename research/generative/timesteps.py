"""Timestep / noise-level samplers for training.

Convention: data at t = 0, noise at t = 1. Every sampler first draws a base uniform variate
``u`` in (0, 1) -- plain i.i.d., antithetic (``u`` and ``1 - u`` in the two halves of the
flattened batch) or stratified (one draw per stratum ``[(i)/n, (i+1)/n)`` of the flattened
batch, then shuffled) -- and then maps it through the inverse CDF of the requested
distribution. Inverse-CDF mapping keeps antithetic/stratified variance reduction valid for
every distribution.

Distributions for ``sample_timesteps``:
  * ``"uniform"``:      t = t_min + (t_max - t_min) u
  * ``"logit_normal"``: t = t_min + (t_max - t_min) sigmoid(loc + scale * Phi^{-1}(u))   (SD3)
  * ``"cosmap"``:       t = t_min + (t_max - t_min) (1 - 1 / (tan(pi u / 2) + 1))       (SD3)

``sample_edm_sigma`` draws EDM's log-normal noise levels ln(sigma) ~ N(P_mean, P_std^2).

Every sampler takes ``dtype=`` (float32 by default; float64 under ``jax_enable_x64``): the losses
pass their data dtype. The draws of a given key differ between dtypes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

TIMESTEP_DISTS = ("uniform", "logit_normal", "cosmap")

# Keep u strictly inside (0, 1) so that Phi^{-1}(u) is finite in float32.
_U_EPS = 1e-6


def _num_elements(shape) -> int:
    return int(math.prod(shape))


def _check_dtype(dtype, name):
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        raise ValueError(f"{name}: dtype must be float32 or float64, got {dtype}")
    return dtype


def base_uniform(key, shape, *, antithetic: bool = False, stratified: bool = False,
                 dtype=jnp.float32) -> jax.Array:
    """Uniform(0, 1) variates of ``shape`` in ``dtype``, optionally antithetic or stratified.

    antithetic: the flattened batch is split in two halves, the second half is ``1 - u`` of the
      first (for an odd count the last element is an independent draw).
    stratified: element i of a random permutation lies in stratum [i/n, (i+1)/n).
    """
    if antithetic and stratified:
        raise ValueError("base_uniform: choose at most one of antithetic=True and stratified=True")
    dtype = _check_dtype(dtype, "base_uniform")
    shape = tuple(shape)
    n = _num_elements(shape)
    if n == 0:
        raise ValueError(f"base_uniform: empty shape {shape}")
    if antithetic:
        half = n // 2
        k1, k2 = jax.random.split(key)
        u = jax.random.uniform(k1, (half,), dtype)
        parts = [u, 1.0 - u]
        if n % 2:
            parts.append(jax.random.uniform(k2, (1,), dtype))
        u = jnp.concatenate(parts)
    elif stratified:
        k1, k2 = jax.random.split(key)
        offs = jax.random.uniform(k1, (n,), dtype)
        u = (jnp.arange(n, dtype=dtype) + offs) / n
        u = jax.random.permutation(k2, u)
    else:
        u = jax.random.uniform(key, (n,), dtype)
    return jnp.clip(u, _U_EPS, 1.0 - _U_EPS).reshape(shape)


def sample_timesteps(key, shape, *, dist: str = "logit_normal", loc: float = 0.0, scale: float = 1.0,
                     t_min: float = 0.0, t_max: float = 1.0, antithetic: bool = False,
                     stratified: bool = False, dtype=jnp.float32) -> jax.Array:
    """Training timesteps t of ``shape`` (``dtype``, float32 by default) in (t_min, t_max).

    dist: one of ``TIMESTEP_DISTS``; ``loc``/``scale`` parameterise the logit-normal
    (SD3 uses loc=0, scale=1). Set ``t_min > 0`` for SDEs whose score blows up at t = 0
    (score_sde uses 1e-5).
    """
    if dist not in TIMESTEP_DISTS:
        raise ValueError(f"sample_timesteps: unknown dist {dist!r}; expected one of {TIMESTEP_DISTS}")
    if not 0.0 <= t_min < t_max:
        raise ValueError(f"sample_timesteps: need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    if scale <= 0:
        raise ValueError(f"sample_timesteps: scale must be > 0, got {scale}")
    u = base_uniform(key, shape, antithetic=antithetic, stratified=stratified, dtype=dtype)
    if dist == "uniform":
        s = u
    elif dist == "logit_normal":
        s = jax.nn.sigmoid(loc + scale * ndtri(u))
    else:  # cosmap
        s = 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)
    return (t_min + (t_max - t_min) * s).astype(u.dtype)


def sample_edm_sigma(key, shape, *, P_mean: float = -1.2, P_std: float = 1.2, antithetic: bool = False,
                     stratified: bool = False, dtype=jnp.float32) -> jax.Array:
    """EDM training noise levels: ln(sigma) ~ N(P_mean, P_std^2); ``dtype`` array of ``shape``."""
    if not P_std > 0:
        raise ValueError(f"sample_edm_sigma: P_std must be > 0, got {P_std}")
    u = base_uniform(key, shape, antithetic=antithetic, stratified=stratified, dtype=dtype)
    return jnp.exp(P_mean + P_std * ndtri(u)).astype(u.dtype)
