"""Coupling layers: NICE's additive and RealNVP's affine coupling, with checkerboard / channel masks.

A binary mask b (1 = passed through unchanged, it conditions the rest) splits the input; a network
reads ``x * b`` (and the conditioning vector) and outputs a shift t and, for the affine kind, a
log-scale s, both used only where b = 0:

    affine    y = b * x + (1 - b) * (x * exp(s) + t),  log_det = sum((1 - b) * s)
    additive  y = b * x + (1 - b) * (x + t),           log_det = 0 exactly   (NICE)

The raw log-scale is bounded, s = scale_bound * tanh(raw / scale_bound) (a soft clamp: ~raw near 0,
|s| < scale_bound always), so one layer scales by at most exp(scale_bound) and saturated networks
still give finite values and gradients. The last layer of each network is zero-initialised: a new
coupling is the identity.

Masks (``make_mask``): on images [B, H, W, C] "checkerboard" is (h + w) % 2 == parity over all channels,
"channel" keeps the first (parity 0) or second (parity 1) half of the channels; on vectors [B, D]
"checkerboard" keeps the indices i % 2 == parity and "channel" the first / second half. Networks:
3x3 convolutions on images, dense layers on vectors; the conditioning vector enters every hidden
layer as a learned bias.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.flows.bijectors import Bijector, check_float_input, sum_per_example, zero_log_det

MASKS = ("checkerboard", "channel")
KINDS = ("affine", "additive")


def make_mask(event_shape, kind: str, parity: int) -> np.ndarray:
    """Float32 mask of ``event_shape`` ((D,) or (H, W, C)), 1 on the part that is kept."""
    if kind not in MASKS:
        raise ValueError(f"make_mask: unknown mask {kind!r}; expected one of {MASKS}")
    if parity not in (0, 1):
        raise ValueError(f"make_mask: parity must be 0 or 1, got {parity!r}")
    shape = tuple(int(s) for s in event_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"make_mask: event shape must be (D,) or (H, W, C), got {shape}")
    if kind == "checkerboard":
        if len(shape) == 1:
            keep = np.arange(shape[0]) % 2 == parity
        else:
            h, w, c = shape
            board = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == parity
            keep = np.broadcast_to(board[:, :, None], shape)
    else:
        n = shape[-1]
        if n < 2:
            raise ValueError(f"make_mask: a channel mask needs at least 2 channels / features, got shape {shape}")
        first = np.arange(n) < n // 2
        keep = np.broadcast_to(first if parity == 0 else ~first, shape)
    mask = keep.astype(np.float32)
    if mask.min() == mask.max():
        raise ValueError(f"make_mask: {kind} mask of shape {shape} keeps all or nothing")
    return mask


def bounded_log_scale(raw: jax.Array, bound: float) -> jax.Array:
    """Soft clamp to (-bound, bound): bound * tanh(raw / bound)."""
    return bound * jnp.tanh(raw / bound)


class CouplingNet(nn.Module):
    """Conditioner: ``x [B, D]`` or ``[B, H, W, C]`` (+ optional ``cond [B, E]``) -> ``out_features``
    channels of x's spatial shape. ``depth`` hidden layers of width ``hidden``, SiLU, cond as a per-layer
    bias, then a zero-initialised output layer. On images (Glow's design) the first hidden layer and the
    output layer are 3x3 convolutions, the others 1x1; on vectors all are dense."""

    hidden: int
    depth: int
    out_features: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None):
        if self.depth < 1 or self.hidden < 1:
            raise ValueError(f"CouplingNet: need depth >= 1 and hidden >= 1, got {self.depth}, {self.hidden}")
        image = x.ndim == 4
        pd = self.param_dtype

        def layer(n, size=3, init=nn.initializers.lecun_normal()):
            if image:
                return nn.Conv(n, (size, size), padding="SAME", kernel_init=init, param_dtype=pd)
            return nn.Dense(n, kernel_init=init, param_dtype=pd)

        h = x
        for i in range(self.depth):
            h = layer(self.hidden, 3 if i == 0 else 1)(h)
            if cond is not None:
                bias = nn.Dense(self.hidden, param_dtype=pd)(cond)
                h = h + (bias[:, None, None, :] if image else bias)
            h = nn.silu(h)
        return layer(self.out_features, 3, nn.initializers.zeros)(h)


class Coupling(Bijector):
    """Affine (RealNVP) or additive (NICE) coupling layer; see the module docstring."""

    mask: str = "checkerboard"
    parity: int = 0
    kind: str = "affine"
    hidden: int = 64
    depth: int = 2
    scale_bound: float = 3.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None, *, inverse: bool = False):
        if self.kind not in KINDS:
            raise ValueError(f"Coupling: unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "affine" and not self.scale_bound > 0:
            raise ValueError(f"Coupling: scale_bound must be > 0, got {self.scale_bound}")
        x = check_float_input(x, "Coupling")
        if cond is not None and (cond.ndim != 2 or cond.shape[0] != x.shape[0]):
            raise ValueError(f"Coupling: cond must be [B, E] with B = {x.shape[0]}, got {cond.shape}")
        b = jnp.asarray(make_mask(x.shape[1:], self.mask, self.parity), x.dtype)
        keep = x * b  # equal to y * b: the kept part passes through
        channels = x.shape[-1]
        affine = self.kind == "affine"
        out = CouplingNet(self.hidden, self.depth, channels * (2 if affine else 1), self.param_dtype,
                          name="net")(keep, cond)
        t = out[..., :channels] * (1 - b)
        if not affine:
            return (x - t if inverse else x + t), zero_log_det(x).astype(out.dtype)
        s = bounded_log_scale(out[..., channels:], self.scale_bound) * (1 - b)
        if not inverse:
            return x * jnp.exp(s) + t, sum_per_example(s)
        return (x - t) * jnp.exp(-s), -sum_per_example(s)
