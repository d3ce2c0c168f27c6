"""Class-conditional normalizing flows on images: NICE, RealNVP and Glow, and their likelihood / sampling.

``ConditionalFlow(bijector, event_shape, num_classes)`` maps x [B, *event_shape] to z [B, D] (D =
prod(event_shape)) with a standard normal base; labels [B] are embedded once and passed to every
coupling network as ``cond``. Exact log-likelihood by the change of variables,

    log p(x | y) = log N(z; 0, I) + log|det dz/dx|,   z = f(x; y),

and sampling x = f^-1(T * eps; y), eps ~ N(0, I), with temperature T (T < 1 trades diversity for
quality; Kingma & Dhariwal 2018). One inverse pass per sample: NFE = 1.

Architectures (``build_flow(kind, ...)``; every one starts with the ``LogitTransform`` of the data
interval (low, high)):
  * "nice":    flatten, ``steps`` additive couplings with MLP networks on alternating (even / odd)
               coordinates, NICE's diagonal scaling (Dinh et al. 2014).
  * "realnvp": multi-scale (Dinh et al. 2016): per level ``steps`` checkerboard affine couplings,
               squeeze (2x2 space-to-depth), ``steps`` channel couplings, factor out half the
               channels; the last level ``steps + 1`` checkerboard couplings.
  * "glow":    per level squeeze, then ``steps`` x (ActNorm, LU 1x1 convolution, affine channel
               coupling), factor out half the channels (Kingma & Dhariwal 2018).
``levels`` is the number of scales. Initialise with ``init_flow`` on a real batch (ActNorm's
data-dependent init).

Bits/dim of discrete data (``make_flow_loss``, ``flow_bits_per_dim``): integer grid values k are
dequantised, z = offset + bin_width * (k + u), u ~ U[0, 1), and bits/dim = -(log p(z) + D log
bin_width) / (D ln 2) (``research.generative.likelihood``), an upper bound on the discrete model's
bits/dim (the variational dequantisation bound RealNVP and Glow report). ``flow_bits_per_dim`` gives
it for p(z | y) with the true label and for the marginal p(z) = mean_y p(z | y) (uniform class prior),
comparable with unconditional models.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from research.flows.bijectors import (
    ActNorm, Chain, DiagonalScale, FactorOut, Flatten, InvConv1x1, LogitTransform, Squeeze, check_float_input,
)
from research.flows.coupling import Coupling
from research.generative.likelihood import bits_per_dim, dequantize

FLOW_KINDS = ("realnvp", "glow", "nice")


def standard_normal_logp(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example of z [B, D]."""
    return -0.5 * jnp.sum(z * z, axis=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _check_labels(labels, batch: int, num_classes: int):
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"ConditionalFlow: labels must be integer class ids, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"ConditionalFlow: labels must have shape ({batch},), got {labels.shape}")
    if isinstance(labels, jax.core.Tracer):  # traced: a checkify debug check (active under checkify.checkify)
        bad = (labels < 0) | (labels >= num_classes)
        checkify.debug_check(~jnp.any(bad), f"ConditionalFlow: labels must be in [0, {num_classes - 1}]")
        return labels
    host = np.asarray(labels)
    bad = (host < 0) | (host >= num_classes)
    if bad.any():
        raise ValueError(f"ConditionalFlow: labels must be in [0, {num_classes - 1}], got "
                         f"{np.unique(host[bad]).tolist()}")
    return labels


class ConditionalFlow(nn.Module):
    """A bijector x [B, *event_shape] -> z [B, D] with a N(0, I) base and an optional label embedding."""

    bijector: nn.Module
    event_shape: tuple[int, ...]
    num_classes: int = 0  # 0: unconditional (labels must be None)
    embed_dim: int = 32

    def setup(self):
        if self.num_classes > 0:
            self.label_embed = nn.Embed(self.num_classes, self.embed_dim, name="label_embed")

    def _cond(self, labels, batch):
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("ConditionalFlow: an unconditional flow (num_classes=0) takes labels=None")
            return None
        if labels is None:
            raise ValueError(f"ConditionalFlow: a conditional flow (num_classes={self.num_classes}) needs labels")
        return self.label_embed(_check_labels(labels, batch, self.num_classes))

    def forward(self, x, labels=None):
        """x [B, *event_shape] -> (z [B, D], log|det dz/dx| [B])."""
        x = check_float_input(x, "ConditionalFlow", (1 + len(self.event_shape),))
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"ConditionalFlow: x must be [B, *{tuple(self.event_shape)}], got {x.shape}")
        return self.bijector(x, self._cond(labels, x.shape[0]), inverse=False)

    def inverse(self, z, labels=None):
        """z [B, D] -> (x [B, *event_shape], log|det dx/dz| [B])."""
        z = check_float_input(z, "ConditionalFlow.inverse", (2,))
        d = int(np.prod(self.event_shape))
        if z.shape[1] != d:
            raise ValueError(f"ConditionalFlow.inverse: z must be [B, {d}], got {z.shape}")
        return self.bijector(z, self._cond(labels, z.shape[0]), inverse=True)

    def log_prob(self, x, labels=None):
        """Exact log p(x | labels) [B] (a density in x's space)."""
        z, ld = self.forward(x, labels)
        return standard_normal_logp(z) + ld

    def sample(self, key, labels, temperature: float = 1.0):
        """x = f^-1(temperature * eps), eps ~ N(0, I) drawn from ``key``; one sample per label."""
        labels = jnp.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"ConditionalFlow.sample: labels must be [B], got shape {labels.shape}")
        d = int(np.prod(self.event_shape))
        eps = jax.random.normal(key, (labels.shape[0], d), jnp.float32)
        return self.inverse(temperature * eps, None if self.num_classes == 0 else labels)[0]

    def __call__(self, x, labels=None):
        return self.log_prob(x, labels)


