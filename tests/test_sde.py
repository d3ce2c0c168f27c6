"""Score SDEs: marginals against the numerically integrated moment ODEs, priors, reverse SDE, discretisations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from research.generative.paths import get_path
from research.generative.sde import SDE, PathSDE, SubVPSDE, VESDE, VPSDE, get_sde
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

SDES = {
    "vp": VPSDE(0.1, 20.0),
    "subvp": SubVPSDE(0.1, 20.0),
    "ve": VESDE(0.01, 50.0),
    "path_rf": PathSDE(get_path("rectified_flow"), T=0.99),
    "path_cosine": PathSDE(get_path("vp_cosine")),
    "path_edm": PathSDE(get_path("edm"), T=80.0),
}
T_GRID = jnp.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.9], jnp.float32)


def _ts(name):
    return T_GRID * 60.0 if name == "path_edm" else T_GRID


def _make_sde(name):
    """Built inside the test, so a PathSDE's prior_std is evaluated under the test's x64 setting."""
    return {
        "vp": lambda: VPSDE(0.1, 20.0), "subvp": lambda: SubVPSDE(0.1, 20.0), "ve": lambda: VESDE(0.01, 50.0),
        "path_rf": lambda: PathSDE(get_path("rectified_flow"), T=0.99),
        "path_cosine": lambda: PathSDE(get_path("vp_cosine")), "path_edm": lambda: PathSDE(get_path("edm"), T=80.0),
    }[name]()


def _rk4_moments(f, g2, m0, v0, h):
    """Classical RK4 for d mean/dt = f mean, d var/dt = 2 f var + g^2 (f, g2 sampled at t_n, t_n + h/2,
    t_n + h of every step: arrays [3, K]); returns mean, var at the K + 1 grid points."""
    m, v = [m0], [v0]
    for (fa, fb, fc), (ga, gb, gc) in zip(f.T, g2.T):
        y = np.array([m[-1], v[-1]])
        rhs = lambda ff, gg, y: np.array([ff * y[0], 2 * ff * y[1] + gg])
        k1 = rhs(fa, ga, y)
        k2 = rhs(fb, gb, y + 0.5 * h * k1)
        k3 = rhs(fb, gb, y + 0.5 * h * k2)
        k4 = rhs(fc, gc, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        m.append(y[0])
        v.append(y[1])
    return np.array(m), np.array(v)


@pytest.mark.parametrize("name", list(SDES))
def test_marginals_solve_moment_odes(name, dtype):
    """Independent check of the perturbation kernel: integrate the moment ODEs
        d mean/dt = f(t) mean,   d var/dt = 2 f(t) var + g(t)^2
    numerically (RK4, 4000 steps, in float64 numpy) with f, g read from ``sde.sde`` only, from the
    kernel of the point mass x0 = 1 at a small t_init (mean alpha, var sigma^2 there), and compare with the
    closed-form path alpha(t), sigma(t)^2 that ``marginal_prob`` returns. For PathSDE, f and g come
    from derivatives of alpha and sigma, so this checks that integrating them gives the path back.

    Tolerances: float64: RK4's global error is ~h^4 max|y^(5)| <~ 1e-12 at h = T/4000 even for the
    stiffest case (rectified flow, f = -1/(1 - t) near t = 0.9), plus ~1e-16 round-off per step over
    4000 steps (measured: <= 2e-13) -> rtol 1e-10. float32: f and g carry ~1e-7 relative error (float32 t and schedule), the moments
    inherit it times a few -> rtol 2e-5, atol 1e-7 near var = 0."""
    sde = _make_sde(name)
    ts = np.asarray(_ts(name), np.float64)
    k = 4000
    t_init = ts[0] / 4  # g is 0 * inf at t = 0 for the cosine PathSDE: start just after it
    h = (ts[-1] - t_init) / k
    grid = t_init + np.arange(k + 1) * h
    tq = np.stack([grid[:-1], grid[:-1] + 0.5 * h, grid[1:]])  # [3, K]
    drift, g = sde.sde(jnp.ones((tq.size, 1), dtype), jnp.asarray(tq.reshape(-1), dtype))
    assert drift.dtype == dtype and g.dtype == dtype
    f = np.asarray(drift[:, 0], np.float64).reshape(3, k)
    g2 = np.asarray(g, np.float64).reshape(3, k) ** 2
    t0 = jnp.full((1,), t_init, dtype)
    m0, v0 = float(sde.path.alpha(t0)[0]), float(sde.path.sigma(t0)[0]) ** 2
    m, v = _rk4_moments(f, g2, m0, v0, h)
    idx = np.rint((ts - t_init) / h).astype(int)  # compare at the grid points nearest to ts
    mean, std = sde.marginal_prob(jnp.ones((len(ts), 1), dtype), jnp.asarray(grid[idx], dtype))
    assert mean.dtype == dtype and std.dtype == dtype
    rtol, atol = (1e-10, 1e-14) if dtype == jnp.float64 else (2e-5, 1e-7)
    np.testing.assert_allclose(np.asarray(mean[:, 0], np.float64), m[idx], rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(std, np.float64) ** 2, v[idx], rtol=rtol, atol=atol)


@pytest.mark.parametrize("cls,path_name,kw", [(VPSDE, "vp_linear", {}), (SubVPSDE, "sub_vp", {}),
                                              (VESDE, "ve", {})])
def test_closed_form_coefficients_match_generic_path_formula(cls, path_name, kw, dtype):
    """The named SDEs' hand-written f, g equal f = alpha'/alpha, g^2 = (sigma^2)' - 2 f sigma^2.
    Tolerance: g^2 = 2 s s' - 2 f s^2 is a difference of terms ~ beta, cancelling to ~1e-3 of them at
    t = 0.02 (sub-VP), so the relative error is ~1e3 eps: 2e-3 in float32, 1e-11 in float64."""
    sde = cls(**kw)
    generic = PathSDE(get_path(path_name))
    t = T_GRID.astype(dtype)
    rtol = 1e-11 if dtype == jnp.float64 else 2e-3
    np.testing.assert_allclose(sde.drift_coef(t), SDE.drift_coef(generic, t), rtol=min(rtol, 1e-5), atol=1e-6 * rtol)
    np.testing.assert_allclose(sde.diffusion_coef(t), SDE.diffusion_coef(generic, t), rtol=rtol)


def test_score_sde_closed_forms(dtype):
    """score_sde's formulas in float64 numpy; rtol 1e-5 in float32 (exp/sqrt of float32 t), 1e-12 in
    float64 (a few ulps of the same expressions evaluated in a different order)."""
    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    vp = VPSDE(0.1, 20.0)
    t = T_GRID.astype(dtype)
    tn = np.asarray(t, np.float64)
    np.testing.assert_allclose(vp.diffusion_coef(t) ** 2, 0.1 + tn * 19.9, rtol=rtol)
    ve = VESDE(0.01, 50.0)
    np.testing.assert_allclose(ve.diffusion_coef(t), 0.01 * 5000 ** tn * np.sqrt(2 * np.log(5000)), rtol=rtol * 10)
    x0 = jnp.ones((len(t), 3), dtype)
    m, s = vp.marginal_prob(x0, t)
    assert m.dtype == dtype and s.dtype == dtype
    lm = -0.25 * tn ** 2 * 19.9 - 0.5 * tn * 0.1
    np.testing.assert_allclose(m[:, 0], np.exp(lm), rtol=rtol)
    np.testing.assert_allclose(s, np.sqrt(-np.expm1(2 * lm)), rtol=rtol)
    _, s_sub = SubVPSDE().marginal_prob(x0, t)
    np.testing.assert_allclose(s_sub, -np.expm1(2 * lm), rtol=rtol)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_prior(name, dtype):
    """Sample std by Monte Carlo (5 %); log-density against scipy at rtol 1e-5 / 1e-12 (float32 /
    float64: a sum of 3 squares and a log, a few ulps)."""
    sde = SDES[name]
    z = sde.prior_sample(jax.random.PRNGKey(0), (4000, 3), dtype)
    assert z.dtype == dtype and sde.prior_logp(z).dtype == dtype
    scale = 50.0 if name == "ve" else 1.0
    np.testing.assert_allclose(np.std(np.asarray(z)), scale, rtol=0.05)
    ref = stats.norm(0, scale).logpdf(np.asarray(z[:10], np.float64)).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z[:10]), ref, rtol=1e-12 if dtype == jnp.float64 else 1e-5)


def test_reverse_sde_and_probability_flow(dtype):
    """Same arithmetic on both sides: equal to a couple of ulps (1e-6 / 1e-14)."""
    rtol = 1e-14 if dtype == jnp.float64 else 1e-6
    sde = VPSDE()
    score = lambda x, t: -x * 2.0
    x = jnp.ones((2, 3), dtype)
    t = jnp.array([0.3, 0.6], dtype)
    f, g = sde.sde(x, t)
    rf, rg = sde.reverse(score).sde(x, t)
    assert rf.dtype == dtype and rg.dtype == dtype
    np.testing.assert_allclose(rf, f - g[:, None] ** 2 * score(x, t), rtol=rtol)
    np.testing.assert_allclose(rg, g)
    pf, pg = sde.reverse(score, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(pf, f - 0.5 * g[:, None] ** 2 * score(x, t), rtol=rtol)
    np.testing.assert_allclose(pg, 0.0)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_discretize_is_consistent_with_the_sde(name):
    """Per unit time, the discrete (f, G^2) tend to (drift, g^2) as the step shrinks."""
    sde = SDES[name]
    x = jnp.full((1, 2), 0.8)
    t = jnp.array([0.5])
    drift, g = sde.sde(x, t)
    for dt in (1e-3, 1e-4):
        f, G = sde.discretize(x, t, t - dt)
        np.testing.assert_allclose(f / dt, drift, rtol=2e-2, atol=1e-4)
        np.testing.assert_allclose(G ** 2 / dt, g ** 2, rtol=2e-2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(5.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(2.0, 1.0)
    with pytest.raises(ValueError, match="prior_std"):
        PathSDE(get_path("rectified_flow"), prior_std=0.0)
    with pytest.raises(ValueError, match="T must be"):
        PathSDE(get_path("rectified_flow"), T=-1.0)
    with pytest.raises(ValueError, match="unknown SDE"):
        get_sde("vpp")
    assert isinstance(get_sde("ve", sigma_max=10.0), VESDE)
    assert math.isclose(get_sde("vp").beta_max, 20.0)
