"""Gaussian probability paths x_t = alpha(t) x_0 + sigma(t) eps (data at t = 0, noise at t = 1).

Every path is a frozen dataclass (hashable, so it can be a static jit argument; hyper-parameters
are Python floats, checked when the path is built) with
  * ``alpha(t)``, ``sigma(t)`` and their time derivatives ``d_alpha(t)``, ``d_sigma(t)``
    (closed forms; tests compare them with autodiff),
  * ``edm_sigma(t) = sigma / alpha`` (the noise level of x_t / alpha in EDM's sense) and its
    inverse ``t_from_edm_sigma`` -- so any model can be sampled with ``edm_sample``,
  * ``t_start`` / ``t_end``: the default sampling interval (the score is singular at t = 0 for
    VP-type paths, the x_0 conversion is singular at t = 1 for the cosine path).
Every method evaluates in t's floating dtype (float32 at least): float64 t under ``jax_enable_x64``
gives float64 schedules, the Python-float hyper-parameters are weakly typed and never round t.

Paths (registry ``PATHS`` / ``get_path(name, **kw)``):
  rectified_flow (alias cond_ot): alpha = 1 - t, sigma = t
  vp_linear:  alpha = exp(-1/4 t^2 (b1 - b0) - 1/2 t b0), sigma = sqrt(1 - alpha^2)  (DDPM / VP-SDE)
  vp_cosine:  alpha = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)), sigma = sqrt(1 - alpha^2)
  ve:         alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t                    (SMLD / VE-SDE)
  sub_vp:     alpha = VP alpha, sigma = 1 - alpha^2                                      (sub-VP SDE)
  edm:        alpha = 1, sigma = t  (t is EDM's sigma; t_start = 80, t_end = 0.002)
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from research.generative._util import as_float, bcast, float_dtype



class GaussianPath:
    """Interface; subclasses define alpha, sigma, d_alpha, d_sigma, t_from_edm_sigma."""

    name: str = "abstract"
    t_start: float = 1.0
    t_end: float = 0.0

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    def edm_sigma(self, t):
        """sigma(t) / alpha(t): x_t / alpha(t) = x_0 + edm_sigma * eps."""
        return self.sigma(t) / self.alpha(t)

    def t_from_edm_sigma(self, s):
        raise NotImplementedError

    def marginal(self, x0, eps, t):
        """x_t for x0, eps [B, ...] and t [B] (in the common floating dtype of the three)."""
        t = as_float(t, float_dtype(x0, eps, t))
        a, s = self.alpha(t), self.sigma(t)
        return bcast(a, x0) * x0 + bcast(s, x0) * eps

    def velocity_target(self, x0, eps, t):
        """Conditional velocity d x_t / dt = alpha'(t) x0 + sigma'(t) eps."""
        t = as_float(t, float_dtype(x0, eps, t))
        return bcast(self.d_alpha(t), x0) * x0 + bcast(self.d_sigma(t), x0) * eps


@dataclasses.dataclass(frozen=True)
class RectifiedFlowPath(GaussianPath):
    name: str = "rectified_flow"
    t_start: float = 1.0
    t_end: float = 0.0

    def alpha(self, t):
        return 1.0 - as_float(t)

    def sigma(self, t):
        return as_float(t)

    def d_alpha(self, t):
        return -jnp.ones_like(as_float(t))

    def d_sigma(self, t):
        return jnp.ones_like(as_float(t))

    def t_from_edm_sigma(self, s):
        s = as_float(s)
        return s / (1.0 + s)


@dataclasses.dataclass(frozen=True)
class VPLinearPath(GaussianPath):
    beta_min: float = 0.1
    beta_max: float = 20.0
    name: str = "vp_linear"
    t_start: float = 1.0
    t_end: float = 1e-3

    def __post_init__(self):
        if not (0 <= self.beta_min <= self.beta_max and self.beta_max > 0):
            raise ValueError(f"{type(self).__name__}: need 0 <= beta_min <= beta_max, beta_max > 0; got "
                             f"beta_min={self.beta_min}, beta_max={self.beta_max}")

    def log_alpha(self, t):
        t = as_float(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t):
        return self.beta_min + as_float(t) * (self.beta_max - self.beta_min)

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  ->  sigma' = -alpha alpha' / sigma = beta alpha^2 / (2 sigma)
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def _t_from_log_alpha(self, log_a):
        # solve 1/4 d t^2 + 1/2 b0 t + log_a = 0 for t >= 0
        d = self.beta_max - self.beta_min
        c = -log_a
        if d == 0:
            return 2.0 * c / self.beta_min
        return (-0.5 * self.beta_min + jnp.sqrt(0.25 * self.beta_min ** 2 + d * c)) / (0.5 * d)

    def t_from_edm_sigma(self, s):
        s = as_float(s)
        return self._t_from_log_alpha(-0.5 * jnp.log1p(s ** 2))


@dataclasses.dataclass(frozen=True)
class VPCosinePath(GaussianPath):
    s: float = 0.008
    name: str = "vp_cosine"
    t_start: float = 0.999
    t_end: float = 0.0

    def __post_init__(self):
        if not 0 <= self.s < 1:
            raise ValueError(f"VPCosinePath: offset s must be in [0, 1), got s={self.s}")

    def _phase(self, t):
        return 0.5 * math.pi * (as_float(t) + self.s) / (1.0 + self.s)

    @property
    def _c0(self):
        return math.cos(0.5 * math.pi * self.s / (1.0 + self.s))

    def alpha(self, t):
        return jnp.cos(self._phase(t)) / self._c0

    def sigma(self, t):
        return jnp.sqrt(jnp.clip(1.0 - self.alpha(t) ** 2, 0.0, None))

    def d_alpha(self, t):
        return -jnp.sin(self._phase(t)) * (0.5 * math.pi / (1.0 + self.s)) / self._c0

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_edm_sigma(self, s):
        a = 1.0 / jnp.sqrt(1.0 + as_float(s) ** 2)
        return jnp.arccos(a * self._c0) * (1.0 + self.s) / (0.5 * math.pi) - self.s


@dataclasses.dataclass(frozen=True)
class VEPath(GaussianPath):
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    name: str = "ve"
    t_start: float = 1.0
    t_end: float = 1e-5

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VEPath: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")

    def alpha(self, t):
        return jnp.ones_like(as_float(t))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** as_float(t)

    def d_alpha(self, t):
        return jnp.zeros_like(as_float(t))

    def d_sigma(self, t):
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def t_from_edm_sigma(self, s):
        return jnp.log(as_float(s) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class SubVPPath(VPLinearPath):
    name: str = "sub_vp"
    t_start: float = 1.0
    t_end: float = 1e-3

    def sigma(self, t):
        return -jnp.expm1(2.0 * self.log_alpha(t))

    def d_sigma(self, t):
        # sigma = 1 - alpha^2 -> sigma' = -2 alpha alpha' = beta alpha^2
        return self.beta(t) * self.alpha(t) ** 2

    def t_from_edm_sigma(self, s):
        # (1 - a^2) / a = s  ->  a = (sqrt(s^2 + 4) - s) / 2
        s = as_float(s)
        a = 2.0 / (jnp.sqrt(s ** 2 + 4.0) + s)
        return self._t_from_log_alpha(jnp.log(a))


@dataclasses.dataclass(frozen=True)
class EDMPath(GaussianPath):
    name: str = "edm"
    t_start: float = 80.0
    t_end: float = 0.002

    def alpha(self, t):
        return jnp.ones_like(as_float(t))

    def sigma(self, t):
        return as_float(t)

    def d_alpha(self, t):
        return jnp.zeros_like(as_float(t))

    def d_sigma(self, t):
        return jnp.ones_like(as_float(t))

    def t_from_edm_sigma(self, s):
        return as_float(s)


PATHS = {
    "rectified_flow": RectifiedFlowPath,
    "cond_ot": RectifiedFlowPath,
    "vp_linear": VPLinearPath,
    "vp_cosine": VPCosinePath,
    "ve": VEPath,
    "sub_vp": SubVPPath,
    "edm": EDMPath,
}


def get_path(name: str, **kwargs) -> GaussianPath:
    """Path by registry name; kwargs go to the dataclass (e.g. beta_min, sigma_max)."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)}")
    try:
        return PATHS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"get_path({name!r}): bad arguments {kwargs}: {e}") from None
