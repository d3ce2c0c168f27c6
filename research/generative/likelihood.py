"""Log-likelihood through the probability-flow ODE, and bits/dim with uniform dequantisation.

Instantaneous change of variables (continuous normalizing flow, Chen et al. 2018): along
dx/dt = v(x, t), d log p_t(x(t)) / dt = -div v(x(t), t). Integrating from the data side t_start
to the prior side t_end (the same names as every integrator: the interval runs from t_start to t_end):
    log p_{t_start}(x) = log p_prior(x(t_end)) + int_{t_start}^{t_end} div v(x(t), t) dt.
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

Dtypes: the ODE (state, log-density and time) runs in x's floating dtype, float32 at least, so a
float64 x under ``jax_enable_x64`` integrates in float64 with diffrax; ``dequantize`` and
``make_probe`` take ``dtype=`` (float32 by default).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from research.generative._util import as_float, float_dtype, tvec

DIVERGENCES = ("exact", "rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5", "heun", "euler")
# Evaluations of the ODE right-hand side per step, and once at the start (FSAL: the first stage of
# Tsit5 / Dopri5 reuses the last one of the previous step, so only the initial step pays for it).
_EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6, "heun": 2, "euler": 1}
_EVALS_AT_START = {"tsit5": 1, "dopri5": 1, "heun": 0, "euler": 0}


def num_function_evals(solver: str, num_steps):
    """Right-hand-side evaluations of ``solver`` for ``num_steps`` steps (accepted + rejected): the one
    NFE formula of this module. Each evaluation is one velocity JVP for the Hutchinson estimator and
    D velocity JVPs (D = data dimension) for the exact divergence."""
    if solver not in SOLVERS:
        raise ValueError(f"num_function_evals: unknown solver {solver!r}; expected one of {SOLVERS}")
    return num_steps * _EVALS_PER_STEP[solver] + _EVALS_AT_START[solver]


def _value_and_exact_divergence(fn: Callable, x: jax.Array, t):
    """(fn(x, t), per-example trace of d fn / d x) by D JVPs with the basis vectors; the value is the
    primal output of the first JVP, so one call costs exactly D velocity evaluations."""
    shape = x.shape
    d = math.prod(shape[1:])
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + shape[1:])

    def jvp_col(e):
        tangent = jnp.broadcast_to(e, shape)
        return jax.jvp(lambda y: fn(y, t), (x,), (tangent,))

    vals, cols = jax.lax.map(jvp_col, basis)  # [D, B, ...] each
    cols = cols.reshape(d, shape[0], d)
    return vals[0], jnp.einsum("dbd->b", cols)


def exact_divergence(fn: Callable, x: jax.Array, t) -> jax.Array:
    """Per-example trace of d fn / d x at (x, t) by D JVPs (jacfwd). x [B, ...] -> [B]."""
    return _value_and_exact_divergence(fn, x, t)[1]


def hutchinson_divergence(fn: Callable, x: jax.Array, t, probe: jax.Array) -> jax.Array:
    """Per-example eps^T (d fn / d x) eps for a probe eps of x's shape (one JVP). [B]."""
    jv = jax.jvp(lambda y: fn(y, t), (x,), (probe,))[1]
    return jnp.sum((jv * probe).reshape(x.shape[0], -1), axis=1)