def _realnvp_level(shape, level, *, levels, steps, coupling):
    h, w, c = shape
    final = level == levels - 1
    layers = [coupling(mask="checkerboard", parity=i % 2) for i in range(steps + (1 if final else 0))]
    if final:
        return layers + [Flatten(shape)]
    if h % 2 or w % 2:
        raise ValueError(f"realnvp: {levels} levels need even sizes at level {level}, got {shape}")
    sq = (h // 2, w // 2, 4 * c)
    layers += [Squeeze()] + [coupling(mask="channel", parity=i % 2) for i in range(steps)]
    inner = _realnvp_level((h // 2, w // 2, 2 * c), level + 1, levels=levels, steps=steps, coupling=coupling)
    return layers + [FactorOut(sq, Chain(inner))]


def _glow_level(shape, level, *, levels, steps, coupling, seed):
    h, w, c = shape
    if h % 2 or w % 2:
        raise ValueError(f"glow: {levels} levels need even sizes at level {level}, got {shape}")
    sq = (h // 2, w // 2, 4 * c)
    layers = [Squeeze()]
    for i in range(steps):
        layers += [ActNorm(), InvConv1x1(seed=seed + 1000 * level + i), coupling(mask="channel", parity=i % 2)]
    if level == levels - 1:
        return layers + [Flatten(sq)]
    inner = _glow_level((h // 2, w // 2, 2 * c), level + 1, levels=levels, steps=steps, coupling=coupling, seed=seed)
    return layers + [FactorOut(sq, Chain(inner))]


def build_bijector(kind: str, *, event_shape, low: float, high: float, levels: int = 2, steps: int = 3,
                   hidden: int = 64, depth: int = 2, scale_bound: float = 3.0, logit_alpha: float = 0.05,
                   seed: int = 0) -> Chain:
    """The bijector of ``kind`` (see the module docstring) for images of ``event_shape`` (H, W, C) with
    values in (low, high); ``seed`` fixes Glow's LU permutations (``InvConv1x1``)."""
    if kind not in FLOW_KINDS:
        raise ValueError(f"build_bijector: unknown flow kind {kind!r}; expected one of {FLOW_KINDS}")
    for name, v in (("levels", levels), ("steps", steps), ("hidden", hidden), ("depth", depth)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"build_bijector: {name} must be a positive int, got {v!r}")
    shape = tuple(int(s) for s in event_shape)
    if len(shape) != 3:
        raise ValueError(f"build_bijector: event_shape must be (H, W, C), got {event_shape!r}")

    def coupling(**kw):
        return Coupling(kind="additive" if kind == "nice" else "affine", hidden=hidden, depth=depth,
                        scale_bound=scale_bound, **kw)

    pre = [LogitTransform(low, high, logit_alpha)]
    if kind == "nice":
        body = [Flatten(shape)] + [coupling(mask="checkerboard", parity=i % 2) for i in range(steps)]
        return Chain(pre + body + [DiagonalScale()])
    if kind == "realnvp":
        return Chain(pre + _realnvp_level(shape, 0, levels=levels, steps=steps, coupling=coupling))
    return Chain(pre + _glow_level(shape, 0, levels=levels, steps=steps, coupling=coupling, seed=seed))


def build_flow(kind: str, *, event_shape, num_classes: int, embed_dim: int = 32, **bijector_kwargs) -> ConditionalFlow:
    """``ConditionalFlow(build_bijector(kind, ...), event_shape, num_classes, embed_dim)``."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"build_flow: num_classes must be an int >= 0, got {num_classes!r}")
    bij = build_bijector(kind, event_shape=event_shape, **bijector_kwargs)
    return ConditionalFlow(bij, tuple(int(s) for s in event_shape), num_classes, embed_dim)


def init_flow(model: ConditionalFlow, key, x, labels=None):
    """Parameters of ``model`` initialised on the batch ``x`` (ActNorm's data-dependent init), jitted."""
    return jax.jit(lambda k, x_, y_: model.init(k, x_, y_, method="log_prob")["params"])(key, x, labels)


def num_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def make_flow_loss(model: ConditionalFlow, *, bin_width: float, offset: float):
    """``loss_fn(params, batch, key) -> (mean bits/dim bound, aux)`` for ``make_train_step``: ``batch["image"]``
    holds integer grid values [B, *event_shape] (any dtype), ``batch["label"]`` the labels (ignored by an
    unconditional flow); ``key`` draws the dequantisation noise."""
    d = int(np.prod(model.event_shape))

    def loss_fn(params, batch, key):
        z = dequantize(key, batch["image"], bin_width=bin_width, offset=offset)
        labels = batch["label"] if model.num_classes else None
        logp = model.apply({"params": params}, z, labels, method="log_prob")
        bpd = bits_per_dim(logp, d, bin_width=bin_width)
        return jnp.mean(bpd), {"nll_nats_per_dim": -jnp.mean(logp) / d}

    return loss_fn


def marginal_log_prob(model: ConditionalFlow, params, x) -> jax.Array:
    """log p(x) = logsumexp_y log p(x | y) - log K over the K classes (uniform prior), [B]."""
    k = model.num_classes
    if k < 1:
        raise ValueError("marginal_log_prob needs a class-conditional flow (num_classes >= 1)")

    def per_class(c):
        labels = jnp.full((x.shape[0],), c, jnp.int32)
        return model.apply({"params": params}, x, labels, method="log_prob")

    return jax.nn.logsumexp(jax.lax.map(per_class, jnp.arange(k)), axis=0) - math.log(k)


def flow_bits_per_dim(model: ConditionalFlow, params, ints, labels, key, *, bin_width: float, offset: float) -> dict:
    """Mean bits/dim bounds on integer grid data ``ints`` [N, *event_shape] (one dequantisation draw per
    image from ``key``): ``{"conditional": with the true labels, "marginal": under mean_y p(. | y)}``
    (an unconditional flow gives log p(z) for both)."""
    d = int(np.prod(model.event_shape))

    @jax.jit
    def run(p, ints_, labels_, k):
        z = dequantize(k, ints_, bin_width=bin_width, offset=offset)
        if model.num_classes == 0:
            lp = model.apply({"params": p}, z, None, method="log_prob")
            return lp, lp
        return model.apply({"params": p}, z, labels_, method="log_prob"), marginal_log_prob(model, p, z)

    cond, marg = run(params, jnp.asarray(ints), None if labels is None else jnp.asarray(labels), key)
    return {"conditional": float(jnp.mean(bits_per_dim(cond, d, bin_width=bin_width))),
            "marginal": float(jnp.mean(bits_per_dim(marg, d, bin_width=bin_width)))}
