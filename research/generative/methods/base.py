"""The method protocol: one small class per generative family behind the ``METHODS`` registry.

A method turns a raw network ``model_fn(params, x, t, cond, key) -> out`` into
  * a training objective   ``loss(model_fn, params, x0, key, *, cond=None) -> (loss, aux)``,
  * model views            ``denoiser(model_fn, params, cond)`` -> ``D(x, sigma)`` in EDM form
                           (``x / alpha = x0 + (sigma / alpha) eps``; drives every sigma-space
                           sampler of ``research.generative.sampling``), and
                           ``velocity(model_fn, params, cond)`` -> the probability-flow drift
                           ``v(x, t)`` in the method's own time (likelihood, time-space ODEs),
  * the prior              ``prior_sample(key, shape, dtype)``, ``prior_logp(z)``,
  * default grids          ``sigmas(num_steps, schedule=...)`` (sigma-space) and
                           ``time_grid(num_steps, grid=...)`` (time-space).
``sample(...)`` and ``log_likelihood(...)`` are written once here on top of those pieces, so a
new family implements the protocol and inherits sampling with every registered sampler.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from research.generative import sampling
from research.generative._util import bcast, normal
from research.generative.likelihood import ode_log_likelihood
from research.generative.parameterization import as_edm_denoiser
from research.generative.paths import GaussianPath

METHODS: dict[str, type["Method"]] = {}
SIGMA_SCHEDULES = {"karras": sampling.karras, "exponential": sampling.exponential,
                   "polyexponential": sampling.polyexponential}
TIME_GRIDS = ("uniform", "karras")


def make_sigmas(schedule: str, num_steps: int, *, sigma_min: float, sigma_max: float, **kw):
    """``num_steps + 1`` descending sigmas ending in 0 from a named schedule of ``sampling.schedules``."""
    if schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {schedule!r}; expected one of {sorted(SIGMA_SCHEDULES)}")
    return SIGMA_SCHEDULES[schedule](num_steps, sigma_min, sigma_max, **kw)


def register_method(name: str):
    """Class decorator: ``@register_method("vp")`` adds the class to ``METHODS`` under ``name``."""
    def add(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
        METHODS[name] = cls
        return cls

    return add


def get_method(name: str, **hparams) -> "Method":
    """The method registered as ``name`` with its hyper-parameters (unknown ones are an error)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(hparams) - fields)
    if bad:
        raise ValueError(f"method {name!r}: unknown hyper-parameter(s) {bad}; expected some of {sorted(fields)}")
    return cls(**hparams)


