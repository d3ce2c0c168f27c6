"""Sliced Wasserstein and MMD against closed forms and brute-force numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.eval.sample_metrics import mmd_rbf, sliced_wasserstein


def test_sliced_wasserstein_shift_closed_form():
    """y = x + m: every 1-D projection is shifted by theta.m, so SW_2^2 = E_theta (theta.m)^2 = |m|^2 / D."""
    x = jax.random.normal(jax.random.PRNGKey(0), (200, 3))
    m = jnp.array([1.0, -2.0, 0.5])
    sw = sliced_wasserstein(jax.random.PRNGKey(1), x, x + m, num_projections=4000)
    np.testing.assert_allclose(float(sw), float(jnp.linalg.norm(m)) / np.sqrt(3), rtol=0.02)
    assert float(sliced_wasserstein(jax.random.PRNGKey(1), x, x[::-1])) == pytest.approx(0.0, abs=1e-6)


def test_sliced_wasserstein_1d_matches_sorted_distance():
    x = np.random.default_rng(0).standard_normal((300, 1)).astype(np.float32)
    y = np.random.default_rng(1).exponential(size=(300, 1)).astype(np.float32)
    ref = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    np.testing.assert_allclose(float(sliced_wasserstein(jax.random.PRNGKey(2), x, y, num_projections=4)), ref,
                               rtol=1e-5)


def _mmd_bruteforce(x, y, hs):
    def k(a, b):
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(np.exp(-d / (2 * h * h)) for h in hs)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_mmd_matches_bruteforce_and_gaussian_closed_form():
    rng = np.random.default_rng(0)
    hs = (0.5, 1.0)
    x = rng.standard_normal((2000, 2))
    y = rng.standard_normal((2000, 2)) + np.array([0.7, 0.0])
    got = float(mmd_rbf(x.astype(np.float32), y.astype(np.float32), bandwidths=hs))
    np.testing.assert_allclose(got, _mmd_bruteforce(x, y, hs), rtol=1e-3)
    # closed form for N(m1, I) vs N(m2, I): E k = (h^2/(h^2+2))^{D/2} exp(-|dm|^2 / (2 (h^2 + 2)))
    ref = sum(2 * (h * h / (h * h + 2)) * (1 - np.exp(-0.49 / (2 * (h * h + 2)))) for h in hs)
    np.testing.assert_allclose(got, ref, rtol=0.15)
    same = float(mmd_rbf(x[:1000].astype(np.float32), x[1000:].astype(np.float32), bandwidths=hs))
    assert abs(same) < 0.1 * ref


def test_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(jax.random.PRNGKey(0), jnp.zeros((3, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_rbf(jnp.zeros((1, 2)), jnp.zeros((4, 2)))
