"""Closed-form oracles for Gaussian data N(mu, s0^2 I) on a Gaussian path (shared by generative tests).

Marginal at t: N(a mu, (a^2 s0^2 + s^2) I) with a = alpha(t), s = sigma(t). Posterior means:
  E[x0 | x_t]  = mu + a s0^2 / v (x_t - a mu),   E[eps | x_t] = s / v (x_t - a mu),   v = a^2 s0^2 + s^2
  score        = -(x_t - a mu) / v
The probability-flow ODE maps x_t to x_u by the affine transport
  x_u = a_u mu + sqrt(v_u / v_t) (x_t - a_t mu).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class GaussianOracle:
    def __init__(self, path, mu, s0):
        self.path = path
        self.mu = jnp.asarray(mu, jnp.float32)
        self.s0 = float(s0)

    def _coef(self, t):
        a, s = self.path.alpha(t), self.path.sigma(t)
        return a[:, None], s[:, None], (a ** 2 * self.s0 ** 2 + s ** 2)[:, None]

    def var(self, t):
        a, s = self.path.alpha(jnp.asarray([t])), self.path.sigma(jnp.asarray([t]))
        return float(a[0] ** 2 * self.s0 ** 2 + s[0] ** 2)

    def mean(self, t):
        return np.asarray(self.path.alpha(jnp.asarray([t]))[0] * self.mu)

    def score(self, x, t):
        a, s, v = self._coef(t)
        return -(x - a * self.mu) / v

    def x0(self, x, t):
        a, s, v = self._coef(t)
        return self.mu + a * self.s0 ** 2 / v * (x - a * self.mu)

    def eps(self, x, t):
        a, s, v = self._coef(t)
        return s / v * (x - a * self.mu)

    def x0_eps(self, x, t):
        return self.x0(x, t), self.eps(x, t)

    def velocity(self, x, t):
        da, ds = self.path.d_alpha(t)[:, None], self.path.d_sigma(t)[:, None]
        return da * self.x0(x, t) + ds * self.eps(x, t)

    def transport(self, x, t_from, t_to):
        """Exact PF-ODE solution at t_to starting from x at t_from."""
        v_from, v_to = self.var(t_from), self.var(t_to)
        return self.mean(t_to) + np.sqrt(v_to / v_from) * (np.asarray(x) - self.mean(t_from))

    def logp(self, x, t):
        """log N(x; a mu, v I) per example, float64 numpy."""
        x = np.asarray(x, np.float64)
        v = self.var(t)
        d = x.shape[1]
        return -0.5 * d * np.log(2 * np.pi * v) - 0.5 * np.sum((x - self.mean(t)) ** 2, axis=1) / v

    def logp_jax(self, x, t):
        """log N(x; a mu, v I) per example, jax float32 (usable as a prior_logp inside jit)."""
        tt = jnp.asarray([t], jnp.float32)
        a, s = self.path.alpha(tt)[0], self.path.sigma(tt)[0]
        v = a ** 2 * self.s0 ** 2 + s ** 2
        d = x.shape[1]
        return -0.5 * d * jnp.log(2 * jnp.pi * v) - 0.5 * jnp.sum((x - a * self.mu) ** 2, axis=1) / v


def gaussian_edm_denoiser(mu, s0):
    """Exact D(x; sigma) = E[x0 | x0 + sigma n = x] for x0 ~ N(mu, s0^2 I) (dtype follows x)."""
    def den(x, sigma):
        s2 = sigma.reshape(sigma.shape + (1,) * (x.ndim - 1)).astype(x.dtype) ** 2
        m = jnp.asarray(mu, x.dtype)
        return m + s0 ** 2 / (s0 ** 2 + s2) * (x - m)

    return den


def gaussian_edm_transport(x, mu, s0, sigma_from, sigma_to=0.0):
    """Exact PF-ODE solution in EDM form from sigma_from to sigma_to (float64 numpy)."""
    x = np.asarray(x, np.float64)
    return mu + np.sqrt((s0 ** 2 + sigma_to ** 2) / (s0 ** 2 + sigma_from ** 2)) * (x - mu)


def mixture_edm_denoiser(means, stds, weights):
    """Exact D(x; sigma) of a mixture of isotropic Gaussians sum_k w_k N(mu_k, s_k^2 I) (x [B, d]):
    sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)), r_k ∝ w_k N(x; mu_k, (s_k^2 + sigma^2) I)."""
    means, stds, logw = np.asarray(means), np.asarray(stds), np.log(np.asarray(weights))

    def den(x, sigma):
        dt = x.dtype
        mu, sd, lw = jnp.asarray(means, dt), jnp.asarray(stds, dt), jnp.asarray(logw, dt)
        var = sd[None] ** 2 + sigma.astype(dt)[:, None] ** 2  # [B, K]
        diff = x[:, None, :] - mu[None]  # [B, K, d]
        log_r = lw[None] - 0.5 * jnp.sum(diff ** 2, -1) / var - 0.5 * x.shape[-1] * jnp.log(var)
        r = jax.nn.softmax(log_r, axis=-1)
        post = mu[None] + (sd[None] ** 2 / var)[..., None] * diff
        return jnp.sum(r[..., None] * post, axis=1)

    return den


def moments_ok(x, mean, var, *, tol_mean=0.05, tol_var=0.1):
    """Samples ``x [N, D]`` are finite with per-dimension mean within ``tol_mean`` (absolute) and variance
    within ``tol_var`` (relative) of the targets (N = 2000 draws: sampling error ~0.02 and ~3%)."""
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x.mean(0), mean, atol=tol_mean)
    np.testing.assert_allclose(x.var(0), var, rtol=tol_var)
