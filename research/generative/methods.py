"""Name-keyed generative methods: one object per method bundling its loss, probability-flow ODE,
samplers and likelihood, so experiments can loop over methods with one code path.

    m = make_method("vp")                  # "vp" | "subvp" | "ve" | "edm" | "rf" | "icfm" | "otcfm"
    loss, aux = m.loss(model_fn, params, x0, key, cond=None)
    x, nfe = m.sample_ode(model_fn, params, key, shape, num_steps=50, solver="heun", cond=None)
    x, nfe = m.sample_sde(model_fn, params, key, shape, num_steps=500, cond=None)   # not for flows
    logp, aux = m.log_likelihood(model_fn, params, x, key=key, divergence="exact")

Conventions: ``model_fn(params, x, t, cond, key)``; score-SDE methods predict epsilon at time t,
by default through the preconditioning ``eps_hat = c_skip x_t + c_out F(c_in x_t, t)``
(``sde_precond="edm"``, research.generative.parameterization.eps_precond, with ``sigma_data``) or
raw, ``eps_hat = F(x_t, t)`` (``sde_precond="none"``, score_sde's networks); ``Method.eps_model``
gives the epsilon predictor either way, and the loss (DSM) and all samplers go through it.
EDM's network F is preconditioned (c_in, c_out, c_skip, c_noise) and works in sigma; flow methods
predict the velocity at t.

Why the preconditioning is the default: with a raw epsilon network the probability-flow ODE of the
VP / sub-VP SDE needs epsilon to an absolute accuracy far below what the DSM loss rewards near
t = 1 (there eps ~= x_t / sigma and the data enter only through alpha(t) ~ 0.007; x0_hat's error is
(sigma / alpha) times eps's error). Measured on eight Gaussians (3 x 256 MLP, 3000 steps): raw eps
leaves a mean-square eps error of ~0.013 at t >= 0.7 against the exact mixture score (at t >= 0.9
20-200x the mean-square of the part of eps that depends on the data), and the PF-ODE samples are poor (SW2 0.25) while
Euler-Maruyama is fine (0.07) -- the reverse SDE's noise washes out errors made at high noise, the
ODE transports them. Preconditioned, the same budget gives eps error < 1e-4 there and PF-ODE SW2 0.09;
the exact mixture score gives 0.07 with every sampler (tests/test_pf_ode_mixture.py).

For CFG pass ``samplers.guided_model_fn(model_fn, null, w)`` as
``model_fn`` (affine in the output, so it applies to every method and sampler).

ODE time: SDE methods integrate t from 1 to ``t_eps`` (uniform grid), EDM integrates sigma from
sigma_max to 0 on Karras' rho = 7 grid (``edm_sample`` for Heun: NFE 2N - 1), flows t from 1 to 0.
NFE of ``sample_ode``: euler N, heun 2N (EDM 2N - 1), rk4 4N. ``sample_sde``: Euler-Maruyama N,
predictor-corrector N (1 + n_corrector), EDM churn 2N - 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from research.generative import losses as L
from research.generative.edm import karras_sigmas, make_edm_denoiser
from research.generative.likelihood import ode_log_likelihood
from research.generative.parameterization import convert, preconditioned_eps_model
from research.generative.samplers import edm_sample, euler_maruyama_sample, pc_sample, pf_ode_velocity
from research.generative.sde import SubVPSDE, VESDE, VPSDE
from research.generative.solvers import NFE_PER_STEP, integrate_grid

METHODS = ("vp", "subvp", "ve", "edm", "rf", "icfm", "otcfm")
SDE_PRECONDS = ("none", "edm")


def _std_normal_logp(z):
    d = math.prod(z.shape[1:])
    return -0.5 * d * math.log(2 * math.pi) - 0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "sde" | "edm" | "flow"
    hparams: dict

    # ---------------------------------------------------------------- model views
    def velocity(self, model_fn: Callable, params, cond=None) -> Callable:
        """PF-ODE drift v(x, t) in the method's own time variable (sigma for EDM)."""
        if self.kind == "flow":
            return lambda x, t: model_fn(params, x, t, cond, None).astype(jnp.float32)
        if self.kind == "edm":
            den = self.denoiser(model_fn, params, cond)
            return lambda x, s: (x - den(x, s)) / s.reshape(s.shape + (1,) * (x.ndim - 1))
        return pf_ode_velocity(self.sde, self.score(model_fn, params, cond))

    def eps_model(self, model_fn: Callable) -> Callable:
        """SDE methods: the epsilon predictor ``(params, x, t, cond, key) -> eps_hat`` of a raw network
        (``precond="none"``: the network output itself; ``"edm"``: ``preconditioned_eps_model``)."""
        h = self.hparams
        if self.kind != "sde":
            raise ValueError(f"method {self.name!r} has no epsilon model")
        if h["precond"] == "edm":
            return preconditioned_eps_model(model_fn, h["sde"].path, h["sigma_data"])
        return model_fn

    def score(self, model_fn, params, cond=None):
        path, eps_fn = self.sde.path, self.eps_model(model_fn)
        return lambda x, t: convert(path, eps_fn(params, x, t, cond, None), x, t, src="eps", dst="score")

    def denoiser(self, model_fn, params, cond=None):
        return make_edm_denoiser(model_fn, params, cond, sigma_data=self.hparams["sigma_data"])

    @property
    def sde(self):
        if self.kind != "sde":
            raise ValueError(f"method {self.name!r} has no score SDE")
        return self.hparams["sde"]

    # ---------------------------------------------------------------- training
    def loss(self, model_fn, params, x0, key, cond=None):
        h = self.hparams
        if self.kind == "sde":
            return L.dsm_loss(self.eps_model(model_fn), params, x0, key, sde=h["sde"], cond=cond, t_min=h["t_min"],
                              likelihood_weighting=h["likelihood_weighting"])
        if self.kind == "edm":
            return L.edm_loss(model_fn, params, x0, key, cond=cond, sigma_data=h["sigma_data"], P_mean=h["P_mean"],
                              P_std=h["P_std"])
        if self.name == "rf":
            k1, k2 = jax.random.split(key)
            x1 = jax.random.normal(k1, x0.shape, jnp.float32)
            return L.pair_flow_loss(model_fn, params, x0, x1, k2, cond=cond, timestep_dist=h["timestep_dist"])
        return L.cfm_loss(model_fn, params, x0, key, cond=cond, sigma=h["sigma"], timestep_dist=h["timestep_dist"],
                          coupling="ot" if self.name == "otcfm" else "independent")

    # ---------------------------------------------------------------- sampling
    @property
    def ode_interval(self):
        """(t_start, t_end) of the probability-flow ODE used for sampling and likelihood."""
        h = self.hparams
        if self.kind == "sde":
            return 1.0, h["t_eps"]
        if self.kind == "edm":
            return h["sigma_max"], 0.0
        return 1.0, 0.0

    def prior_sample(self, key, shape):
        if self.kind == "sde":
            return self.sde.prior_sample(key, shape)
        if self.kind == "edm":
            return self.hparams["sigma_max"] * jax.random.normal(key, shape, jnp.float32)
        return jax.random.normal(key, shape, jnp.float32)

    def prior_logp(self, z):
        if self.kind == "sde":
            return self.sde.prior_logp(z)
        if self.kind == "edm":
            s = self.hparams["sigma_max"]
            return _std_normal_logp(z / s) - math.prod(z.shape[1:]) * math.log(s)
        return _std_normal_logp(z)

    def time_grid(self, num_steps: int, grid: str = "uniform"):
        """ODE time grid. EDM: Karras' sigmas. Others: ``grid="uniform"`` in t, or ``"karras"``: Karras'
        rho = 7 spacing of the path's EDM sigma (sigma/alpha) mapped back to t (SDE methods only)."""
        t0, t1 = self.ode_interval
        if self.kind == "edm":
            return karras_sigmas(num_steps, sigma_min=self.hparams["sigma_min"], sigma_max=t0)
        if grid == "karras":
            if self.kind != "sde":
                raise ValueError("time_grid: grid='karras' is for SDE methods")
            path = self.sde.path
            with jax.ensure_compile_time_eval():
                s_hi, s_lo = (float(path.edm_sigma(jnp.float32(t))) for t in (t0, t1))
            sig = karras_sigmas(num_steps + 1, sigma_min=s_lo, sigma_max=s_hi)[:-1]
            return jnp.clip(path.t_from_edm_sigma(sig), t1, t0).at[0].set(t0).at[-1].set(t1)
        if grid != "uniform":
            raise ValueError(f"time_grid: unknown grid {grid!r}; expected 'uniform' or 'karras'")
        return jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)

    def sample_ode(self, model_fn, params, key, shape, *, num_steps: int, solver: str = "heun", cond=None,
                   grid: str = "uniform"):
        """(x, nfe): deterministic sampling with the probability-flow ODE (``grid``: see ``time_grid``)."""
        if solver not in NFE_PER_STEP:
            raise ValueError(f"sample_ode: unknown solver {solver!r}; expected one of {tuple(NFE_PER_STEP)}")
        x = self.prior_sample(key, shape)
        if self.kind == "edm" and solver == "heun":
            h = self.hparams
            out = edm_sample(self.denoiser(model_fn, params, cond), x / h["sigma_max"], num_steps=num_steps,
                             sigma_min=h["sigma_min"], sigma_max=h["sigma_max"])
            return out, 2 * num_steps - 1
        v = self.velocity(model_fn, params, cond)
        ts = self.time_grid(num_steps, grid)
        if self.kind == "edm":  # never evaluate at sigma = 0: the last interval is an Euler step for every solver
            x = integrate_grid(v, x, ts[:-1], method=solver) if num_steps > 1 else x
            x = integrate_grid(v, x, ts[-2:], method="euler")
            return x, NFE_PER_STEP[solver] * (num_steps - 1) + 1
        return integrate_grid(v, x, ts, method=solver), NFE_PER_STEP[solver] * num_steps

    def sample_sde(self, model_fn, params, key, shape, *, num_steps: int, cond=None, corrector: str = "none",
                   snr: float = 0.16, S_churn: float = 30.0):
        """(x, nfe): stochastic sampling. SDE methods: Euler-Maruyama (corrector="none") or reverse-diffusion
        predictor + Langevin corrector (corrector="langevin"); EDM: Algorithm 2 with churn."""
        k_prior, k_noise = jax.random.split(key)
        if self.kind == "flow":
            raise ValueError(f"method {self.name!r} is a deterministic flow; use sample_ode")
        if self.kind == "edm":
            h = self.hparams
            out = edm_sample(self.denoiser(model_fn, params, cond), jax.random.normal(k_prior, shape, jnp.float32),
                             num_steps=num_steps, sigma_min=h["sigma_min"], sigma_max=h["sigma_max"],
                             S_churn=S_churn, S_min=0.01, S_max=h["sigma_max"], S_noise=1.0, key=k_noise)
            return out, 2 * num_steps - 1
        x = self.prior_sample(k_prior, shape)
        score = self.score(model_fn, params, cond)
        t_end = self.hparams["t_eps"]
        if corrector == "none":
            return euler_maruyama_sample(self.sde, score, x, k_noise, num_steps=num_steps, t_end=t_end), num_steps
        out = pc_sample(self.sde, score, x, k_noise, num_steps=num_steps, corrector=corrector, snr=snr, t_end=t_end)
        return out, 2 * num_steps

    # ---------------------------------------------------------------- likelihood
    def log_likelihood(self, model_fn, params, x, *, key=None, divergence: str = "exact", cond=None,
                       rtol: float = 1e-5, atol: float = 1e-5):
        """log p(x) per example through the PF-ODE (data side t_end -> prior side t_start)."""
        t_start, t_end = self.ode_interval
        if self.kind == "edm":
            t_end = self.hparams["sigma_min"]
        return ode_log_likelihood(self.velocity(model_fn, params, cond), x, prior_logp=self.prior_logp, t0=t_end,
                                  t1=t_start, divergence=divergence, key=key, rtol=rtol, atol=atol)


