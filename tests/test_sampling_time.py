"""Time-space samplers (score SDEs, DDIM, ODEs) against closed forms and one-step formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative._util import bcast
from research.generative.paths import get_path
from research.generative.sampling import langevin_correct, pf_ode_velocity, sample_time
from research.generative.sde import SubVPSDE, VESDE, VPSDE
from tests.gaussian_oracle import moments_ok, GaussianOracle

MU = np.array([1.0, -0.5], np.float32)
S0 = 0.5
N = 2000
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=50.0)}
MU_OT, S0_OT = 1.0, 1.5


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.PRNGKey(0), (N, 2), jnp.float32)


_moments_ok = moments_ok


def _condot_velocity(x, t):
    """Exact marginal velocity of rectified flow from N(MU_OT, S0_OT^2) data (closed form)."""
    t = t[:, None]
    sd = jnp.sqrt((1 - t) ** 2 * S0_OT ** 2 + t ** 2)
    dsd = ((t - 1) * S0_OT ** 2 + t) / sd
    return -MU_OT + dsd / sd * (x - (1 - t) * MU_OT)


# --------------------------------------------------------------------------- ODE
@pytest.mark.parametrize("solver,order,steps", [("euler", 1, (16, 32, 64)), ("heun", 2, (16, 32, 64)),
                                                ("rk4", 4, (4, 8, 16))])
@pytest.mark.parametrize("grid", ["uniform", "ts"])
def test_ode_convergence_order(z, solver, order, steps, grid):
    """The CondOT flow from noise z ends exactly at MU + S0 z; RMS error falls as h^order."""
    x1 = z[:64]
    exact = MU_OT + S0_OT * np.asarray(x1)
    errs = []
    for n in steps:
        kw = {"num_steps": n} if grid == "uniform" else {"ts": jnp.linspace(1.0, 0.0, n + 1)}
        out, nfe = jax.jit(lambda x: sample_time("ode", _condot_velocity, x, solver=solver, **kw))(x1)
        assert int(nfe) == {"euler": 1, "heun": 2, "rk4": 4}[solver] * n
        errs.append(float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2))))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.3) and np.all(rates < order + 0.6), (errs, rates)


def test_ode_float64_rk4(z):
    with jax.enable_x64(True):
        x1 = jnp.asarray(z[:16], jnp.float64)
        out, _ = sample_time("ode", _condot_velocity, x1, num_steps=64, solver="rk4")
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, MU_OT + S0_OT * np.asarray(x1, np.float64), atol=1e-8)


def test_ode_rejects_bad_args(z):
    with pytest.raises(ValueError, match="solver"):
        sample_time("ode", _condot_velocity, z, num_steps=2, solver="midpoint")
    with pytest.raises(ValueError, match="num_steps"):
        sample_time("ode", _condot_velocity, z, num_steps=0)
    with pytest.raises(ValueError, match="exactly one of num_steps and ts"):
        sample_time("ode", _condot_velocity, z)
    with pytest.raises(ValueError, match="solver"):
        sample_time("ode_adaptive", _condot_velocity, z, solver="rk4")


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_ode_matches_exact_transport(z, solver):
    o = GaussianOracle(get_path("vp_linear"), MU, S0)
    v = pf_ode_velocity(VPSDE(), o.score)
    x_init = np.asarray(z[:128])
    out, nfe = jax.jit(lambda x: sample_time("ode_adaptive", v, x, t_start=1.0, t_end=1e-3, solver=solver))(x_init)
    np.testing.assert_allclose(np.asarray(out), o.transport(x_init, 1.0, 1e-3), atol=2e-3)
    assert 7 <= int(nfe) < 2000


# --------------------------------------------------------------------------- SDE samplers: moments
@pytest.mark.parametrize("sde_name", list(SDES))
def test_euler_maruyama_gaussian_moments(sde_name):
    sde = SDES[sde_name]
    o = GaussianOracle(sde.path, MU, S0)
    x_init = sde.prior_sample(jax.random.PRNGKey(1), (N, 2))
    out, nfe = jax.jit(lambda x, k: sample_time("euler_maruyama", o.score, x, sde=sde, key=k, num_steps=500))(
        x_init, jax.random.PRNGKey(2))
    assert int(nfe) == 500
    _moments_ok(out, o.mean(1e-3), o.var(1e-3))


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("predictor,corrector", [("reverse_diffusion", "langevin"), ("euler_maruyama", "none"),
                                                 ("none", "langevin")])
def test_pc_sampler_gaussian_moments(sde_name, predictor, corrector):
    sde = SDES[sde_name]
    o = GaussianOracle(sde.path, MU, S0)
    x_init = sde.prior_sample(jax.random.PRNGKey(3), (N, 2))
    steps = 400 if predictor != "none" else 1000  # corrector-only: annealed Langevin dynamics
    out, nfe = jax.jit(lambda x, k: sample_time("pc", o.score, x, sde=sde, key=k, num_steps=steps,
                                                predictor=predictor, corrector=corrector, snr=0.16))(
        x_init, jax.random.PRNGKey(4))
    assert int(nfe) == steps * ((predictor != "none") + (corrector != "none"))
    tol = 0.1 if predictor != "none" else 0.25
    _moments_ok(out, o.mean(1e-3), o.var(1e-3), tol_var=tol)


def test_pc_rejects_unknown():
    for opt in ("predictor", "corrector"):
        with pytest.raises(ValueError, match=f"unknown {opt}"):
            sample_time("pc", lambda x, t: x, jnp.zeros((2, 2)), sde=VPSDE(), key=jax.random.key(0), num_steps=2,
                        **{opt: "x"})


def test_langevin_corrector_one_step_formula():
    """One corrector step: eps = 2 alpha (snr ||z|| / ||score||)^2 (norms averaged over the batch),
    x' = x + eps score(x) + sqrt(2 eps) z with z the step's normal draw."""
    sde = VPSDE()
    o = GaussianOracle(sde.path, MU, S0)
    x = np.asarray(jax.random.normal(jax.random.key(7), (6, 2)) * 1.3, np.float64)
    t, dt, snr, key = 0.4, 0.01, 0.2, jax.random.key(8)
    out, out_mean = langevin_correct(sde, o.score, jnp.asarray(x, jnp.float32), 0.4, dt, key, snr=snr, n_steps=1)
    zk = np.asarray(jax.random.normal(jax.random.split(key, 1)[0], x.shape, jnp.float32), np.float64)
    score = np.asarray(o.score(jnp.asarray(x, jnp.float32), jnp.full((6,), t)), np.float64)
    alpha = 1.0 - (0.1 + t * (20.0 - 0.1)) * dt
    eps = 2 * alpha * (snr * np.linalg.norm(zk, axis=1).mean() / np.linalg.norm(score, axis=1).mean()) ** 2
    np.testing.assert_allclose(out_mean, x + eps * score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, x + eps * score + np.sqrt(2 * eps) * zk, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("path_name", ["rectified_flow", "vp_linear", "vp_cosine", "sub_vp"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian(z, path_name, eta):
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    t0, t1 = path.t_start, path.t_end
    x_init = np.asarray(o.mean(t0)) + np.sqrt(o.var(t0)) * np.asarray(z)
    out, _ = jax.jit(lambda x, k: sample_time("ddim", o.x0_eps, x, path=path, num_steps=200, eta=eta, key=k))(
        x_init, jax.random.PRNGKey(5))
    if eta == 0.0:
        np.testing.assert_allclose(np.asarray(out), o.transport(x_init, t0, t1), atol=3e-2)
    _moments_ok(out, o.mean(t1), o.var(t1))


@pytest.mark.parametrize("path_name", ["vp_linear", "rectified_flow"])
def test_ddim_eta1_step_is_ddpm_posterior(path_name):
    """One DDIM step with eta = 1 and x0_hat = the given x0 samples q(x_s | x_t, x0) of the forward
    process: mean a_s x0 + sqrt(s_s^2 - c^2) (x_t - a_t x0)/s_t, variance c^2 = s_{s|t}^2 s_s^2 / s_t^2 with
    s_{s|t}^2 = s_t^2 - (a_t/a_s)^2 s_s^2 (the DDPM posterior, Ho et al. 2020 eq. 7)."""
    path = get_path(path_name)
    t, s = 0.6, 0.45
    x0 = np.array([0.7, -1.2], np.float64)
    x_t = np.array([[0.3, 0.4]] * 20000, np.float64)
    fn = lambda x, tt: (jnp.broadcast_to(jnp.asarray(x0, x.dtype), x.shape),
                        (x - bcast(path.alpha(tt), x) * jnp.asarray(x0, x.dtype)) / bcast(path.sigma(tt), x))
    out, _ = sample_time("ddim", fn, jnp.asarray(x_t, jnp.float32), path=path, ts=jnp.array([t, s]), eta=1.0,
                         key=jax.random.key(9))
    a_t, s_t = float(path.alpha(jnp.float32(t))), float(path.sigma(jnp.float32(t)))
    a_s, s_s = float(path.alpha(jnp.float32(s))), float(path.sigma(jnp.float32(s)))
    # DDPM posterior of x_s given x_t, x0 (forward kernel x_t | x_s: mean (a_t/a_s) x_s, var s_t^2 - (a_t/a_s)^2 s_s^2)
    k = a_t / a_s
    v_ts = s_t ** 2 - k ** 2 * s_s ** 2
    post_var = v_ts * s_s ** 2 / s_t ** 2
    post_mean = (k * s_s ** 2 * x_t[0] + v_ts * a_s * x0) / s_t ** 2
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out.mean(0), post_mean, atol=4 * np.sqrt(post_var / 20000))
    np.testing.assert_allclose(out.var(0), post_var, rtol=0.05)


def test_ddim_eta_needs_key():
    with pytest.raises(ValueError, match="key"):
        sample_time("ddim", lambda x, t: (x, x), jnp.zeros((2, 2)), path=get_path("vp_linear"), num_steps=2, eta=0.5)
