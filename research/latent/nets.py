"""Convolutional encoder / decoder for 8x8x1 images (the digits), optionally class-conditional.

Both take ``features``: the channel width of each resolution level, the first at 8x8 and each
following one at half the resolution of the previous, so the latent grid is
``latent_size(features) = 8 // 2 ** (len(features) - 1)`` on a side: ``(32, 64)`` -> 4x4,
``(32, 64, 64)`` -> 2x2, four levels -> 1x1 (a vector latent). Each level has one pre-norm
residual block (GroupNorm, SiLU, 3x3 conv, twice). Going down is a 2x2 stride-2 convolution
(space-to-depth + a linear map), going up its transpose (a linear map + depth-to-space). With
``num_classes > 0`` a learned label embedding is added (through a per-block linear map) inside
every residual block, as in the class-conditional U-Nets of diffusion models.

    Encoder(features, out_channels)(x [B, 8, 8, 1], labels=None) -> [B, s, s, out_channels]
    Decoder(features, out_channels)(z [B, s, s, c], labels=None) -> [B, 8, 8, out_channels]

The modules only map arrays; what the channels mean (posterior mean / log-variance, code
vectors, likelihood parameters) is decided by ``research.latent.vae`` and ``research.latent.vq``.

CPU notes: XLA:CPU's convolution is very slow on maps of 2x2 or 1x1 pixels with many channels (a
2x2x128 3x3 conv stack measured 10x slower than the same maths as one matmul), so ``Conv3x3``
computes maps of at most ``IM2COL_MAX_PIXELS`` pixels as a matmul over the nine shifted copies
(im2col); both paths use the same [3, 3, C_in, C_out] kernel and give the same result.
``init_module`` draws all parameters from one random call (see there).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 8
IM2COL_MAX_PIXELS = 4


def latent_size(features: Sequence[int]) -> int:
    """Side of the latent grid for ``features`` (one entry per resolution level, 8x8 first)."""
    n = len(features)
    if not 1 <= n <= 4:
        raise ValueError(f"features needs 1..4 levels (8x8 down to 1x1), got {len(features)}: {tuple(features)}")
    if any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in features):
        raise ValueError(f"features must be positive ints, got {tuple(features)}")
    return IMAGE_SIZE // 2 ** (n - 1)


def _norm(x):
    return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]))(x)


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, zero ("SAME") padding; kernel [3, 3, C_in, features] (lecun-normal)."""

    features: int

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if hgt * wid <= IM2COL_MAX_PIXELS:
            xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            cols = jnp.concatenate([xp[:, i:i + hgt, j:j + wid] for i in range(3) for j in range(3)], axis=-1)
            y = cols @ kernel.reshape(9 * c, self.features)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def space_to_depth(x):
    """[B, H, W, C] -> [B, H/2, W/2, 4C] (each 2x2 block to channels, row-major within the block)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def depth_to_space(x):
    """Inverse of ``space_to_depth``: [B, H, W, 4C] -> [B, 2H, 2W, C]."""
    b, h, w, c4 = x.shape
    c = c4 // 4
    return x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
    """Pre-norm residual block ``x + conv(silu(norm(conv(silu(norm(x))) + W emb)))``."""

    features: int

    @nn.compact
    def __call__(self, x, emb=None):
        h = Conv3x3(self.features)(nn.silu(_norm(x)))
        if emb is not None:
            h = h + nn.Dense(self.features)(emb)[:, None, None, :]
        h = Conv3x3(self.features)(nn.silu(_norm(h)))
        skip = x if x.shape[-1] == self.features else nn.Dense(self.features)(x)
        return skip + h


class _LabelEmbed(nn.Module):
    num_classes: int
    dim: int

    @nn.compact
    def __call__(self, labels):
        if labels is None:
            raise ValueError(f"this network is class-conditional (num_classes={self.num_classes}); pass labels")
        return nn.Embed(self.num_classes, self.dim)(jnp.asarray(labels, jnp.int32))


def _embedding(module: nn.Module, labels, dim: int):
    if module.num_classes <= 0:
        return None
    return _LabelEmbed(module.num_classes, dim, name="label_embed")(labels)


def _check_input(x, size: int, who: str):
    if x.ndim != 4 or x.shape[1] != size or x.shape[2] != size:
        raise ValueError(f"{who}: expected input [B, {size}, {size}, C], got shape {x.shape}")


class Encoder(nn.Module):
    """[B, 8, 8, C_in] -> [B, s, s, out_channels], s = latent_size(features)."""

    features: Sequence[int] = (32, 64)
    out_channels: int = 8
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, labels=None):
        _check_input(x, IMAGE_SIZE, "Encoder")
        latent_size(self.features)
        emb = _embedding(self, labels, self.features[0])
        h = Conv3x3(self.features[0])(x)
        for i, f in enumerate(self.features):
            if i > 0:
                h = nn.Dense(f)(space_to_depth(h))
            h = ResBlock(f)(h, emb)
        return nn.Dense(self.out_channels)(nn.silu(_norm(h)))


class Decoder(nn.Module):
    """[B, s, s, c] -> [B, 8, 8, out_channels]; ``features`` as for the encoder (8x8 level first)."""

    features: Sequence[int] = (32, 64)
    out_channels: int = 1
    num_classes: int = 0

    @nn.compact
    def __call__(self, z, labels=None):
        size = latent_size(self.features)
        _check_input(z, size, "Decoder")
        emb = _embedding(self, labels, self.features[0])
        levels = list(reversed(self.features))
        h = Conv3x3(levels[0])(z)
        for i, f in enumerate(levels):
            if i > 0:
                h = depth_to_space(nn.Dense(4 * f)(h))
            h = ResBlock(f)(h, emb)
        return Conv3x3(self.out_channels)(nn.silu(_norm(h)))


def init_module(module: nn.Module, key, input_shape, *, conditional: bool):
    """Params of ``module`` (structure from flax's abstract ``init`` on zeros of ``input_shape``, plus zero
    labels if conditional), drawn from ONE normal draw of ``key``: kernels N(0, 1 / fan_in) (LeCun
    normal; fan_in = the product of all but the last axis), label embeddings N(0, 1), biases 0,
    norm scales 1. (flax draws each tensor with its own threefry call, and XLA:CPU took longer to
    compile those ~50 draws than the whole train step.) Not jittable (host-side slicing)."""
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    labels = jnp.zeros((input_shape[0],), jnp.int32) if conditional else None
    abstract = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, labels)["params"])
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [str(getattr(p[-1], "key", p[-1])) for p, _ in paths]
    unknown = sorted({n for n in names if n not in _INIT_RULES})
    if unknown:
        raise ValueError(f"init_module: no initialisation rule for parameters named {unknown}")
    drawn = [math.prod(a.shape) if _INIT_RULES[n] is not None else 0 for n, (_, a) in zip(names, paths)]
    noise = np.asarray(jax.random.normal(key, (max(sum(drawn), 1),), jnp.float32))
    leaves, offset = [], 0
    for name, (_, a), n in zip(names, paths, drawn):
        rule = _INIT_RULES[name]
        if rule is None:
            leaves.append(jnp.full(a.shape, 1.0 if name == "scale" else 0.0, a.dtype))
        else:
            leaves.append(jnp.asarray(noise[offset:offset + n].reshape(a.shape) * rule(a.shape), a.dtype))
            offset += n
    return jax.tree.unflatten(treedef, leaves)


# name -> std of the normal draw given the shape, or None for a constant (scale 1, bias 0)
_INIT_RULES = {"kernel": lambda shape: 1.0 / math.sqrt(math.prod(shape[:-1])),
               "embedding": lambda shape: 1.0, "bias": None, "scale": None}


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(tree)))
