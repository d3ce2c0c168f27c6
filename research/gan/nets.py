"""Generator and discriminator / critic MLPs for small images and 2-D data (flax.linen).

* ``Generator``: z [B, latent] (and labels y [B]) -> x [B, *out_shape] in [-1, 1] (tanh). The label
  enters as a learned embedding concatenated to z.
* ``ProjectionDiscriminator``: x [B, ...] (and y [B]) -> scores [B], the projection discriminator of
  Miyato & Koyama (2018): ``D(x, y) = psi(phi(x)) + <embed(y), phi(x)>`` with an MLP feature map phi.
  No normalisation layers, so each example's score depends on that example only (the per-sample
  gradient penalty of ``research.gan.losses`` relies on it). ``num_classes=0``: unconditional.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def _check_labels(y, batch: int, num_classes: int, who: str):
    if num_classes == 0:
        if y is not None:
            raise ValueError(f"{who} with num_classes=0 is unconditional; got labels")
        return None
    if y is None:
        raise ValueError(f"{who} with num_classes={num_classes} needs labels y [B]")
    y = jnp.asarray(y)
    if y.shape != (batch,):
        raise ValueError(f"{who}: labels must have shape ({batch},), got {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{who}: labels must be integer class ids, got {y.dtype}")
    return y


class Generator(nn.Module):
    """MLP generator; ``hidden`` widths, leaky-ReLU(0.2), tanh output of shape ``out_shape``."""
    out_shape: Sequence[int] = (8, 8, 1)
    hidden: Sequence[int] = (256, 512)
    num_classes: int = 10
    embed_dim: int = 32

    @nn.compact
    def __call__(self, z, y=None):
        if z.ndim != 2:
            raise ValueError(f"Generator expects latents z of shape [B, latent_dim], got {z.shape}")
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise TypeError(f"Generator: z must be floating point, got {z.dtype}")
        y = _check_labels(y, z.shape[0], self.num_classes, "Generator")
        h = z.astype(jnp.float32)
        if y is not None:
            h = jnp.concatenate([h, nn.Embed(self.num_classes, self.embed_dim, name="label_embed")(y)], axis=-1)
        for width in self.hidden:
            h = nn.leaky_relu(nn.Dense(width)(h), 0.2)
        out = nn.Dense(int(np.prod(self.out_shape)), name="out")(h)
        return jnp.tanh(out).reshape((z.shape[0], *self.out_shape))


class ProjectionDiscriminator(nn.Module):
    """MLP feature map phi (``hidden`` widths, leaky-ReLU(0.2)), linear head plus the label projection."""
    hidden: Sequence[int] = (512, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, y=None):
        if x.ndim < 2:
            raise ValueError(f"ProjectionDiscriminator expects a batch x [B, ...], got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"ProjectionDiscriminator: x must be floating point, got {x.dtype}")
        y = _check_labels(y, x.shape[0], self.num_classes, "ProjectionDiscriminator")
        h = x.reshape(x.shape[0], -1).astype(jnp.float32)
        for width in self.hidden:
            h = nn.leaky_relu(nn.Dense(width)(h), 0.2)
        out = nn.Dense(1, name="head")(h)[:, 0]
        if y is not None:
            embed = nn.Embed(self.num_classes, h.shape[-1], embedding_init=nn.initializers.normal(0.02),
                             name="label_projection")(y)
            out = out + jnp.sum(embed * h, axis=-1)
        return out


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    import jax

    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


__all__ = ["Generator", "ProjectionDiscriminator", "count_params"]
