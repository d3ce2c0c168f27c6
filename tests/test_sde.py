"""Score SDEs: marginals solve the moment ODEs (autodiff), priors, reverse SDE, discretisations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from research.generative.paths import get_path
from research.generative.sde import SDE, PathSDE, SubVPSDE, VESDE, VPSDE, get_sde

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


@pytest.mark.parametrize("name", list(SDES))
def test_marginals_solve_moment_odes(name):
    """d mean/dt = f mean and d var/dt = 2 f var + g^2, with mean/var from marginal_prob, by jvp in t."""
    sde = SDES[name]
    x0 = jnp.array([[1.3, -0.4]], jnp.float32)
    for t in _ts(name):
        def mean_var(s):
            m, std = sde.marginal_prob(x0, s)
            return m, std ** 2

        (m, var), (dm, dvar) = jax.jvp(mean_var, (t,), (jnp.ones_like(t),))
        drift, g = sde.sde(m, t)
        f = drift / m  # linear drift coefficient
        np.testing.assert_allclose(dm, drift, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(dvar, 2 * f[0, 0] * var + g ** 2, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("cls,path_name,kw", [(VPSDE, "vp_linear", {}), (SubVPSDE, "sub_vp", {}),
                                              (VESDE, "ve", {})])
def test_closed_form_coefficients_match_generic_path_formula(cls, path_name, kw):
    """The named SDEs' hand-written f, g equal f = alpha'/alpha, g^2 = (sigma^2)' - 2 f sigma^2."""
    sde = cls(**kw)
    generic = PathSDE(get_path(path_name))
    np.testing.assert_allclose(sde.drift_coef(T_GRID), SDE.drift_coef(generic, T_GRID), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sde.diffusion_coef(T_GRID), SDE.diffusion_coef(generic, T_GRID), rtol=2e-3)


def test_score_sde_closed_forms():
    vp = VPSDE(0.1, 20.0)
    t = T_GRID
    np.testing.assert_allclose(vp.diffusion_coef(t) ** 2, 0.1 + t * 19.9, rtol=1e-5)
    ve = VESDE(0.01, 50.0)
    np.testing.assert_allclose(ve.diffusion_coef(t), 0.01 * 5000 ** t * np.sqrt(2 * np.log(5000)), rtol=1e-5)
    x0 = jnp.ones((len(t), 3))
    m, s = vp.marginal_prob(x0, t)
    lm = -0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1
    np.testing.assert_allclose(m[:, 0], np.exp(lm), rtol=1e-5)
    np.testing.assert_allclose(s, np.sqrt(1 - np.exp(2 * lm)), rtol=1e-5)
    _, s_sub = SubVPSDE().marginal_prob(x0, t)
    np.testing.assert_allclose(s_sub, 1 - np.exp(2 * lm), rtol=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_prior(name):
    sde = SDES[name]
    z = sde.prior_sample(jax.random.PRNGKey(0), (4000, 3))
    scale = 50.0 if name == "ve" else 1.0
    np.testing.assert_allclose(np.std(np.asarray(z)), scale, rtol=0.05)
    ref = stats.norm(0, scale).logpdf(np.asarray(z[:10], np.float64)).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z[:10]), ref, rtol=1e-5)


def test_reverse_sde_and_probability_flow():
    sde = VPSDE()
    score = lambda x, t: -x * 2.0
    x = jnp.ones((2, 3))
    t = jnp.array([0.3, 0.6])
    f, g = sde.sde(x, t)
    rf, rg = sde.reverse(score).sde(x, t)
    np.testing.assert_allclose(rf, f - g[:, None] ** 2 * score(x, t), rtol=1e-6)
    np.testing.assert_allclose(rg, g)
    pf, pg = sde.reverse(score, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(pf, f - 0.5 * g[:, None] ** 2 * score(x, t), rtol=1e-6)
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
    with pytest.raises(ValueError, match="unknown SDE"):
        get_sde("vpp")
    assert isinstance(get_sde("ve", sigma_max=10.0), VESDE)
    assert math.isclose(get_sde("vp").beta_max, 20.0)
