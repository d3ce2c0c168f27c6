"""Noise-level schedules: descending sigma grids ending in 0 (for ``sample``) and time grids.

  karras(n, sigma_min, sigma_max, rho=7)     EDM's eq. 5: uniform in sigma^(1/rho)
  exponential(n, sigma_min, sigma_max)       uniform in log sigma
  polyexponential(n, sigma_min, sigma_max, rho=1)  log sigma uniform in ramp^rho (rho=1: exponential)
  shift_time(t, shift)                       SD3's timestep shift  shift t / (1 + (shift - 1) t)
  flow_sigmas(n, shift=3.0, t_max=...)       rectified-flow sampling sigmas: EDM sigma t / (1 - t) of
                                             the shifted uniform grid from t_max to 0 (SD3 default 3.0)
  uniform_time(n, t_start, t_end)            n + 1 uniform times
Each sigma schedule returns n + 1 entries (n sampling steps): sigma_max ... sigma_min, 0. The dtype
is the default float dtype (float64 under ``jax_enable_x64``) unless given.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def _default_dtype(dtype):
    return jnp.result_type(float) if dtype is None else jnp.dtype(dtype)


def _check(where, n, sigma_min, sigma_max, rho=None):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: n must be a positive int, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"{where}: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho is not None and not rho > 0:
        raise ValueError(f"{where}: rho must be > 0, got {rho}")


def _append_zero(s):
    return jnp.concatenate([s, jnp.zeros((1,), s.dtype)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, dtype=None):
    """EDM (Karras et al. 2022, eq. 5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check("karras", n, sigma_min, sigma_max, rho)
    i = jnp.arange(n, dtype=_default_dtype(dtype))
    denom = max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return _append_zero(s)


def exponential(n: int, sigma_min: float, sigma_max: float, *, dtype=None):
    """log sigma uniform from log sigma_max to log sigma_min (n entries), then 0."""
    _check("exponential", n, sigma_min, sigma_max)
    dt = _default_dtype(dtype)
    s = jnp.exp(jnp.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dt))
    return _append_zero(s)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, dtype=None):
    """log sigma = log smin + ramp^rho (log smax - log smin), ramp from 1 to 0 (n entries), then 0."""
    _check("polyexponential", n, sigma_min, sigma_max, rho)
    dt = _default_dtype(dtype)
    ramp = jnp.linspace(1.0, 0.0, n, dtype=dt) ** rho
    s = jnp.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return _append_zero(s)


def shift_time(t, shift: float):
    """SD3's resolution-dependent timestep shift (Esser et al. 2024, eq. 23): shift t / (1 + (shift - 1) t)."""
    if not shift > 0:
        raise ValueError(f"shift_time: shift must be > 0, got {shift}")
    t = jnp.asarray(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def uniform_time(n: int, t_start: float = 1.0, t_end: float = 0.0, *, dtype=None):
    """n + 1 uniform times from t_start to t_end."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"uniform_time: n must be a positive int, got {n!r}")
    return jnp.linspace(t_start, t_end, n + 1, dtype=_default_dtype(dtype))


def flow_sigmas(n: int, shift: float = 3.0, t_max: float = 1.0 - 1e-3, *, dtype=None):
    """Sampling sigmas for a rectified-flow model (alpha = 1 - t, sigma = t) in EDM form.

    t_i = shift_time(u_i, shift) for u uniform from t_max to 0 (n + 1 entries); the EDM sigma of x_t /
    alpha is t / (1 - t), so the grid ends in 0 and starts at t_max' / (1 - t_max') (t_max < 1: the
    EDM sigma is infinite at t = 1). Use with ``as_edm_denoiser(velocity_fn, RectifiedFlowPath(),
    src="velocity")`` and x_init = x_{t_0} / (1 - t_0) for x_{t_0} ~ N(0, t_0^2 I) ~= N(0, I)."""
    if not 0 < t_max < 1:
        raise ValueError(f"flow_sigmas: need 0 < t_max < 1, got {t_max}")
    t = shift_time(uniform_time(n, t_max, 0.0, dtype=dtype), shift)
    return (t / (1.0 - t)).at[-1].set(0.0)
