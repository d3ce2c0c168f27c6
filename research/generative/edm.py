"""EDM (Karras et al. 2022) preconditioning, loss weight and noise-level schedule.

EDM works in sigma: x = x_0 + sigma * eps (alpha = 1, sigma = t). The network F_theta is wrapped as
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))
with
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4
and trained with weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so that
lambda * c_out^2 = 1 (unit effective weight on F's regression target).
Dtypes: computed in sigma's (and x's) floating dtype, float32 at least. ``sigma_data`` and ``rho``
must be > 0 (checked eagerly).
"""
from __future__ import annotations

import jax.numpy as jnp

from research.generative._util import as_float, bcast, check_positive, check_same_shape, float_dtype, tvec


def edm_precond(sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) for noise level(s) ``sigma`` (any shape, sigma's dtype)."""
    check_positive(sigma_data, "sigma_data", "edm_precond")
    sigma = as_float(sigma)
    sd2 = sigma_data ** 2
    s2 = sigma ** 2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / jnp.sqrt(s2 + sd2)
    c_in = 1.0 / jnp.sqrt(s2 + sd2)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_weight(sigma, sigma_data: float = 0.5):
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    check_positive(sigma_data, "sigma_data", "edm_weight")
    sigma = as_float(sigma)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def make_edm_denoiser(model_fn, params, cond=None, *, sigma_data: float = 0.5, key=None):
    """D(x, sigma) from a raw network ``model_fn(params, x, t, cond, key)`` with EDM preconditioning.

    x: [B, ...]; sigma: [B] (or scalar). The network receives c_in x and c_noise as its time input; its
    output must have x's shape (ValueError otherwise). D is in the dtype of (x, sigma), float32 at least.
    """
    check_positive(sigma_data, "sigma_data", "make_edm_denoiser")

    def denoiser(x, sigma):
        sigma = tvec(x, sigma)
        x = as_float(x, sigma.dtype)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
        f = model_fn(params, bcast(c_in, x) * x, c_noise, cond, key)
        check_same_shape(f, x, "make_edm_denoiser", "network output")
        return bcast(c_skip, x) * x + bcast(c_out, x) * as_float(f, float_dtype(f, x))

    return denoiser


def karras_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype=jnp.float32):
    """EDM's time steps: [sigma_0 = sigma_max, ..., sigma_{N-1} = sigma_min, sigma_N = 0] (N+1 entries)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"karras_sigmas: num_steps must be a positive int, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    check_positive(rho, "rho", "karras_sigmas")
    i = jnp.arange(num_steps, dtype=dtype)
    denom = max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return jnp.concatenate([s, jnp.zeros((1,), dtype)])
