"""Free-form continuous normalizing flow (FFJORD; Grathwohl et al. 2019), trained by maximum likelihood.

A time-conditioned velocity v(x, t) (``research.nn.mlp.ToyMLP``) transports data at t = 0 to the
N(0, I) base at t = 1 (the codebase's convention). By the instantaneous change of variables,

    log p_0(x) = log N(x(1); 0, I) + int_0^1 div v(x(t), t) dt,   dx/dt = v(x, t), x(0) = x,

computed by ``research.generative.likelihood.ode_log_likelihood`` (exact divergence by D JVPs, or
Hutchinson's estimator with one probe per example held along the path). Training uses a fixed-step
solver (Heun or Euler, ``num_steps`` steps, ``max_steps = num_steps``) so the loss is cheap and
differentiable by reverse mode through the solve; evaluation may use an adaptive
solver. Sampling (``cnf_transform``, ``cnf_sample``) integrates the same ODE back from t = 1 to t = 0
(``research.generative.sampling.ode``). With the Hutchinson estimator the log-likelihood is unbiased
for each probe: its mean over probes is the exact-divergence value of the same discretised ODE.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from research.flows.models import standard_normal_logp
from research.generative.likelihood import DIVERGENCES, SOLVERS, ode_log_likelihood
from research.generative.sampling.ode import ode

TRAIN_SOLVERS = ("heun", "euler")


def velocity_from_model(model_fn: Callable, params) -> Callable:
    """``v(x, t) = model_fn(params, x, t, None)`` (the codebase's model-call convention, e.g.
    ``research.nn.mlp.make_mlp_fn(ToyMLP(...))``)."""
    return lambda x, t: model_fn(params, x, t, None)


def _check_x(x, name):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be a floating array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [B, D], got shape {x.shape}")
    return x


def cnf_log_prob(velocity_fn: Callable, x, *, key=None, divergence: str = "exact", solver: str = "heun",
                 num_steps: int | None = 16, rtol: float = 1e-5, atol: float = 1e-5):
    """log p(x) [B] of the CNF with velocity ``velocity_fn(x, t)`` and a N(0, I) base at t = 1.

    Fixed-step solvers (heun, euler) take ``num_steps`` (and ``max_steps = num_steps``, the cheapest
    differentiable solve); adaptive ones (tsit5, dopri5) use rtol / atol. Hutchinson divergences
    ("rademacher", "gaussian") need ``key``. Returns ``(logp, aux)`` as ``ode_log_likelihood``."""
    x = _check_x(x, "cnf_log_prob")
    if divergence not in DIVERGENCES:
        raise ValueError(f"cnf_log_prob: unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if solver not in SOLVERS:
        raise ValueError(f"cnf_log_prob: unknown solver {solver!r}; expected one of {SOLVERS}")
    fixed = solver in TRAIN_SOLVERS
    if fixed and not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"cnf_log_prob: solver {solver!r} needs num_steps >= 1, got {num_steps!r}")
    return ode_log_likelihood(velocity_fn, x, prior_logp=standard_normal_logp, t_start=0.0, t_end=1.0,
                              divergence=divergence, key=key, solver=solver, rtol=rtol, atol=atol,
                              num_steps=num_steps if fixed else None, max_steps=num_steps if fixed else 4096)


def make_cnf_loss(model_fn: Callable, *, num_steps: int, solver: str = "heun", divergence: str = "exact",
                  data_key: str = "x"):
    """``loss_fn(params, batch, key) -> (mean NLL in nats, {"nll": ...})`` on ``batch[data_key]`` [B, D],
    for ``research.train.step.make_train_step``."""
    if solver not in TRAIN_SOLVERS:
        raise ValueError(f"make_cnf_loss: training needs a fixed-step solver {TRAIN_SOLVERS}, got {solver!r}")

    def loss_fn(params, batch, key):
        logp, _ = cnf_log_prob(velocity_from_model(model_fn, params), batch[data_key], key=key,
                               divergence=divergence, solver=solver, num_steps=num_steps)
        nll = -jnp.mean(logp)
        return nll, {"nll": nll}

    return loss_fn


def cnf_transform(velocity_fn: Callable, z, *, num_steps: int = 32, solver: str = "heun") -> jax.Array:
    """The generative direction: base points z [B, D] at t = 1 integrated to t = 0 with the fixed-step
    ``solver`` (euler | heun | rk4) in ``num_steps`` steps."""
    z = _check_x(z, "cnf_transform")
    return ode(velocity_fn, z, num_steps=num_steps, solver=solver, t_start=1.0, t_end=0.0)


def cnf_sample(velocity_fn: Callable, key, num_samples: int, dim: int, *, num_steps: int = 32,
               solver: str = "heun", temperature: float = 1.0) -> jax.Array:
    """Samples: z ~ N(0, temperature^2 I) [num_samples, dim] drawn from ``key``, then ``cnf_transform``."""
    if not (isinstance(num_samples, int) and num_samples >= 1 and isinstance(dim, int) and dim >= 1):
        raise ValueError(f"cnf_sample: num_samples and dim must be positive ints, got {num_samples!r}, {dim!r}")
    z = temperature * jax.random.normal(key, (num_samples, dim), jnp.float32)
    return cnf_transform(velocity_fn, z, num_steps=num_steps, solver=solver)
