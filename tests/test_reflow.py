"""Reflow on CondOT (rectified flow) between Gaussians, where everything is closed form.

Data N(mu, s0^2 I), source x1 ~ N(0, I). The 1-rectified flow's marginal velocity is the exact
Gaussian PF-ODE field, whose flow from t = 1 to t = 0 is the affine monotone map x0 = mu + s0 x1
(the W2-optimal map between the two isotropic Gaussians). On pairs (mu + s0 x1, x1) the straight
interpolation x_t = (1 - t) x0 + t x1 = (1 - t) mu + ((1 - t) s0 + t) x1 determines x1, so the
straight-path velocity v(x_t, t) = x1 - x0 = (1 - s0) x1 - mu has zero reflow loss.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative.paths import get_path
from research.generative.reflow import reflow_loss, reflow_pairs
from tests.gaussian_oracle import GaussianOracle
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

MU = np.array([0.8, -0.3, 1.5], np.float32)
S0 = 0.6


def _straight_velocity(x, t):
    t = t[:, None]
    x1 = (x - (1 - t) * jnp.asarray(MU, x.dtype)) / ((1 - t) * S0 + t)
    return (1 - S0) * x1 - jnp.asarray(MU, x.dtype)


def test_reflow_pairs_are_the_exact_transport_map():
    """x0 from reflow_pairs (RK4, 32 steps, float32) equals mu + s0 x1. Tolerance: RK4's global error
    h^4 |x^(5)| / 180 with h = 1/32 and a field whose log-std rate varies on a scale ~0.3 -> ~1e-6,
    plus float32 round-off over 32 steps (~1e-6) -> 2e-5 absolute on |x| ~ 3."""
    o = GaussianOracle(get_path("rectified_flow"), MU, S0)
    x0, x1 = reflow_pairs(o.velocity, jax.random.PRNGKey(0), (256, 3), num_steps=32, solver="rk4")
    assert x0.shape == x1.shape == (256, 3) and x0.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x0), MU + S0 * np.asarray(x1), atol=2e-5)
    # the noise side really is N(0, I) draws
    assert abs(float(jnp.std(x1)) - 1.0) < 0.1


def test_reflow_loss_is_zero_on_exact_pairs_at_the_straight_velocity(dtype):
    """One reflow training step on the exact-map pairs: the loss at the straight-path velocity is zero
    up to round-off (x1 recovered from x_t with ~eps relative error, squared: < 1e-24 in float64,
    < 1e-10 in float32) and so is its gradient, so an SGD step leaves the model unchanged. The
    1-rectified flow's own field is not that velocity: along the straight path of coupled pairs the
    marginal std is (1 - t) s0 + t, not sqrt((1 - t)^2 s0^2 + t^2), so reflow has something to learn
    (its loss is > 0), and on independent pairs the straight velocity is wrong."""
    x1 = jax.random.normal(jax.random.PRNGKey(1), (512, 3), dtype)
    x0 = jnp.asarray(MU, dtype) + S0 * x1
    model = lambda p, x, t, c, k: p["w"] * _straight_velocity(x, t)
    params = {"w": jnp.ones((), dtype)}
    loss_fn = lambda p, k: reflow_loss(model, p, x0, x1, k)[0]
    loss, grad = jax.value_and_grad(loss_fn)(params, jax.random.PRNGKey(2))
    assert loss.dtype == dtype
    small = 1e-24 if dtype == jnp.float64 else 1e-10
    assert float(loss) < small
    new_w = params["w"] - 0.1 * grad["w"]  # one SGD step
    assert abs(float(new_w) - 1.0) < np.sqrt(small)
    # the 1-rectified flow's (curved) field is not optimal for the reflow objective
    o = GaussianOracle(get_path("rectified_flow"), MU, S0)
    loss_rf, _ = reflow_loss(lambda p, x, t, c, k: o.velocity(x, t), None, x0, x1, jax.random.PRNGKey(2))
    assert float(loss_rf) > 1e-2
    # independent (x0, x1) pairs: the straight velocity is wrong, loss of order the pair variance
    x0_ind = jnp.asarray(MU, dtype) + S0 * jax.random.normal(jax.random.PRNGKey(3), (512, 3), dtype)
    loss_ind, _ = reflow_loss(model, params, x0_ind, x1, jax.random.PRNGKey(2))
    assert float(loss_ind) > 0.1
