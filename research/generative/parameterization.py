"""Exact conversions between epsilon, x_0, score and velocity predictions on a Gaussian path.

For x_t = a x_0 + s eps (a = alpha(t), s = sigma(t), a' and s' their time derivatives):
  eps   -> x_0:  x_0 = (x_t - s eps) / a
  x_0   -> eps:  eps = (x_t - a x_0) / s
  score = grad log p_t(x_t) = -E[eps | x_t] / s
  velocity (probability-flow ODE drift) v = a' x_0 + s' eps, and back:
      x_0 = (s' x_t - s v) / (a s' - s a'),   eps = (a v - a' x_t) / (a s' - s a')
Every prediction is an affine function of (E[x_0 | x_t], E[eps | x_t]), so a model trained in one
parameterisation is sampled by any sampler through these maps (and CFG, an affine combination,
commutes with them).
The maps divide by alpha (eps/score/x0 -> x0 at alpha = 0, e.g. t = 1 of rectified flow or
cosine) or by sigma (x0 -> eps at sigma = 0, t = 0); sample on an interval that avoids them
(``path.t_start`` / ``path.t_end``) or predict the quantity the sampler needs.
Dtypes: every map computes in the common floating dtype of (pred, x_t, t), float32 at least (a
bfloat16 model output gives float32; float64 inputs under ``jax_enable_x64`` give float64).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from research.generative._util import as_float, bcast, check_positive, check_same_shape, float_dtype, tvec
from research.generative.paths import GaussianPath

PREDICTIONS = ("eps", "x0", "score", "velocity")


def _check(pred_type, what):
    if pred_type not in PREDICTIONS:
        raise ValueError(f"{what}: unknown prediction type {pred_type!r}; expected one of {PREDICTIONS}")


def to_x0_eps(path: GaussianPath, pred, x_t, t, prediction: str):
    """(x0_hat, eps_hat) from a prediction of type ``prediction`` at (x_t, t); x_t [B, ...], t [B]."""
    _check(prediction, "to_x0_eps")
    dtype = float_dtype(pred, x_t, t)
    pred, x_t, t = as_float(pred, dtype), as_float(x_t, dtype), as_float(t, dtype)
    a, s = bcast(path.alpha(t), x_t), bcast(path.sigma(t), x_t)
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction == "score":
        eps = -s * pred
        return (x_t - s * eps) / a, eps
    da, ds = bcast(path.d_alpha(t), x_t), bcast(path.d_sigma(t), x_t)
    det = a * ds - s * da
    return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det


def from_x0_eps(path: GaussianPath, x0, eps, x_t, t, prediction: str):
    """Prediction of type ``prediction`` from (x0_hat, eps_hat)."""
    _check(prediction, "from_x0_eps")
    dtype = float_dtype(x0, eps, x_t, t)
    x0, eps, t = as_float(x0, dtype), as_float(eps, dtype), as_float(t, dtype)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "score":
        return -eps / bcast(path.sigma(t), x_t)
    return bcast(path.d_alpha(t), x_t) * x0 + bcast(path.d_sigma(t), x_t) * eps


def convert(path: GaussianPath, pred, x_t, t, *, src: str, dst: str):
    """Convert a prediction from parameterisation ``src`` to ``dst`` (exact algebra)."""
    if src == dst:
        _check(src, "convert")
        return pred
    x0, eps = to_x0_eps(path, pred, x_t, t, src)
    return from_x0_eps(path, x0, eps, x_t, t, dst)


def as_fn(fn: Callable, path: GaussianPath, *, src: str, dst: str) -> Callable:
    """Wrap ``fn(x, t) -> prediction of type src`` into ``(x, t) -> prediction of type dst``."""
    _check(src, "as_fn")
    _check(dst, "as_fn")
    return lambda x, t: convert(path, fn(x, t), x, t, src=src, dst=dst)


def as_x0_eps_fn(fn: Callable, path: GaussianPath, *, src: str) -> Callable:
    """Wrap ``fn(x, t)`` into ``(x, t) -> (x0_hat, eps_hat)`` (used by DDIM)."""
    _check(src, "as_x0_eps_fn")
    return lambda x, t: to_x0_eps(path, fn(x, t), x, t, src)


def as_edm_denoiser(fn: Callable, path: GaussianPath, *, src: str) -> Callable:
    """EDM denoiser D(x, sigma) from any path model ``fn(x, t)``.

    EDM's x = x_0 + sigma eps equals x_t / alpha(t) with sigma = sigma(t) / alpha(t), so
    D(x, sigma) = x0_hat(alpha(t) x, t) with t = path.t_from_edm_sigma(sigma).
    """
    _check(src, "as_edm_denoiser")

    def denoiser(x, sigma):
        t = path.t_from_edm_sigma(sigma)
        x_t = bcast(path.alpha(t), x) * x
        x0, _ = to_x0_eps(path, fn(x_t, t), x_t, t, src)
        return x0

    return denoiser


def model_as_fn(model_fn: Callable, params, cond=None) -> Callable:
    """``(x, t) -> model_fn(params, x, t, cond, None)`` (inference call)."""
    return lambda x, t: model_fn(params, x, t, cond, None)


def eps_precond(path: GaussianPath, t, sigma_data: float):
    """(c_skip, c_out, c_in) of the preconditioned epsilon model on a Gaussian path.

    eps_hat(x_t, t) = c_skip x_t + c_out F(c_in x_t, t) with v = alpha^2 sigma_data^2 + sigma^2:
      c_skip = sigma / v            (E[eps | x_t] exactly when x_0 ~ N(0, sigma_data^2 I)),
      c_out  = alpha sigma_data / sqrt(v)   (the std of eps given x_t for that Gaussian),
      c_in   = 1 / sqrt(v)          (unit-variance network input).
    This is EDM's (c_skip, c_out, c_in) written for x_t = alpha (x_0 + (sigma / alpha) eps): the
    network F only models the non-Gaussian residual, so an error in F moves x0_hat by at most about
    sigma_data |F error| at every noise level. Without it (raw eps prediction) x0_hat's error is
    (sigma / alpha) |eps error|, which is ~150x the eps error at t = 1 of the VP SDE -- the
    probability-flow ODE carries that error to the data end (the reverse SDE's noise damps it).
    """
    check_positive(sigma_data, "sigma_data", "eps_precond")
    t = as_float(t)
    a, s = path.alpha(t), path.sigma(t)
    v = a ** 2 * sigma_data ** 2 + s ** 2
    return s / v, a * sigma_data / jnp.sqrt(v), 1.0 / jnp.sqrt(v)


def preconditioned_eps_model(model_fn: Callable, path: GaussianPath, sigma_data: float) -> Callable:
    """``model_fn(params, x, t, cond, key) -> F`` wrapped as ``(params, x, t, cond, key) -> eps_hat`` with
    ``eps_precond`` (the network sees c_in x_t and the path time t)."""
    check_positive(sigma_data, "sigma_data", "preconditioned_eps_model")

    def fn(params, x, t, cond, key):
        t = tvec(x, t)
        x = as_float(x, t.dtype)
        c_skip, c_out, c_in = eps_precond(path, t, sigma_data)
        f = model_fn(params, bcast(c_in, x) * x, t, cond, key)
        check_same_shape(f, x, "preconditioned_eps_model", "network output")
        f = as_float(f, float_dtype(f, x))
        return bcast(c_skip, x) * x + bcast(c_out, x) * f

    return fn
