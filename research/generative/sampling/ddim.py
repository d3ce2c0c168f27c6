"""DDIM (Song et al. 2021) on any Gaussian path x_t = alpha x0 + sigma eps, from t to s < t:

  x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
  c^2 = eta^2 sigma_s^2 (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)
(eta = 1: the DDPM posterior q(x_s | x_t, x0_hat) variance; eta = 0: deterministic, = Euler for
rectified flow). ``x0_eps_fn(x, t [B]) -> (x0_hat, eps_hat)`` (parameterization.as_x0_eps_fn). NFE = N.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative._util import bcast, normal, tvec
from research.generative.sampling._common import check_nonneg, compute_dtype, step_keys
from research.generative.sampling.registry import register
from research.generative.sampling.score_sde import grid_pairs


@register("ddim", family="time", nfe=lambda n, **o: n, stochastic=True, noise_option="eta", order="1")
def ddim(x0_eps_fn, x_init, *, path, key=None, num_steps=None, ts=None, eta=0.0, t_start=None, t_end=None):
    """DDIM on any Gaussian path with stochasticity eta (eta = 1: DDPM ancestral posterior)."""
    check_nonneg("ddim", "eta", eta)
    x = x_init.astype(compute_dtype(x_init))
    ts, ts_next, n = grid_pairs("ddim", x, num_steps, ts, path.t_start if t_start is None else t_start,
                                path.t_end if t_end is None else t_end)
    stochastic = key is not None
    keys = step_keys(key, n, stochastic)

    def body(x, inp):
        t, s, k = inp
        tv, sv = tvec(x, t, x.dtype), tvec(x, s, x.dtype)
        x0, eps = x0_eps_fn(x, tv)
        a_t, s_t, a_s, s_s = path.alpha(tv), path.sigma(tv), path.alpha(sv), path.sigma(sv)
        if stochastic:
            ratio = (a_t * s_s) / (a_s * s_t)
            c2 = jnp.clip(eta ** 2 * s_s ** 2 * (1.0 - ratio ** 2), 0.0, None)
            z = normal(k, x.shape, x.dtype)
        else:
            c2 = jnp.zeros_like(s_s)
            z = 0.0
        x = bcast(a_s, x) * x0 + bcast(jnp.sqrt(jnp.clip(s_s ** 2 - c2, 0.0, None)), x) * eps + bcast(jnp.sqrt(c2), x) * z
        return x.astype(inp[0].dtype), None

    x, _ = jax.lax.scan(body, x, (ts, ts_next, keys))
    return x
