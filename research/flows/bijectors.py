"""Bijectors for normalizing flows: the protocol, composition and the parameter-light layers.

Protocol (every class here and in ``research.flows.coupling``)::

    forward(x, cond=None) -> (y, log_det)    log_det = log|det dy/dx|, one value per example [B]
    inverse(y, cond=None) -> (x, log_det)    log_det = log|det dx/dy| = -forward's at the matching x

Bijectors are flax.linen modules; ``__call__(x, cond=None, *, inverse=False)`` is the one compact
method and ``forward`` / ``inverse`` call it, so ``module.init(key, x, method="forward")`` creates the
parameters and ``module.apply(variables, y, cond, method="inverse")`` inverts. ``x`` has a leading
batch axis: ``[B, D]`` vectors or ``[B, H, W, C]`` images (NHWC); examples never interact in ``apply``
(ActNorm's batch statistics are used only once, at ``init``), so per-example Jacobians are the maps'
own. ``cond`` is an optional ``[B, E]`` conditioning vector (a label embedding) that the coupling
networks read and the other layers ignore.

Initialise through ``forward`` on a real batch: ``ActNorm`` sets its parameters from the statistics
of the activations it sees at ``init`` (Glow's data-dependent initialisation).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def check_float_input(x, name: str, ndims: Sequence[int] = (2, 4)) -> jax.Array:
    """``x`` as an array; TypeError unless floating, ValueError unless ``x.ndim`` is one of ``ndims``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: input must be a floating array, got dtype {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name}: input must have ndim in {tuple(ndims)} ([B, D] or [B, H, W, C]), got shape "
                         f"{x.shape}")
    return x


def sum_per_example(a: jax.Array) -> jax.Array:
    """Sum over all axes but the first: [B, ...] -> [B]."""
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def zero_log_det(x: jax.Array) -> jax.Array:
    return jnp.zeros((x.shape[0],), x.dtype)


class Bijector(nn.Module):
    """Base class: subclasses implement ``__call__(x, cond=None, *, inverse=False) -> (out, log_det)``."""

    def forward(self, x, cond=None):
        return self(x, cond, inverse=False)

    def inverse(self, y, cond=None):
        return self(y, cond, inverse=True)


class Chain(Bijector):
    """Composition: ``forward`` applies ``layers`` in order, ``inverse`` their inverses in reverse order;
    log-determinants add."""

    layers: Sequence[nn.Module]

    def __call__(self, x, cond=None, *, inverse: bool = False):
        if not self.layers:
            raise ValueError("Chain needs at least one layer")
        total = None
        for layer in (reversed(self.layers) if inverse else self.layers):
            x, ld = layer(x, cond, inverse=inverse)
            total = ld if total is None else total + ld
        return x, total


class Squeeze(Bijector):
    """Space-to-depth: [B, H, W, C] -> [B, H/2, W/2, 4C] (each 2x2 block into channels); volume-preserving."""

    def __call__(self, x, cond=None, *, inverse: bool = False):
        x = check_float_input(x, "Squeeze", (4,))
        b, h, w, c = x.shape
        if not inverse:
            if h % 2 or w % 2:
                raise ValueError(f"Squeeze: height and width must be even, got shape {x.shape}")
            y = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
            return y, zero_log_det(x)
        if c % 4:
            raise ValueError(f"Squeeze.inverse: channels must be divisible by 4, got shape {x.shape}")
        y = x.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)
        return y, zero_log_det(x)


class Flatten(Bijector):
    """[B, *shape] <-> [B, prod(shape)]; volume-preserving."""

    shape: tuple[int, ...]

    def __call__(self, x, cond=None, *, inverse: bool = False):
        x = jnp.asarray(x)
        shape = tuple(self.shape)
        if not inverse:
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"Flatten: expected inputs of shape [B, *{shape}], got {x.shape}")
            return x.reshape(x.shape[0], -1), zero_log_det(x)
        if x.ndim != 2 or x.shape[1] != int(np.prod(shape)):
            raise ValueError(f"Flatten.inverse: expected [B, {int(np.prod(shape))}], got {x.shape}")
        return x.reshape((x.shape[0],) + shape), zero_log_det(x)


