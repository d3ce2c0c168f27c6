"""Stochastic and DDIM samplers (all jit-able, lax.scan over a uniform time grid).

Time runs from ``t_start`` (noise) down to ``t_end`` (near data) on the grid
ts = linspace(t_start, t_end, N + 1); step i moves from ts[i] to ts[i + 1].

  * ``euler_maruyama_sample``: reverse SDE by Euler-Maruyama.                 NFE = N
  * ``pc_sample``: predictor (reverse diffusion | euler_maruyama | none) + Langevin corrector
    with signal-to-noise ratio ``snr`` (score_sde's Algorithms 2-3).          NFE = N (1 + n_corrector)
  * ``ddim_sample``: DDIM on any Gaussian path with stochasticity ``eta``.    NFE = N
  * ``pf_ode_velocity``: the probability-flow ODE drift of an SDE, to pass to ``ode_sample``
    (Euler N, Heun 2N, RK4 4N) or ``ode_sample_adaptive`` (diffrax).

With ``denoise=True`` the last step adds no noise (score_sde returns ``x_mean``).
``score_fn(x, t) -> score`` and ``x0_eps_fn(x, t) -> (x0_hat, eps_hat)`` with t [B]; build them from
any model parameterisation with research.generative.parameterization.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from research.generative.paths import GaussianPath, _bc
from research.generative.sde import SDE

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def _grid(t_start, t_end, num_steps):
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    ts = jnp.linspace(t_start, t_end, num_steps + 1, dtype=jnp.float32)
    return ts[:-1], ts[1:]


def _tvec(x, t):
    return jnp.full((x.shape[0],), t, jnp.float32)


def _scan_steps(step, x, ts, ts_next, key, num_steps, denoise):
    """Run ``step(x, t, t_next, key, add_noise) -> (x, x_mean)`` over the grid."""
    keys = jax.random.split(key, num_steps)

    def body(x, inp):
        t, t_next, k = inp
        x, _ = step(x, t, t_next, k, True)
        return x, None

    if num_steps > 1:
        x, _ = jax.lax.scan(body, x, (ts[:-1], ts_next[:-1], keys[:-1]))
    x_new, x_mean = step(x, ts[-1], ts_next[-1], keys[-1], not denoise)
    return x_mean if denoise else x_new


def euler_maruyama_sample(sde: SDE, score_fn: Callable, x_init, key, *, num_steps: int, t_start: float | None = None,
                          t_end: float = 1e-3, denoise: bool = True):
    """Reverse-SDE Euler-Maruyama from x_init ~ prior at t_start (default sde.T) to t_end. NFE = N."""
    rsde = sde.reverse(score_fn, probability_flow=False)
    ts, ts_next = _grid(sde.T if t_start is None else t_start, t_end, num_steps)

    def step(x, t, t_next, k, add_noise):
        dt = t_next - t
        drift, diffusion = rsde.sde(x, _tvec(x, t))
        x_mean = x + drift * dt
        if not add_noise:
            return x_mean, x_mean
        z = jax.random.normal(k, x.shape, x.dtype)
        return x_mean + _bc(diffusion, x) * jnp.sqrt(-dt) * z, x_mean

    return _scan_steps(step, x_init, ts, ts_next, key, num_steps, denoise)


def langevin_correct(sde: SDE, score_fn: Callable, x, t, dt, key, *, snr: float, n_steps: int):
    """score_sde's Langevin corrector: step size (snr ||z|| / ||score||)^2 * 2 alpha_i with norms
    averaged over the batch. Returns (x, x_mean)."""
    x_mean = x
    for k in jax.random.split(key, n_steps):
        tv = _tvec(x, t)
        grad = score_fn(x, tv)
        noise = jax.random.normal(k, x.shape, x.dtype)
        gn = jnp.mean(jnp.linalg.norm(grad.reshape(grad.shape[0], -1), axis=-1))
        nn = jnp.mean(jnp.linalg.norm(noise.reshape(noise.shape[0], -1), axis=-1))
        alpha = sde.langevin_alpha(tv, dt)
        step = (snr * nn / gn) ** 2 * 2.0 * alpha
        x_mean = x + _bc(step, x) * grad
        x = x_mean + _bc(jnp.sqrt(2.0 * step), x) * noise
    return x, x_mean


def pc_sample(sde: SDE, score_fn: Callable, x_init, key, *, num_steps: int, predictor: str = "reverse_diffusion",
              corrector: str = "langevin", snr: float = 0.16, n_corrector: int = 1, t_start: float | None = None,
              t_end: float = 1e-3, denoise: bool = True):
    """Predictor-corrector sampler. NFE = num_steps * ((predictor != 'none') + n_corrector * (corrector != 'none'))."""
    if predictor not in PREDICTORS:
        raise ValueError(f"pc_sample: unknown predictor {predictor!r}; expected one of {PREDICTORS}")
    if corrector not in CORRECTORS:
        raise ValueError(f"pc_sample: unknown corrector {corrector!r}; expected one of {CORRECTORS}")
    if corrector == "langevin" and (n_corrector < 1 or snr <= 0):
        raise ValueError(f"pc_sample: Langevin corrector needs n_corrector >= 1 and snr > 0, got {n_corrector}, {snr}")
    rsde = sde.reverse(score_fn, probability_flow=False)
    ts, ts_next = _grid(sde.T if t_start is None else t_start, t_end, num_steps)

    def step(x, t, t_next, k, add_noise):
        kc, kp = jax.random.split(k)
        x_mean = x
        if corrector == "langevin":
            x, x_mean = langevin_correct(sde, score_fn, x, t, t - t_next, kc, snr=snr, n_steps=n_corrector)
        if predictor == "none":
            return x, x_mean
        tv = _tvec(x, t)
        if predictor == "reverse_diffusion":
            rev_f, rev_g = rsde.discretize(x, tv, _tvec(x, t_next))
            x_mean = x - rev_f
        else:
            drift, rev_g = rsde.sde(x, tv)
            x_mean = x + drift * (t_next - t)
            rev_g = rev_g * jnp.sqrt(t - t_next)
        if not add_noise:
            return x_mean, x_mean
        return x_mean + _bc(rev_g, x) * jax.random.normal(kp, x.shape, x.dtype), x_mean

    return _scan_steps(step, x_init, ts, ts_next, key, num_steps, denoise)


def ddim_sample(x0_eps_fn: Callable, path: GaussianPath, x_init, *, num_steps: int, eta: float = 0.0, key=None,
                t_start: float | None = None, t_end: float | None = None):
    """DDIM (Song et al. 2021) generalised to any Gaussian path.

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2 = eta^2 sigma_s^2 (1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)   (eta = 1: ancestral/DDPM
    posterior variance; eta = 0: deterministic, equal to Euler for rectified flow). NFE = N.
    """
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic and key is None:
        raise ValueError("ddim_sample: eta > 0 needs a PRNG key (key=...)")
    ts, ts_next = _grid(path.t_start if t_start is None else t_start, path.t_end if t_end is None else t_end,
                        num_steps)
    keys = jax.random.split(key, num_steps) if stochastic else jnp.zeros((num_steps,), jnp.uint32)

    def body(x, inp):
        t, s, k = inp
        tv, sv = _tvec(x, t), _tvec(x, s)
        x0, eps = x0_eps_fn(x, tv)
        a_t, s_t, a_s, s_s = path.alpha(tv), path.sigma(tv), path.alpha(sv), path.sigma(sv)
        if stochastic:
            ratio = (a_t * s_s) / (a_s * s_t)
            c2 = jnp.clip(eta ** 2 * s_s ** 2 * (1.0 - ratio ** 2), 0.0, None)
            z = jax.random.normal(k, x.shape, x.dtype)
        else:
            c2 = jnp.zeros_like(s_s)
            z = 0.0
        x = _bc(a_s, x) * x0 + _bc(jnp.sqrt(jnp.clip(s_s ** 2 - c2, 0.0, None)), x) * eps + _bc(jnp.sqrt(c2), x) * z
        return x, None

    x, _ = jax.lax.scan(body, x_init, (ts, ts_next, keys))
    return x


def pf_ode_velocity(sde: SDE, score_fn: Callable) -> Callable:
    """Probability-flow ODE drift v(x, t) = f(x, t) - g(t)^2 score / 2 (for ode_sample / likelihood)."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: rsde.sde(x, t)[0]
