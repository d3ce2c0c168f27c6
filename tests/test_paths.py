"""Gaussian paths and parameterisation conversions against autodiff and exact algebra."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import parameterization as P
from research.generative.paths import PATHS, get_path
from research.generative.sde import PathSDE
from tests.gaussian_oracle import GaussianOracle
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

NAMES = ["rectified_flow", "vp_linear", "vp_cosine", "ve", "sub_vp", "edm"]


def _ts(name, dtype=jnp.float32):
    if name == "edm":
        return jnp.array([0.01, 0.3, 1.0, 5.0, 40.0], dtype)
    return jnp.array([0.01, 0.2, 0.5, 0.8, 0.97], dtype)


def _f64(dtype):
    return dtype == jnp.float64


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autodiff(name, dtype):
    """Closed-form derivatives = autodiff of alpha, sigma. The two evaluate different expressions of the
    same function; the worst case is the cosine path's sigma' = -alpha alpha' / sigma at t = 0.01,
    where 1 - alpha^2 ~ 6e-4 cancels ~3 digits: 2e-4 relative in float32, 1e-11 in float64."""
    path = get_path(name)
    t = _ts(name, dtype)
    da = jax.vmap(jax.grad(lambda s: path.alpha(s)))(t)
    ds = jax.vmap(jax.grad(lambda s: path.sigma(s)))(t)
    assert da.dtype == dtype and path.d_alpha(t).dtype == dtype and path.d_sigma(t).dtype == dtype
    rtol, atol = (1e-11, 1e-14) if _f64(dtype) else (2e-4, 1e-6)
    np.testing.assert_allclose(path.d_alpha(t), da, rtol=rtol, atol=atol)
    np.testing.assert_allclose(path.d_sigma(t), ds, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,a0,s1", [("rectified_flow", 1.0, 1.0), ("vp_linear", 1.0, 1.0),
                                        ("vp_cosine", 1.0, 1.0), ("sub_vp", 1.0, 1.0)])
def test_endpoints(name, a0, s1, dtype):
    """alpha(0) = 1 and the identities alpha^2 + sigma^2 = 1 / alpha + sigma = 1 hold to a few ulps
    (1e-6 / 1e-5 in float32, 1e-14 in float64); sigma(1) is only ~1 (VP-type paths stop at 1 - 4e-5)."""
    path = get_path(name)
    np.testing.assert_allclose(path.alpha(jnp.zeros((), dtype)), a0, atol=1e-14 if _f64(dtype) else 1e-6)
    np.testing.assert_allclose(path.sigma(jnp.ones((), dtype)), s1, atol=1e-2)
    if name != "sub_vp":  # VP-type: alpha^2 + sigma^2 = 1 ; rectified flow: alpha + sigma = 1
        t = _ts(name, dtype)
        lhs = path.alpha(t) + path.sigma(t) if name == "rectified_flow" else path.alpha(t) ** 2 + path.sigma(t) ** 2
        np.testing.assert_allclose(lhs, 1.0, rtol=1e-14 if _f64(dtype) else 1e-5)


def test_closed_forms_of_named_paths(dtype):
    """Against float64 numpy formulas: float32 rtol 1e-6..1e-5 (exp of a float32 argument up to ~9,
    5000^t), float64 1e-13 (the same relative argument error, 1e-16 x 9 x a few)."""
    f64 = _f64(dtype)
    t = jnp.array([0.1, 0.5, 0.9], dtype)
    tn = np.asarray(t, np.float64)
    vp = get_path("vp_linear", beta_min=0.1, beta_max=20.0)
    np.testing.assert_allclose(vp.alpha(t), np.exp(-0.25 * tn ** 2 * 19.9 - 0.05 * tn), rtol=1e-13 if f64 else 1e-6)
    ve = get_path("ve", sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0 ** tn, rtol=1e-13 if f64 else 1e-5)
    sub = get_path("sub_vp")
    np.testing.assert_allclose(sub.sigma(t), 1.0 - vp.alpha(t) ** 2, rtol=1e-13 if f64 else 1e-5)
    cos = get_path("vp_cosine", s=0.008)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(cos.alpha(t) ** 2, f(tn) / f(0.0), rtol=1e-13 if f64 else 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_edm_sigma_inverse(name, dtype):
    """t_from_edm_sigma inverts edm_sigma. Float32 loses ~3 digits (cosine near t = 0: arccos of a
    number ~1; VP: sqrt(1 + s^2) with s^2 ~ 1e-4): rtol 2e-3. Float64 has the same amplification
    of a 1e-16 round-off: rtol 1e-10."""
    path = get_path(name)
    t = _ts(name, dtype)
    back = path.t_from_edm_sigma(path.edm_sigma(t))
    assert back.dtype == dtype
    np.testing.assert_allclose(back, t, **(dict(rtol=1e-10, atol=1e-12) if _f64(dtype) else dict(rtol=2e-3, atol=2e-4)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("src", P.PREDICTIONS)
def test_conversions_exact_from_ground_truth(name, src, dtype):
    """With x_t built from known (x0, eps), every parameterisation maps back to exactly (x0, eps).
    Float32 tolerance 2e-3: the maps divide by alpha ~0.05 (cosine, t = 0.97) or sigma ~0.01 and
    subtract nearly equal terms, amplifying 1e-7 round-off ~1e4x. Float64: the same amplification of
    1e-16 -> 1e-10."""
    path = get_path(name)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    t = _ts(name, dtype)
    x0 = jax.random.normal(k1, (5, 3), dtype)
    eps = jax.random.normal(k2, (5, 3), dtype)
    tol = 1e-10 if _f64(dtype) else 2e-3
    x_t = path.marginal(x0, eps, t)
    # independent targets from the definitions
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    targets = {"eps": eps, "x0": x0, "score": -eps / s,
               "velocity": path.d_alpha(t)[:, None] * x0 + path.d_sigma(t)[:, None] * eps}
    np.testing.assert_allclose(x_t, a * x0 + s * eps, rtol=1e-14 if _f64(dtype) else 1e-6)
    rx0, reps = P.to_x0_eps(path, targets[src], x_t, t, src)
    assert rx0.dtype == dtype and reps.dtype == dtype
    np.testing.assert_allclose(rx0, x0, rtol=tol, atol=tol)
    np.testing.assert_allclose(reps, eps, rtol=tol, atol=tol)
    for dst in P.PREDICTIONS:
        out = P.convert(path, targets[src], x_t, t, src=src, dst=dst)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, targets[dst], rtol=1.5 * tol,
                                   atol=1.5 * tol * float(jnp.max(jnp.abs(targets[dst]))))


@pytest.mark.parametrize("name", NAMES)
def test_velocity_is_probability_flow_drift(name, dtype):
    """For Gaussian data the marginal velocity a' E[x0|x] + s' E[eps|x] equals the PF-ODE drift
    f x - g^2/2 score of the SDE with the path's marginals (independent formula via PathSDE).
    Both are differences of terms up to ~1/sigma(0.01) ~ 100x the result: 2e-3 in float32,
    1e-10 in float64."""
    path = get_path(name)
    o = GaussianOracle(path, [0.7, -1.2], 0.6)
    sde = PathSDE(path)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2), dtype)
    t = _ts(name, dtype)
    v = o.velocity(x, t)
    drift = sde.reverse(o.score, probability_flow=True).sde(x, t)[0]
    assert drift.dtype == dtype
    np.testing.assert_allclose(v, drift, **(dict(rtol=1e-10, atol=1e-12) if _f64(dtype) else dict(rtol=2e-3, atol=2e-4)))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("nope")
    with pytest.raises(TypeError, match="bad arguments"):
        get_path("ve", beta_min=1.0)
    # hyper-parameters out of range are rejected when the path is built
    for name, kw, arg in [("vp_linear", {"beta_min": 5.0, "beta_max": 1.0}, "beta_min"),
                          ("vp_linear", {"beta_min": 0.0, "beta_max": 0.0}, "beta_max"),
                          ("sub_vp", {"beta_min": -1.0}, "beta_min"), ("vp_cosine", {"s": -0.1}, "s="),
                          ("ve", {"sigma_min": 0.0}, "sigma_min"), ("ve", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max")]:
        with pytest.raises(ValueError, match=arg):
            get_path(name, **kw)
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
