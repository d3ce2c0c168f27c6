"""MLP score / velocity / denoiser network for low-dimensional (toy) data, flax.linen.

x [B, D] and t [B] -> out [B, D]. The time enters through a sinusoidal embedding of
``t * time_scale`` followed by a 2-layer MLP, added to every hidden layer (FiLM-free, like the
torchcfm/score_sde toy nets). Optional class conditioning with ``num_classes > 0`` (label id
``num_classes`` is the null label for classifier-free guidance).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from research.nn.embeddings import timestep_embedding


class ToyMLP(nn.Module):
    hidden_size: int = 256
    depth: int = 3
    time_embed_dim: int = 64
    time_scale: float = 1000.0
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, y=None, *, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"ToyMLP expects x of shape [B, D], got {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        temb = timestep_embedding(t * self.time_scale, self.time_embed_dim)
        temb = nn.Dense(self.hidden_size)(temb)
        temb = nn.Dense(self.hidden_size)(nn.silu(temb))
        if self.num_classes > 0:
            if y is None:
                raise ValueError("ToyMLP with num_classes > 0 needs labels y")
            temb = temb + nn.Embed(self.num_classes + 1, self.hidden_size)(y)
        h = nn.Dense(self.hidden_size)(x.astype(jnp.float32))
        for _ in range(self.depth):
            h = nn.Dense(self.hidden_size)(nn.silu(h + temb))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(h))


def make_mlp_fn(model: ToyMLP):
    """``model_fn(params, x, t, cond, key) -> out`` (the codebase's model-call convention)."""

    def model_fn(params, x, t, cond, key=None):
        return model.apply({"params": params}, x, t, cond, train=key is not None)

    return model_fn
