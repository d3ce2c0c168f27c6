"""Methods behind the METHODS registry: protocol, hyper-parameter checks, and sampling through their views
with exact models (Gaussian data N(mu, s0^2 I) and the exact mixture score), against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import losses as L
from research.generative.methods import METHODS, get_method
from research.generative.parameterization import eps_precond
from research.generative.sampling import SAMPLERS
from tests.gaussian_oracle import GaussianOracle, moments_ok
from tests.test_pf_ode_mixture import MEANS, STDS, WEIGHTS, check_mixture, mixture_eps_model

MU = np.array([1.0, -0.5], np.float32)
S0 = 0.5
N = 2000


def _moments_ok(x, *, tol_mean=0.05, tol_var=0.12):
    moments_ok(x, MU, S0 ** 2, tol_mean=tol_mean, tol_var=tol_var)


def _exact_model(m):
    """The Bayes-optimal network of method ``m`` for N(MU, S0^2 I) data, in the method's own parameterisation
    and input convention (EDM: the raw F behind the preconditioning; score SDEs: raw eps, precond="none")."""
    o = GaussianOracle(m.path, MU, S0)
    pred = m.model_prediction()
    if m.name == "edm":
        from research.generative.edm import edm_precond

        def f(params, x_in, c_noise, cond, key):
            sigma = jnp.exp(4.0 * c_noise)
            c_skip, c_out, c_in, _ = edm_precond(sigma, m.sigma_data)
            x = x_in / c_in[:, None]
            return (o.x0(x, sigma) - c_skip[:, None] * x) / c_out[:, None]

        return f
    fn = {"eps": o.eps, "velocity": o.velocity, "x0": o.x0}[pred]
    return lambda params, x, t, cond, key: fn(x, t)


def _method(name):
    return get_method(name, precond="none") if name in ("vp", "subvp", "ve") else get_method(name)


def test_registry_and_hyperparameter_errors():
    assert set(METHODS) == {"vp", "subvp", "ve", "edm", "rf", "icfm", "otcfm"}
    with pytest.raises(ValueError, match="unknown method 'ddpm'"):
        get_method("ddpm")
    with pytest.raises(ValueError, match="beta_mx"):
        get_method("vp", beta_mx=3.0)
    with pytest.raises(ValueError, match="precond"):
        get_method("vp", precond="karras")
    with pytest.raises(ValueError, match="sigma_data"):
        get_method("edm", sigma_data=0.0)
    with pytest.raises(ValueError, match="timestep_dist"):
        get_method("rf", timestep_dist="beta")
    # methods are hashable (static jit arguments) and equal by value
    assert get_method("vp", beta_max=10.0) == get_method("vp", beta_max=10.0)
    assert len({get_method("vp"), get_method("vp"), get_method("ve")}) == 2


def test_one_name_one_objective_rf_is_rectified_flow_loss():
    """'rf' is exactly losses.rectified_flow_loss with its hyper-parameters (same key -> same loss)."""
    net = lambda p, x, t, c, k: 0.3 * x + t[:, None]
    x0 = jax.random.normal(jax.random.key(0), (64, 2))
    for dist in ("logit_normal", "uniform"):
        m = get_method("rf", timestep_dist=dist)
        a, _ = m.loss(net, None, x0, jax.random.key(1))
        b, _ = L.rectified_flow_loss(net, None, x0, jax.random.key(1), timestep_dist=dist)
        assert float(a) == float(b)
    assert get_method("rf").timestep_dist == "logit_normal"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_supports_matches_the_views(name):
    cls = METHODS[name]
    sde = name in ("vp", "subvp", "ve")
    for s, spec in SAMPLERS.items():
        expect = spec.family == "sigma" or s in ("ode", "ode_adaptive") or sde
        assert cls.supports(s) == expect, s


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm", "rf"])
@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "unipc"])
def test_sigma_space_sampling_of_every_method_with_the_exact_model(name, sampler):
    """Every method sampled by sigma-space samplers through its EDM view (prior draw, x / alpha scaling,
    sigma range) reaches the data moments with the Bayes-optimal network of that method."""
    m = _method(name)
    x, nfe = jax.jit(lambda k: m.sample(_exact_model(m), None, k, (N, 2), sampler=sampler, num_steps=64))(
        jax.random.key(0))
    assert nfe == SAMPLERS[sampler].nfe(64)
    _moments_ok(x)


@pytest.mark.parametrize("name,sampler", [("vp", "euler_maruyama"), ("vp", "ddim"), ("ve", "pc"),
                                          ("rf", "ode"), ("edm", "ode"), ("subvp", "ode_adaptive")])
def test_time_space_sampling_with_the_exact_model(name, sampler):
    m = _method(name)
    opts = {"solver": "rk4"} if sampler == "ode" else {}
    steps = {"euler_maruyama": 400, "pc": 300}.get(sampler, 40)
    x, nfe = jax.jit(lambda k: m.sample(_exact_model(m), None, k, (N, 2), sampler=sampler, num_steps=steps,
                                        **opts))(jax.random.key(1))
    assert int(nfe) > 0
    _moments_ok(x, tol_var=0.15)


def test_sde_only_sampler_on_a_flow_is_refused():
    with pytest.raises(ValueError, match="score_fn"):
        get_method("rf").sample(lambda *a: a[1], None, jax.random.key(0), (4, 2), sampler="euler_maruyama",
                                num_steps=3)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_karras_time_grid_for_sdes(name):
    m = get_method(name)
    t0, t1 = m.t_interval
    ts = np.asarray(m.time_grid(10, "karras"))
    assert ts.shape == (11,) and ts[0] == pytest.approx(t0) and ts[-1] == pytest.approx(t1, rel=1e-4)
    assert np.all(np.diff(ts) < 0)
    # the EDM sigma of the grid follows Karras' rho = 7 spacing
    sig = np.asarray(m.path.edm_sigma(jnp.asarray(ts[:-1])), np.float64) ** (1 / 7)
    np.testing.assert_allclose(np.diff(sig), np.diff(sig)[0], rtol=2e-2)
    with pytest.raises(ValueError, match="unknown grid"):
        m.time_grid(4, "cosine")


def test_preconditioned_method_samples_exact_mixture():
    """A preconditioned VP method whose network outputs F = (eps_exact - c_skip x) / c_out (the exact
    mixture in the preconditioned parameterisation, evaluated at the un-scaled input) samples the mixture:
    the wrapper feeds the network c_in x_t and combines the output consistently in the loss and samplers."""
    m = get_method("vp", precond="edm", sigma_data=1.5)
    path, sd = m.path, 1.5
    exact = mixture_eps_model(path)

    def net(params, x_in, t, cond, key):
        c_skip, c_out, c_in = eps_precond(path, t, sd)
        x = x_in / c_in[:, None]
        return (exact(None, x, t, None, None) - c_skip[:, None] * x) / c_out[:, None]

    x, _ = jax.jit(lambda k: m.sample(net, None, k, (N, 2), sampler="ode", num_steps=40, solver="heun"))(
        jax.random.key(4))
    check_mixture(x, path, m.t_interval[1])
    # training goes through the same wrapper: the DSM loss of this network equals that of the raw exact
    # epsilon predictor (same t, noise), and is below 1 (= the loss of eps_hat = 0)
    comp = jax.random.choice(jax.random.key(5), 3, (4096,), p=jnp.asarray(WEIGHTS))
    x0 = jnp.asarray(MEANS)[comp] + jnp.asarray(STDS)[comp, None] * jax.random.normal(jax.random.key(6), (4096, 2))
    loss_pre, _ = m.loss(net, None, x0, jax.random.key(7))
    loss_raw, _ = get_method("vp", precond="none").loss(exact, None, x0, jax.random.key(7))
    np.testing.assert_allclose(float(loss_pre), float(loss_raw), rtol=2e-3)
    assert 0.0 < float(loss_raw) < 1.0


@pytest.mark.parametrize("name", ["vp", "edm", "rf"])
def test_log_likelihood_of_gaussian_data_is_exact(name):
    """PF-ODE likelihood through the method (its velocity view, prior, interval) with the exact model. The exact
    flow maps the data-side marginal N(a0 mu, a0^2 s0^2 + s0'^2) onto the prior-side marginal at t_prior, so
    log p(x) = log N_data(x) + log prior(z) - log N_prior_side(z) with z the ODE's end point (the last two
    differ because the method's prior is only approximately the marginal at t_prior)."""
    m = _method(name)
    x = MU + S0 * np.asarray(jax.random.normal(jax.random.key(8), (16, 2)))
    logp, aux = jax.jit(lambda x: m.log_likelihood(_exact_model(m), None, x, divergence="exact", rtol=1e-6,
                                                   atol=1e-6))(jnp.asarray(x, jnp.float32))

    def log_marginal(y, t):
        a, s = float(m.path.alpha(jnp.float32(t))), float(m.path.sigma(jnp.float32(t)))
        var = a ** 2 * S0 ** 2 + s ** 2
        return -0.5 * np.sum((y - a * MU) ** 2 / var + np.log(2 * np.pi * var), axis=1)

    t_data, t_prior = m.likelihood_interval()
    z = np.asarray(aux["z"], np.float64)
    expect = log_marginal(x, t_data) + np.asarray(m.prior_logp(jnp.asarray(z))) - log_marginal(z, t_prior)
    # tolerance: the adaptive solve at rtol = atol = 1e-6 over ~1e2 steps, in float32 (~1e-4 nats here)
    np.testing.assert_allclose(np.asarray(logp), expect, rtol=0, atol=2e-3)


def test_flow_shift_schedule_is_sd3s():
    """'shift' = SD3's t' = 3t / (1 + 2t) of a uniform grid: sigma = t' / (1 - t') in sigma space, t' in time."""
    m = get_method("rf")
    u = np.linspace(m.t_max, 0.0, 6)
    t = 3 * u / (1 + 2 * u)
    # float32: 1 - t' cancels near t' = 1 (t' = 0.99967), relative error ~ 2^-24 / (1 - t') ~ 2e-4 there
    np.testing.assert_allclose(np.asarray(m.sigmas(5, "shift"))[:-1], (t / (1 - t))[:-1], rtol=5e-4)
    assert float(m.sigmas(5, "shift")[-1]) == 0.0
    u = np.linspace(1.0, 0.0, 6)
    np.testing.assert_allclose(np.asarray(m.time_grid(5, "shift:2.0")), 2 * u / (1 + u), rtol=1e-6)
    x, nfe = m.sample(_exact_model(m), None, jax.random.key(2), (N, 2), sampler="dpmpp_2m", num_steps=32,
                      schedule="shift")
    _moments_ok(x)
    with pytest.raises(ValueError, match="shift:<number>"):
        m.sigmas(4, "shift:x")
