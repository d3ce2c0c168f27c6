"""Classifier-free guidance (Ho & Salimans 2022): out = uncond + w (cond - uncond); w = 1 is no guidance.

The combination is affine, so it commutes with every parameterisation conversion (eps, x0, score,
velocity, EDM's D): guide the network and drive any sampler of research.generative.sampling.
  guided_model_fn(model_fn, null_cond, w)  -> model_fn'(params, x, t, cond, key)   (network level)
  guided(model_fn, params, cond, null_cond, w) -> fn(x, t)                          (inference fn)
  guided_denoiser(denoiser, cond, null_cond, w) -> D(x, sigma) from denoiser(x, sigma, cond)
Each makes ONE batched call on [x; x] with labels [cond; null] (w = 1 as a Python number: one call
on cond only).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _null_like(c, n):
    n = jnp.asarray(n)
    if n.ndim == 0:
        return jnp.full(c.shape, n, dtype=c.dtype)
    if n.shape != c.shape:
        raise ValueError(f"guided: null_cond shape {n.shape} does not match cond shape {c.shape}")
    return n.astype(c.dtype)


def _no_guidance(w) -> bool:
    return isinstance(w, (int, float)) and not isinstance(w, bool) and w == 1


def _both(cond, null_cond):
    null = jax.tree_util.tree_map(_null_like, cond, null_cond)
    return jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)


def guided_model_fn(model_fn: Callable, null_cond, guidance) -> Callable:
    """CFG at the level of the raw network: ``fn(params, x, t, cond, key) -> uncond + w (cond - uncond)``.

    One batched model call on [x; x] with labels [cond; null]. Use it wherever a ``model_fn`` is
    expected (e.g. ``make_edm_denoiser``; EDM's D is affine in the network output, so guiding the
    network output guides D). ``guidance`` = 1 (Python number) returns ``model_fn`` unchanged.
    null_cond: a scalar null label (broadcast to cond's shape) or a pytree like cond.
    """
    if _no_guidance(guidance):
        return model_fn

    def fn(params, x, t, cond, key):
        b = x.shape[0]
        out = model_fn(params, jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                       _both(cond, null_cond), key)
        c, u = out[:b], out[b:]
        return u + guidance * (c - u)

    return fn


def guided(model_fn: Callable, params, cond, null_cond, guidance) -> Callable:
    """Classifier-free guidance as ``fn(x, t) -> uncond + w * (cond - uncond)`` (model called with key=None).

    cond: [B] labels (or any pytree with leading batch axis); null_cond: same structure, or a scalar
    null label broadcast to cond's shape. Convert the guided output with
    research.generative.parameterization to drive any sampler.
    """
    g = guided_model_fn(model_fn, null_cond, guidance)
    return lambda x, t: g(params, x, t, cond, None)


def guided_denoiser(denoiser: Callable, cond, null_cond, guidance) -> Callable:
    """``D(x, sigma)`` for ``sample`` from a conditional ``denoiser(x, sigma, cond)`` with CFG weight w."""
    if _no_guidance(guidance):
        return lambda x, sigma: denoiser(x, sigma, cond)

    def D(x, sigma):
        b = x.shape[0]
        out = denoiser(jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0),
                       _both(cond, null_cond))
        c, u = out[:b], out[b:]
        return u + guidance * (c - u)

    return D
