"""Log-likelihood through the probability-flow ODE, and bits/dim with uniform dequantisation.

Instantaneous change of variables (continuous normalizing flow, Chen et al. 2018): along
dx/dt = v(x, t), d log p_t(x(t)) / dt = -div v(x(t), t). Integrating from the data side t0 to
the prior side t1:
    log p_{t0}(x) = log p_prior(x(t1)) + int_{t0}^{t1} div v(x(t), t) dt.
div v is computed
  * exactly (``divergence="exact"``): D forward-mode JVPs with the basis vectors (jacfwd, the
    trace of the Jacobian) -- for low dimensions;
  * by the Hutchinson/Skilling estimator E_eps[eps^T (dv/dx) eps] with one probe per example
    held fixed along the trajectory, ``"rademacher"`` (+-1) or ``"gaussian"`` probes; unbiased.
Both assume examples do not interact inside ``v`` (no batch statistics), so the batched JVP
gives every example's own Jacobian.

Bits per dimension for discrete data (uniform dequantisation, Theis et al. 2016; Ho et al. 2019):
integer data k in {0, ..., K-1}^D map to model space by z = offset + bin_width * (k + u),
u ~ U[0, 1)^D. For a continuous model density p(z), the discrete model P(k) = int_bin p(z) dz
(bin volume bin_width^D), and by Jensen
    log P(k) >= E_u[ log p(z) + D log(bin_width) ],
so   bits/dim <= E_u[ -(log p(z) + D log bin_width) ] / (D ln 2).
The D log(bin_width) term is the Jacobian of the scaling [0, K) -> model space and it is where the
``log(number of bins)`` enters: for 8-bit images scaled to [-1, 1], bin_width = 2/256, so
bits/dim = -log p(z) / (D ln 2) + 8 - 1. A model that is uniform on the occupied range gets
exactly log2(K). Noise must be added on the integer grid *before* scaling (``dequantize``), and
the same z must be the one whose density is evaluated.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = ("exact", "rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5", "heun", "euler")


def _tvec(x, t):
    return jnp.full((x.shape[0],), t, jnp.float32)


def exact_divergence(fn: Callable, x: jax.Array, t) -> jax.Array:
    """Per-example trace of d fn / d x at (x, t) by D JVPs (jacfwd). x [B, ...] -> [B]."""
    shape = x.shape
    d = math.prod(shape[1:])
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + shape[1:])

    def jvp_col(e):
        tangent = jnp.broadcast_to(e, shape)
        return jax.jvp(lambda y: fn(y, t), (x,), (tangent,))[1]

    cols = jax.lax.map(jvp_col, basis)  # [D, B, ...]
    cols = cols.reshape(d, shape[0], d)
    return jnp.einsum("dbd->b", cols)


def hutchinson_divergence(fn: Callable, x: jax.Array, t, probe: jax.Array) -> jax.Array:
    """Per-example eps^T (d fn / d x) eps for a probe eps of x's shape (one JVP). [B]."""
    jv = jax.jvp(lambda y: fn(y, t), (x,), (probe,))[1]
    return jnp.sum((jv * probe).reshape(x.shape[0], -1), axis=1)


def make_probe(key, shape, kind: str) -> jax.Array:
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, jnp.float32)
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    raise ValueError(f"unknown probe kind {kind!r}; expected 'rademacher' or 'gaussian'")


