"""Gaussian VAE (Kingma & Welling 2014) with a discretised-logistic decoder on the 17-level digits.

Model: prior p(z) = N(0, I); posterior q(z | x[, y]) = N(mean, diag(exp(log_var))) from the
encoder; likelihood p(x | z[, y]) = prod over pixels of a discretised logistic on the L = 17
intensity levels (PixelCNN++, Salimans et al. 2017): level k sits at low + k * delta
(delta = (high - low) / (L - 1) = 1/8 on [-1, 1]) and gets the logistic mass of its bin
[x - delta/2, x + delta/2], the two edge bins extended to -inf / +inf, so the L masses sum to
exactly 1 and log p(x | z) is a DISCRETE log-probability. Hence

    log P(x) >= ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))

bounds the same discrete likelihood that the flows bound through dequantisation and the PF-ODE
families estimate (``research.generative.likelihood``: a uniform model scores log2(17) = 4.09
bits/dim); no bin-width term is needed (``bits_per_dim(..., bin_width=1)``). The importance
weighted bound (Burda et al. 2016) log mean_k p(x, z_k) / q(z_k | x) lies between the two and
tightens with more samples. For a class-conditional VAE both bound log P(x | y); the bound on the
unconditional log P(x) = log sum_y P(y) P(x | y) is ``class_marginal_bound`` (uniform P(y)).

Pieces: ``gaussian_kl`` (analytic), ``diag_gaussian_log_prob``, ``reparameterize``,
``discretized_logistic_log_prob`` / ``_sample``, ``bounds`` (ELBO and IWAE of any posterior /
likelihood pair), the ``VAE`` description (encoder + decoder, pure ``init`` / ``posterior`` /
``decode``) and ``VAEObjective`` (the training loss with a KL weight, in the ``method.loss``
calling convention of ``experiments.common.train_digits``). Everything is per example: [B].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from research.generative.likelihood import bits_per_dim
from research.latent.nets import Decoder, Encoder, count_params, init_module, latent_size

NUM_LEVELS = 17
LOG_VAR_RANGE = (-30.0, 20.0)  # clip of the encoder's log-variance (exp stays finite in float32)


def _sum_per_example(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def gaussian_kl(mean, log_var):
    """KL(N(mean, diag exp(log_var)) || N(0, I)) per example, summed over all non-batch axes."""
    return 0.5 * _sum_per_example(jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)


def diag_gaussian_log_prob(z, mean, log_var):
    """log N(z; mean, diag exp(log_var)) per example (summed over all non-batch axes)."""
    return -0.5 * _sum_per_example(math.log(2 * math.pi) + log_var + jnp.square(z - mean) * jnp.exp(-log_var))


def reparameterize(key, mean, log_var):
    """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I): differentiable in mean and log_var."""
    eps = jax.random.normal(key, jnp.shape(mean), jnp.result_type(mean))
    return mean + jnp.exp(0.5 * log_var) * eps


def _half_bin(num_levels: int, low: float, high: float) -> float:
    if not (isinstance(num_levels, int) and num_levels >= 2) or not high > low:
        raise ValueError(f"need num_levels >= 2 and high > low, got {num_levels}, [{low}, {high}]")
    return 0.5 * (high - low) / (num_levels - 1)


def discretized_logistic_log_prob(x, loc, log_scale, *, num_levels: int = NUM_LEVELS, low: float = -1.0,
                                  high: float = 1.0):
    """Elementwise log-mass of the grid values ``x`` (levels low + k * delta) under a logistic
    (loc, exp(log_scale)) discretised to ``num_levels`` bins, edge bins open. Same shape as x.

    The mass of an inner bin [x - delta/2, x + delta/2] is sigmoid(a) - sigmoid(b) with
    a = (x - loc + delta/2) / s, b = (x - loc - delta/2) / s, computed without cancellation as
    log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a))."""
    h = _half_bin(num_levels, low, high)
    inv_s = jnp.exp(-log_scale)
    a = (x - loc + h) * inv_s
    b = (x - loc - h) * inv_s
    inner = jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b) + jnp.log(-jnp.expm1(-2.0 * h * inv_s))
    lowest = jax.nn.log_sigmoid(a)  # (-inf, x + delta/2]
    highest = jax.nn.log_sigmoid(-b)  # [x - delta/2, inf)
    return jnp.where(x < low + h, lowest, jnp.where(x > high - h, highest, inner))


def discretized_logistic_sample(key, loc, log_scale, *, num_levels: int = NUM_LEVELS, low: float = -1.0,
                                high: float = 1.0):
    """A sample of the discretised logistic: a logistic draw rounded to the nearest level (clipped
    to the edge levels, which own the tails). Returns grid values in [low, high], loc's shape."""
    h = _half_bin(num_levels, low, high)
    dtype = jnp.result_type(loc)
    tiny = jnp.finfo(dtype).eps
    u = jax.random.uniform(key, jnp.shape(loc), dtype, minval=tiny, maxval=1.0 - tiny)
    y = loc + jnp.exp(log_scale) * (jnp.log(u) - jnp.log1p(-u))
    level = jnp.clip(jnp.round((y - low) / (2 * h)), 0, num_levels - 1)
    return low + level * (2 * h)


