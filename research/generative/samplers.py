"""Samplers: ODE (re-exported from solvers.py), EDM Algorithm 2, classifier-free guidance.

SDE samplers (Euler-Maruyama, predictor-corrector) and DDIM live in sde_samplers.py and are
re-exported here, so ``research.generative.samplers`` is the one place to import samplers from.

NFE per sample (N = num_steps):
  ode_sample euler N, heun 2N, rk4 4N; edm_sample 2N - 1 (no Heun correction at sigma = 0);
  euler_maruyama N; pc_sample N * (1 + n_corrector); ddim N.
  ``guided`` doubles the batch of each call (one batched model call per NFE).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from research.generative.edm import karras_sigmas
from research.generative.sde_samplers import (  # noqa: F401  (re-exports)
    CORRECTORS,
    PREDICTORS,
    ddim_sample,
    euler_maruyama_sample,
    langevin_correct,
    pc_sample,
    pf_ode_velocity,
)
from research.generative.solvers import (  # noqa: F401  (re-exports)
    FIXED_STEP_METHODS,
    NFE_PER_STEP,
    integrate_grid,
    ode_sample,
    ode_sample_adaptive,
)


def _null_like(c, n):
    n = jnp.asarray(n)
    if n.ndim == 0:
        return jnp.full(c.shape, n, dtype=c.dtype)
    if n.shape != c.shape:
        raise ValueError(f"guided: null_cond shape {n.shape} does not match cond shape {c.shape}")
    return n.astype(c.dtype)


def guided_model_fn(model_fn: Callable, null_cond, guidance) -> Callable:
    """CFG at the level of the raw network: ``fn(params, x, t, cond, key) -> uncond + w (cond - uncond)``.

    One batched model call on [x; x] with labels [cond; null]. Use it wherever a ``model_fn`` is
    expected (e.g. ``make_edm_denoiser``; EDM's D is affine in the network output, so guiding the
    network output guides D). ``guidance`` = 1 (Python number) returns ``model_fn`` unchanged.
    null_cond: a scalar null label (broadcast to cond's shape) or a pytree like cond.
    """
    if isinstance(guidance, (int, float)) and guidance == 1:
        return model_fn

    def fn(params, x, t, cond, key):
        null = jax.tree_util.tree_map(_null_like, cond, null_cond)
        both = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
        b = x.shape[0]
        out = model_fn(params, jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both, key)
        c, u = out[:b], out[b:]
        return u + guidance * (c - u)

    return fn


def guided(model_fn: Callable, params, cond, null_cond, guidance) -> Callable:
    """Classifier-free guidance as a function ``fn(x, t) -> uncond + w * (cond - uncond)``.

    model_fn(params, x, t, cond, key) is called with key=None (inference). cond: [B] labels (or any
    pytree with leading batch axis); null_cond: same structure, or a scalar null label broadcast
    to cond's shape. One batched model call on the concatenation [cond; null]. ``guidance`` = 1
    (Python number) calls the model once on cond only. The guidance combination is affine, so it
    is valid for epsilon, x_0, score and velocity outputs alike: convert the guided output with
    research.generative.parameterization to drive any sampler (CFG for every sampler).
    """
    g = guided_model_fn(model_fn, null_cond, guidance)
    return lambda x, t: g(params, x, t, cond, None)


def edm_sample(denoiser: Callable, latents: jax.Array, *, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0, key=None) -> jax.Array:
    """EDM Algorithm 2 (Karras et al. 2022): Heun sampler with optional stochastic churn.

    denoiser(x, sigma) -> D(x; sigma) with x [B, ...] and sigma [B] float32.
    latents: [B, ...] ~ N(0, I); scaled by sigma_max inside. NFE = 2 * num_steps - 1
    (the last step, to sigma = 0, is an Euler step). S_churn > 0 needs ``key``.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"edm_sample: num_steps must be a positive int, got {num_steps!r}")
    stochastic = not (isinstance(S_churn, (int, float)) and S_churn == 0)
    if stochastic and key is None:
        raise ValueError("edm_sample: S_churn > 0 needs a PRNG key (key=...)")
    sig = karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    b = latents.shape[0]
    x = latents.astype(jnp.float32) * sig[0]
    gamma_max = min(S_churn / num_steps, 2 ** 0.5 - 1) if stochastic else 0.0
    keys = jax.random.split(key, num_steps) if stochastic else jnp.zeros((num_steps,), jnp.uint32)

    def d_of(x, s):
        return (x - denoiser(x, jnp.full((b,), s, jnp.float32))) / s

    def churn(x, t_cur, k):
        if not stochastic:
            return x, t_cur
        gamma = jnp.where((t_cur >= S_min) & (t_cur <= S_max), gamma_max, 0.0)
        t_hat = t_cur + gamma * t_cur
        noise = jax.random.normal(k, x.shape, x.dtype)
        # sqrt(t_hat^2 - t_cur^2) written so that it can never be sqrt(negative rounding error)
        return x + t_cur * jnp.sqrt(gamma * (2.0 + gamma)) * S_noise * noise, t_hat

    def heun_step(x, inp):
        t_cur, t_next, k = inp
        x_hat, t_hat = churn(x, t_cur, k)
        d = d_of(x_hat, t_hat)
        x_next = x_hat + (t_next - t_hat) * d
        d2 = d_of(x_next, t_next)
        return x_hat + (t_next - t_hat) * 0.5 * (d + d2), None

    if num_steps > 1:
        x, _ = jax.lax.scan(heun_step, x, (sig[:num_steps - 1], sig[1:num_steps], keys[:num_steps - 1]))
    # last step sigma_{N-1} -> 0: Euler only.
    x_hat, t_hat = churn(x, sig[num_steps - 1], keys[num_steps - 1])
    return x_hat + (0.0 - t_hat) * d_of(x_hat, t_hat)


def edm_nfe(num_steps: int) -> int:
    """Denoiser evaluations of ``edm_sample``: 2N - 1."""
    return 2 * num_steps - 1
