"""Gaussian paths and parameterisation conversions against autodiff and exact algebra."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import parameterization as P
from research.generative.paths import PATHS, get_path
from research.generative.sde import PathSDE
from tests.gaussian_oracle import GaussianOracle

NAMES = ["rectified_flow", "vp_linear", "vp_cosine", "ve", "sub_vp", "edm"]


def _ts(name):
    if name == "edm":
        return jnp.array([0.01, 0.3, 1.0, 5.0, 40.0], jnp.float32)
    return jnp.array([0.01, 0.2, 0.5, 0.8, 0.97], jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autodiff(name):
    path = get_path(name)
    t = _ts(name)
    da = jax.vmap(jax.grad(lambda s: path.alpha(s)))(t)
    ds = jax.vmap(jax.grad(lambda s: path.sigma(s)))(t)
    np.testing.assert_allclose(path.d_alpha(t), da, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(path.d_sigma(t), ds, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name,a0,s1", [("rectified_flow", 1.0, 1.0), ("vp_linear", 1.0, 1.0),
                                        ("vp_cosine", 1.0, 1.0), ("sub_vp", 1.0, 1.0)])
def test_endpoints(name, a0, s1):
    path = get_path(name)
    np.testing.assert_allclose(path.alpha(0.0), a0, atol=1e-6)
    np.testing.assert_allclose(path.sigma(1.0), s1, atol=1e-2)
    if name != "sub_vp":  # VP-type: alpha^2 + sigma^2 = 1 ; rectified flow: alpha + sigma = 1
        t = _ts(name)
        lhs = path.alpha(t) + path.sigma(t) if name == "rectified_flow" else path.alpha(t) ** 2 + path.sigma(t) ** 2
        np.testing.assert_allclose(lhs, 1.0, rtol=1e-5)


def test_closed_forms_of_named_paths():
    t = jnp.array([0.1, 0.5, 0.9])
    vp = get_path("vp_linear", beta_min=0.1, beta_max=20.0)
    np.testing.assert_allclose(vp.alpha(t), np.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t), rtol=1e-6)
    ve = get_path("ve", sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0 ** t, rtol=1e-5)
    sub = get_path("sub_vp")
    np.testing.assert_allclose(sub.sigma(t), 1.0 - vp.alpha(t) ** 2, rtol=1e-5)
    cos = get_path("vp_cosine", s=0.008)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cos.alpha(t) ** 2, f(np.asarray(t)) / f(0.0), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_edm_sigma_inverse(name):
    path = get_path(name)
    t = _ts(name)
    np.testing.assert_allclose(path.t_from_edm_sigma(path.edm_sigma(t)), t, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("src", P.PREDICTIONS)
def test_conversions_exact_from_ground_truth(name, src):
    """With x_t built from known (x0, eps), every parameterisation maps back to exactly (x0, eps)."""
    path = get_path(name)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    t = _ts(name)
    x0 = jax.random.normal(k1, (5, 3))
    eps = jax.random.normal(k2, (5, 3))
    x_t = path.marginal(x0, eps, t)
    # independent targets from the definitions
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    targets = {"eps": eps, "x0": x0, "score": -eps / s,
               "velocity": path.d_alpha(t)[:, None] * x0 + path.d_sigma(t)[:, None] * eps}
    np.testing.assert_allclose(x_t, a * x0 + s * eps, rtol=1e-6)
    rx0, reps = P.to_x0_eps(path, targets[src], x_t, t, src)
    np.testing.assert_allclose(rx0, x0, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(reps, eps, rtol=2e-3, atol=2e-3)
    for dst in P.PREDICTIONS:
        out = P.convert(path, targets[src], x_t, t, src=src, dst=dst)
        np.testing.assert_allclose(out, targets[dst], rtol=3e-3, atol=3e-3 * float(jnp.max(jnp.abs(targets[dst]))))


@pytest.mark.parametrize("name", NAMES)
def test_velocity_is_probability_flow_drift(name):
    """For Gaussian data the marginal velocity a' E[x0|x] + s' E[eps|x] equals the PF-ODE drift
    f x - g^2/2 score of the SDE with the path's marginals (independent formula via PathSDE)."""
    path = get_path(name)
    o = GaussianOracle(path, [0.7, -1.2], 0.6)
    sde = PathSDE(path)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    t = _ts(name)
    v = o.velocity(x, t)
    drift = sde.reverse(o.score, probability_flow=True).sde(x, t)[0]
    np.testing.assert_allclose(v, drift, rtol=2e-3, atol=2e-4)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("nope")
    with pytest.raises(TypeError, match="bad arguments"):
        get_path("ve", beta_min=1.0)
    with pytest.raises(ValueError, match="unknown prediction"):
        P.convert(get_path("ve"), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1,)), src="noise", dst="x0")
    assert set(NAMES) <= set(PATHS)


def test_paths_are_hashable_static_args():
    path = get_path("vp_linear")

    @jax.jit
    def f(x):
        return path.marginal(x, x, jnp.full((x.shape[0],), 0.5))

    assert hash(path) == hash(get_path("vp_linear"))
    assert f(jnp.ones((2, 2))).shape == (2, 2)
