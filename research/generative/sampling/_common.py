"""Shared pieces of the samplers: eager argument checks, the sigma grid, denoiser calls, keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.generative._util import float_dtype, normal, tvec


def is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def check_nonneg(where: str, name: str, v):
    """ValueError naming ``name`` when the (concrete) value ``v`` is negative or NaN."""
    if v is None or not is_concrete(v):
        return
    a = np.asarray(v, np.float64)
    if np.any(np.isnan(a)) or np.any(a < 0):
        raise ValueError(f"{where}: {name} must be >= 0, got {v!r}")


def check_choice(where: str, name: str, v, choices):
    if v not in choices:
        raise ValueError(f"{where}: unknown {name} {v!r}; expected one of {tuple(choices)}")


def check_sigmas(where: str, sigmas, dtype):
    """``sigmas`` as a 1-D array of ``dtype``: at least 2 entries; when concrete, strictly descending,
    positive before the last entry, and ending in 0."""
    s = jnp.asarray(sigmas)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"{where}: sigmas must be a 1-D array with at least 2 entries, got shape {s.shape}")
    if is_concrete(sigmas):
        a = np.asarray(s, np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: sigmas must be finite, got {a}")
        if a[-1] != 0:
            raise ValueError(f"{where}: sigmas must end in 0, got last entry {a[-1]}")
        if not np.all(np.diff(a) < 0):
            raise ValueError(f"{where}: sigmas must be strictly descending, got {a}")
    return s.astype(dtype)


def compute_dtype(x):
    """Floating dtype of the sampler state: x's, at least float32 (bf16 -> float32; f64 under x64)."""
    return float_dtype(x)


def denoise_fn(denoiser, dtype):
    """``D(x, s)`` with scalar s broadcast to [B] in ``dtype``, output cast to ``dtype``."""
    def D(x, s):
        return denoiser(x, tvec(x, s, dtype)).astype(dtype)

    return D


def step_keys(key, n: int, stochastic: bool):
    """n keys (one per step) or, when deterministic, a dummy array of the same leading length."""
    return jax.random.split(key, n) if stochastic else jnp.zeros((n,), jnp.uint32)


def noise_like(key, x):
    return normal(key, x.shape, x.dtype)
