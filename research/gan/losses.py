"""GAN objectives as pure functions of discriminator outputs (logits / critic scores, shape [B]).

Non-saturating GAN (Goodfellow et al. 2014, the "-log D trick"), with D(x) = sigmoid(logit):

    discriminator: E_real softplus(-l) + E_fake softplus(l)   (= -E log D(x) - E log(1 - D(G(z))))
    generator:     E_fake softplus(-l)                        (= -E log D(G(z)))

The minimax generator loss E_fake log(1 - D(G(z))) = -E_fake softplus(l) and the hinge loss
(Lim & Ye 2017; Miyato et al. 2018) are the optional variants.

WGAN-GP (Gulrajani et al. 2017): critic loss E[D(fake)] - E[D(real)] + lambda * GP with

    GP = E_i (||grad_x D(x_hat_i)||_2 - 1)^2,   x_hat_i = eps_i x_i + (1 - eps_i) x_fake_i,  eps_i ~ U[0, 1]

one eps per example and one gradient norm per example (never a norm over the batch), plus the
optional drift term eps_drift * E[D(real)^2] (Karras et al. 2018, progressive GAN).

Per-sample input gradients: ``input_grad_norms`` takes the gradient of ``sum_i D(x)_i`` with respect
to the batch ``x``. Row i of that gradient is ``grad_{x_i} D(x_i)`` ONLY because the critic's output
for example i does not depend on the other examples (no batch norm, no minibatch statistics). For a
critic whose examples interact, use ``per_sample="vmap"`` (``vmap(grad)`` over single examples),
which is exact regardless and costs the same here.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array], jax.Array]  # x [B, ...] -> scores [B]


def _scores(name: str, s) -> jax.Array:
    s = jnp.asarray(s)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one score per example, shape [B], got {s.shape}")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {s.dtype}")
    return s


# ------------------------------------------------------------------ logit losses
def ns_discriminator_loss(real_logits, fake_logits) -> jax.Array:
    """E_real softplus(-l) + E_fake softplus(l): the discriminator's binary cross-entropy."""
    real, fake = _scores("real_logits", real_logits), _scores("fake_logits", fake_logits)
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def ns_generator_loss(fake_logits) -> jax.Array:
    """Non-saturating generator loss E_fake softplus(-l) = -E log D(G(z))."""
    return jnp.mean(jax.nn.softplus(-_scores("fake_logits", fake_logits)))


def minimax_generator_loss(fake_logits) -> jax.Array:
    """The original (saturating) minimax generator loss E_fake log(1 - D(G(z))) = -E_fake softplus(l)."""
    return -jnp.mean(jax.nn.softplus(_scores("fake_logits", fake_logits)))


def hinge_discriminator_loss(real_logits, fake_logits) -> jax.Array:
    """E_real relu(1 - l) + E_fake relu(1 + l)."""
    real, fake = _scores("real_logits", real_logits), _scores("fake_logits", fake_logits)
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def wasserstein_generator_loss(fake_scores) -> jax.Array:
    """-E_fake D(G(z)): the generator loss of WGAN(-GP) and of the hinge GAN."""
    return -jnp.mean(_scores("fake_scores", fake_scores))


hinge_generator_loss = wasserstein_generator_loss


def wasserstein_critic_gap(real_scores, fake_scores) -> jax.Array:
    """E[D(real)] - E[D(fake)]: the critic's dual estimate of W1 (a lower bound for a 1-Lipschitz D)."""
    return jnp.mean(_scores("real_scores", real_scores)) - jnp.mean(_scores("fake_scores", fake_scores))