def ode_log_likelihood(velocity_fn: Callable, x: jax.Array, *, prior_logp: Callable, t0: float = 0.0, t1: float = 1.0,
                       divergence: str = "rademacher", key=None, solver: str = "tsit5", rtol: float = 1e-5,
                       atol: float = 1e-5, num_steps: int | None = None, max_steps: int = 4096):
    """log p_{t0}(x) per example through the probability-flow ODE.

    velocity_fn(x, t) with t [B]: the PF-ODE drift (e.g. ``pf_ode_velocity(sde, score_fn)`` or a
    flow-matching velocity). prior_logp(z) -> [B] at t1. Adaptive solvers (tsit5, dopri5) use a
    PID controller with rtol/atol; fixed-step ones (heun, euler) need ``num_steps``.
    Returns (logp [B], aux) with aux = {"z": x(t1), "delta_logp": int div v dt, "nfe": velocity-JVP
    evaluations per example (each counts one JVP; exact divergence costs D JVPs per evaluation)}.
    """
    import diffrax

    if divergence not in DIVERGENCES:
        raise ValueError(f"ode_log_likelihood: unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if solver not in SOLVERS:
        raise ValueError(f"ode_log_likelihood: unknown solver {solver!r}; expected one of {SOLVERS}")
    if divergence != "exact" and key is None:
        raise ValueError("ode_log_likelihood: Hutchinson divergence needs a PRNG key (key=...)")
    if solver in ("heun", "euler") and not num_steps:
        raise ValueError(f"ode_log_likelihood: solver {solver!r} needs num_steps")
    shape = x.shape
    x = x.astype(jnp.float32)
    probe = None if divergence == "exact" else make_probe(key, shape, divergence)

    def f(t, y, args):
        xs, _ = y
        xs = xs.reshape(shape)
        tv = _tvec(xs, t)
        if probe is None:
            v = velocity_fn(xs, tv)
            div = exact_divergence(velocity_fn, xs, tv)
        else:
            v, jv = jax.jvp(lambda y_: velocity_fn(y_, tv), (xs,), (probe,))
            div = jnp.sum((jv * probe).reshape(shape[0], -1), axis=1)
        return v.reshape(-1), div

    term = diffrax.ODETerm(f)
    y0 = (x.reshape(-1), jnp.zeros((shape[0],), jnp.float32))
    if solver in ("tsit5", "dopri5"):
        s = diffrax.Tsit5() if solver == "tsit5" else diffrax.Dopri5()
        ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = (t1 - t0) / 64.0
    else:
        s = diffrax.Heun() if solver == "heun" else diffrax.Euler()
        ctrl = diffrax.ConstantStepSize()
        dt0 = (t1 - t0) / num_steps
    sol = diffrax.diffeqsolve(term, s, t0=t0, t1=t1, dt0=dt0, y0=y0, stepsize_controller=ctrl,
                              max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
    z = sol.ys[0][-1].reshape(shape)
    delta = sol.ys[1][-1]
    logp = prior_logp(z) + delta
    stages = {"tsit5": 6, "dopri5": 6, "heun": 2, "euler": 1}[solver]
    nfe = sol.stats["num_steps"] * stages + (1 if solver in ("tsit5", "dopri5") else 0)
    return logp, {"z": z, "delta_logp": delta, "nfe": nfe}


def dequantize(key, x_int: jax.Array, *, bin_width: float, offset: float) -> jax.Array:
    """Uniform dequantisation: z = offset + bin_width * (x_int + u), u ~ U[0, 1) elementwise."""
    u = jax.random.uniform(key, x_int.shape, jnp.float32)
    return offset + bin_width * (jnp.asarray(x_int, jnp.float32) + u)


def bits_per_dim(logp_z: jax.Array, num_dims: int, *, bin_width: float) -> jax.Array:
    """Upper bound on discrete bits/dim from the continuous log-density of dequantised data:
    -(log p(z) + D log bin_width) / (D ln 2). See the module docstring."""
    if bin_width <= 0:
        raise ValueError(f"bits_per_dim: bin_width must be > 0, got {bin_width}")
    return -(logp_z + num_dims * math.log(bin_width)) / (num_dims * math.log(2.0))


def digits_dequantization():
    """(bin_width, offset) for research.data.digits: intensities k in 0..16 map to k / 8 - 1, so bins
    of width 1/8 centred on the grid points: z = k/8 - 1 + (u - 1/2)/8. 17 bins -> the uniform
    model on [-1 - 1/16, 1 + 1/16] has log2(17) = 4.09 bits/dim."""
    return 1.0 / 8.0, -1.0 - 1.0 / 16.0