def bounds(posterior: Callable, log_likelihood: Callable, x, key, *, num_samples: int):
    """(ELBO, IWAE bound) per example from ``num_samples`` posterior draws.

    posterior(x) -> (mean, log_var); log_likelihood(x, z) -> [B]. ELBO = mean_k log p(x | z_k) -
    KL (analytic); IWAE = logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] - log K, with
    the same draws (equal to the ELBO's integrand at K = 1, and to log p(x) for every draw when q
    is the exact posterior)."""
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    mean, log_var = posterior(x)
    zeros = jnp.zeros_like(mean)

    def one(k):
        z = reparameterize(k, mean, log_var)
        log_px = log_likelihood(x, z)
        return log_px, diag_gaussian_log_prob(z, zeros, zeros) - diag_gaussian_log_prob(z, mean, log_var)

    log_px, log_ratio = jax.lax.map(one, jax.random.split(key, num_samples))  # [K, B] each
    elbo = jnp.mean(log_px, axis=0) - gaussian_kl(mean, log_var)
    iwae = jax.nn.logsumexp(log_px + log_ratio, axis=0) - math.log(num_samples)
    return elbo, iwae


def class_marginal_bound(per_class_bounds):
    """Bound on the unconditional log P(x) = log (1/C) sum_y P(x | y) from per-class bounds
    [C, B] (each <= log P(x | y)): logsumexp over y - log C, per example [B]."""
    per_class_bounds = jnp.asarray(per_class_bounds)
    if per_class_bounds.ndim != 2:
        raise ValueError(f"class_marginal_bound: need per-class bounds [C, B], got shape {per_class_bounds.shape}")
    return jax.nn.logsumexp(per_class_bounds, axis=0) - math.log(per_class_bounds.shape[0])


def bound_bits_per_dim(log_bound, num_dims: int):
    """Bits/dim of a discrete log-probability (bound): -log P / (D ln 2) (bin width 1: no dequantisation)."""
    return bits_per_dim(log_bound, num_dims, bin_width=1.0)


