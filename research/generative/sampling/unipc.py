"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor-corrector, multistep, data prediction,
B(h) = e^{-h} - 1 ("bh2"), in EDM form (alpha = 1, lambda = -log sigma).

Step from sigma (lambda_0, model m_0 = D at the current x) to sigma' (h = lambda' - lambda_0) with the
previous model outputs m_k at lambda_k, r_k = (lambda_k - lambda_0) / h, D_k = (m_k - m_0) / r_k:
  base   x_ = (sigma'/sigma) x - (e^{-h} - 1) m_0
  UniP-p x^p = x_ - B(h) sum_{k<p} a_k D_k,             a = R_{p-1}^{-1} g_{p-1}  (p = 2: a = 1/2)
  UniC-p x^c = x_ - B(h) (sum_{k<p} a^c_k D_k + a^c_p (m' - m_0)),  a^c = R_p^{-1} g_p  (p = 1: 1/2)
with m' = D(x^p, sigma') (reused by the next step), R_p the Vandermonde matrix R[i, j] = r_j^i of
(r_1, ..., r_{p-1}, 1) and g_i = i! (-h) phi_{i+1}(-h) / B(h) (phi_{k+1}(x) = (phi_k(x) - 1/k!) / x,
phi_1(x) = (e^x - 1) / x). The order p warms up as min(order, step + 1); the corrector is not applied
after the last step, and the last step (to sigma = 0, h = inf) is the first-order limit x = m_0.
NFE = N. Order of accuracy p + 1 (UniC raises the order by one; measured in tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative.sampling._common import denoise_fn
from research.generative.sampling.registry import register


def _coefficients(hist_lam, lam0, h, p):
    """(rks [p], B_h, g [p]) for order p (hist_lam: lambdas of the p - 1 previous points, newest first)."""
    rks = [(hist_lam[k] - lam0) / h for k in range(p - 1)] + [jnp.ones_like(h)]
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = jnp.expm1(hh)  # bh2
    h_phi_k = h_phi_1 / hh - 1.0
    g, fact = [], 1
    for i in range(1, p + 1):
        g.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return jnp.stack(rks), b_h, jnp.stack(g), h_phi_1


def _solve(rks, g, p):
    r = jnp.stack([rks[:p] ** i for i in range(p)])  # [p, p], row i: r_j^i
    return jnp.linalg.solve(r, g[:p])


@register("unipc", family="sigma", nfe=lambda n, **o: n, order="order + 1 (bh2 corrector); 3 predictor default")
def unipc(denoiser, x, sigmas, *, order=3):
    """UniPC-bh2 predictor-corrector (data prediction, multistep, order 1..3; 1 NFE per step)."""
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"unipc: order must be an int in 1..3, got {order!r}")
    D = denoise_fn(denoiser, x.dtype)
    n = sigmas.shape[0] - 1
    lam = -jnp.log(sigmas[:-1])  # sigma = 0 never enters a formula

    def step(x, m_hist, i, p):
        """One step sigma_i -> sigma_{i+1} (> 0) of order p; m_hist [order, ...] newest first."""
        s, s_next = sigmas[i], sigmas[i + 1]
        lam0, lam_next = lam[i], -jnp.log(s_next)
        h = lam_next - lam0
        hist_lam = [lam[i - k] for k in range(1, p)]
        rks, b_h, g, h_phi_1 = _coefficients(hist_lam, lam0, h, p)
        m0 = m_hist[0]
        d1s = [(m_hist[k] - m0) / rks[k - 1] for k in range(1, p)]
        x_base = (s_next / s) * x - h_phi_1 * m0
        if p == 1:
            x_pred = x_base
        else:
            a = jnp.array([0.5], x.dtype) if p == 2 else _solve(rks, g, p - 1)
            x_pred = x_base - b_h * sum(a[k] * d1s[k] for k in range(p - 1))
        m_new = D(x_pred, s_next)
        ac = jnp.array([0.5], x.dtype) if p == 1 else _solve(rks, g, p)
        corr = sum((ac[k] * d1s[k] for k in range(p - 1)), jnp.zeros_like(x))
        x_corr = x_base - b_h * (corr + ac[p - 1] * (m_new - m0))
        m_hist = jnp.concatenate([m_new[None], m_hist[:-1]], axis=0)
        return x_corr, m_hist

    m0 = D(x, sigmas[0])
    m_hist = jnp.concatenate([m0[None], jnp.zeros((order - 1,) + x.shape, x.dtype)], axis=0)
    last = n - 1  # steps 0..last-1 go to sigma > 0
    warm = min(order - 1, last)
    for i in range(warm):
        x, m_hist = step(x, m_hist, i, i + 1)
    if last > warm:
        def body(carry, i):
            return step(*carry, i, order), None

        (x, m_hist), _ = jax.lax.scan(body, (x, m_hist), jnp.arange(warm, last))
    return m_hist[0]
