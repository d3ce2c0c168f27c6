"""``edm_sample`` (EDM Algorithm 2 with unit latents, the stable entry) over the sampler registry.

Samplers live in research.generative.sampling (``sample``, ``sample_time``, ``SAMPLERS``, schedules);
classifier-free guidance in research.generative.guidance (re-exported here).
"""
from __future__ import annotations

from typing import Callable

import jax

from research.generative.guidance import guided, guided_model_fn  # noqa: F401  (re-exports)
from research.generative.sampling import karras, sample
from research.generative.sampling._common import check_nonneg, compute_dtype
from research.generative.sampling.registry import get_spec


def edm_sample(denoiser: Callable, latents: jax.Array, *, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0, key=None) -> jax.Array:
    """EDM Algorithm 2 (Karras et al. 2022): Heun sampler with optional stochastic churn; returns x0.

    denoiser(x, sigma) -> D(x; sigma) with x [B, ...] and sigma [B]. latents: [B, ...] ~ N(0, I), scaled
    by sigma_max inside. Karras' sigmas (rho); NFE = 2 num_steps - 1 (the last step, to sigma = 0, is
    Euler). S_churn > 0 needs ``key``. Same as ``sample("heun", denoiser, sigma_max * latents,
    sigmas=karras(num_steps, sigma_min, sigma_max, rho), s_churn=S_churn, s_tmin=S_min, s_tmax=S_max,
    s_noise=S_noise, key=key)[0]``.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"edm_sample: num_steps must be a positive int, got {num_steps!r}")
    check_nonneg("edm_sample", "S_churn", S_churn)
    check_nonneg("edm_sample", "S_noise", S_noise)
    if not rho > 0:
        raise ValueError(f"edm_sample: rho must be > 0, got {rho}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"edm_sample: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    dtype = compute_dtype(latents)
    sigmas = karras(num_steps, sigma_min, sigma_max, rho, dtype=dtype)
    x, _ = sample("heun", denoiser, latents.astype(dtype) * sigmas[0], sigmas=sigmas, key=key, s_churn=S_churn,
                  s_tmin=S_min, s_tmax=S_max, s_noise=S_noise)
    return x


def edm_nfe(num_steps: int) -> int:
    """Denoiser evaluations of ``edm_sample`` (from the "heun" spec): 2N - 1."""
    return get_spec("heun").nfe(num_steps)
