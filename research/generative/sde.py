"""Score SDEs with score_sde semantics (Song et al. 2021); data at t = 0, prior at t = T = 1.

Forward SDE dx = f(x, t) dt + g(t) dw with linear drift f(x, t) = f(t) x. Its Gaussian
perturbation kernel p_t(x_t | x_0) = N(mean(t) x_0, std(t)^2 I) satisfies the moment equations
    d mean / dt = f(t) mean,   d var / dt = 2 f(t) var + g(t)^2.
Reverse SDE dx = [f - g^2 score] dt + g dw_bar; probability-flow ODE dx = [f - g^2 score / 2] dt.

Classes (``.sde``, ``.marginal_prob``, ``.prior_sample``, ``.prior_logp``, ``.reverse``,
``.discretize``, ``.path``):
  VPSDE(beta_min=0.1, beta_max=20.0), SubVPSDE(beta_min=0.1, beta_max=20.0),
  VESDE(sigma_min=0.01, sigma_max=50.0) -- closed forms, and
  PathSDE(path) -- the SDE with the marginals of any Gaussian path (rectified flow, cosine,
  EDM, ...): f = alpha'/alpha, g^2 = (sigma^2)' - 2 f sigma^2.
``score_fn(x, t) -> score`` everywhere, with x [B, ...] and t [B].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from research.generative.paths import GaussianPath, SubVPPath, VEPath, VPLinearPath, _bc


def _tvec(x, t):
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))


class SDE:
    """Base class: linear-drift SDE with a Gaussian path. Subclasses set ``self.path``."""

    T: float = 1.0
    path: GaussianPath

    # --- scalar coefficient functions of t [B] -------------------------------------------------
    def drift_coef(self, t):
        """f(t) with drift f(t) x."""
        return self.path.d_alpha(t) / self.path.alpha(t)

    def diffusion_coef(self, t):
        """g(t)."""
        s = self.path.sigma(t)
        g2 = 2.0 * s * self.path.d_sigma(t) - 2.0 * self.drift_coef(t) * s ** 2
        return jnp.sqrt(jnp.clip(g2, 0.0, None))

    # --- score_sde interface -------------------------------------------------------------------
    def sde(self, x, t):
        """(drift [B, ...], diffusion [B]) of the forward SDE."""
        t = _tvec(x, t)
        return _bc(self.drift_coef(t), x) * x, self.diffusion_coef(t)

    def marginal_prob(self, x, t):
        """(mean [B, ...], std [B]) of p_t(x_t | x_0 = x)."""
        t = _tvec(x, t)
        return _bc(self.path.alpha(t), x) * x, self.path.sigma(t)

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape, jnp.float32)

    def prior_logp(self, z):
        """log N(z; 0, I) per example, summed over non-batch dims."""
        d = math.prod(z.shape[1:])
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)

    def discretize(self, x, t, t_prev):
        """(f, G) of the forward step from ``t_prev`` to ``t`` (t_prev < t), coefficients at t:
        x_t = x_{t_prev} + f + G z (score_sde's ``discretize``).

        Default: Euler-Maruyama, f = f(x, t) dt, G = g(t) sqrt(dt), dt = t - t_prev."""
        drift, diffusion = self.sde(x, t)
        dt = _tvec(x, t) - _tvec(x, t_prev)
        return drift * _bc(dt, x), diffusion * jnp.sqrt(dt)

    def reverse(self, score_fn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time SDE (or probability-flow ODE when ``probability_flow``) of a forward SDE."""

    def __init__(self, forward: SDE, score_fn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.T = forward.T

    def sde(self, x, t):
        """(drift, diffusion) in forward time: integrate with dt < 0. Diffusion is 0 for the ODE."""
        t = _tvec(x, t)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        w = 0.5 if self.probability_flow else 1.0
        drift = drift - _bc(diffusion ** 2, x) * score * w
        return drift, (jnp.zeros_like(diffusion) if self.probability_flow else diffusion)

    def discretize(self, x, t, t_prev):
        """Reverse-diffusion predictor step from t to t_prev < t: x_{t_prev} = x - rev_f + rev_G z."""
        t = _tvec(x, t)
        f, G = self.forward.discretize(x, t, t_prev)
        w = 0.5 if self.probability_flow else 1.0
        rev_f = f - _bc(G ** 2, x) * self.score_fn(x, t) * w
        return rev_f, (jnp.zeros_like(G) if self.probability_flow else G)


class VPSDE(SDE):
    """Variance-preserving SDE: dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta linear."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"VPSDE: need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.path = VPLinearPath(beta_min=beta_min, beta_max=beta_max)

    def drift_coef(self, t):
        return -0.5 * self.path.beta(t)

    def diffusion_coef(self, t):
        return jnp.sqrt(self.path.beta(t))

    def discretize(self, x, t, t_prev):
        """DDPM ancestral step (score_sde's VPSDE.discretize with beta_i = beta(t) (t - t_prev))."""
        t = _tvec(x, t)
        beta_i = self.path.beta(t) * (t - _tvec(x, t_prev))
        return _bc(jnp.sqrt(1.0 - beta_i), x) * x - x, jnp.sqrt(beta_i)

    def langevin_alpha(self, t, dt):
        """score_sde's corrector step-size factor alpha_i = 1 - beta_i, beta_i = beta(t) dt."""
        return 1.0 - self.path.beta(t) * dt


class SubVPSDE(SDE):
    """sub-VP SDE: dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dw."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"SubVPSDE: need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.path = SubVPPath(beta_min=beta_min, beta_max=beta_max)

    def drift_coef(self, t):
        return -0.5 * self.path.beta(t)

    def diffusion_coef(self, t):
        discount = -jnp.expm1(4.0 * self.path.log_alpha(t))  # 1 - exp(-2 int beta)
        return jnp.sqrt(self.path.beta(t) * discount)

    def langevin_alpha(self, t, dt):
        return 1.0 - self.path.beta(t) * dt


class VESDE(SDE):
    """Variance-exploding SDE: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.path = VEPath(sigma_min=sigma_min, sigma_max=sigma_max)

    def drift_coef(self, t):
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def diffusion_coef(self, t):
        return self.path.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape, jnp.float32) * self.sigma_max

    def prior_logp(self, z):
        d = math.prod(z.shape[1:])
        sq = jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)
        return -0.5 * d * math.log(2 * math.pi * self.sigma_max ** 2) - 0.5 * sq / self.sigma_max ** 2

    def discretize(self, x, t, t_prev):
        """SMLD step: f = 0, G = sqrt(sigma(t)^2 - sigma(t_prev)^2)."""
        s_hi = self.path.sigma(_tvec(x, t))
        s_lo = self.path.sigma(_tvec(x, t_prev))
        return jnp.zeros_like(x), jnp.sqrt(jnp.clip(s_hi ** 2 - s_lo ** 2, 0.0, None))

    def langevin_alpha(self, t, dt):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))


class PathSDE(SDE):
    """The linear SDE whose perturbation kernel is a given Gaussian path (f, g from alpha, sigma).

    Its prior is N(0, sigma(1)^2 I) scaled like the path's endpoint (N(0, I) for rectified flow,
    cosine); use ``prior_std`` to override (EDM: t_start = 80).
    """

    def __init__(self, path: GaussianPath, *, T: float | None = None, prior_std: float | None = None):
        self.path = path
        self.T = float(path.t_start if T is None else T)
        self.prior_std = float(path.sigma(self.T)) if prior_std is None else float(prior_std)

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape, jnp.float32) * self.prior_std

    def prior_logp(self, z):
        d = math.prod(z.shape[1:])
        sq = jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)
        return -0.5 * d * math.log(2 * math.pi * self.prior_std ** 2) - 0.5 * sq / self.prior_std ** 2

    def langevin_alpha(self, t, dt):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "sub_vp": SubVPSDE, "ve": VESDE}


def get_sde(name: str, **kwargs) -> SDE:
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; expected one of {sorted(SDES)}")
    return SDES[name](**kwargs)
