"""Samplers against closed forms: Gaussian data N(mu, s0^2 I) with the exact score/denoiser.

Deterministic samplers are compared point-wise with the exact affine PF-ODE transport;
stochastic ones by the mean and variance of the samples.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import edm as edm_lib
from research.generative import parameterization as P
from research.generative.paths import get_path
from research.generative.samplers import (
    ddim_sample,
    edm_nfe,
    edm_sample,
    euler_maruyama_sample,
    guided,
    guided_model_fn,
    ode_sample,
    ode_sample_adaptive,
    pc_sample,
    pf_ode_velocity,
)
from research.generative.sde import PathSDE, SubVPSDE, VESDE, VPSDE
from tests.gaussian_oracle import GaussianOracle

MU = np.array([1.0, -0.5], np.float32)
S0 = 0.5
N = 2000
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=50.0)}


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.PRNGKey(0), (N, 2), jnp.float32)


def _moments_ok(x, mean, var, *, tol_mean=0.05, tol_var=0.1):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x.mean(0), mean, atol=tol_mean)
    np.testing.assert_allclose(x.var(0), var, rtol=tol_var)


# ----------------------------------------------------------------------------- fixed-step ODE order
MU_OT, S0_OT = 1.0, 1.5


def _condot_velocity(x, t):
    """Exact marginal velocity of rectified flow from N(MU_OT, S0_OT^2) data (closed form)."""
    t = t[:, None]
    sd = jnp.sqrt((1 - t) ** 2 * S0_OT ** 2 + t ** 2)
    dsd = ((t - 1) * S0_OT ** 2 + t) / sd
    return -MU_OT + dsd / sd * (x - (1 - t) * MU_OT)


@pytest.mark.parametrize("method,order,steps", [("euler", 1, (16, 32, 64)), ("heun", 2, (16, 32, 64)),
                                                 ("rk4", 4, (4, 8, 16))])
def test_ode_convergence_order(z, method, order, steps):
    """The CondOT flow from noise z ends exactly at MU + S0 z; RMS error falls as h^order."""
    x1 = z[:64]
    exact = MU_OT + S0_OT * np.asarray(x1)
    errs = []
    for n in steps:
        out = jax.jit(functools.partial(ode_sample, _condot_velocity, num_steps=n, method=method))(x1)
        errs.append(float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2))))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.3), (errs, rates)
    assert np.all(rates < order + 0.6), (errs, rates)


def test_ode_sample_rejects_bad_args(z):
    with pytest.raises(ValueError, match="unknown ODE method"):
        ode_sample(_condot_velocity, z, num_steps=2, method="midpoint")
    with pytest.raises(ValueError, match="num_steps"):
        ode_sample(_condot_velocity, z, num_steps=0)


# ----------------------------------------------------------------------------- every path, ODE samplers
PATH_NAMES = ["rectified_flow", "vp_linear", "vp_cosine", "ve", "sub_vp", "edm"]


@pytest.mark.parametrize("path_name", PATH_NAMES)
@pytest.mark.parametrize("src", ["score", "eps", "x0", "velocity"])
def test_pf_ode_heun_any_parameterisation_matches_exact_transport(z, path_name, src):
    """The exact prediction in any parameterisation -> velocity -> Heun reproduces the transport map."""
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    t0, t1 = path.t_start, path.t_end
    if path_name != "edm":  # conversions divide by alpha (-> 0 at t = 1) or sigma (-> 0 at t = 0)
        t0, t1 = min(t0, 0.999), max(t1, 1e-3)
    x_init = np.asarray(o.mean(t0)) + np.sqrt(o.var(t0)) * np.asarray(z[:256])
    pred = {"score": o.score, "eps": o.eps, "x0": o.x0, "velocity": o.velocity}[src]
    v = P.as_fn(pred, path, src=src, dst="velocity")
    if path_name == "edm":  # sigma spans 80 -> 0.002: integrate in log-sigma spacing for accuracy
        ts = edm_lib.karras_sigmas(64)[:-1]
        from research.generative.solvers import integrate_grid
        out = jax.jit(lambda x: integrate_grid(v, x, jnp.concatenate([ts, jnp.array([t1])]), method="heun"))(x_init)
    else:
        out = jax.jit(lambda x: ode_sample(v, x, num_steps=200, method="heun", t_start=t0, t_end=t1))(x_init)
    exact = o.transport(x_init, t0, t1)
    np.testing.assert_allclose(np.asarray(out), exact, atol=2e-2 * max(1.0, S0))


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_ode_matches_exact_transport(z, solver):
    path = get_path("vp_linear")
    o = GaussianOracle(path, MU, S0)
    v = pf_ode_velocity(VPSDE(), o.score)
    x_init = np.asarray(z[:128])
    out, nfe = jax.jit(lambda x: ode_sample_adaptive(v, x, t_start=1.0, t_end=1e-3, solver=solver,
                                                     rtol=1e-5, atol=1e-5))(x_init)
    np.testing.assert_allclose(np.asarray(out), o.transport(x_init, 1.0, 1e-3), atol=2e-3)
    assert 7 <= int(nfe) < 2000


def test_adaptive_nfe_is_exact_count():
    calls = []

    def v(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    _, nfe = ode_sample_adaptive(v, jnp.ones((2, 3)), rtol=1e-4, atol=1e-4)
    jax.effects_barrier()
    assert int(nfe) == len(calls)


# ----------------------------------------------------------------------------- SDE samplers
@pytest.mark.parametrize("sde_name", list(SDES))
def test_euler_maruyama_gaussian_moments(z, sde_name):
    sde = SDES[sde_name]
    o = GaussianOracle(sde.path, MU, S0)
    x_init = sde.prior_sample(jax.random.PRNGKey(1), (N, 2))
    out = jax.jit(lambda x, k: euler_maruyama_sample(sde, o.score, x, k, num_steps=500, t_end=1e-3))(
        x_init, jax.random.PRNGKey(2))
    _moments_ok(out, o.mean(1e-3), o.var(1e-3))


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("predictor,corrector", [("reverse_diffusion", "langevin"), ("euler_maruyama", "none"),
                                                 ("reverse_diffusion", "none")])
def test_pc_sampler_gaussian_moments(z, sde_name, predictor, corrector):
    sde = SDES[sde_name]
    o = GaussianOracle(sde.path, MU, S0)
    x_init = sde.prior_sample(jax.random.PRNGKey(3), (N, 2))
    f = jax.jit(lambda x, k: pc_sample(sde, o.score, x, k, num_steps=400, predictor=predictor, corrector=corrector,
                                       snr=0.16, t_end=1e-3))
    _moments_ok(f(x_init, jax.random.PRNGKey(4)), o.mean(1e-3), o.var(1e-3))


def test_pc_sampler_rejects_unknown():
    with pytest.raises(ValueError, match="unknown predictor"):
        pc_sample(VPSDE(), lambda x, t: x, jnp.zeros((2, 2)), jax.random.PRNGKey(0), num_steps=2, predictor="x")
    with pytest.raises(ValueError, match="unknown corrector"):
        pc_sample(VPSDE(), lambda x, t: x, jnp.zeros((2, 2)), jax.random.PRNGKey(0), num_steps=2, corrector="x")


@pytest.mark.parametrize("path_name", ["rectified_flow", "vp_linear", "vp_cosine", "sub_vp"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian(z, path_name, eta):
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    t0, t1 = path.t_start, path.t_end
    x_init = np.asarray(o.mean(t0)) + np.sqrt(o.var(t0)) * np.asarray(z)
    out = jax.jit(lambda x, k: ddim_sample(o.x0_eps, path, x, num_steps=200, eta=eta, key=k))(x_init, jax.random.PRNGKey(5))
    if eta == 0.0:  # deterministic: first-order accurate transport
        np.testing.assert_allclose(np.asarray(out), o.transport(x_init, t0, t1), atol=3e-2)
    _moments_ok(out, o.mean(t1), o.var(t1))


def test_ddim_eta_needs_key():
    path = get_path("vp_linear")
    with pytest.raises(ValueError, match="key"):
        ddim_sample(lambda x, t: (x, x), path, jnp.zeros((2, 2)), num_steps=2, eta=0.5)


# ----------------------------------------------------------------------------- EDM
SIGMA_DATA = 0.5


def _ideal_edm_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, S0^2 I), x = x0 + sigma n."""
    s2 = sigma[:, None] ** 2
    return MU + S0 ** 2 / (S0 ** 2 + s2) * (x - MU)


