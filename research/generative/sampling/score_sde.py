"""Reverse-SDE samplers of score SDEs (Song et al. 2021) in time t (data at t = 0), lax.scan over the
grid ts = linspace(t_start, t_end, N + 1) (or an explicit ``ts``); step i goes from ts[i] to ts[i+1].

  euler_maruyama   reverse SDE by Euler-Maruyama                                   NFE N
  pc               predictor (reverse_diffusion | euler_maruyama | none) + Langevin corrector with
                   signal-to-noise ratio ``snr`` (score_sde's Algorithms 2-3)      NFE N (p + n_corrector c)
With ``denoise=True`` the last step adds no noise (score_sde returns x_mean). ``score_fn(x, t [B])``;
build it from any parameterisation with research.generative.parameterization. x_init ~ the prior
at t_start (``sde.prior_sample``); ``t_start`` defaults to sde.T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative._util import bcast, normal, tvec
from research.generative.sampling._common import check_choice, compute_dtype
from research.generative.sampling.ode import time_grid_args
from research.generative.sampling.registry import register

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def grid_pairs(where, x, num_steps, ts, t_start, t_end):
    n = time_grid_args(where, num_steps, ts)
    dt = x.dtype
    ts = jnp.linspace(t_start, t_end, n + 1, dtype=dt) if ts is None else jnp.asarray(ts, dt)
    return ts[:-1], ts[1:], n


def _scan_steps(step, x, ts, ts_next, key, n, denoise):
    """Run ``step(x, t, t_next, key, add_noise) -> (x, x_mean)`` over the grid."""
    keys = jax.random.split(key, n)

    def body(x, inp):
        t, t_next, k = inp
        x_new, _ = step(x, t, t_next, k, True)
        return x_new.astype(x.dtype), None

    if n > 1:
        x, _ = jax.lax.scan(body, x, (ts[:-1], ts_next[:-1], keys[:-1]))
    x_new, x_mean = step(x, ts[-1], ts_next[-1], keys[-1], not denoise)
    return x_mean if denoise else x_new


@register("euler_maruyama", family="time", nfe=lambda n, **o: n, stochastic=True, order="1/2 (strong), 1 (weak)")
def euler_maruyama(score_fn, x_init, *, sde, key=None, num_steps=None, ts=None, t_start=None, t_end=1e-3,
                   denoise=True):
    """Reverse-SDE Euler-Maruyama from x_init ~ prior at t_start (default sde.T) to t_end."""
    x = x_init.astype(compute_dtype(x_init))
    rsde = sde.reverse(score_fn, probability_flow=False)
    ts, ts_next, n = grid_pairs("euler_maruyama", x, num_steps, ts, sde.T if t_start is None else t_start, t_end)

    def step(x, t, t_next, k, add_noise):
        dt = t_next - t
        drift, diffusion = rsde.sde(x, tvec(x, t, x.dtype))
        x_mean = x + drift * dt
        if not add_noise:
            return x_mean, x_mean
        z = normal(k, x.shape, x.dtype)
        return x_mean + bcast(diffusion, x) * jnp.sqrt(-dt) * z, x_mean

    return _scan_steps(step, x, ts, ts_next, key, n, denoise)


def langevin_correct(sde, score_fn, x, t, dt, key, *, snr: float, n_steps: int):
    """score_sde's Langevin corrector: eps_i = 2 alpha_i (snr ||z|| / ||score||)^2 with the norms averaged
    over the batch; x <- x + eps score + sqrt(2 eps) z. Returns (x, x_mean)."""
    x_mean = x
    for k in jax.random.split(key, n_steps):
        tv = tvec(x, t, x.dtype)
        grad = score_fn(x, tv)
        noise = normal(k, x.shape, x.dtype)
        gn = jnp.mean(jnp.linalg.norm(grad.reshape(grad.shape[0], -1), axis=-1))
        nn = jnp.mean(jnp.linalg.norm(noise.reshape(noise.shape[0], -1), axis=-1))
        alpha = sde.langevin_alpha(tv, dt)
        step = (snr * nn / gn) ** 2 * 2.0 * alpha
        x_mean = x + bcast(step, x) * grad
        x = x_mean + bcast(jnp.sqrt(2.0 * step), x) * noise
    return x, x_mean


def _pc_nfe(n, *, predictor="reverse_diffusion", corrector="langevin", n_corrector=1, **o):
    return n * (int(predictor != "none") + n_corrector * int(corrector != "none"))


@register("pc", family="time", nfe=_pc_nfe, stochastic=True, order="1 (weak)")
def pc(score_fn, x_init, *, sde, key=None, num_steps=None, ts=None, predictor="reverse_diffusion",
       corrector="langevin", snr=0.16, n_corrector=1, t_start=None, t_end=1e-3, denoise=True):
    """Predictor-corrector: reverse_diffusion | euler_maruyama | none predictor + langevin | none corrector."""
    check_choice("pc", "predictor", predictor, PREDICTORS)
    check_choice("pc", "corrector", corrector, CORRECTORS)
    if corrector == "langevin" and (not isinstance(n_corrector, int) or n_corrector < 1 or not snr > 0):
        raise ValueError(f"pc: the Langevin corrector needs n_corrector >= 1 and snr > 0, got {n_corrector}, {snr}")
    x = x_init.astype(compute_dtype(x_init))
    rsde = sde.reverse(score_fn, probability_flow=False)
    ts, ts_next, n = grid_pairs("pc", x, num_steps, ts, sde.T if t_start is None else t_start, t_end)

    def step(x, t, t_next, k, add_noise):
        kc, kp = jax.random.split(k)
        x_mean = x
        if corrector == "langevin":
            x, x_mean = langevin_correct(sde, score_fn, x, t, t - t_next, kc, snr=snr, n_steps=n_corrector)
        if predictor == "none":
            return x, x_mean
        tv = tvec(x, t, x.dtype)
        if predictor == "reverse_diffusion":
            rev_f, rev_g = rsde.discretize(x, tv, tvec(x, t_next, x.dtype))
            x_mean = x - rev_f
        else:
            drift, rev_g = rsde.sde(x, tv)
            x_mean = x + drift * (t_next - t)
            rev_g = rev_g * jnp.sqrt(t - t_next)
        if not add_noise:
            return x_mean, x_mean
        return x_mean + bcast(rev_g, x) * normal(kp, x.shape, x.dtype), x_mean

    return _scan_steps(step, x, ts, ts_next, key, n, denoise)
