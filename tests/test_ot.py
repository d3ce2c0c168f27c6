"""On-device exact assignment (Hungarian) against scipy.optimize.linear_sum_assignment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from research.generative.ot import linear_assignment, ot_pairing, squared_distances
from tests.test_x64 import dtype  # noqa: F401  (fixture: float32 and float64)

_la = jax.jit(linear_assignment)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 100])
@pytest.mark.parametrize("kind", ["normal", "uniform", "negative"])
def test_assignment_matches_scipy(n, kind, dtype):
    rng = np.random.default_rng(n)
    c = {"normal": rng.standard_normal, "uniform": rng.random}.get(kind, lambda s: -np.abs(rng.standard_normal(s)) * 100)((n, n))
    c = c.astype(dtype)
    perm = np.asarray(_la(jnp.asarray(c)))
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    r, col = linear_sum_assignment(c)
    np.testing.assert_array_equal(perm, col)  # continuous costs: the optimum is unique a.s.


@pytest.mark.parametrize("n", [5, 16, 40])
def test_assignment_with_ties_has_optimal_cost(n):
    """Integer costs with many ties: the optimum may not be unique, its cost is."""
    rng = np.random.default_rng(100 + n)
    c = rng.integers(0, 4, size=(n, n)).astype(np.float32)
    perm = np.asarray(_la(c))
    assert sorted(perm.tolist()) == list(range(n))
    r, col = linear_sum_assignment(c)
    assert c[np.arange(n), perm].sum() == c[r, col].sum()


def test_ot_pairing_point_clouds_and_jit_inside_function(dtype):
    """squared_distances by |a|^2 + |b|^2 - 2 a.b cancels terms of size ~10 to results >= ~1e-3:
    absolute error ~10 eps -> 1e-4 (float32) / 1e-12 (float64)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, (128, 2), dtype) + 2.0
    x1 = jax.random.normal(k2, (128, 2), dtype)
    perm = np.asarray(jax.jit(ot_pairing)(x0, x1))
    c = ((np.asarray(x0, np.float64)[:, None] - np.asarray(x1, np.float64)[None]) ** 2).sum(-1)
    _, col = linear_sum_assignment(c)
    np.testing.assert_array_equal(perm, col)
    d = squared_distances(x0, x1)
    assert d.dtype == dtype
    tol = 1e-12 if dtype == jnp.float64 else 1e-4
    np.testing.assert_allclose(d, c, rtol=tol, atol=tol)
    # images (non-flat data) and vmapped over a leading axis
    xi = jax.random.normal(k1, (3, 16, 4, 4, 1))
    yi = jax.random.normal(k2, (3, 16, 4, 4, 1))
    perms = jax.jit(jax.vmap(ot_pairing))(xi, yi)
    for b in range(3):
        cb = ((np.asarray(xi[b]).reshape(16, -1)[:, None] - np.asarray(yi[b]).reshape(16, -1)[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(np.asarray(perms[b]), linear_sum_assignment(cb)[1])


def test_errors():
    with pytest.raises(ValueError, match="square"):
        linear_assignment(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="equal batch"):
        ot_pairing(jnp.zeros((3, 2)), jnp.zeros((4, 2)))
