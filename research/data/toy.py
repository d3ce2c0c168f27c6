"""2-D toy distributions, sampled from an explicit PRNG key.

Every sampler has the signature ``sampler(key, n) -> x`` with ``x`` float32 ``[n, 2]``.
``GaussianMixture`` additionally provides an exact ``log_prob``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Sampler = Callable[[jax.Array, int], jax.Array]


def _check_n(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return n


class GaussianMixture:
    """Mixture of isotropic Gaussians in d dimensions with exact density.

    Args:
      means: [K, d] component means.
      stds: [K] (or scalar) component standard deviations (isotropic).
      weights: [K] mixture weights (normalised here); uniform if None.
    """

    def __init__(self, means, stds, weights=None):
        means = jnp.asarray(means, jnp.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {means.shape}")
        k = means.shape[0]
        stds = jnp.broadcast_to(jnp.asarray(stds, jnp.float32), (k,))
        if bool(jnp.any(stds <= 0)):
            raise ValueError("stds must be positive")
        if weights is None:
            weights = jnp.full((k,), 1.0 / k, jnp.float32)
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (k,) or bool(jnp.any(weights < 0)) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be non-negative with shape ({k},), got {weights.shape}")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """Draws ``n`` samples, float32 [n, d]."""
        _check_n(n)
        kc, kn = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        eps = jax.random.normal(kn, (n, self.dim), jnp.float32)
        return self.means[comp] + self.stds[comp, None] * eps

    def log_prob(self, x: jax.Array) -> jax.Array:
        """Exact log density of ``x`` [..., d] -> [...] (float32)."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {x.shape}")
        d = self.dim
        diff = x[..., None, :] - self.means  # [..., K, d]
        sq = jnp.sum(diff**2, axis=-1)  # [..., K]
        log_comp = (
            -0.5 * sq / self.stds**2 - d * jnp.log(self.stds) - 0.5 * d * math.log(2 * math.pi)
        )
        return jax.nn.logsumexp(log_comp + jnp.log(self.weights), axis=-1)

    def __call__(self, key: jax.Array, n: int) -> jax.Array:
        return self.sample(key, n)


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """The classic 8 Gaussians on a circle of ``radius`` as an exact mixture."""
    ang = jnp.arange(8) * (2 * math.pi / 8)
    means = radius * jnp.stack([jnp.cos(ang), jnp.sin(ang)], axis=-1)
    return GaussianMixture(means, std)


def eight_gaussians(key: jax.Array, n: int, *, radius: float = 2.0, std: float = 0.2) -> jax.Array:
    """Samples of 8 equally weighted Gaussians on a circle, float32 [n, 2]."""
    return eight_gaussians_mixture(radius, std).sample(key, _check_n(n))


def two_moons(key: jax.Array, n: int, *, noise: float = 0.1) -> jax.Array:
    """Two interleaving half circles (as sklearn's make_moons) plus Gaussian noise, [n, 2]."""
    _check_n(n)
    ku, kb, kn = jax.random.split(key, 3)
    theta = jax.random.uniform(ku, (n,), minval=0.0, maxval=math.pi)
    upper = jax.random.bernoulli(kb, 0.5, (n,))
    x_up = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    x_lo = jnp.stack([1.0 - jnp.cos(theta), 0.5 - jnp.sin(theta)], -1)
    x = jnp.where(upper[:, None], x_up, x_lo)
    x = x + noise * jax.random.normal(kn, (n, 2))
    # centre roughly at the origin
    return (x - jnp.array([0.5, 0.25])).astype(jnp.float32)


def checkerboard(key: jax.Array, n: int, *, num_squares: int = 4, size: float = 4.0) -> jax.Array:
    """Uniform on the 'black' squares of a num_squares x num_squares board on [-size/2, size/2]^2."""
    _check_n(n)
    if num_squares < 2:
        raise ValueError(f"num_squares must be >= 2, got {num_squares}")
    kc, ku = jax.random.split(key)
    cells = jnp.array(
        [(i, j) for i in range(num_squares) for j in range(num_squares) if (i + j) % 2 == 0],
        jnp.float32,
    )
    idx = jax.random.randint(kc, (n,), 0, cells.shape[0])
    u = jax.random.uniform(ku, (n, 2))
    width = size / num_squares
    return ((cells[idx] + u) * width - size / 2).astype(jnp.float32)


def spirals(key: jax.Array, n: int, *, noise: float = 0.05, turns: float = 1.5) -> jax.Array:
    """Two interleaved Archimedean spirals with Gaussian noise, float32 [n, 2], radius <= ~3."""
    _check_n(n)
    ku, kb, kn = jax.random.split(key, 3)
    s = jnp.sqrt(jax.random.uniform(ku, (n,)))  # more points further out
    theta = s * turns * 2 * math.pi
    r = 3.0 * s
    sign = jnp.where(jax.random.bernoulli(kb, 0.5, (n,)), 1.0, -1.0)
    x = sign[:, None] * jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)
    return (x + noise * jax.random.normal(kn, (n, 2))).astype(jnp.float32)


TOY_DISTRIBUTIONS: dict[str, Sampler] = {
    "eight_gaussians": eight_gaussians,
    "two_moons": two_moons,
    "checkerboard": checkerboard,
    "spirals": spirals,
}


def get_toy(name: str) -> Sampler:
    """Returns the sampler ``fn(key, n) -> [n, 2]`` registered under ``name``."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; known: {sorted(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name]


def sample_toy(name: str, key: jax.Array, n: int) -> jax.Array:
    """Samples ``n`` points of the named toy distribution, float32 [n, 2]."""
    return get_toy(name)(key, n)
