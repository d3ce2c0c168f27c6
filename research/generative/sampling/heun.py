"""EDM's Algorithm 2 (Karras et al. 2022): Heun's 2nd-order method with optional stochastic churn."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from research.generative.sampling._common import check_nonneg, denoise_fn, is_concrete, noise_like, step_keys
from research.generative.sampling.registry import register


@register("heun", family="sigma", nfe=lambda n, **o: 2 * n - 1, stochastic=True, noise_option="s_churn",
          order="2")
def heun(denoiser, x, sigmas, *, key=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """EDM Algorithm 2: churn gamma_i = min(s_churn / N, sqrt2 - 1) for sigma_i in [s_tmin, s_tmax]
    (noise of std s_noise), Heun step; the step to sigma = 0 is an Euler step (NFE 2N - 1)."""
    check_nonneg("heun", "s_churn", s_churn)
    check_nonneg("heun", "s_noise", s_noise)
    if is_concrete(s_tmin) and is_concrete(s_tmax) and float(s_tmin) > float(s_tmax):
        raise ValueError(f"heun: need s_tmin <= s_tmax, got {s_tmin}, {s_tmax}")
    D = denoise_fn(denoiser, x.dtype)
    n = sigmas.shape[0] - 1
    stochastic = key is not None
    if stochastic:
        g = s_churn / n
        gamma_max = min(g, math.sqrt(2.0) - 1.0) if isinstance(g, (int, float)) else jnp.minimum(g, 2 ** 0.5 - 1)
    keys = step_keys(key, n, stochastic)

    def d_of(x, s):
        return (x - D(x, s)) / s

    def churn(x, t_cur, k):
        if not stochastic:
            return x, t_cur
        gamma = jnp.where((t_cur >= s_tmin) & (t_cur <= s_tmax), gamma_max, 0.0).astype(x.dtype)
        t_hat = t_cur + gamma * t_cur
        # sqrt(t_hat^2 - t_cur^2) = t_cur sqrt(gamma (2 + gamma)): never sqrt of a negative rounding error
        return x + t_cur * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * noise_like(k, x), t_hat

    def heun_step(x, inp):
        t_cur, t_next, k = inp
        x_hat, t_hat = churn(x, t_cur, k)
        d = d_of(x_hat, t_hat)
        x_next = x_hat + (t_next - t_hat) * d
        d2 = d_of(x_next, t_next)
        return x_hat + (t_next - t_hat) * 0.5 * (d + d2), None

    if n > 1:
        x, _ = jax.lax.scan(heun_step, x, (sigmas[:n - 1], sigmas[1:n], keys[:n - 1]))
    x_hat, t_hat = churn(x, sigmas[n - 1], keys[n - 1])  # last step sigma_{N-1} -> 0: Euler only
    return x_hat + (sigmas[n] - t_hat) * d_of(x_hat, t_hat)