def make_method(name: str, *, sigma_data: float = 0.5, beta_min: float = 0.1, beta_max: float = 20.0,
                ve_sigma_min: float = 0.01, ve_sigma_max: float = 50.0, t_eps: float = 1e-3, t_min: float = 1e-5,
                likelihood_weighting: bool = False, sde_precond: str = "edm", edm_sigma_min: float = 0.002, edm_sigma_max: float = 80.0,
                P_mean: float = -1.2, P_std: float = 1.2, cfm_sigma: float = 0.1,
                timestep_dist: str = "uniform") -> Method:
    """Builds a ``Method`` by name with explicit hyper-parameters (see module docstring)."""
    if name in ("vp", "subvp", "ve"):
        sde = {"vp": lambda: VPSDE(beta_min, beta_max), "subvp": lambda: SubVPSDE(beta_min, beta_max),
               "ve": lambda: VESDE(ve_sigma_min, ve_sigma_max)}[name]()
        if sde_precond not in SDE_PRECONDS:
            raise ValueError(f"make_method: unknown sde_precond {sde_precond!r}; expected one of {SDE_PRECONDS}")
        if sde_precond == "edm" and not sigma_data > 0:
            raise ValueError(f"make_method: sde_precond='edm' needs sigma_data > 0, got {sigma_data}")
        return Method(name, "sde", {"sde": sde, "t_eps": t_eps if name != "ve" else min(t_eps, 1e-5),
                                    "t_min": t_min, "likelihood_weighting": likelihood_weighting,
                                    "precond": sde_precond, "sigma_data": sigma_data})
    if name == "edm":
        return Method(name, "edm", {"sigma_data": sigma_data, "sigma_min": edm_sigma_min, "sigma_max": edm_sigma_max,
                                    "P_mean": P_mean, "P_std": P_std})
    if name in ("rf", "icfm", "otcfm"):
        return Method(name, "flow", {"sigma": 0.0 if name == "rf" else cfm_sigma, "timestep_dist": timestep_dist})
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
