"""Reflow (Liu et al. 2023): re-train a flow on (generated sample, noise) pairs from a trained flow.

``reflow_pairs`` integrates the trained velocity field from noise x1 ~ N(0, I) at t = 1 to
x0 at t = 0 and returns the coupled pair (x0, x1); training ``pair_flow_loss`` on such pairs
straightens the paths (fewer sampling steps). NFE per pair: the ``ode`` sampler's (euler N, heun 2N, rk4 4N).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from research.generative._util import normal
from research.generative.losses import pair_flow_loss
from research.generative.sampling import sample_time


def reflow_pairs(velocity_fn: Callable, key, shape, *, num_steps: int = 32, solver: str = "rk4", dtype=jnp.float32):
    """(x0 [shape], x1 [shape]): x1 ~ N(0, I) in ``dtype``, x0 = the PF-ODE solution of velocity_fn from t = 1
    to 0 (the registered ``ode`` sampler with ``solver``)."""
    x1 = normal(key, tuple(shape), dtype)
    x0, _ = sample_time("ode", velocity_fn, x1, num_steps=num_steps, solver=solver)
    return jax.lax.stop_gradient(x0), x1


def reflow_loss(model_fn, params, x0, x1, key, *, cond=None, timestep_dist="uniform"):
    """Rectified-flow loss on fixed (x0, x1) pairs (the k-rectified flow objective)."""
    return pair_flow_loss(model_fn, params, x0, x1, key, cond=cond, timestep_dist=timestep_dist)
