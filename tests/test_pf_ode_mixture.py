"""Score-SDE samplers driven by the EXACT score of a 2-D Gaussian mixture (no learned model).

Data: p_0 = sum_k w_k N(mu_k, s_k^2 I). Under x_t = alpha x_0 + sigma eps its marginal is again a
mixture, p_t = sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so the exact score (and the
exact epsilon predictor E[eps | x_t] = -sigma score) is known in closed form at every t. Feeding it
as the "model" to the registry's time samplers separates sampler bugs (wrong
score scaling, drift, diffusion, prior, time direction) from model error: every sampler must recover
the per-mode mass, mean and spread of the mixture. The mixture is deliberately unequal (weights
0.5 / 0.3 / 0.2, stds 0.15 / 0.3 / 0.2), so a sampler that merely lands near the modes but with the
wrong spread or mass fails.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative.parameterization import eps_precond, preconditioned_eps_model
from research.generative.sampling import pf_ode_velocity, sample_time
from research.generative.sde import SubVPSDE, VESDE, VPSDE
from tests.gaussian_oracle import GaussianOracle

MEANS = np.array([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], np.float32)
STDS = np.array([0.15, 0.3, 0.2], np.float32)
WEIGHTS = np.array([0.5, 0.3, 0.2], np.float32)
N = 3000


def mixture_eps_model(path):
    """Exact E[eps | x_t] of the diffused mixture as a ``model_fn(params, x, t, cond, key)``."""
    means, stds, logw = jnp.asarray(MEANS), jnp.asarray(STDS), jnp.log(jnp.asarray(WEIGHTS))

    def model_fn(params, x, t, cond, key):
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]  # [B, 1]
        var = a ** 2 * stds[None] ** 2 + s ** 2  # [B, K]
        diff = x[:, None, :] - a[:, :, None] * means[None]  # [B, K, d]
        log_r = logw[None] - 0.5 * jnp.sum(diff ** 2, -1) / var - x.shape[-1] * 0.5 * jnp.log(var)
        r = jax.nn.softmax(log_r, axis=-1)
        score = -jnp.sum(r[..., None] * diff / var[..., None], axis=1)
        return -s * score

    return model_fn


def check_mixture(x, path, t_end, *, tol_mass=0.035, tol_mean=0.05, tol_std=0.1):
    """Per-mode mass, mean and spread of samples x [N, 2] vs the mixture's marginal at t_end."""
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "non-finite samples"
    a = float(path.alpha(jnp.float32(t_end)))
    s = float(path.sigma(jnp.float32(t_end)))
    mu = a * MEANS.astype(np.float64)
    sd = np.sqrt(a ** 2 * STDS.astype(np.float64) ** 2 + s ** 2)
    d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    comp = d2.argmin(1)
    near = d2[np.arange(len(x)), comp] < (5.0 * sd[comp]) ** 2
    assert near.mean() > 0.99, f"{(1 - near.mean()):.3f} of the samples are far from every mode"
    for k in range(len(WEIGHTS)):
        xk = x[(comp == k) & near]
        mass = len(xk) / len(x)
        assert abs(mass - WEIGHTS[k]) < tol_mass, f"mode {k}: mass {mass:.3f} vs {WEIGHTS[k]}"
        np.testing.assert_allclose(xk.mean(0), mu[k], atol=tol_mean, err_msg=f"mode {k} mean")
        std_k = np.sqrt(((xk - xk.mean(0)) ** 2).mean())
        assert abs(std_k / sd[k] - 1.0) < tol_std, f"mode {k}: std {std_k:.4f} vs {sd[k]:.4f}"


SDES = {"vp": lambda: VPSDE(), "subvp": lambda: SubVPSDE(), "ve": lambda: VESDE(0.01, 10.0)}
T_END = {"vp": 1e-3, "subvp": 1e-3, "ve": 1e-5}


def _score(sde):
    eps = mixture_eps_model(sde.path)
    return lambda x, t: -eps(None, x, t, None, None) / sde.path.sigma(t)[:, None]


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("solver,steps", [("heun", 40), ("rk4", 20)])
def test_pf_ode_exact_mixture_score(name, solver, steps):
    sde = SDES[name]()
    v = pf_ode_velocity(sde, _score(sde))
    x_init = sde.prior_sample(jax.random.key(0), (N, 2))
    x, nfe = jax.jit(lambda x: sample_time("ode", v, x, num_steps=steps, solver=solver, t_start=1.0,
                                           t_end=T_END[name]))(x_init)
    assert int(nfe) == {"heun": 2, "rk4": 4}[solver] * steps
    check_mixture(x, sde.path, T_END[name])


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_euler_maruyama_exact_mixture_score(name):
    sde = SDES[name]()
    x_init = sde.prior_sample(jax.random.key(1), (N, 2))
    x, nfe = jax.jit(lambda x, k: sample_time("euler_maruyama", _score(sde), x, sde=sde, key=k, num_steps=500,
                                              t_end=T_END[name]))(x_init, jax.random.key(5))
    assert int(nfe) == 500
    check_mixture(x, sde.path, T_END[name])


def test_pf_ode_adaptive_exact_mixture_score_vp():
    sde = VPSDE()
    x_init = sde.prior_sample(jax.random.key(2), (N, 2))
    v = pf_ode_velocity(sde, _score(sde))
    x, nfe = jax.jit(lambda x: sample_time("ode_adaptive", v, x, t_start=1.0, t_end=1e-3, rtol=1e-4, atol=1e-4))(
        x_init)
    assert int(nfe) > 7
    check_mixture(x, sde.path, 1e-3)


# ----------------------------------------------------------------------------- preconditioned eps model
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_eps_precond_is_exact_for_gaussian_data(name):
    """With F = 0 the preconditioned epsilon model is E[eps | x_t] of N(0, sigma_data^2 I) data (closed form),
    and c_out^2 is that Gaussian's Var[eps_i | x_t] = 1 - sigma^2 / v."""
    sd = 0.7
    path = SDES[name]().path
    zero_net = lambda params, x, t, cond, key: jnp.zeros_like(x)
    eps_fn = preconditioned_eps_model(zero_net, path, sd)
    oracle = GaussianOracle(path, np.zeros(3, np.float32), sd)
    x = jax.random.normal(jax.random.key(3), (16, 3)) * 2.0
    for t in (1e-3, 0.1, 0.5, 0.9, 1.0):
        tv = jnp.full((16,), t, jnp.float32)
        np.testing.assert_allclose(eps_fn(None, x, tv, None, None), oracle.eps(x, tv), rtol=1e-5, atol=1e-6)
        _, c_out, c_in = eps_precond(path, tv, sd)
        v = oracle.var(t)
        s = float(path.sigma(jnp.float32(t)))
        np.testing.assert_allclose(np.asarray(c_out) ** 2, 1.0 - s ** 2 / v, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(c_in), 1.0 / np.sqrt(v), rtol=1e-5)
