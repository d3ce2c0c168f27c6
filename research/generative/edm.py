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