@dataclasses.dataclass(frozen=True)
class VAE:
    """Encoder + decoder of a Gaussian VAE on 8x8x1 images in [-1, 1]; params {"encoder", "decoder"}.

    The latent is [s, s, latent_channels] with s = latent_size(features); the encoder outputs the
    posterior mean and log-variance, the decoder the per-pixel logistic location and log-scale
    (floored at ``min_log_scale``). ``num_classes > 0``: both networks see the label (a CVAE)."""

    features: tuple = (32, 64)
    latent_channels: int = 4
    num_classes: int = 0
    min_log_scale: float = -7.0

    def __post_init__(self):
        latent_size(self.features)
        if not (isinstance(self.latent_channels, int) and self.latent_channels >= 1):
            raise ValueError(f"latent_channels must be a positive int, got {self.latent_channels!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 0):
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def latent_shape(self) -> tuple:
        s = latent_size(self.features)
        return (s, s, self.latent_channels)

    @property
    def encoder(self) -> Encoder:
        return Encoder(tuple(self.features), 2 * self.latent_channels, self.num_classes)

    @property
    def decoder(self) -> Decoder:
        return Decoder(tuple(self.features), 2, self.num_classes)

    def init(self, key) -> dict:
        """Params {"encoder", "decoder"} (``research.latent.nets.init_module``)."""
        k_enc, k_dec = jax.random.split(key)
        return {"encoder": init_module(self.encoder, k_enc, (1, 8, 8, 1), conditional=self.conditional),
                "decoder": init_module(self.decoder, k_dec, (1, *self.latent_shape), conditional=self.conditional)}

    def num_params(self, params, part: str | None = None) -> int:
        return count_params(params if part is None else params[part])

    def _labels(self, labels):
        if not self.conditional:
            return None
        if labels is None:
            raise ValueError(f"this VAE is class-conditional (num_classes={self.num_classes}); pass labels")
        return labels

    def posterior(self, params, x, labels=None):
        """(mean, log_var) of q(z | x[, y]), each [B, s, s, latent_channels]."""
        out = self.encoder.apply({"params": params["encoder"]}, x, self._labels(labels))
        mean, log_var = jnp.split(out, 2, axis=-1)
        return mean, jnp.clip(log_var, *LOG_VAR_RANGE)

    def decode(self, params, z, labels=None):
        """(loc, log_scale) of the per-pixel discretised logistic p(x | z[, y]), each [B, 8, 8, 1]."""
        out = self.decoder.apply({"params": params["decoder"]}, z, self._labels(labels))
        loc, log_scale = jnp.split(out, 2, axis=-1)
        return loc, jnp.maximum(log_scale, self.min_log_scale)

    def log_likelihood(self, params, x, z, labels=None):
        """log p(x | z[, y]) per example [B] (x on the 17-level grid)."""
        loc, log_scale = self.decode(params, z, labels)
        return _sum_per_example(discretized_logistic_log_prob(x, loc, log_scale))

    def bounds(self, params, x, key, labels=None, *, num_samples: int = 1):
        """(ELBO, IWAE) per example on log P(x[ | y]); see the module function ``bounds``."""
        return bounds(lambda xx: self.posterior(params, xx, labels),
                      lambda xx, z: self.log_likelihood(params, xx, z, labels), x, key, num_samples=num_samples)

    def mean_image(self, params, z, labels=None):
        """The decoder's location clipped to [-1, 1] (the logistic's mean/mode, not a pixel sample)."""
        return jnp.clip(self.decode(params, z, labels)[0], -1.0, 1.0)

    def sample_image(self, params, z, key, labels=None):
        """A pixel sample of p(x | z[, y]) on the 17-level grid."""
        loc, log_scale = self.decode(params, z, labels)
        return discretized_logistic_sample(key, loc, log_scale)


@dataclasses.dataclass(frozen=True)
class VAEObjective:
    """Negative ELBO per dimension with the KL term weighted by ``kl_weight`` (1: the true ELBO;
    < 1: a beta-VAE with more informative latents, e.g. for a latent-diffusion stage 1).

    ``loss(vae, params, x, key, cond=None) -> (loss, aux)``: one reparameterised posterior sample
    per example, analytic KL; aux holds the batch's ELBO bits/dim (always with weight 1) and its
    reconstruction and KL parts in bits/dim."""

    kl_weight: float = 1.0

    def loss(self, vae: VAE, params, x, key, cond=None):
        mean, log_var = vae.posterior(params, x, cond)
        z = reparameterize(key, mean, log_var)
        log_px = vae.log_likelihood(params, x, z, cond)
        kl = gaussian_kl(mean, log_var)
        d = math.prod(x.shape[1:])
        loss = jnp.mean(kl * self.kl_weight - log_px) / d
        to_bits = 1.0 / (d * math.log(2.0))
        aux = {"elbo_bpd": jnp.mean(kl - log_px) * to_bits, "recon_bpd": -jnp.mean(log_px) * to_bits,
               "kl_bpd": jnp.mean(kl) * to_bits}
        return loss, aux
