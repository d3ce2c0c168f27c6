"""Training losses for every Gaussian-path model (all pure, jit-able).

Model-call convention: ``model_fn(params, x, t, cond, key) -> out`` with x [B, ...], t [B] and
``key`` the dropout key (None at inference). Every loss returns ``(loss, aux)`` with
``aux = {"loss": loss, ...}``; the per-example error is averaged over the non-batch dimensions
and then over the batch (unless stated otherwise). The model output must have the target's shape
exactly (a ValueError names both shapes otherwise: broadcasting would give a wrong loss).

Dtypes: the noise, the timesteps and the loss are in x0's floating dtype with float32 as the
floor -- bfloat16 / float16 data or model outputs give a float32 loss, float64 data under
``jax_enable_x64`` give a float64 loss end to end.

Losses:
  * ``rectified_flow_loss``: x_t = (1 - t) x_0 + t eps, target eps - x_0 (SD3 / CondOT).
  * ``cfm_loss``: I-CFM (Tong et al.) with sigma > 0 and independent or exact minibatch-OT
    coupling (OT-CFM); with sigma = 0 and independent coupling it is rectified flow.
  * ``pair_flow_loss``: rectified flow on given (x_0, x_1) pairs -- reflow.
  * ``dsm_loss``: denoising score matching for a score SDE, ``reduce_mean`` and likelihood
    weighting g(t)^2 (score_sde semantics).
  * ``edm_loss``: EDM preconditioned denoiser with log-normal sigma and weight lambda(sigma).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative._util import as_float, bcast, check_positive, check_same_shape, float_dtype, is_zero, normal
from research.generative.timesteps import sample_timesteps


def _mean_per_example(err):
    return err.reshape(err.shape[0], -1).mean(axis=1)


def _check_batch(x0, name):
    if x0.ndim < 2:
        raise ValueError(f"{name}: x0 must have a batch axis and at least one data axis, got shape {x0.shape}")


def _model_out(model_fn, params, x, t, cond, key, target, name):
    """The model output, shape-checked against ``target`` and cast to the loss dtype."""
    out = model_fn(params, x, t, cond, key)
    check_same_shape(out, target, name)
    return as_float(out, float_dtype(out, target))


def pair_flow_loss(model_fn, params, x0, x1, key, *, cond=None, timestep_dist="logit_normal", loc=0.0,
                   scale=1.0, sigma=0.0, t_min=0.0, t_max=1.0):
    """Flow matching on pairs (x0 data, x1 noise/source): x_t = (1 - t) x0 + t x1 + sigma z,
    target x1 - x0. Used by rectified flow (x1 ~ N(0, I)), I-CFM, OT-CFM and reflow."""
    _check_batch(x0, "pair_flow_loss")
    if x1.shape != x0.shape:
        raise ValueError(f"pair_flow_loss: x1 shape {x1.shape} != x0 shape {x0.shape}")
    if isinstance(sigma, (int, float)) and sigma < 0:
        raise ValueError(f"pair_flow_loss: sigma must be >= 0, got {sigma}")
    k_t, k_z, k_model = jax.random.split(key, 3)
    dtype = float_dtype(x0, x1)
    x0, x1 = as_float(x0, dtype), as_float(x1, dtype)
    t = sample_timesteps(k_t, (x0.shape[0],), dist=timestep_dist, loc=loc, scale=scale, t_min=t_min, t_max=t_max,
                         dtype=dtype)
    tb = bcast(t, x0)
    x_t = (1.0 - tb) * x0 + tb * x1
    if not is_zero(sigma):
        x_t = x_t + sigma * normal(k_z, x0.shape, dtype)
    target = x1 - x0
    pred = _model_out(model_fn, params, x_t, t, cond, k_model, target, "pair_flow_loss")
    loss = (_mean_per_example((pred - target) ** 2)).mean()
    return loss, {"loss": loss}


def rectified_flow_loss(model_fn, params, x0, key, *, cond=None, timestep_dist="logit_normal", loc=0.0, scale=1.0):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0; t from ``timestep_dist``.

    x0: [B, ...] data. Returns (loss, {"loss": loss}) in x0's dtype (float32 at least).
    """
    _check_batch(x0, "rectified_flow_loss")
    k_eps, k_rest = jax.random.split(key)
    eps = normal(k_eps, x0.shape, float_dtype(x0))
    return pair_flow_loss(model_fn, params, x0, eps, k_rest, cond=cond, timestep_dist=timestep_dist, loc=loc,
                          scale=scale)


def cfm_loss(model_fn, params, x0, key, *, cond=None, sigma=0.0, coupling="independent", timestep_dist="uniform",
             loc=0.0, scale=1.0):
    """Conditional flow matching with source x1 ~ N(0, I) (data at t = 0).

    sigma: I-CFM's path width (x_t = (1 - t) x0 + t x1 + sigma z, target x1 - x0).
    coupling: "independent" (I-CFM) or "ot" (OT-CFM: x1 is re-ordered by the exact minibatch W2
    assignment ``ot_pairing`` computed on device, inside jit). cond stays attached to x0.
    """
    from research.generative.ot import ot_pairing

    if coupling not in ("independent", "ot"):
        raise ValueError(f"cfm_loss: unknown coupling {coupling!r}; expected 'independent' or 'ot'")
    if isinstance(sigma, (int, float)) and sigma < 0:
        raise ValueError(f"cfm_loss: sigma must be >= 0, got {sigma}")
    _check_batch(x0, "cfm_loss")
    k_x1, k_rest = jax.random.split(key)
    x1 = normal(k_x1, x0.shape, float_dtype(x0))
    if coupling == "ot":
        x1 = x1[ot_pairing(jax.lax.stop_gradient(x0), x1)]
    return pair_flow_loss(model_fn, params, x0, x1, k_rest, cond=cond, timestep_dist=timestep_dist, loc=loc,
                          scale=scale, sigma=sigma)