# ------------------------------------------------------------------ gradient penalties
def input_grad_norms(score_fn: ScoreFn, x, *, per_sample: str = "sum") -> jax.Array:
    """||grad_{x_i} D(x_i)||_2 per example, [B] (norm over all non-batch axes).

    per_sample: "sum" (gradient of the summed scores: exact only for critics whose examples do not
    interact, see the module docstring) or "vmap" (vmap of the gradient of single examples; it calls
    ``score_fn`` on batches of one, so a score_fn closing over per-example labels [B] needs "sum").
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [B, ...] with B examples, got shape {x.shape}")
    if per_sample == "sum":
        grads = jax.grad(lambda v: jnp.sum(_scores("score_fn(x)", score_fn(v))))(x)
    elif per_sample == "vmap":
        grads = jax.vmap(jax.grad(lambda xi: _scores("score_fn(x)", score_fn(xi[None]))[0]))(x)
    else:
        raise ValueError(f"per_sample must be 'sum' or 'vmap', got {per_sample!r}")
    flat = grads.reshape(grads.shape[0], -1)
    # sqrt(sum + tiny) keeps the second derivative finite where a gradient vanishes
    return jnp.sqrt(jnp.sum(flat * flat, axis=1) + jnp.finfo(flat.dtype).tiny)


def interpolate(real, fake, eps) -> jax.Array:
    """x_hat_i = eps_i real_i + (1 - eps_i) fake_i, one eps per example (eps [B])."""
    real, fake, eps = jnp.asarray(real), jnp.asarray(fake), jnp.asarray(eps)
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {real.shape} and {fake.shape}")
    if eps.shape != real.shape[:1]:
        raise ValueError(f"eps must hold one value per example, shape ({real.shape[0]},), got {eps.shape}")
    e = eps.astype(real.dtype).reshape((-1,) + (1,) * (real.ndim - 1))
    return e * real + (1 - e) * fake


def gradient_penalty(score_fn: ScoreFn, real, fake, key=None, *, eps=None, target: float = 1.0,
                     per_sample: str = "sum") -> tuple[jax.Array, dict]:
    """WGAN-GP penalty E_i (||grad D(x_hat_i)|| - target)^2 on random interpolates.

    Args:
      score_fn: x [B, ...] -> scores [B] (labels and params closed over).
      real, fake: [B, ...] batches of the same shape.
      key: draws eps ~ U[0, 1], one per example (ignored when ``eps`` is given).
      eps: optional explicit interpolation weights [B].
    Returns:
      (penalty, {"grad_norms": [B], "eps": [B]}).
    """
    real = jnp.asarray(real)
    if eps is None:
        if key is None:
            raise ValueError("gradient_penalty needs a PRNG key (or explicit eps)")
        eps = jax.random.uniform(key, real.shape[:1], real.dtype)
    x_hat = interpolate(real, fake, eps)
    norms = input_grad_norms(score_fn, x_hat, per_sample=per_sample)
    return jnp.mean((norms - target) ** 2), {"grad_norms": norms, "eps": jnp.asarray(eps)}


def r1_penalty(score_fn: ScoreFn, real, *, per_sample: str = "sum") -> jax.Array:
    """R1 (Mescheder et al. 2018): E_real ||grad_x D(x)||^2; the caller weights it by gamma / 2."""
    return jnp.mean(input_grad_norms(score_fn, real, per_sample=per_sample) ** 2)


def drift_penalty(real_scores) -> jax.Array:
    """E[D(real)^2]; weighted by eps_drift (e.g. 1e-3) it keeps the critic's values near 0."""
    return jnp.mean(_scores("real_scores", real_scores) ** 2)


def wgan_gp_critic_loss(score_fn: ScoreFn, real, fake, key, *, gp_weight: float = 10.0, drift: float = 0.0,
                        per_sample: str = "sum") -> tuple[jax.Array, dict]:
    """E[D(fake)] - E[D(real)] + gp_weight * GP + drift * E[D(real)^2].

    Returns (loss, aux) with aux: "w1_estimate" (E[D(real)] - E[D(fake)]), "gp", "grad_norm_mean"
    (mean ||grad D|| on the interpolates), "real_score", "fake_score".
    """
    real_s, fake_s = score_fn(real), score_fn(fake)
    gap = wasserstein_critic_gap(real_s, fake_s)
    gp, extra = gradient_penalty(score_fn, real, jax.lax.stop_gradient(fake), key, per_sample=per_sample)
    loss = -gap + gp_weight * gp
    if drift:
        loss = loss + drift * drift_penalty(real_s)
    return loss, {"w1_estimate": gap, "gp": gp, "grad_norm_mean": jnp.mean(extra["grad_norms"]),
                  "real_score": jnp.mean(real_s), "fake_score": jnp.mean(fake_s)}


__all__ = ["ns_discriminator_loss", "ns_generator_loss", "minimax_generator_loss", "hinge_discriminator_loss",
           "hinge_generator_loss", "wasserstein_generator_loss", "wasserstein_critic_gap", "input_grad_norms",
           "interpolate", "gradient_penalty", "r1_penalty", "drift_penalty", "wgan_gp_critic_loss"]