class Method(abc.ABC):
    """Protocol of a Gaussian-path generative method (see the module docstring).

    Subclasses are frozen dataclasses of plain hyper-parameters (hashable, so a method can be a
    static argument of ``jit``) and set ``name``, ``time`` ("t" or "sigma": the variable of
    ``velocity``), ``stochastic_ok`` (whether reverse-SDE samplers apply) and ``path``.
    """

    name: ClassVar[str] = "abstract"
    time: ClassVar[str] = "t"
    view_names: ClassVar[tuple[str, ...]] = ("velocity_fn",)  # what ``views`` returns
    default_time_grid: ClassVar[str] = "uniform"  # grid of the time-space samplers when none is given
    path: GaussianPath

    @classmethod
    def supports(cls, sampler: str) -> bool:
        """Whether the registered ``sampler`` applies: every sigma-space sampler does; a time-space one
        needs the model view named by its first parameter (e.g. ``score_fn`` for Euler-Maruyama)."""
        spec = sampling.get_spec(sampler)
        return spec.family == "sigma" or _view_of(spec) in cls.view_names

    # ---------------------------------------------------------------- the protocol
    @abc.abstractmethod
    def loss(self, model_fn: Callable, params, x0, key, *, cond=None):
        """(scalar loss, aux dict) of one batch ``x0 [B, ...]``."""

    @abc.abstractmethod
    def model_prediction(self) -> str:
        """What the (wrapped) network predicts on ``self.path``: "eps" | "x0" | "velocity" | "score"."""

    def path_model(self, model_fn: Callable, params, cond=None) -> Callable:
        """``(x_t, t) -> prediction`` on ``self.path`` (inference: dropout key None)."""
        return lambda x, t: model_fn(params, x, t, cond, None)

    @abc.abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) in EDM sigma = sigma(t) / alpha(t) of the default sampling interval."""

    def prior_std(self) -> float:
        """Std of the prior of x_t at the start of sampling (time ``t_start``)."""
        return 1.0

    @property
    def t_interval(self) -> tuple[float, float]:
        """(t_start, t_end) of time-space sampling and the likelihood ODE (noise side first)."""
        return self.path.t_start, self.path.t_end

    # ---------------------------------------------------------------- views
    def denoiser(self, model_fn: Callable, params, cond=None) -> Callable:
        """EDM denoiser ``D(x, sigma)`` with ``x = x_t / alpha(t)``, ``sigma = sigma(t) / alpha(t)``."""
        return as_edm_denoiser(self.path_model(model_fn, params, cond), self.path, src=self.model_prediction())

    def velocity(self, model_fn: Callable, params, cond=None) -> Callable:
        """Probability-flow ODE drift ``v(x_t, t) = alpha'(t) x0_hat + sigma'(t) eps_hat``."""
        from research.generative.parameterization import as_fn

        return as_fn(self.path_model(model_fn, params, cond), self.path, src=self.model_prediction(), dst="velocity")

    def prior_sample(self, key, shape, dtype=jnp.float32):
        return self.prior_std() * normal(key, tuple(shape), dtype)

    def prior_logp(self, z):
        from research.generative._util import normal_logp

        return normal_logp(z, self.prior_std())

    # ---------------------------------------------------------------- grids
    def sigmas(self, num_steps: int, schedule: str = "karras", **kw):
        """Descending EDM sigmas (num_steps + 1 entries ending in 0) for the sigma-space samplers."""
        lo, hi = self.sigma_range()
        return make_sigmas(schedule, num_steps, sigma_min=lo, sigma_max=hi, **kw)

    def time_grid(self, num_steps: int, grid: str = "uniform", dtype=jnp.float32):
        """Descending time grid (num_steps + 1 entries) from ``t_start`` to ``t_end``.

        ``"uniform"`` in t, or ``"karras"``: Karras' rho = 7 spacing of the EDM sigma mapped back to t."""
        t0, t1 = self.t_interval
        if grid == "uniform":
            return jnp.linspace(t0, t1, num_steps + 1, dtype=dtype)
        if grid != "karras":
            raise ValueError(f"time_grid: unknown grid {grid!r}; expected 'uniform' or 'karras'")
        with jax.ensure_compile_time_eval():
            s_hi, s_lo = (float(self.path.edm_sigma(jnp.asarray(t, dtype))) for t in (t0, t1))
        sig = sampling.karras(num_steps + 1, s_lo, s_hi, dtype=dtype)[:-1]
        ts = jnp.clip(self.path.t_from_edm_sigma(sig), min(t0, t1), max(t0, t1))
        return ts.at[0].set(t0).at[-1].set(t1)

    # ---------------------------------------------------------------- sampling
    def sample(self, model_fn: Callable, params, key, shape, *, sampler: str, num_steps: int, cond=None,
               schedule: str | None = None, dtype=jnp.float32, **options):
        """``(x0 [shape], nfe)``: draw from the prior and run the registered ``sampler``.

        Sigma-space samplers (``euler``, ``heun``, ``dpmpp_2m``, ``unipc``, ...) run on the EDM view
        over ``self.sigmas(num_steps, schedule or "karras")``; time-space samplers run on the
        method's own views over ``self.time_grid(num_steps, schedule or self.default_time_grid)``.
        ``options`` go to the sampler (e.g. ``s_churn=``, ``eta=``, ``solver=``).
        """
        spec = sampling.get_spec(sampler)
        k_prior, k_run = jax.random.split(key)
        x_t = self.prior_sample(k_prior, shape, dtype)
        if spec.family == "sigma":
            sig = self.sigmas(num_steps, schedule or "karras").astype(x_t.dtype)
            t0 = self.path.t_from_edm_sigma(sig[0])
            x_init = x_t / bcast(jnp.broadcast_to(self.path.alpha(t0), x_t.shape[:1]), x_t)
            return sampling.sample(sampler, self.denoiser(model_fn, params, cond), x_init, sigmas=sig,
                                   key=k_run, **options)
        if sampler == "ode_adaptive":
            t0, t1 = self.t_interval
            return self.sample_time(sampler, model_fn, params, x_t, key=k_run, cond=cond, t_start=t0, t_end=t1,
                                    **options)
        ts = self.time_grid(num_steps, schedule or self.default_time_grid, dtype=x_t.dtype)
        return self.sample_time(sampler, model_fn, params, x_t, ts=ts, key=k_run, cond=cond, **options)

    def views(self, model_fn: Callable, params, cond=None) -> dict:
        """The model views the time-space samplers take (keyed by their first parameter's name)."""
        return {"velocity_fn": self.velocity(model_fn, params, cond)}

    def sampler_context(self) -> dict:
        """Keyword options some time-space samplers need (``sde=``, ``path=``), offered when accepted."""
        return {"path": self.path}

    def sample_time(self, sampler: str, model_fn: Callable, params, x_init, *, key, cond=None, **options):
        """Runs a time-space sampler: the view it needs is named by its first parameter (``velocity_fn``,
        ``score_fn``, ``x0_eps_fn``); ``sde=``/``path=`` are passed when the sampler takes them."""
        spec = sampling.get_spec(sampler, "time")
        view = _view_of(spec)
        if view not in self.view_names:
            raise ValueError(f"sampler {sampler!r} needs the model view {view!r}, which method {self.name!r} does "
                             f"not provide (it offers {list(self.view_names)}); use a sigma-space sampler or 'ode'")
        views = self.views(model_fn, params, cond)
        extra = {k: v for k, v in self.sampler_context().items() if k in spec.options and k not in options}
        return sampling.sample_time(sampler, views[view], x_init, key=key, **extra, **options)

    # ---------------------------------------------------------------- likelihood
    def likelihood_interval(self) -> tuple[float, float]:
        """(data-side t, prior-side t) of the likelihood ODE."""
        t0, t1 = self.t_interval
        return t1, t0

    def log_likelihood(self, model_fn: Callable, params, x, *, key=None, divergence: str = "exact", cond=None,
                       rtol: float = 1e-5, atol: float = 1e-5):
        """log p(x) per example through the PF-ODE from the data side to the prior side; (logp, aux)."""
        t_data, t_prior = self.likelihood_interval()
        return ode_log_likelihood(self.velocity(model_fn, params, cond), x, prior_logp=self.prior_logp,
                                  t_start=t_data, t_end=t_prior, divergence=divergence, key=key, rtol=rtol,
                                  atol=atol)



def _view_of(spec) -> str:
    """The model view a time-space sampler takes: the name of its first parameter."""
    return next(iter(inspect.signature(spec.fn).parameters))