def test_edm_identities():
    sigma = jnp.exp(jnp.linspace(-6.0, 4.5, 50))
    c_skip, c_out, c_in, c_noise = edm_lib.edm_precond(sigma, SIGMA_DATA)
    # lambda * c_out^2 = 1
    np.testing.assert_allclose(edm_lib.edm_weight(sigma, SIGMA_DATA) * c_out ** 2, 1.0, rtol=1e-5)
    # ideal denoiser of N(0, sigma_data^2) data is c_skip x (so the ideal F is 0)
    x = jax.random.normal(jax.random.PRNGKey(0), (50, 3)) * 3.0
    ideal = SIGMA_DATA ** 2 / (SIGMA_DATA ** 2 + sigma[:, None] ** 2) * x
    np.testing.assert_allclose(c_skip[:, None] * x, ideal, rtol=1e-5, atol=1e-6)
    # the preconditioned input has unit variance: c_in^2 (sigma_data^2 + sigma^2) = 1
    np.testing.assert_allclose(c_in ** 2 * (SIGMA_DATA ** 2 + sigma ** 2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_noise, jnp.log(sigma) / 4, rtol=1e-6)
    # a zero network gives exactly c_skip x through make_edm_denoiser
    den = edm_lib.make_edm_denoiser(lambda p, x, t, c, k: jnp.zeros_like(x), None, sigma_data=SIGMA_DATA)
    np.testing.assert_allclose(den(x, sigma), ideal, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 2, 18])
