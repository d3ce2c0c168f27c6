"""Fixed-step and adaptive ODE solvers for sampling (all jit-able).

``velocity_fn(x, t) -> dx/dt`` with ``x`` of shape [B, ...] and ``t`` of shape [B] (float32;
every example at the same time). Data at t = 0, noise at t = 1, so sampling integrates from
``t_start = 1`` down to ``t_end = 0`` (negative step sizes are fine).

Number of function evaluations (NFE) for N steps:
  * ``euler``: N
  * ``heun``:  2N (the explicit trapezoidal rule; the correction is applied on every step,
    including the last one, so the method is second order on the whole interval. EDM's
    ``edm_sample`` instead skips the correction at sigma = 0 -> 2N - 1, see samplers.py)
  * ``rk4``:   4N
  * ``adaptive`` (diffrax Tsit5/Dopri5 + PIDController): reported by ``ode_sample_adaptive``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

FIXED_STEP_METHODS = ("euler", "heun", "rk4")
NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


def _tvec(x, t):
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def _step(velocity_fn, method, x, t, t_next):
    h = (t_next - t).astype(x.dtype)
    if method == "euler":
        return x + h * velocity_fn(x, _tvec(x, t))
    if method == "heun":
        d1 = velocity_fn(x, _tvec(x, t))
        x_pred = x + h * d1
        d2 = velocity_fn(x_pred, _tvec(x, t_next))
        return x + 0.5 * h * (d1 + d2)
    # rk4
    t_mid = t + 0.5 * (t_next - t)
    k1 = velocity_fn(x, _tvec(x, t))
    k2 = velocity_fn(x + 0.5 * h * k1, _tvec(x, t_mid))
    k3 = velocity_fn(x + 0.5 * h * k2, _tvec(x, t_mid))
    k4 = velocity_fn(x + h * k3, _tvec(x, t_next))
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _check_method(method):
    if method not in FIXED_STEP_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {FIXED_STEP_METHODS}")


def integrate_grid(velocity_fn: Callable, x_init: jax.Array, ts: jax.Array, *, method: str = "euler") -> jax.Array:
    """Integrate dx/dt = velocity_fn(x, t) over the time grid ``ts`` [K+1] (K steps, lax.scan)."""
    _check_method(method)
    ts = jnp.asarray(ts, jnp.float32)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"integrate_grid: ts must be 1-D with at least 2 entries, got shape {ts.shape}")

    def body(x, tt):
        return _step(velocity_fn, method, x, tt[0], tt[1]), None

    x, _ = jax.lax.scan(body, x_init, jnp.stack([ts[:-1], ts[1:]], axis=1))
    return x


def ode_sample(velocity_fn: Callable, x_init: jax.Array, *, num_steps: int, method: str = "euler",
               t_start: float = 1.0, t_end: float = 0.0) -> jax.Array:
    """Integrate from ``t_start`` to ``t_end`` with ``num_steps`` uniform steps; returns x(t_end).

    x_init: [B, ...] (noise for sampling). NFE = num_steps * NFE_PER_STEP[method].
    """
    _check_method(method)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"ode_sample: num_steps must be a positive int, got {num_steps!r}")
    t_start = jnp.float32(t_start)
    t_end = jnp.float32(t_end)
    dt = (t_end - t_start) / num_steps

    def body(i, x):
        t = t_start + i * dt
        t_next = jnp.where(i == num_steps - 1, t_end, t_start + (i + 1) * dt)
        return _step(velocity_fn, method, x, t, t_next)

    return jax.lax.fori_loop(0, num_steps, body, x_init)


def ode_sample_adaptive(velocity_fn: Callable, x_init: jax.Array, *, t_start: float = 1.0, t_end: float = 0.0,
                        solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5, dt0: float | None = None,
                        max_steps: int = 4096):
    """Adaptive-step integration with diffrax (Tsit5 or Dopri5 with a PID step-size controller).

    Returns (x(t_end), nfe): nfe = velocity evaluations per example, 1 + 6 per attempted
    (accepted or rejected) step for these FSAL 7-stage methods (tests count the calls).
    """
    import diffrax

    solvers = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
    if solver not in solvers:
        raise ValueError(f"ode_sample_adaptive: unknown solver {solver!r}; expected one of {tuple(solvers)}")
    shape = x_init.shape

    def f(t, y, args):
        return velocity_fn(y.reshape(shape), _tvec(x_init, t)).reshape(-1)

    dt0 = (t_end - t_start) / 64.0 if dt0 is None else dt0
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), solvers[solver](), t0=t_start, t1=t_end, dt0=dt0, y0=x_init.reshape(-1),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        saveat=diffrax.SaveAt(t1=True))
    nfe = adaptive_nfe(sol.stats)
    return sol.ys[-1].reshape(shape), nfe


def adaptive_nfe(stats) -> jax.Array:
    """Velocity evaluations of a diffrax Tsit5/Dopri5 solve with a given dt0: 1 initial + 6 per
    attempted step (7 stages, first-same-as-last reuses one)."""
    return 1 + 6 * stats["num_steps"]
