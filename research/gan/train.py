"""GAN training on the multi-model step (``research.train.multi``): the two loss closures, the state,
the step with its n_critic schedule, and conditional sampling.

Models are named ``"generator"`` and ``critic_name(loss)`` (``"discriminator"`` for the logit losses,
``"critic"`` for WGAN-GP). Batches are dicts ``{x_key: real [B, ...], y_key: labels [B]}`` (labels only
for conditional models); the generator is conditioned on the labels of the real batch, so its
classes follow the data's class frequencies. Within one step the critic is visited first and the
generator (on its scheduled steps) trains against the critic's updated parameters.

Randomness: the multi step hands each loss its own key (step- and model-folded); the critic splits
its key into the latent key and the interpolation key.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.gan import losses as L
from research.train.multi import MultiTrainState, create_multi_train_state, make_multi_train_step, n_critic

LOSSES = ("ns", "hinge", "wgan_gp")
GENERATOR = "generator"


def critic_name(loss: str) -> str:
    """The critic's model name: "critic" for WGAN-GP, "discriminator" for the logit losses."""
    _check_loss(loss)
    return "critic" if loss == "wgan_gp" else "discriminator"


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")


def make_gan_loss_fns(generator: nn.Module, critic: nn.Module, *, loss: str, latent_dim: int,
                      gp_weight: float = 10.0, drift: float = 0.0, r1_gamma: float = 0.0,
                      x_key: str = "image", y_key: str | None = "label") -> dict[str, Callable]:
    """``{critic_name(loss): critic_loss, "generator": generator_loss}`` in the multi step's signature
    ``loss_fn(params, others, batch, key) -> (loss, aux)``.

    loss: "ns" (non-saturating), "hinge" or "wgan_gp" (gp_weight, drift). ``r1_gamma > 0`` adds the R1
    penalty (gamma / 2) E_real ||grad D||^2 to the logit losses. ``y_key=None``: unconditional models.
    """
    _check_loss(loss)
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
    for name, v in (("gp_weight", gp_weight), ("drift", drift), ("r1_gamma", r1_gamma)):
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    d_name = critic_name(loss)

    def labels(batch):
        return None if y_key is None else batch[y_key]

    def fake_batch(g_params, batch, key):
        n = batch[x_key].shape[0]
        z = jax.random.normal(key, (n, latent_dim), jnp.float32)
        return generator.apply({"params": g_params}, z, labels(batch))

    def score_fn(d_params, batch):
        y = labels(batch)
        return lambda x: critic.apply({"params": d_params}, x, y)

    def critic_loss(params, others, batch, key):
        k_z, k_gp = jax.random.split(key)
        real = batch[x_key]
        fake = jax.lax.stop_gradient(fake_batch(others[GENERATOR], batch, k_z))
        score = score_fn(params, batch)
        if loss == "wgan_gp":
            return L.wgan_gp_critic_loss(score, real, fake, k_gp, gp_weight=gp_weight, drift=drift)
        real_s, fake_s = score(real), score(fake)
        fn = L.ns_discriminator_loss if loss == "ns" else L.hinge_discriminator_loss
        value = fn(real_s, fake_s)
        aux = {"real_score": jnp.mean(real_s), "fake_score": jnp.mean(fake_s),
               "real_prob": jnp.mean(jax.nn.sigmoid(real_s)), "fake_prob": jnp.mean(jax.nn.sigmoid(fake_s))}
        if r1_gamma:
            r1 = L.r1_penalty(score, real)
            value = value + 0.5 * r1_gamma * r1
            aux["r1"] = r1
        return value, aux

    def generator_loss(params, others, batch, key):
        fake = fake_batch(params, batch, key)
        fake_s = score_fn(others[d_name], batch)(fake)
        value = L.ns_generator_loss(fake_s) if loss == "ns" else L.wasserstein_generator_loss(fake_s)
        return value, {"fake_score": jnp.mean(fake_s)}

    return {d_name: critic_loss, GENERATOR: generator_loss}


def init_gan_params(generator: nn.Module, critic: nn.Module, key, *, latent_dim: int, x_shape,
                    conditional: bool = True) -> tuple[dict, dict]:
    """``(generator_params, critic_params)`` from example inputs of batch 1 (x_shape excludes the batch)."""
    return _init_params(generator, critic, key, latent_dim=int(latent_dim), x_shape=tuple(x_shape),
                        conditional=bool(conditional))


# one compiled program instead of dozens of eager ones, cached across calls (modules are hashable)
@partial(jax.jit, static_argnames=("generator", "critic", "latent_dim", "x_shape", "conditional"))
def _init_params(generator, critic, key, *, latent_dim, x_shape, conditional):
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    k_g, k_d = jax.random.split(key)
    return (generator.init(k_g, jnp.zeros((1, latent_dim), jnp.float32), y)["params"],
            critic.init(k_d, jnp.zeros((1, *x_shape), jnp.float32), y)["params"])


def make_gan_optimizers(loss: str, *, g_lr: float, d_lr: float, b1: float, b2: float
                        ) -> dict[str, optax.GradientTransformation]:
    """Adam (AdamW without decay) per network, e.g. betas (0.0, 0.9) or (0.5, 0.9) as in WGAN-GP."""
    from research.train.optim import adamw

    return {critic_name(loss): adamw(d_lr, b1=b1, b2=b2, weight_decay=0.0),
            GENERATOR: adamw(g_lr, b1=b1, b2=b2, weight_decay=0.0)}


def create_gan_state(g_params, d_params, optimizers, key, *, loss: str, ema: bool) -> MultiTrainState:
    """The initial multi-model state (EMA of the generator only, when ``ema``)."""
    d_name = critic_name(loss)
    return create_multi_train_state({d_name: d_params, GENERATOR: g_params}, optimizers, key,
                                    ema={d_name: False, GENERATOR: ema})


def make_gan_step(loss_fns: dict, optimizers: dict, *, loss: str, num_critic: int,
                  generator_ema_decay: float | None = None, jit: bool = True):
    """The jitted multi step: the critic every step, the generator every ``num_critic``-th step."""
    d_name = critic_name(loss)
    ordered = {d_name: loss_fns[d_name], GENERATOR: loss_fns[GENERATOR]}  # critic first, then generator
    return make_multi_train_step(ordered, optimizers, schedule=n_critic(d_name, GENERATOR, num_critic),
                                 ema_decay={d_name: None, GENERATOR: generator_ema_decay}, jit=jit)


def sample_generator(generator: nn.Module, params, key, *, num: int, latent_dim: int, labels=None):
    """``num`` samples G(z, y), z ~ N(0, I); ``labels`` [num] or None (unconditional). One network call."""
    z = jax.random.normal(key, (num, latent_dim), jnp.float32)
    return generator.apply({"params": params}, z, labels)


__all__ = ["LOSSES", "GENERATOR", "critic_name", "make_gan_loss_fns", "init_gan_params", "make_gan_optimizers",
           "create_gan_state", "make_gan_step", "sample_generator"]
