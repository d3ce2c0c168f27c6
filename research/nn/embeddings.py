"""Fixed sinusoidal embeddings: timesteps and 2-D sin-cos position embeddings."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def timestep_embedding(t, dim: int, *, max_period: float = 10000.0):
    """Sinusoidal embedding of (scaled) timesteps.

    Args:
      t: [B] float timesteps (already multiplied by any time scale).
      dim: embedding size (even or odd; an odd size gets a zero last column).
      max_period: smallest frequency is 1 / max_period.

    Returns:
      [B, dim] float32: ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i/half)``.
    """
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_1d(embed_dim: int, pos) -> np.ndarray:
    """1-D sin-cos embedding: [M] positions -> [M, embed_dim] = [sin(p w_i), cos(p w_i)]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding for a row-major grid of patches.

    The first half of the channels encodes the row index, the second half the column index.

    Returns:
      float32 [grid_h * grid_w, embed_dim]; token ``r * grid_w + c`` is patch (r, c).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate(
        [sincos_1d(embed_dim // 2, rows), sincos_1d(embed_dim // 2, cols)], axis=1
    )
    return emb.astype(np.float32)