def test_edm_nfe_is_2n_minus_1(num_steps):
    calls = []

    def den(x, sigma):
        calls.append(1)
        return 0.5 * x

    with jax.disable_jit():
        edm_sample(den, jnp.ones((2, 2)), num_steps=num_steps)
    assert len(calls) == edm_nfe(num_steps) == 2 * num_steps - 1


def test_karras_sigmas():
    s = np.asarray(edm_lib.karras_sigmas(18))
    assert s.shape == (19,) and s[-1] == 0.0
    np.testing.assert_allclose([s[0], s[-2]], [80.0, 0.002], rtol=1e-5)
    assert np.all(np.diff(s) < 0)


def test_edm_deterministic_matches_transport(z):
    out = jax.jit(lambda x: edm_sample(_ideal_edm_denoiser, x, num_steps=64))(z[:256])
    # exact: start N(0, 80^2) approximates N(MU, S0^2 + 80^2); transport x_end = MU + S0 (x80 - MU)/sqrt(S0^2 + 80^2)
    x80 = 80.0 * np.asarray(z[:256])
    exact = MU + S0 * (x80 - MU) / np.sqrt(S0 ** 2 + 80.0 ** 2)
    np.testing.assert_allclose(np.asarray(out), exact, atol=1e-2)


def test_edm_stochastic_churn_moments(z):
    f = jax.jit(lambda x, k: edm_sample(_ideal_edm_denoiser, x, num_steps=64, S_churn=20.0, S_min=0.01, S_max=50.0,
                                        S_noise=1.0, key=k))
    _moments_ok(f(z, jax.random.PRNGKey(7)), MU, S0 ** 2)
    with pytest.raises(ValueError, match="key"):
        edm_sample(_ideal_edm_denoiser, z, S_churn=1.0)


@pytest.mark.parametrize("path_name,src", [("vp_linear", "eps"), ("rectified_flow", "velocity"), ("ve", "score")])
def test_edm_sampler_drives_any_path_model(z, path_name, src):
    """A model of any path/parameterisation becomes an EDM denoiser; sample with edm_sample."""
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    pred = {"eps": o.eps, "velocity": o.velocity, "score": o.score}[src]
    den = P.as_edm_denoiser(pred, path, src=src)
    s = jnp.array([0.1, 1.0, 5.0])
    np.testing.assert_allclose(den(jnp.ones((3, 2)), s), _ideal_edm_denoiser(jnp.ones((3, 2)), s), rtol=2e-3,
                               atol=2e-3)
    smax = float(path.edm_sigma(jnp.array(path.t_start * 0.999)))
    out = jax.jit(lambda x: edm_sample(den, x, num_steps=40, sigma_max=min(smax, 80.0)))(z)
    _moments_ok(out, MU, S0 ** 2, tol_var=0.1)