def make_probe(key, shape, kind: str, dtype=jnp.float32) -> jax.Array:
    """Hutchinson probe of ``shape``: +-1 (``"rademacher"``) or N(0, 1) (``"gaussian"``) in ``dtype``."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    raise ValueError(f"unknown probe kind {kind!r}; expected 'rademacher' or 'gaussian'")


def ode_log_likelihood(velocity_fn: Callable, x: jax.Array, *, prior_logp: Callable, t_start: float = 0.0,
                       t_end: float = 1.0, divergence: str = "rademacher", key=None, solver: str = "tsit5",
                       rtol: float = 1e-5, atol: float = 1e-5, num_steps: int | None = None, max_steps: int = 4096):
    """log p_{t_start}(x) per example through the probability-flow ODE, integrated from the data side
    ``t_start`` to the prior side ``t_end``.

    velocity_fn(x, t) with t [B]: the PF-ODE drift (e.g. ``pf_ode_velocity(sde, score_fn)`` or a
    flow-matching velocity). prior_logp(z) -> [B] at t_end. Adaptive solvers (tsit5, dopri5) use a
    PID controller with rtol/atol; fixed-step ones (heun, euler) need ``num_steps``.
    Returns (logp [B], aux) with aux = {"z": x(t_end), "delta_logp": int div v dt, "nfe": evaluations
    of the ODE right-hand side (``num_function_evals``): each is one velocity JVP for the Hutchinson
    estimator and D velocity JVPs for the exact divergence}. Computed in x's dtype (float32 at least).
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
    if isinstance(t_start, (int, float)) and isinstance(t_end, (int, float)) and t_start == t_end:
        raise ValueError(f"ode_log_likelihood: need t_start != t_end, got {t_start}, {t_end}")
    shape = x.shape
    dtype = float_dtype(x)
    x = as_float(x, dtype)
    probe = None if divergence == "exact" else make_probe(key, shape, divergence, dtype)

    def f(t, y, args):
        xs, _ = y
        xs = xs.reshape(shape)
        tv = tvec(xs, t, dtype)
        if probe is None:
            v, div = _value_and_exact_divergence(velocity_fn, xs, tv)
        else:
            v, jv = jax.jvp(lambda y_: velocity_fn(y_, tv), (xs,), (probe,))
            div = jnp.sum((jv * probe).reshape(shape[0], -1), axis=1)
        return as_float(v, dtype).reshape(-1), as_float(div, dtype)

    term = diffrax.ODETerm(f)
    y0 = (x.reshape(-1), jnp.zeros((shape[0],), dtype))
    # times in the state's dtype, so diffrax's step arithmetic is float64 for float64 x
    t0, t1 = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
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
    nfe = num_function_evals(solver, sol.stats["num_steps"])
    return logp, {"z": z, "delta_logp": delta, "nfe": nfe}


def dequantize(key, x_int: jax.Array, *, bin_width: float, offset: float, dtype=jnp.float32) -> jax.Array:
    """Uniform dequantisation: z = offset + bin_width * (x_int + u), u ~ U[0, 1) elementwise, in ``dtype``."""
    if not bin_width > 0:
        raise ValueError(f"dequantize: bin_width must be > 0, got {bin_width}")
    u = jax.random.uniform(key, jnp.shape(x_int), dtype)
    return offset + bin_width * (jnp.asarray(x_int, u.dtype) + u)


def bits_per_dim(logp_z: jax.Array, num_dims: int, *, bin_width: float) -> jax.Array:
    """Upper bound on discrete bits/dim from the continuous log-density of dequantised data:
    -(log p(z) + D log bin_width) / (D ln 2). See the module docstring."""
    if not bin_width > 0:
        raise ValueError(f"bits_per_dim: bin_width must be > 0, got {bin_width}")
    if not (isinstance(num_dims, int) and num_dims > 0):
        raise ValueError(f"bits_per_dim: num_dims must be a positive int, got {num_dims!r}")
    return -(as_float(logp_z) + num_dims * math.log(bin_width)) / (num_dims * math.log(2.0))


def digits_dequantization():
    """(bin_width, offset) for research.data.digits: intensities k in 0..16 map to k / 8 - 1, so bins
    of width 1/8 centred on the grid points: z = k/8 - 1 + (u - 1/2)/8. 17 bins -> the uniform
    model on [-1 - 1/16, 1 + 1/16] has log2(17) = 4.09 bits/dim."""
    return 1.0 / 8.0, -1.0 - 1.0 / 16.0
