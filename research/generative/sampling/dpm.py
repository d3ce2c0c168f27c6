"""DPM-Solver family in EDM form (alpha = 1, lambda = -log sigma, h = lambda_next - lambda > 0).

dpm_2        DPM-Solver-2 (Lu et al. 2022a, arXiv 2206.00927, Alg. 1 with r = 1/2) with the noise
             prediction eps = (x - D) / sigma. In VE form its two stages are Euler steps: to the
             geometric-mean sigma_mid = sqrt(sigma sigma_next), then from sigma with the slope at
             sigma_mid. The step to sigma = 0 is Euler.                              NFE 2N - 1
dpmpp_2m     DPM-Solver++(2M) (Lu et al. 2022b, arXiv 2211.01095, Alg. 2), data prediction:
             x' = (sigma'/sigma) x - (e^{-h} - 1) [(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}], r = h_{i-1}/h_i;
             first step first order, last step (to 0) x' = D_i.                     NFE N
dpmpp_2m_sde SDE-DPM-Solver++(2M) with a noise fraction eta (eta = 1: the paper's SDE solver, eta = 0:
             dpmpp_2m): h_eta = (1 + eta) h,
             x' = e^{-h_eta} x + (1 - e^{-h_eta}) D_i + c (D_i - D_{i-1}) / r + sigma' sqrt(1 - e^{-2 eta h}) z,
             c = (1 - e^{-h_eta}) / 2 (midpoint) or 1 - (1 - e^{-h_eta}) / h_eta (heun: the exact
             integral of the linear interpolation of D in lambda).                  NFE N
dpmpp_3m_sde third-order multistep of the same exponential integrator: D in lambda is the quadratic
             through D_i, D_{i-1}, D_{i-2}; the integrals of its Taylor terms are
             h phi2(h_eta) D' and -h^2 phi3(h_eta) D'' with phi2(H) = 1 + (e^{-H} - 1)/H and
             phi3(H) = phi2(H)/H - 1/2. (k-diffusion and the DPM-Solver reference code multiply the
             divided difference d2 ~= h^2 D''/2 by phi3, i.e. half this third-order term: that is
             second order; here the coefficient is 2 phi3, third order, see tests.)     NFE N
The noise of the SDE variants is N(0, I) per step from ``key`` (eta > 0), scaled by s_noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative.sampling._common import check_choice, check_nonneg, denoise_fn, noise_like, step_keys
from research.generative.sampling.registry import register


@register("dpm_2", family="sigma", nfe=lambda n, **o: 2 * n - 1, order="2")
def dpm_2(denoiser, x, sigmas):
    """DPM-Solver-2: midpoint in log sigma (noise prediction); the step to sigma = 0 is Euler."""
    D = denoise_fn(denoiser, x.dtype)
    n = sigmas.shape[0] - 1

    def body(x, ss):
        s, s_next = ss[0], ss[1]
        d = (x - D(x, s)) / s
        s_mid = jnp.exp(0.5 * (jnp.log(s) + jnp.log(s_next)))
        x_mid = x + (s_mid - s) * d
        d_mid = (x_mid - D(x_mid, s_mid)) / s_mid
        return x + (s_next - s) * d_mid, None

    if n > 1:
        x, _ = jax.lax.scan(body, x, jnp.stack([sigmas[:n - 1], sigmas[1:n]], axis=1))
    s = sigmas[n - 1]
    return x + (sigmas[n] - s) * (x - D(x, s)) / s


def _multistep(x, sigmas, key, order, first_steps, step):
    """Run a multistep sampler: ``step(x, hist, i_order, s, s_next, k) -> (x, hist)`` where hist holds
    the previous (D, h) pairs. Steps 0..order-2 are unrolled with the lower orders, steps order-1..N-2
    are one lax.scan with the full order, the last step (to sigma = 0) returns the current D."""
    n = sigmas.shape[0] - 1
    stochastic = key is not None
    keys = step_keys(key, n, stochastic)
    hist = None
    last = n - 1
    for i in range(min(first_steps, last)):
        x, hist = step(x, hist, i + 1, sigmas[i], sigmas[i + 1], keys[i], stochastic)
    start = min(first_steps, last)
    if last > start:
        def body(carry, inp):
            x, hist = carry
            s, s_next, k = inp
            return step(x, hist, order, s, s_next, k, stochastic), None

        (x, hist), _ = jax.lax.scan(body, (x, hist), (sigmas[start:last], sigmas[start + 1:n], keys[start:last]))
    return x, hist, sigmas[last]


def _dpmpp_sde_run(denoiser, x, sigmas, key, eta, s_noise, order, solver_type="midpoint"):
    D = denoise_fn(denoiser, x.dtype)

    def step(x, hist, k_order, s, s_next, k, stochastic):
        den = D(x, s)
        h = jnp.log(s) - jnp.log(s_next)
        h_eta = h * (1.0 + eta)
        one_m = -jnp.expm1(-h_eta)  # 1 - e^{-h_eta}
        x_new = jnp.exp(-h_eta) * x + one_m * den
        if k_order >= 2:
            d1_prev, h1 = hist[0], hist[1]
            r0 = h1 / h
            d1_0 = (den - d1_prev) / r0  # ~ h D'
            phi2 = 1.0 + jnp.expm1(-h_eta) / h_eta
            if k_order == 2:
                if solver_type == "heun" or order == 3:
                    x_new = x_new + phi2 * d1_0
                else:
                    x_new = x_new + 0.5 * one_m * d1_0
            else:
                d2_prev, h2 = hist[2], hist[3]
                r1 = h2 / h
                d1_1 = (d1_prev - d2_prev) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # ~ h D'
                d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D'' / 2
                phi3 = phi2 / h_eta - 0.5
                x_new = x_new + phi2 * d1 - 2.0 * phi3 * d2
        if stochastic:
            x_new = x_new + s_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * s_noise * noise_like(k, x)
        if order == 2:
            new_hist = (den, h)
        else:
            prev = (jnp.zeros_like(den), jnp.ones_like(h)) if hist is None else hist[:2]
            new_hist = (den, h) + prev
        return x_new, new_hist

    x, hist, s_last = _multistep(x, sigmas, key, order, order - 1, step)
    return D(x, s_last)


@register("dpmpp_2m", family="sigma", nfe=lambda n, **o: n, order="2")
def dpmpp_2m(denoiser, x, sigmas):
    """DPM-Solver++(2M): second-order multistep with data prediction (1 NFE per step)."""
    return _dpmpp_sde_run(denoiser, x, sigmas, None, 0.0, 0.0, 2)


@register("dpmpp_2m_sde", family="sigma", nfe=lambda n, **o: n, stochastic=True, noise_option="eta",
          order="2 (eta=0); SDE")
def dpmpp_2m_sde(denoiser, x, sigmas, *, key=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) with noise fraction eta (eta = 0: dpmpp_2m); solver_type midpoint|heun."""
    check_nonneg("dpmpp_2m_sde", "eta", eta)
    check_nonneg("dpmpp_2m_sde", "s_noise", s_noise)
    check_choice("dpmpp_2m_sde", "solver_type", solver_type, ("midpoint", "heun"))
    return _dpmpp_sde_run(denoiser, x, sigmas, key, eta, s_noise, 2, solver_type)


@register("dpmpp_3m_sde", family="sigma", nfe=lambda n, **o: n, stochastic=True, noise_option="eta",
          order="3 (eta=0); SDE")
def dpmpp_3m_sde(denoiser, x, sigmas, *, key=None, eta=1.0, s_noise=1.0):
    """Third-order multistep DPM-Solver++ with noise fraction eta (eta = 0: deterministic 3M)."""
    check_nonneg("dpmpp_3m_sde", "eta", eta)
    check_nonneg("dpmpp_3m_sde", "s_noise", s_noise)
    return _dpmpp_sde_run(denoiser, x, sigmas, key, eta, s_noise, 3)
