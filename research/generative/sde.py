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
Dtypes: everything is computed in the common floating dtype of x and t (float32 at least), so
float64 inputs under ``jax_enable_x64`` run in float64; ``prior_sample(key, shape, dtype=None)``
draws float32 unless asked otherwise.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from research.generative._util import as_float, bcast, float_dtype, normal, normal_logp, tvec, widest_float
from research.generative.paths import GaussianPath, SubVPPath, VEPath, VPLinearPath


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
        t = tvec(x, t)
        return bcast(self.drift_coef(t), x) * x, self.diffusion_coef(t)

    def marginal_prob(self, x, t):
        """(mean [B, ...], std [B]) of p_t(x_t | x_0 = x)."""
        t = tvec(x, t)
        return bcast(self.path.alpha(t), x) * x, self.path.sigma(t)

    prior_std: float = 1.0

    def prior_sample(self, key, shape, dtype=None):
        """x ~ N(0, prior_std^2 I) of ``shape`` in ``dtype`` (float32 by default)."""
        return normal(key, shape, dtype) * self.prior_std

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per example, summed over non-batch dims (in z's dtype)."""
        return normal_logp(z, self.prior_std)

    def discretize(self, x, t, t_prev):
        """(f, G) of the forward step from ``t_prev`` to ``t`` (t_prev < t), coefficients at t:
        x_t = x_{t_prev} + f + G z (score_sde's ``discretize``).

        Default: Euler-Maruyama, f = f(x, t) dt, G = g(t) sqrt(dt), dt = t - t_prev."""
        dtype = float_dtype(x, t, t_prev)
        drift, diffusion = self.sde(x, tvec(x, t, dtype))
        dt = tvec(x, t, dtype) - tvec(x, t_prev, dtype)
        return drift * bcast(dt, x), diffusion * jnp.sqrt(dt)

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
        t = tvec(x, t)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        w = 0.5 if self.probability_flow else 1.0
        drift = drift - bcast(diffusion ** 2, x) * score * w
        return drift, (jnp.zeros_like(diffusion) if self.probability_flow else diffusion)

    def discretize(self, x, t, t_prev):
        """Reverse-diffusion predictor step from t to t_prev < t: x_{t_prev} = x - rev_f + rev_G z."""
        t = tvec(x, t, float_dtype(x, t, t_prev))
        f, G = self.forward.discretize(x, t, t_prev)
        w = 0.5 if self.probability_flow else 1.0
        rev_f = f - bcast(G ** 2, x) * self.score_fn(x, t) * w
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
        t = tvec(x, t, float_dtype(x, t, t_prev))
        beta_i = self.path.beta(t) * (t - tvec(x, t_prev, t.dtype))
        return bcast(jnp.sqrt(1.0 - beta_i), x) * x - x, jnp.sqrt(beta_i)

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
        self.prior_std = float(sigma_max)

    def drift_coef(self, t):
        return jnp.zeros_like(as_float(t))

    def diffusion_coef(self, t):
        return self.path.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def discretize(self, x, t, t_prev):
        """SMLD step: f = 0, G = sqrt(sigma(t)^2 - sigma(t_prev)^2)."""
        dtype = float_dtype(x, t, t_prev)
        s_hi = self.path.sigma(tvec(x, t, dtype))
        s_lo = self.path.sigma(tvec(x, t_prev, dtype))
        return jnp.zeros_like(x), jnp.sqrt(jnp.clip(s_hi ** 2 - s_lo ** 2, 0.0, None))

    def langevin_alpha(self, t, dt):
        return jnp.ones_like(as_float(t))


class PathSDE(SDE):
    """The linear SDE whose perturbation kernel is a given Gaussian path (f, g from alpha, sigma).

    Its prior is N(0, sigma(1)^2 I) scaled like the path's endpoint (N(0, I) for rectified flow,
    cosine); use ``prior_std`` to override (EDM: t_start = 80).
    """

    def __init__(self, path: GaussianPath, *, T: float | None = None, prior_std: float | None = None):
        self.path = path
        self.T = float(path.t_start if T is None else T)
        if not self.T > 0:
            raise ValueError(f"PathSDE: T must be > 0, got T={self.T}")
        if prior_std is None:
            # sigma(T) at the widest precision available (float64 under x64), kept as a Python float
            prior_std = float(path.sigma(jnp.asarray(self.T, widest_float())))
        self.prior_std = float(prior_std)
        if not self.prior_std > 0:
            raise ValueError(f"PathSDE: prior_std must be > 0, got prior_std={self.prior_std}")

    def langevin_alpha(self, t, dt):
        return jnp.ones_like(as_float(t))


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "sub_vp": SubVPSDE, "ve": VESDE}


def get_sde(name: str, **kwargs) -> SDE:
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; expected one of {sorted(SDES)}")
    return SDES[name](**kwargs)
