"""Euler and Euler-ancestral in sigma (k-diffusion convention; d = (x - D(x; sigma)) / sigma)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative.sampling._common import check_nonneg, denoise_fn, noise_like, step_keys
from research.generative.sampling.registry import register


@register("euler", family="sigma", nfe=lambda n, **o: n, order="1")
def euler(denoiser, x, sigmas):
    """Euler on the PF-ODE dx/dsigma = (x - D) / sigma (EDM eq. 3 with alpha = 1)."""
    D = denoise_fn(denoiser, x.dtype)

    def body(x, ss):
        s, s_next = ss[0], ss[1]
        return x + (s_next - s) * (x - D(x, s)) / s, None

    x, _ = jax.lax.scan(body, x, jnp.stack([sigmas[:-1], sigmas[1:]], axis=1))
    return x


def ancestral_step(s, s_next, eta):
    """(sigma_down, sigma_up) of the DDPM posterior in VE form (Ho et al. 2020): going from sigma to
    sigma_next given x0, q(x_next | x, x0) has variance sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2)
    / sigma^2; eta scales sigma_up (clamped to sigma_next), the deterministic part lands at sigma_down =
    sqrt(sigma_next^2 - sigma_up^2) (total noise level sigma_next)."""
    up = jnp.minimum(s_next, eta * jnp.sqrt(jnp.clip(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0, None)))
    down = jnp.sqrt(jnp.clip(s_next ** 2 - up ** 2, 0.0, None))
    return down, up


@register("euler_ancestral", family="sigma", nfe=lambda n, **o: n, stochastic=True, noise_option="eta",
          order="1 (weak)")
def euler_ancestral(denoiser, x, sigmas, *, key=None, eta=1.0, s_noise=1.0):
    """Euler to sigma_down, then fresh noise of std s_noise * sigma_up (ancestral sampling)."""
    check_nonneg("euler_ancestral", "eta", eta)
    check_nonneg("euler_ancestral", "s_noise", s_noise)
    D = denoise_fn(denoiser, x.dtype)
    n = sigmas.shape[0] - 1
    stochastic = key is not None
    keys = step_keys(key, n, stochastic)

    def body(x, inp):
        s, s_next, k = inp
        down, up = ancestral_step(s, s_next, eta)
        x = x + (down - s) * (x - D(x, s)) / s
        if stochastic:
            x = x + noise_like(k, x) * s_noise * up
        return x, None

    x, _ = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:], keys))
    return x