class FactorOut(Bijector):
    """Multi-scale factoring (RealNVP): of an image [B, H, W, C] (``shape`` = (H, W, C)), the first
    C // 2 channels leave the flow as latents, the rest go through ``inner`` (a bijector whose forward
    returns flat [B, D']). Forward output: concat(flatten(factored), inner(rest)) [B, H*W*C // 2 + D']."""

    shape: tuple[int, int, int]
    inner: nn.Module

    def __call__(self, x, cond=None, *, inverse: bool = False):
        h, w, c = self.shape
        if c < 2:
            raise ValueError(f"FactorOut: need at least 2 channels, got shape {self.shape}")
        n_out = h * w * (c // 2)
        if not inverse:
            x = check_float_input(x, "FactorOut", (4,))
            if tuple(x.shape[1:]) != tuple(self.shape):
                raise ValueError(f"FactorOut: expected inputs of shape [B, *{tuple(self.shape)}], got {x.shape}")
            z, ld = self.inner(x[..., c // 2:], cond, inverse=False)
            return jnp.concatenate([x[..., : c // 2].reshape(x.shape[0], -1), z], axis=1), ld
        x = check_float_input(x, "FactorOut.inverse", (2,))
        rest, ld = self.inner(x[:, n_out:], cond, inverse=True)
        out = x[:, :n_out].reshape(x.shape[0], h, w, c // 2)
        return jnp.concatenate([out, rest], axis=-1), ld


class LogitTransform(Bijector):
    """Data preprocessing of RealNVP: x in (low, high) -> u = (x - low) / (high - low) -> p = alpha +
    (1 - 2 alpha) u -> y = logit(p). With alpha > 0 the ends of the interval (dequantised values at the
    ends of the grid) map to finite -+logit(alpha); the inverse maps any finite y into the slightly wider
    interval (low - r, high + r), r = alpha (high - low) / (1 - 2 alpha)."""

    low: float
    high: float
    alpha: float = 0.05

    def __call__(self, x, cond=None, *, inverse: bool = False):
        if not self.high > self.low:
            raise ValueError(f"LogitTransform: need high > low, got low={self.low}, high={self.high}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"LogitTransform: alpha must be in (0, 0.5), got {self.alpha}")
        x = check_float_input(x, "LogitTransform")
        width, a = self.high - self.low, self.alpha
        const = float(np.log1p(-2 * a) - np.log(width))  # log dp/dx
        if not inverse:
            p = a + (1 - 2 * a) * (x - self.low) / width
            y = jnp.log(p) - jnp.log1p(-p)
            return y, sum_per_example(const - jnp.log(p) - jnp.log1p(-p))
        # inverse: log p and log(1 - p) from y directly (finite for any y)
        p = jax.nn.sigmoid(x)
        out = self.low + width * (p - a) / (1 - 2 * a)
        return out, sum_per_example(jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x) - const)


class DiagonalScale(Bijector):
    """NICE's final scaling layer: y = x * exp(log_scale), one learned log-scale per dimension of the
    event (zeros at init); log_det = sum(log_scale)."""

    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None, *, inverse: bool = False):
        x = check_float_input(x, "DiagonalScale")
        log_scale = self.param("log_scale", nn.initializers.zeros, x.shape[1:], self.param_dtype)
        ld = jnp.broadcast_to(jnp.sum(log_scale), (x.shape[0],)).astype(jnp.result_type(x, log_scale))
        if not inverse:
            return x * jnp.exp(log_scale), ld
        return x * jnp.exp(-log_scale), -ld


class ActNorm(Bijector):
    """Glow's activation normalisation: per channel (last axis) y = x * exp(log_scale) + bias.

    Data-dependent initialisation: at ``init`` (through ``forward``) the parameters are set so that the
    init batch comes out with zero mean and unit variance per channel (statistics over every axis but
    the last). log_det = (number of positions) * sum(log_scale) per example."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None, *, inverse: bool = False):
        x = check_float_input(x, "ActNorm")
        c = x.shape[-1]
        axes = tuple(range(x.ndim - 1))

        def init_log_scale(_):
            std = jnp.std(jax.lax.stop_gradient(x), axis=axes)
            return (-jnp.log(std + self.eps)).astype(self.param_dtype)

        log_scale = self.param("log_scale", init_log_scale)

        def init_bias(_):
            mean = jnp.mean(jax.lax.stop_gradient(x), axis=axes)
            return (-mean * jnp.exp(log_scale)).astype(self.param_dtype)

        bias = self.param("bias", init_bias)
        if log_scale.shape != (c,):
            raise ValueError(f"ActNorm: parameters are for {log_scale.shape[0]} channels, input has {c}")
        positions = int(np.prod(x.shape[1:-1]))
        ld = jnp.broadcast_to(positions * jnp.sum(log_scale), (x.shape[0],)).astype(jnp.result_type(x, log_scale))
        if not inverse:
            return x * jnp.exp(log_scale) + bias, ld
        return (x - bias) * jnp.exp(-log_scale), -ld


def lu_init(channels: int, seed: int):
    """Glow's LU initialisation: a random rotation W0 (QR of a Gaussian matrix from
    ``np.random.default_rng(seed)``) factored as W0 = P L (U + diag(s)). Returns NumPy float64
    ``(P, l_strict, u_strict, sign_s, log_abs_s)``."""
    import scipy.linalg

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
    p, l, u = scipy.linalg.lu(q)
    s = np.diag(u)
    return p, np.tril(l, -1), np.triu(u, 1), np.sign(s), np.log(np.abs(s))


class InvConv1x1(Bijector):
    """Glow's invertible 1x1 convolution, LU-parameterised: W = P L (U + diag(sign_s * exp(log_s))),
    with P (a permutation) and sign_s fixed, L unit lower triangular, U strictly upper triangular and
    log_s learned. y[..., i] = sum_j W[i, j] x[..., j]; log_det = (H * W) * sum(log_s) per example.

    P and sign_s are constants of the architecture: they come, with the initial L, U and log_s, from the
    LU factors of a random rotation drawn by ``np.random.default_rng(seed)`` (``lu_init``), like a fixed
    random permutation; the builder gives each layer its own ``seed``. They are not variables, so the
    optimiser never sees them."""

    seed: int = 0
    param_dtype: jnp.dtype = jnp.float32

    def weights(self, channels: int):
        """(W, W^-1, sum(log_s)) assembled from the parameters (in the parameter dtype)."""
        p0, l0, u0, sign0, logs0 = lu_init(channels, self.seed)
        pd = self.param_dtype
        l_strict = self.param("l_strict", lambda _: jnp.asarray(l0, pd))
        u_strict = self.param("u_strict", lambda _: jnp.asarray(u0, pd))
        log_s = self.param("log_s", lambda _: jnp.asarray(logs0, pd))
        dt = l_strict.dtype
        eye = jnp.eye(channels, dtype=dt)
        lower = jnp.tril(l_strict, -1) + eye
        upper = jnp.triu(u_strict, 1) + jnp.diag(jnp.asarray(sign0, dt) * jnp.exp(log_s))
        perm = jnp.asarray(p0, dt)
        w = perm @ lower @ upper
        inv_l = jax.scipy.linalg.solve_triangular(lower, eye, lower=True, unit_diagonal=True)
        inv_u = jax.scipy.linalg.solve_triangular(upper, eye, lower=False)
        return w, inv_u @ inv_l @ perm.T, jnp.sum(log_s)

    @nn.compact
    def __call__(self, x, cond=None, *, inverse: bool = False):
        x = check_float_input(x, "InvConv1x1")
        w, w_inv, sum_log_s = self.weights(x.shape[-1])
        positions = int(np.prod(x.shape[1:-1]))
        ld = jnp.broadcast_to(positions * sum_log_s, (x.shape[0],)).astype(jnp.result_type(x, w))
        if not inverse:
            return jnp.einsum("...j,ij->...i", x, w), ld
        return jnp.einsum("...j,ij->...i", x, w_inv), -ld
