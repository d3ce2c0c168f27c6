"""Private array helpers shared by the Gaussian-path modules (one copy of each).

Dtype rule of the library: a function computes in the floating dtype of its inputs, with
float32 as the floor (bfloat16 / float16 model outputs still give float32 losses and
statistics). Under ``jax_enable_x64`` float64 inputs therefore run in float64 end to end;
Python scalars are weakly typed and never promote.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def float_dtype(*xs):
    """The compute dtype for ``xs``: their common floating dtype, at least float32.

    Non-floating and Python-scalar arguments do not raise the result (an int label array or a
    float literal leaves it at float32)."""
    dts = []
    for x in xs:
        if x is None or isinstance(x, (int, float, bool)):
            continue
        dt = jnp.result_type(x)
        if jnp.issubdtype(dt, jnp.floating):
            dts.append(dt)
    if not dts:
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(jnp.result_type(*dts), jnp.float32)


def as_float(x, dtype=None):
    """``x`` as an array of ``dtype`` (default: ``float_dtype(x)``)."""
    return jnp.asarray(x, float_dtype(x) if dtype is None else dtype)


def bcast(v, x):
    """``v`` [B] (or any leading shape) reshaped to broadcast against ``x`` [B, ...] on the left."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def tvec(x, t, dtype=None):
    """A time (or sigma) per example: scalar or [B] ``t`` broadcast to [B] = x.shape[:1], in ``dtype``
    (default: the compute dtype of x and t)."""
    dtype = float_dtype(x, t) if dtype is None else dtype
    return jnp.broadcast_to(jnp.asarray(t, dtype), (x.shape[0],))


def normal_logp(z, std=1.0):
    """log N(z; 0, std^2 I) per example, summed over the non-batch dims of z [B, ...]."""
    z = as_float(z)
    d = math.prod(z.shape[1:])
    sq = jnp.sum(jnp.square(z.reshape(z.shape[0], -1)), axis=1)
    std = jnp.asarray(std, z.dtype)
    return -0.5 * d * jnp.log(2 * math.pi * std ** 2) - 0.5 * sq / std ** 2


def normal(key, shape, dtype=None):
    """Standard normal draws in ``dtype`` (float32 by default, float64 allowed under x64)."""
    return jax.random.normal(key, shape, jnp.float32 if dtype is None else dtype)


def is_zero(v) -> bool:
    """True for the Python number 0 (a static switch: traced values are never 'zero')."""
    return isinstance(v, (int, float)) and v == 0


def widest_float():
    """float64 when ``jax_enable_x64`` is on, else float32 (for evaluating Python-float constants, e.g.
    a path's sigma at its end time, at the best precision the process allows)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def check_same_shape(pred, target, name: str, what: str = "model output"):
    """Raise a ValueError naming both shapes when ``pred`` and ``target`` differ in shape: a
    broadcasting mismatch (e.g. [B, D] against [B, 1]) silently gives a wrong loss otherwise."""
    if tuple(jnp.shape(pred)) != tuple(jnp.shape(target)):
        raise ValueError(f"{name}: {what} shape {tuple(jnp.shape(pred))} != target shape "
                         f"{tuple(jnp.shape(target))}")


def check_positive(value, arg: str, name: str):
    """Eager check of a static (Python-number) hyper-parameter: ``value > 0`` or a ValueError naming
    ``arg``; traced values are left alone (checked where they enter)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name}: {arg} must be > 0, got {value}")