# ----------------------------------------------------------------------------- CFG
def _cond_model(params, x, t, cond, key):
    """out = params * x + cond (cond broadcast over dims); records the batch size it was called with."""
    _cond_model.calls.append(x.shape[0])
    return params * x + cond[:, None].astype(jnp.float32)


def test_guided_formula_and_single_batched_call():
    x = jnp.ones((3, 2))
    t = jnp.zeros((3,))
    cond = jnp.array([1, 2, 3])
    for w in (0.0, 1.0, 2.5, 4.0):
        _cond_model.calls = []
        out = guided(_cond_model, 2.0, cond, 10, w)(x, t)
        uncond = 2.0 * x + 10.0
        condo = 2.0 * x + cond[:, None]
        np.testing.assert_allclose(out, uncond + w * (condo - uncond), rtol=1e-6)
        assert _cond_model.calls == ([3] if w == 1.0 else [6])
    with pytest.raises(ValueError, match="null_cond shape"):
        guided(_cond_model, 2.0, cond, jnp.array([1, 2]), 3.0)(x, t)
    # array null labels and a traced guidance weight under jit
    out = jax.jit(lambda w: guided(_cond_model, 1.0, cond, jnp.array([0, 0, 0]), w)(x, t))(3.0)
    np.testing.assert_allclose(out, x + 3.0 * cond[:, None], rtol=1e-6)


def test_cfg_composes_with_any_sampler(z):
    """CFG of exact conditional eps-predictions with w: the guided eps is the eps of the Gaussian
    with mean mu_u + w (mu_c - mu_u) (same variance) -> every sampler should produce that mean."""
    path = get_path("vp_linear")
    mu_c, mu_u = np.array([1.0, 1.0], np.float32), np.array([0.0, 0.0], np.float32)
    oc, ou = GaussianOracle(path, mu_c, S0), GaussianOracle(path, mu_u, S0)

    def model(params, x, t, cond, key):
        return jnp.where(cond[:, None] == 1, oc.eps(x, t), ou.eps(x, t))

    w = 2.0
    target = mu_u + w * (mu_c - mu_u)
    cond = jnp.ones((N,), jnp.int32)
    eps_fn = guided(model, None, cond, 0, w)
    # the guided eps of two equal-variance Gaussians equals the eps of the Gaussian at the extrapolated mean
    og = GaussianOracle(path, target, S0)
    xs, ts = np.asarray(z[:8]), jnp.full((8,), 0.3)
    np.testing.assert_allclose(guided(model, None, cond[:8], 0, w)(xs, ts), og.eps(xs, ts), rtol=1e-4, atol=1e-5)
    out_ddim = jax.jit(lambda x: ddim_sample(P.as_x0_eps_fn(eps_fn, path, src="eps"), path, x, num_steps=100))(z)
    _moments_ok(out_ddim, og.mean(path.t_end), og.var(path.t_end))
    g_model = guided_model_fn(model, 0, w)
    den = P.as_edm_denoiser(lambda x, t: g_model(None, x, t, cond, None), path, src="eps")
    out_edm = jax.jit(lambda x: edm_sample(den, x, num_steps=32, sigma_max=100.0))(z)
    _moments_ok(out_edm, target, S0 ** 2, tol_var=0.1)


# ----------------------------------------------------------------------------- method registry
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_method_karras_grid_for_sdes(name):
    from research.generative.methods import make_method

    m = make_method(name)
    t0, t1 = m.ode_interval
    ts = np.asarray(m.time_grid(10, "karras"))
    assert ts.shape == (11,) and ts[0] == pytest.approx(t0) and ts[-1] == pytest.approx(t1, rel=1e-4)
    assert np.all(np.diff(ts) < 0)
    # the EDM sigma of the grid follows Karras' rho = 7 spacing
    sig = np.asarray(m.sde.path.edm_sigma(jnp.asarray(ts[:-1])), np.float64) ** (1 / 7)
    np.testing.assert_allclose(np.diff(sig), np.diff(sig)[0], rtol=2e-2)
    with pytest.raises(ValueError, match="unknown grid"):
        m.time_grid(4, "cosine")
