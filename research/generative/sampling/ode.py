"""Time-space ODE integration of dx/dt = velocity_fn(x, t) (PF-ODE or flow velocity), data at t = 0.

``ode``: fixed steps, ``solver`` euler (NFE N) | heun (explicit trapezoid, correction on every step
including the last: 2N) | rk4 (4N), on the uniform grid t_start -> t_end (``num_steps``) or an
explicit grid ``ts`` [K+1]. ``ode_adaptive``: diffrax Tsit5 / Dopri5 with a PID controller; returns
the counted NFE (1 + 6 per attempted step of these FSAL 7-stage methods).
``pf_ode_velocity(sde, score_fn)``: the probability-flow drift f - g^2 score / 2 of a score SDE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.generative._util import tvec
from research.generative.sampling._common import check_choice, compute_dtype
from research.generative.sampling.registry import register

ODE_SOLVERS = {"euler": 1, "heun": 2, "rk4": 4}
ADAPTIVE_SOLVERS = ("tsit5", "dopri5")


def _step(velocity_fn, solver, x, t, t_next):
    dt = x.dtype
    h = (t_next - t).astype(dt)
    if solver == "euler":
        return x + h * velocity_fn(x, tvec(x, t, dt))
    if solver == "heun":
        d1 = velocity_fn(x, tvec(x, t, dt))
        x_pred = x + h * d1
        d2 = velocity_fn(x_pred, tvec(x, t_next, dt))
        return x + 0.5 * h * (d1 + d2)
    t_mid = t + 0.5 * (t_next - t)
    k1 = velocity_fn(x, tvec(x, t, dt))
    k2 = velocity_fn(x + 0.5 * h * k1, tvec(x, t_mid, dt))
    k3 = velocity_fn(x + 0.5 * h * k2, tvec(x, t_mid, dt))
    k4 = velocity_fn(x + h * k3, tvec(x, t_next, dt))
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def time_grid_args(where, num_steps, ts):
    """Number of steps from exactly one of ``num_steps`` / ``ts``."""
    if (num_steps is None) == (ts is None):
        raise ValueError(f"{where}: give exactly one of num_steps and ts")
    if ts is not None:
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"{where}: ts must be 1-D with at least 2 entries, got shape {ts.shape}")
        return ts.shape[0] - 1
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"{where}: num_steps must be a positive int, got {num_steps!r}")
    return num_steps


def _ode_nfe(n, *, solver="euler", **o):
    return ODE_SOLVERS[solver] * n


@register("ode", family="time", nfe=_ode_nfe, order="1 | 2 | 4 (solver)")
def ode(velocity_fn, x_init, *, num_steps=None, ts=None, solver="euler", t_start=1.0, t_end=0.0):
    """Fixed-step ODE: solver euler | heun | rk4 on a uniform grid (num_steps) or an explicit ``ts``."""
    check_choice("ode", "solver", solver, ODE_SOLVERS)
    time_grid_args("ode", num_steps, ts)
    dt = compute_dtype(x_init)
    x = x_init.astype(dt)
    if ts is not None:
        ts = jnp.asarray(ts, dt)

        def body(x, tt):
            return _step(velocity_fn, solver, x, tt[0], tt[1]), None

        x, _ = jax.lax.scan(body, x, jnp.stack([ts[:-1], ts[1:]], axis=1))
        return x
    t0, t1 = jnp.asarray(t_start, dt), jnp.asarray(t_end, dt)
    h = (t1 - t0) / num_steps

    def fbody(i, x):
        t = t0 + i * h
        t_next = jnp.where(i == num_steps - 1, t1, t0 + (i + 1) * h)
        return _step(velocity_fn, solver, x, t, t_next)

    return jax.lax.fori_loop(0, num_steps, fbody, x)


def adaptive_nfe(stats):
    """Velocity evaluations of a diffrax Tsit5 / Dopri5 solve: 1 initial + 6 per attempted step."""
    return 1 + 6 * stats["num_steps"]


@register("ode_adaptive", family="time", nfe=None, order="5 (adaptive)")
def ode_adaptive(velocity_fn, x_init, *, solver="tsit5", t_start=1.0, t_end=0.0, rtol=1e-5, atol=1e-5, dt0=None,
                 max_steps=4096):
    """Adaptive ODE (diffrax tsit5 | dopri5 + PID controller); returns (x, counted nfe)."""
    import diffrax

    check_choice("ode_adaptive", "solver", solver, ADAPTIVE_SOLVERS)
    solvers = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
    dt = compute_dtype(x_init)
    x_init = x_init.astype(dt)
    shape = x_init.shape

    def f(t, y, args):
        return velocity_fn(y.reshape(shape), tvec(x_init, t, dt)).astype(dt).reshape(-1)

    dt0 = (t_end - t_start) / 64.0 if dt0 is None else dt0
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), solvers[solver](), t0=jnp.asarray(t_start, dt), t1=jnp.asarray(t_end, dt),
        dt0=jnp.asarray(dt0, dt), y0=x_init.reshape(-1),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        saveat=diffrax.SaveAt(t1=True))
    return sol.ys[-1].reshape(shape), adaptive_nfe(sol.stats)


def pf_ode_velocity(sde, score_fn):
    """Probability-flow ODE drift v(x, t) = f(x, t) - g(t)^2 score / 2 of a score SDE (for ``ode``)."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: rsde.sde(x, t)[0]
