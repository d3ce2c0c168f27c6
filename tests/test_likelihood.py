"""PF-ODE likelihood, divergence estimators and bits/dim against closed forms."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import likelihood as LK
from research.generative import parameterization as P
from research.generative.paths import get_path
from research.generative.sampling import pf_ode_velocity
from research.generative.sde import PathSDE, SubVPSDE, VESDE, VPSDE
from tests.gaussian_oracle import GaussianOracle
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

MU = np.array([0.7, -0.4, 1.1], np.float32)
S0 = 0.6


class _Field(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = nn.tanh(nn.Dense(16)(jnp.concatenate([x, t[:, None]], -1)))
        return nn.Dense(x.shape[-1])(h)


@pytest.fixture(scope="module")
def field():
    m = _Field()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    params = m.init(jax.random.PRNGKey(1), x, jnp.zeros((4,)))
    return (lambda y, t: m.apply(params, y, t)), x


def test_exact_divergence_equals_jacobian_trace(field):
    fn, x = field
    t = jnp.full((4,), 0.3)
    div = LK.exact_divergence(fn, x, t)
    ref = [jnp.trace(jax.jacfwd(lambda y: fn(y[None], t[:1])[0])(x[i])) for i in range(4)]
    np.testing.assert_allclose(div, np.array(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(field, kind):
    fn, x = field
    reps = 20000
    xr = jnp.tile(x, (reps, 1))
    t = jnp.full((xr.shape[0],), 0.3)
    probe = LK.make_probe(jax.random.PRNGKey(2), xr.shape, kind)
    est = np.asarray(jax.jit(lambda y, p: LK.hutchinson_divergence(fn, y, t, p))(xr, probe)).reshape(reps, 4)
    exact = np.asarray(LK.exact_divergence(fn, x, t[:4]))
    se = est.std(0) / np.sqrt(reps)
    assert np.all(np.abs(est.mean(0) - exact) < 4 * se + 1e-6), (est.mean(0), exact, se)
    assert np.all(est.std(0) > 0)  # really a random estimator on a non-diagonal Jacobian


CASES = {
    "vp": (VPSDE(), None),
    "subvp": (SubVPSDE(), None),
    "ve": (VESDE(0.01, 50.0), None),
    "rectified_flow": (None, "rectified_flow"),
    "edm": (None, "edm"),
}


def _setup(name):
    sde, path_name = CASES[name]
    if sde is not None:
        path = sde.path
        o = GaussianOracle(path, MU, S0)
        v = pf_ode_velocity(sde, o.score)
    else:
        path = get_path(path_name)
        o = GaussianOracle(path, MU, S0)
        v = P.as_fn(o.eps, path, src="eps", dst="velocity") if path_name == "edm" else o.velocity
    t0 = {"vp": 1e-3, "subvp": 1e-3, "ve": 1e-5, "rectified_flow": 0.0, "edm": 0.002}[name]
    t1 = 80.0 if name == "edm" else 1.0
    return o, v, t0, t1


def _gauss_logp(o, t):
    """log N(z; a mu, v I) at time t with (a mu, v) as float64 constants (jax, the dtype of z)."""
    mean, var = np.asarray(o.mean(t), np.float64), o.var(t)
    return lambda z: (-0.5 * z.shape[1] * math.log(2 * math.pi * var)
                      - 0.5 * jnp.sum((z - jnp.asarray(mean, z.dtype)) ** 2, axis=1) / var)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("divergence", ["exact", "rademacher"])
def test_pf_ode_likelihood_of_gaussian_is_exact(name, divergence, dtype):
    """Exact score -> log p_{t_start}(x) = log N(x; a mu, a^2 s0^2 + s^2) to solver tolerance (the field
    is isotropic-linear, so the Rademacher estimate is exact here too).

    Tolerances follow the solver's: float32 with rtol = atol = 1e-6 on the state (and ~1e-7 round-off
    in the schedules) -> logp to 5e-3 absolute (the log-density integrates div v ~ 1/sigma over
    [1e-5, 1] for VE: 1e-6 relative error per step on a quantity of size ~10-100); float64 with
    rtol = atol = 1e-10 -> 1e-6 (same amplification, 1e4x smaller local error)."""
    f64 = dtype == jnp.float64
    o, v, t0, t1 = _setup(name)
    x = np.asarray(o.mean(t0)) + np.sqrt(o.var(t0)) * np.asarray(jax.random.normal(jax.random.PRNGKey(3), (16, 3)))
    x = jnp.asarray(x, dtype)
    tol = 1e-10 if f64 else 1e-6
    prior = _gauss_logp(o, t1)
    f = jax.jit(lambda y, k: LK.ode_log_likelihood(v, y, prior_logp=prior, t_start=t0, t_end=t1,
                                                   divergence=divergence, key=k, rtol=tol, atol=tol))
    logp, aux = f(x, jax.random.PRNGKey(4))
    assert logp.dtype == dtype and aux["z"].dtype == dtype
    np.testing.assert_allclose(np.asarray(logp), o.logp(x, t0), atol=1e-6 if f64 else 5e-3, rtol=1e-4)
    ztol = 1e-7 if f64 else 1e-3
    np.testing.assert_allclose(np.asarray(aux["z"]), o.transport(np.asarray(x, np.float64), t0, t1), rtol=ztol,
                               atol=ztol * math.sqrt(o.var(t1)))
    assert int(aux["nfe"]) > 6


def test_pf_ode_likelihood_with_the_sde_prior_and_gaussian_probes():
    """VP-SDE with its own N(0, I) prior (approximate at t = 1) and Gaussian Hutchinson probes: unbiased,
    so the average over many probes matches the exact log-density."""
    sde = VPSDE()
    o = GaussianOracle(sde.path, MU, S0)
    x = np.asarray(o.mean(1e-3)) + np.sqrt(o.var(1e-3)) * np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, 3)))
    xr = np.tile(x, (500, 1))
    logp, _ = jax.jit(lambda y, k: LK.ode_log_likelihood(pf_ode_velocity(sde, o.score), y, prior_logp=sde.prior_logp,
                                                         t_start=1e-3, divergence="gaussian", key=k, rtol=1e-4, atol=1e-4))(
        xr, jax.random.PRNGKey(6))
    est = np.asarray(logp).reshape(500, 4)
    se = est.std(0) / np.sqrt(500)
    assert np.all(np.abs(est.mean(0) - o.logp(x, 1e-3)) < 4 * se + 0.03)


def _counting(v):
    """v wrapped so that every evaluation (also inside a JVP, lax.map or the solver loop) is counted."""
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return v(x, t)

    return counted, calls


@pytest.mark.parametrize("solver,divergence", [("heun", "exact"), ("heun", "rademacher"), ("euler", "rademacher"),
                                               ("tsit5", "exact")])
def test_likelihood_nfe_counts_the_velocity_calls(solver, divergence):
    """aux["nfe"] = RHS evaluations; the velocity is called once per evaluation with a Hutchinson
    probe and D times (one JVP per basis vector) with the exact divergence -- counted, not derived."""
    o, v, _, _ = _setup("rectified_flow")
    x = jnp.asarray(np.asarray(jax.random.normal(jax.random.PRNGKey(7), (8, 3))))
    counted, calls = _counting(v)
    kw = {"num_steps": 16} if solver in ("heun", "euler") else {"rtol": 1e-4, "atol": 1e-4}
    _, aux = LK.ode_log_likelihood(counted, x, prior_logp=_gauss_logp(o, 1.0), divergence=divergence, solver=solver,
                                   key=jax.random.PRNGKey(0), **kw)
    jax.effects_barrier()
    per_eval = x.shape[1] if divergence == "exact" else 1
    assert int(aux["nfe"]) * per_eval == len(calls)
    if solver in ("heun", "euler"):
        assert int(aux["nfe"]) == 16 * {"heun": 2, "euler": 1}[solver]


def test_fixed_step_likelihood_and_errors():
    o, v, t0, t1 = _setup("rectified_flow")
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (8, 3)))
    prior = _gauss_logp(o, 1.0)
    logp, aux = LK.ode_log_likelihood(v, x, prior_logp=prior, divergence="exact", solver="heun", num_steps=64)
    np.testing.assert_allclose(np.asarray(logp), o.logp(x, 0.0), atol=2e-2)
    with pytest.raises(ValueError, match="num_steps"):
        LK.ode_log_likelihood(v, x, prior_logp=prior, divergence="exact", solver="heun")
    with pytest.raises(ValueError, match="key"):
        LK.ode_log_likelihood(v, x, prior_logp=prior, divergence="rademacher")
    with pytest.raises(ValueError, match="unknown divergence"):
        LK.ode_log_likelihood(v, x, prior_logp=prior, divergence="skilling")
    with pytest.raises(ValueError, match="t_start != t_end"):
        LK.ode_log_likelihood(v, x, prior_logp=prior, divergence="exact", t_start=0.5, t_end=0.5)


def test_adaptive_likelihood_nfe_is_exact_count():
    calls = []

    def v(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x * (1.0 + t[:, None])

    _, aux = LK.ode_log_likelihood(v, jnp.ones((2, 2)), prior_logp=lambda z: jnp.zeros(z.shape[0]),
                                   divergence="rademacher", key=jax.random.PRNGKey(0), rtol=1e-4, atol=1e-4)
    jax.effects_barrier()
    assert int(aux["nfe"]) == len(calls)


# ----------------------------------------------------------------------------- bits/dim
def test_bits_per_dim_uniform_model_is_log2_bins():
    """A model uniform over the K occupied bins (density 1 / (K w) per dim) has log2(K) bits/dim."""
    for k_bins, w in [(256, 2.0 / 256), (17, 1.0 / 8)]:
        d = 64
        logp = jnp.full((5,), -d * math.log(k_bins * w))
        np.testing.assert_allclose(LK.bits_per_dim(logp, d, bin_width=w), math.log2(k_bins), rtol=1e-6)


def test_bits_per_dim_is_tight_for_a_histogram_density():
    """A density constant on each bin (P(k) / w) makes the dequantisation bound tight:
    bits/dim = -log2 P(x) / D exactly, whatever the dequantisation noise."""
    rng = np.random.default_rng(0)
    k_bins, w, offset, d = 17, 1.0 / 8, -1.0 - 1.0 / 16, 4
    probs = rng.dirichlet(np.ones(k_bins))
    x_int = rng.integers(0, k_bins, size=(6, d))
    z = LK.dequantize(jax.random.PRNGKey(0), jnp.asarray(x_int), bin_width=w, offset=offset)
    kz = np.floor((np.asarray(z, np.float64) - offset) / w).astype(int)
    np.testing.assert_array_equal(kz, x_int)  # the noise stays inside each value's own bin
    logp_z = np.log(probs[kz] / w).sum(1)
    bpd = LK.bits_per_dim(jnp.asarray(logp_z), d, bin_width=w)
    np.testing.assert_allclose(bpd, -np.log2(probs[x_int]).sum(1) / d, rtol=1e-5)


def test_digits_dequantization_bins_are_centred_on_the_data_grid():
    from research.data.digits import to_unit_range

    w, offset = LK.digits_dequantization()
    k = np.arange(17)
    centres = offset + w * (k + 0.5)
    np.testing.assert_allclose(centres, to_unit_range(k), atol=1e-6)
    with pytest.raises(ValueError, match="bin_width"):
        LK.bits_per_dim(jnp.zeros(2), 4, bin_width=0.0)