def dsm_loss(model_fn, params, x0, key, *, sde, cond=None, prediction="eps", reduce_mean=True,
             likelihood_weighting=False, t_min=1e-5, timestep_dist="uniform", antithetic=False):
    """Denoising score matching for a score SDE (score_sde's ``get_sde_loss_fn``, continuous t).

    t ~ U(t_min, T) (or ``timestep_dist``); x_t = mean(t) x0 + std(t) z; the model output is read
    as ``prediction`` (eps | x0 | score | velocity) and converted to a score s.
      likelihood_weighting=False: per-example reduce(|s std + z|^2)          (lambda = std^2)
      likelihood_weighting=True:  per-example reduce(|s + z / std|^2) * g(t)^2 (Song et al. 2021b)
    reduce = mean over non-batch dims if ``reduce_mean`` else sum; then the batch mean.
    """
    from research.generative.parameterization import convert

    _check_batch(x0, "dsm_loss")
    k_t, k_z, k_model = jax.random.split(key, 3)
    dtype = float_dtype(x0)
    x0 = as_float(x0, dtype)
    t = sample_timesteps(k_t, (x0.shape[0],), dist=timestep_dist, t_min=t_min, t_max=sde.T, antithetic=antithetic,
                         dtype=dtype)
    z = normal(k_z, x0.shape, dtype)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + bcast(std, x0) * z
    out = _model_out(model_fn, params, x_t, t, cond, k_model, x0, "dsm_loss")
    score = convert(sde.path, out, x_t, t, src=prediction, dst="score")
    if likelihood_weighting:
        g2 = sde.sde(jnp.zeros_like(x0), t)[1] ** 2
        err = (score + z / bcast(std, x0)) ** 2
    else:
        g2 = None
        err = (score * bcast(std, x0) + z) ** 2
    flat = err.reshape(err.shape[0], -1)
    per_ex = flat.mean(axis=1) if reduce_mean else flat.sum(axis=1)
    if g2 is not None:
        per_ex = per_ex * g2
    loss = per_ex.mean()
    return loss, {"loss": loss}


def edm_loss(model_fn, params, x0, key, *, cond=None, sigma_data=0.5, P_mean=-1.2, P_std=1.2):
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), D = c_skip x + c_out F(c_in x, c_noise),
    per-example mean over dims of lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2, then the batch mean."""
    from research.generative.edm import edm_weight, make_edm_denoiser
    from research.generative.timesteps import sample_edm_sigma

    check_positive(sigma_data, "sigma_data", "edm_loss")
    check_positive(P_std, "P_std", "edm_loss")
    _check_batch(x0, "edm_loss")
    k_s, k_n, k_model = jax.random.split(key, 3)
    dtype = float_dtype(x0)
    x0 = as_float(x0, dtype)
    sigma = sample_edm_sigma(k_s, (x0.shape[0],), P_mean=P_mean, P_std=P_std, dtype=dtype)
    x = x0 + bcast(sigma, x0) * normal(k_n, x0.shape, dtype)
    # make_edm_denoiser checks that the network output has x's shape
    denoised = make_edm_denoiser(model_fn, params, cond, sigma_data=sigma_data, key=k_model)(x, sigma)
    per_ex = edm_weight(sigma, sigma_data) * _mean_per_example((denoised - x0) ** 2)
    loss = per_ex.mean()
    return loss, {"loss": loss}


def path_loss(model_fn, params, x0, key, *, path, prediction="eps", cond=None, timestep_dist="uniform", loc=0.0,
              scale=1.0, t_min=0.0, t_max=1.0):
    """Generic regression loss on any Gaussian path in any parameterisation (eps | x0 | velocity | score):
    x_t = alpha x0 + sigma eps, target = that parameterisation of (x0, eps); unweighted MSE."""
    from research.generative.parameterization import from_x0_eps

    _check_batch(x0, "path_loss")
    k_t, k_e, k_model = jax.random.split(key, 3)
    dtype = float_dtype(x0)
    x0 = as_float(x0, dtype)
    t = sample_timesteps(k_t, (x0.shape[0],), dist=timestep_dist, loc=loc, scale=scale, t_min=t_min, t_max=t_max,
                         dtype=dtype)
    eps = normal(k_e, x0.shape, dtype)
    x_t = path.marginal(x0, eps, t)
    target = from_x0_eps(path, x0, eps, x_t, t, prediction)
    pred = _model_out(model_fn, params, x_t, t, cond, k_model, target, "path_loss")
    loss = _mean_per_example((pred - target) ** 2).mean()
    return loss, {"loss": loss}
