"""Losses and timestep samplers against closed forms.

For Gaussian data N(mu, s0^2 I) the Bayes-optimal prediction is known in closed form, and the
expected loss of that prediction is the conditional variance of the regression target -- an
independent number (quadrature over t) that every loss must reproduce by Monte Carlo.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.optimize import linear_sum_assignment
from scipy.special import expit, logit

from research.generative import losses as L
from research.generative.paths import get_path
from research.generative.sde import SubVPSDE, VESDE, VPSDE
from research.generative.timesteps import TIMESTEP_DISTS, sample_edm_sigma, sample_timesteps
from tests.gaussian_oracle import GaussianOracle
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

MU = np.array([0.8, -0.3, 0.0, 1.5], np.float32)
S0 = 0.6
B = 20000


@pytest.fixture(scope="module")
def x0():
    return jnp.asarray(MU) + S0 * jax.random.normal(jax.random.PRNGKey(11), (B, 4), jnp.float32)


def _logit_normal_pdf(t, loc=0.0, scale=1.0):
    return stats.norm(loc, scale).pdf(logit(t)) / (t * (1 - t))


def _expect(fn, pdf, lo=0.0, hi=1.0):
    return integrate.quad(lambda t: fn(t) * pdf(t), lo, hi, limit=200)[0]


# ----------------------------------------------------------------------------- flow matching
@pytest.mark.parametrize("dist", ["logit_normal", "uniform"])
def test_rectified_flow_loss_optimum(x0, dist):
    """E[(v* - (eps - x0))^2] = s0^2 / ((1 - t)^2 s0^2 + t^2) per dimension."""
    o = GaussianOracle(get_path("rectified_flow"), MU, S0)
    model = lambda p, x, t, c, k: o.velocity(x, t)
    loss, aux = jax.jit(lambda x, k: L.rectified_flow_loss(model, None, x, k, timestep_dist=dist))(
        x0, jax.random.PRNGKey(0))
    pdf = _logit_normal_pdf if dist == "logit_normal" else (lambda t: 1.0)
    ref = _expect(lambda t: S0 ** 2 / ((1 - t) ** 2 * S0 ** 2 + t ** 2), pdf)
    assert loss.dtype == jnp.float32 and float(aux["loss"]) == float(loss)
    np.testing.assert_allclose(float(loss), ref, rtol=0.03)
    # a wrong model (zero velocity) is worse: E|eps - x0|^2 = 1 + s0^2 + mean(mu^2)
    bad, _ = L.rectified_flow_loss(lambda p, x, t, c, k: jnp.zeros_like(x), None, x0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(bad), 1 + S0 ** 2 + np.mean(MU ** 2), rtol=0.03)


def test_icfm_sigma_optimum(x0):
    """I-CFM with width sigma: optimal E[u | x_t] for u = x1 - x0 is affine; its loss is
    (s0^2 + sigma^2 (1 + s0^2)) / ((1 - t)^2 s0^2 + t^2 + sigma^2) per dimension (t uniform)."""
    sig = 0.3

    def model(p, x, t, c, k):
        t = t[:, None]
        var = (1 - t) ** 2 * S0 ** 2 + t ** 2 + sig ** 2
        cov = t - (1 - t) * S0 ** 2
        return -MU + cov / var * (x - (1 - t) * MU)

    loss, _ = jax.jit(lambda x, k: L.cfm_loss(model, None, x, k, sigma=sig))(x0, jax.random.PRNGKey(1))
    ref = _expect(lambda t: (S0 ** 2 + sig ** 2 * (1 + S0 ** 2)) / ((1 - t) ** 2 * S0 ** 2 + t ** 2 + sig ** 2),
                  lambda t: 1.0)
    np.testing.assert_allclose(float(loss), ref, rtol=0.03)


def test_ot_cfm_uses_exact_minibatch_assignment(dtype):
    """Zero model, sigma = 0: the loss is the mean squared pair distance, t-independent; with the OT
    coupling it equals scipy's optimal assignment cost (x1 is drawn from the first split of key).
    Tolerance: a mean of 192 squares, ~1e-7 (float32) / 1e-16 (float64) relative round-off each
    -> rtol 1e-4 / 1e-12."""
    xb = jax.random.normal(jax.random.PRNGKey(3), (64, 3), dtype) * 2.0 + 1.0
    key = jax.random.PRNGKey(4)
    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    ot, _ = jax.jit(lambda x, k: L.cfm_loss(zero, None, x, k, coupling="ot"))(xb, key)
    ind, _ = L.cfm_loss(zero, None, xb, key, coupling="independent")
    assert ot.dtype == dtype and ind.dtype == dtype
    rtol = 1e-12 if dtype == jnp.float64 else 1e-4
    x1 = np.asarray(jax.random.normal(jax.random.split(key)[0], xb.shape, dtype), np.float64)
    c = ((np.asarray(xb, np.float64)[:, None] - x1[None]) ** 2).sum(-1)
    r, col = linear_sum_assignment(c)
    np.testing.assert_allclose(float(ot), c[r, col].sum() / c.size * len(c) / 3, rtol=rtol)
    np.testing.assert_allclose(float(ind), np.trace(c) / (64 * 3), rtol=rtol)
    assert float(ot) < float(ind)
    with pytest.raises(ValueError, match="coupling"):
        L.cfm_loss(zero, None, xb, key, coupling="sinkhorn")


def test_pair_flow_loss_closed_form(dtype):
    """Pairs x1 = x0 + c: the target x1 - x0 = c for every t, so a model returning c has loss 0 and the
    zero model has loss mean(c^2) -- exact up to round-off in x1 - x0 (|x| ~ 3: 3 eps relative to
    c ~ 1, squared): 1e-12 / 1e-5 absolute in float64 / float32."""
    x0 = jax.random.normal(jax.random.PRNGKey(0), (32, 3), dtype) * 3.0
    c = jnp.array([0.5, -1.0, 2.0], dtype)
    x1 = x0 + c
    exact = lambda p, x, t, cc, k: jnp.broadcast_to(c, x.shape)
    zero = lambda p, x, t, cc, k: jnp.zeros_like(x)
    key = jax.random.PRNGKey(1)
    loss, _ = L.pair_flow_loss(exact, None, x0, x1, key)
    bad, _ = L.pair_flow_loss(zero, None, x0, x1, key)
    assert loss.dtype == dtype and bad.dtype == dtype
    atol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(float(loss), 0.0, atol=atol)
    np.testing.assert_allclose(float(bad), float(np.mean(np.asarray(c, np.float64) ** 2)), atol=atol * 10)


def _wrong_shape(p, x, t, c, k):
    return jnp.zeros(x.shape[:1] + (1,), x.dtype)  # [B, 1] broadcasts against [B, D] -- a silent bug


@pytest.mark.parametrize("which", ["rectified_flow", "cfm", "pair", "dsm", "edm", "path"])
def test_every_loss_rejects_a_model_output_of_the_wrong_shape(which):
    x0 = jnp.ones((4, 3))
    key = jax.random.PRNGKey(0)
    call = {
        "rectified_flow": lambda m: L.rectified_flow_loss(m, None, x0, key),
        "cfm": lambda m: L.cfm_loss(m, None, x0, key, sigma=0.1),
        "pair": lambda m: L.pair_flow_loss(m, None, x0, x0, key),
        "dsm": lambda m: L.dsm_loss(m, None, x0, key, sde=VPSDE()),
        "edm": lambda m: L.edm_loss(m, None, x0, key),
        "path": lambda m: L.path_loss(m, None, x0, key, path=get_path("vp_linear"), t_min=0.1),
    }[which]
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4, 3\)"):
        call(_wrong_shape)
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4, 3\)"):
        jax.jit(lambda x: call(_wrong_shape))(x0)  # shapes are static: also raised at trace time


def test_static_hyper_parameters_are_checked():
    from research.generative.edm import edm_precond, edm_weight, make_edm_denoiser
    from research.generative.sampling import karras
    from research.generative.parameterization import eps_precond, preconditioned_eps_model

    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    x0, key = jnp.ones((4, 3)), jax.random.PRNGKey(0)
    for bad in (0.0, -0.5, float("nan")):
        for fn in (lambda: edm_precond(1.0, bad), lambda: edm_weight(1.0, bad),
                   lambda: make_edm_denoiser(zero, None, sigma_data=bad),
                   lambda: L.edm_loss(zero, None, x0, key, sigma_data=bad),
                   lambda: eps_precond(get_path("vp_linear"), jnp.ones(2), bad),
                   lambda: preconditioned_eps_model(zero, get_path("vp_linear"), bad)):
            with pytest.raises(ValueError, match="sigma_data"):
                fn()
        with pytest.raises(ValueError, match="rho"):
            karras(4, 0.002, 80.0, rho=bad)
        with pytest.raises(ValueError, match="P_std"):
            L.edm_loss(zero, None, x0, key, P_std=bad)
        with pytest.raises(ValueError, match="P_std"):
            sample_edm_sigma(key, (3,), P_std=bad)
    with pytest.raises(ValueError, match="sigma"):
        L.pair_flow_loss(zero, None, x0, x0, key, sigma=-0.1)


def test_pair_flow_loss_shape_checks():
    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    with pytest.raises(ValueError, match="x1 shape"):
        L.pair_flow_loss(zero, None, jnp.zeros((4, 2)), jnp.zeros((4, 3)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="batch axis"):
        L.rectified_flow_loss(zero, None, jnp.zeros((4,)), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- DSM
def _np_vp(t, b0=0.1, b1=20.0):
    la = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
    return np.exp(la), np.sqrt(1 - np.exp(2 * la)), b0 + t * (b1 - b0)


def _np_coefs(name, t):
    """(alpha, std, g^2) from the score_sde formulas, numpy."""
    if name == "vp":
        a, s, beta = _np_vp(t)
        return a, s, beta
    if name == "subvp":
        a, _, beta = _np_vp(t)
        return a, 1 - a ** 2, beta * (1 - a ** 4)
    s = 0.01 * 5000.0 ** t
    return 1.0, s, s ** 2 * 2 * np.log(5000.0)


DSM_SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(0.01, 50.0)}


@pytest.mark.parametrize("name", list(DSM_SDES))
@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "velocity"])
def test_dsm_loss_optimum(x0, name, prediction):
    """Exact predictor: E|s std + z|^2 = Var(eps | x_t) = a^2 s0^2 / (a^2 s0^2 + std^2) per dim."""
    sde = DSM_SDES[name]
    o = GaussianOracle(sde.path, MU, S0)
    fn = {"eps": o.eps, "score": o.score, "x0": o.x0, "velocity": o.velocity}[prediction]
    model = lambda p, x, t, c, k: fn(x, t)
    t_min = 1e-5 if prediction in ("eps", "score") else 1e-3  # x0/velocity -> score divides by std
    loss, _ = jax.jit(lambda x, k: L.dsm_loss(model, None, x, k, sde=sde, prediction=prediction, t_min=t_min))(
        x0, jax.random.PRNGKey(5))

    def var_eps(t):
        a, s, _ = _np_coefs(name, t)
        return a ** 2 * S0 ** 2 / (a ** 2 * S0 ** 2 + s ** 2)

    ref = integrate.quad(var_eps, t_min, 1.0, limit=200)[0] / (1 - t_min)
    np.testing.assert_allclose(float(loss), ref, rtol=0.04)


@pytest.mark.parametrize("name", list(DSM_SDES))
def test_dsm_likelihood_weighting_and_sum(x0, name):
    """Likelihood weighting: E[g^2 |s + z/std|^2] = g^2 Var(eps|x_t) / std^2; reduce_mean=False sums dims."""
    sde = DSM_SDES[name]
    o = GaussianOracle(sde.path, MU, S0)
    model = lambda p, x, t, c, k: o.eps(x, t)
    t_min = 0.05
    lw, _ = jax.jit(lambda x, k: L.dsm_loss(model, None, x, k, sde=sde, likelihood_weighting=True, t_min=t_min))(
        x0, jax.random.PRNGKey(6))

    def integrand(t):
        a, s, g2 = _np_coefs(name, t)
        return g2 / s ** 2 * a ** 2 * S0 ** 2 / (a ** 2 * S0 ** 2 + s ** 2)

    ref = integrate.quad(integrand, t_min, 1.0, limit=200)[0] / (1 - t_min)
    np.testing.assert_allclose(float(lw), ref, rtol=0.05)
    mean_l, _ = L.dsm_loss(model, None, x0, jax.random.PRNGKey(7), sde=sde)
    sum_l, _ = L.dsm_loss(model, None, x0, jax.random.PRNGKey(7), sde=sde, reduce_mean=False)
    np.testing.assert_allclose(float(sum_l), 4 * float(mean_l), rtol=1e-5)


@pytest.mark.parametrize("name", list(DSM_SDES))
def test_dsm_sum_is_dims_times_mean(name, dtype):
    """reduce_mean=False sums the same 4 per-dimension errors: exactly 4x up to the order of the
    summation (1e-6 / 1e-14 relative in float32 / float64)."""
    sde = DSM_SDES[name]
    o = GaussianOracle(sde.path, MU, S0)
    model = lambda p, x, t, c, k: o.eps(x, t)
    xb = jnp.asarray(MU, dtype) + S0 * jax.random.normal(jax.random.PRNGKey(12), (256, 4), dtype)
    mean_l, _ = L.dsm_loss(model, None, xb, jax.random.PRNGKey(7), sde=sde)
    sum_l, _ = L.dsm_loss(model, None, xb, jax.random.PRNGKey(7), sde=sde, reduce_mean=False)
    assert mean_l.dtype == dtype and sum_l.dtype == dtype
    np.testing.assert_allclose(float(sum_l), 4 * float(mean_l), rtol=1e-14 if dtype == jnp.float64 else 1e-6)


# ----------------------------------------------------------------------------- EDM
def test_edm_loss_ideal_denoiser_is_one():
    """For N(0, sigma_data^2) data the ideal network is F = 0 (D = c_skip x) and
    lambda(sigma) Var(x0 | x) = 1 for every sigma: the expected loss is exactly 1."""
    sd = 0.5
    xb = sd * jax.random.normal(jax.random.PRNGKey(8), (B, 4))
    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    for pm, ps in [(-1.2, 1.2), (0.5, 0.3)]:
        loss, _ = jax.jit(lambda x, k: L.edm_loss(zero, None, x, k, sigma_data=sd, P_mean=pm, P_std=ps))(
            xb, jax.random.PRNGKey(9))
        np.testing.assert_allclose(float(loss), 1.0, atol=0.04)
    # a network that is not ideal has a larger loss
    bad, _ = L.edm_loss(lambda p, x, t, c, k: 0.5 * jnp.ones_like(x), None, xb, jax.random.PRNGKey(9), sigma_data=sd)
    assert float(bad) > 1.1


# ----------------------------------------------------------------------------- generic path loss
@pytest.mark.parametrize("path_name", ["rectified_flow", "vp_linear", "vp_cosine", "ve", "sub_vp"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "velocity"])
def test_path_loss_optimum(x0, path_name, prediction):
    """Expected loss of the exact prediction = conditional variance of the target given x_t."""
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    fn = {"eps": o.eps, "x0": o.x0, "velocity": o.velocity}[prediction]
    lo, hi = 0.02, 0.98
    loss, _ = jax.jit(lambda x, k: L.path_loss(lambda p, x_, t, c, kk: fn(x_, t), None, x, k, path=path,
                                               prediction=prediction, t_min=lo, t_max=hi))(x0, jax.random.PRNGKey(10))

    ts = np.linspace(lo, hi, 801)
    tj = jnp.asarray(ts, jnp.float32)
    a, s, da, ds = (np.asarray(f(tj), np.float64) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    v = a ** 2 * S0 ** 2 + s ** 2
    if prediction == "eps":
        cond_var = a ** 2 * S0 ** 2 / v
    elif prediction == "x0":
        cond_var = S0 ** 2 * s ** 2 / v
    else:
        cond_var = da ** 2 * S0 ** 2 + ds ** 2 - (da * a * S0 ** 2 + ds * s) ** 2 / v
    ref = integrate.simpson(cond_var, x=ts) / (hi - lo)
    np.testing.assert_allclose(float(loss), ref, rtol=0.05)


# ----------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("dist", TIMESTEP_DISTS)
@pytest.mark.parametrize("mode", ["iid", "antithetic", "stratified"])
def test_timestep_distributions(dist, mode):
    kw = {"antithetic": mode == "antithetic", "stratified": mode == "stratified"}
    t = np.asarray(sample_timesteps(jax.random.PRNGKey(0), (4000,), dist=dist, t_min=0.1, t_max=0.9, **kw),
                   np.float64)
    assert t.dtype == np.float64 and t.min() > 0.1 and t.max() < 0.9
    s = (t - 0.1) / 0.8
    if dist == "uniform":
        cdf = stats.uniform.cdf
    elif dist == "logit_normal":
        cdf = lambda q: stats.norm.cdf(logit(q))
    else:  # cosmap: u = (2/pi) arctan(s / (1 - s))
        cdf = lambda q: 2 / np.pi * np.arctan(q / (1 - q))
    assert stats.kstest(s, cdf).pvalue > 1e-3
    if mode == "antithetic" and dist == "uniform":
        np.testing.assert_allclose(s[:2000] + s[2000:], 1.0, atol=1e-5)
    if mode == "stratified":
        u = np.sort(cdf(s))
        assert np.all(np.floor(u * 4000).astype(int) == np.arange(4000)) or np.max(np.abs(u * 4000 - np.arange(4000) - 0.5)) <= 0.51


def test_logit_normal_loc_scale_and_edm_sigma():
    t = np.asarray(sample_timesteps(jax.random.PRNGKey(1), (20000,), dist="logit_normal", loc=0.5, scale=0.7),
                   np.float64)
    lt = logit(t)
    np.testing.assert_allclose([lt.mean(), lt.std()], [0.5, 0.7], atol=0.02)
    s = np.log(np.asarray(sample_edm_sigma(jax.random.PRNGKey(2), (20000,)), np.float64))
    np.testing.assert_allclose([s.mean(), s.std()], [-1.2, 1.2], atol=0.03)
    assert np.all(np.isfinite(expit(lt)))


@pytest.mark.parametrize("dist", TIMESTEP_DISTS)
def test_timestep_dtype(dist, dtype):
    t = sample_timesteps(jax.random.PRNGKey(0), (64,), dist=dist, t_min=0.1, t_max=0.9, dtype=dtype)
    assert t.dtype == dtype and float(t.min()) > 0.1 and float(t.max()) < 0.9
    assert sample_edm_sigma(jax.random.PRNGKey(0), (8,), dtype=dtype).dtype == dtype


def test_timestep_errors():
    k = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="unknown dist"):
        sample_timesteps(k, (3,), dist="beta")
    with pytest.raises(ValueError, match="t_min"):
        sample_timesteps(k, (3,), t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="at most one"):
        sample_timesteps(k, (3,), antithetic=True, stratified=True)
    with pytest.raises(ValueError, match="dtype"):
        sample_timesteps(k, (3,), dtype=jnp.bfloat16)
