"""Exponential moving average of parameters (EDM-style half-life in images)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def ema_decay_from_half_life(half_life_images: float, batch_size: int) -> float:
    """Per-step EMA decay `beta = 0.5 ** (batch_size / half_life_images)` (Karras et al., EDM).

    After `half_life_images / batch_size` steps the weight of the old average has halved.
    """
    if not half_life_images > 0:
        raise ValueError(f"half_life_images must be > 0, got {half_life_images}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return float(0.5 ** (batch_size / half_life_images))


def ema_update(ema_params: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """Returns `decay * ema_params + (1 - decay) * params`, leaf by leaf, keeping each EMA leaf's dtype."""
    def upd(e, p):
        d = jnp.asarray(decay, e.dtype)
        return (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype)

    return jax.tree.map(upd, ema_params, params)
