"""Small layers shared by the models: RMSNorm, patchify/unpatchify, MLP, adaLN modulate."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

xavier_uniform = nn.initializers.xavier_uniform()


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learnt scale (init 1); statistics in float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
    """Dense -> GELU(tanh) -> Dense, xavier_uniform weights, zero biases."""

    hidden_dim: int
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    hidden_name: str | None = None  # checkpoint_name tag for the hidden activation

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, kernel_init=xavier_uniform, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = nn.gelu(dense(self.hidden_dim, "fc1")(x), approximate=True)
        if self.hidden_name:
            h = jax.ad_checkpoint.checkpoint_name(h, self.hidden_name)
        return dense(self.out_dim, "fc2")(h)


def modulate(x, shift, scale):
    """adaLN modulation: x [B, N, D], shift/scale [B, D] -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def patchify(x, patch_size: int):
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; tokens row-major, features (pi, pj, c)."""
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} not divisible by patch_size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, patch_size: int, height: int, width: int, channels: int):
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
    b, n, f = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if n != gh * gw or f != p * p * channels:
        raise ValueError(
            f"tokens {tokens.shape} do not match image {(height, width, channels)} with patch {p}"
        )
    x = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, channels)
