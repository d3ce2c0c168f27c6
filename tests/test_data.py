"""Tests for research.data: toy distributions, digits, batching iterator."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from research.data import digits as digits_mod
from research.data import toy
from research.data.iterators import batch_iterator, steps_per_epoch

TOYS = sorted(toy.TOY_DISTRIBUTIONS)


# ---------------------------------------------------------------- toy distributions
@pytest.mark.parametrize("name", TOYS)
def test_toy_shape_dtype_determinism(name):
    fn = toy.get_toy(name)
    a = fn(jax.random.key(0), 500)
    b = fn(jax.random.key(0), 500)
    c = fn(jax.random.key(1), 500)
    assert a.shape == (500, 2) and a.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert float(jnp.std(a)) > 0.3  # not collapsed


def test_toy_registry_and_bad_input():
    with pytest.raises(ValueError, match="unknown toy distribution"):
        toy.get_toy("nine_gaussians")
    with pytest.raises(ValueError, match="positive int"):
        toy.eight_gaussians(jax.random.key(0), 0)
    np.testing.assert_array_equal(
        np.asarray(toy.sample_toy("spirals", jax.random.key(3), 10)),
        np.asarray(toy.spirals(jax.random.key(3), 10)),
    )


def test_eight_gaussians_geometry():
    x = np.asarray(toy.eight_gaussians(jax.random.key(0), 4000, radius=2.0, std=0.05))
    ang = np.arctan2(x[:, 1], x[:, 0])
    k = np.round(ang / (np.pi / 4)) % 8
    counts = np.bincount(k.astype(int), minlength=8)
    assert counts.min() > 400  # each mode ~500
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 2.0, atol=0.02)


def test_checkerboard_only_black_squares():
    x = np.asarray(toy.checkerboard(jax.random.key(0), 5000, num_squares=4, size=4.0))
    assert np.all(np.abs(x) <= 2.0)
    cell = np.floor(x + 2.0).astype(int)  # width 1
    assert np.all((cell[:, 0] + cell[:, 1]) % 2 == 0)
    assert len({tuple(c) for c in cell}) == 8  # all 8 black squares hit


def test_two_moons_and_spirals_ranges():
    m = np.asarray(toy.two_moons(jax.random.key(0), 3000, noise=0.0))
    # noise-free moons: each point is on one of the two unit half circles
    up = np.abs(np.linalg.norm(m + np.array([0.5, 0.25]), axis=1) - 1) < 1e-5
    lo = np.abs(np.linalg.norm(m + np.array([0.5, 0.25]) - np.array([1.0, 0.5]), axis=1) - 1) < 1e-5
    assert np.all(up | lo) and 0.4 < up.mean() < 0.6
    s = np.asarray(toy.spirals(jax.random.key(0), 3000, noise=0.0))
    assert np.linalg.norm(s, axis=1).max() <= 3.0 + 1e-5


def _mixture_logpdf_scipy(x, means, stds, weights):
    comps = [
        np.log(w) + stats.multivariate_normal(m, s**2 * np.eye(len(m))).logpdf(x)
        for m, s, w in zip(means, stds, weights)
    ]
    return np.logaddexp.reduce(np.stack(comps), axis=0)


def test_gaussian_mixture_log_prob_matches_scipy():
    means = np.array([[0.0, 0.0], [2.0, -1.0], [-1.5, 3.0]])
    stds = np.array([0.5, 1.0, 0.3])
    weights = np.array([0.2, 0.5, 0.3])
    gm = toy.GaussianMixture(means, stds, weights * 7.0)  # unnormalised weights are normalised
    x = np.random.default_rng(0).normal(size=(50, 2)) * 2
    np.testing.assert_allclose(
        np.asarray(gm.log_prob(x)), _mixture_logpdf_scipy(x, means, stds, weights), rtol=1e-5, atol=1e-5
    )
    assert gm.log_prob(x[:3].reshape(3, 1, 2)).shape == (3, 1)
    # sample moments: mean = sum w m, second moment = sum w (s^2 I + m m^T)
    s = np.asarray(gm.sample(jax.random.key(0), 100_000), np.float64)
    mean = weights @ means
    second = sum(w * (sd**2 * np.eye(2) + np.outer(m, m)) for m, sd, w in zip(means, stds, weights))
    np.testing.assert_allclose(s.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(s.T @ s / len(s), second, atol=0.08)


def test_gaussian_mixture_density_integrates_to_one():
    gm = toy.eight_gaussians_mixture(radius=2.0, std=0.3)
    g = np.linspace(-4, 4, 401)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(np.asarray(gm.log_prob(np.stack([xx, yy], -1).reshape(-1, 2), ), np.float64))
    np.testing.assert_allclose(p.sum() * (g[1] - g[0]) ** 2, 1.0, atol=1e-3)


def test_gaussian_mixture_bad_input():
    with pytest.raises(ValueError, match="means"):
        toy.GaussianMixture(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="stds"):
        toy.GaussianMixture(np.zeros((2, 2)), [1.0, -1.0])
    with pytest.raises(ValueError, match="last dimension"):
        toy.GaussianMixture(np.zeros((2, 2)), 1.0).log_prob(np.zeros((4, 3)))


# ---------------------------------------------------------------- digits
def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits as sk

    raw = sk()
    xtr, ytr = digits_mod.load_digits("train", seed=0)
    xte, yte = digits_mod.load_digits("test", seed=0)
    assert xtr.shape[1:] == (8, 8, 1) and xtr.dtype == np.float32 and ytr.dtype == np.int32
    assert len(xtr) + len(xte) == len(raw.target) == 1797
    assert len(xte) == round(1797 * 0.2)
    assert xtr.min() == -1.0 and xtr.max() == 1.0
    # the union of the splits is exactly the dataset, and the scale inverts exactly
    tr_idx, te_idx = digits_mod.split_indices(1797, seed=0, test_fraction=0.2)
    assert not set(tr_idx) & set(te_idx)
    np.testing.assert_array_equal(digits_mod.to_0_16(xtr[..., 0]), raw.images[tr_idx])
    np.testing.assert_array_equal(ytr, raw.target[tr_idx])
    np.testing.assert_array_equal(digits_mod.to_0_16(xte[..., 0]), raw.images[te_idx])
    # fixed by seed
    np.testing.assert_array_equal(digits_mod.load_digits("test", seed=0)[1], yte)
    assert not np.array_equal(digits_mod.load_digits("test", seed=1)[1], yte)
    assert set(np.unique(ytr)) == set(range(10))


def test_digits_bad_input_and_clip():
    with pytest.raises(ValueError, match="split"):
        digits_mod.load_digits("val")
    with pytest.raises(ValueError, match="test_fraction"):
        digits_mod.load_digits("train", test_fraction=1.5)
    np.testing.assert_array_equal(digits_mod.to_0_16(np.array([-2.0, 0.0, 3.0])), [0.0, 8.0, 16.0])


# ---------------------------------------------------------------- iterator
def _arrays(n=23):
    return {"x": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), "y": np.arange(n)}


def test_iterator_epoch_covers_all_and_reshuffles():
    arrs = _arrays(23)
    it = batch_iterator(arrs, 5, seed=1, drop_remainder=False, num_epochs=2)
    batches = list(it)
    assert [len(b["y"]) for b in batches] == [5, 5, 5, 5, 3] * 2
    e1 = np.concatenate([b["y"] for b in batches[:5]])
    e2 = np.concatenate([b["y"] for b in batches[5:]])
    assert sorted(e1) == list(range(23)) and sorted(e2) == list(range(23))
    assert not np.array_equal(e1, e2)
    for b in batches:  # rows stay aligned across arrays
        np.testing.assert_array_equal(b["x"][:, 0], b["y"])


def test_iterator_drop_remainder_and_determinism():
    arrs = _arrays(23)
    a = list(batch_iterator(arrs, 5, seed=3, num_epochs=3))
    b = list(batch_iterator(arrs, 5, seed=3, num_epochs=3))
    assert len(a) == 3 * 4 == 3 * steps_per_epoch(23, 5)
    assert all(len(x["y"]) == 5 for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["y"], y["y"])
    c = list(batch_iterator(arrs, 5, seed=4, num_epochs=1))
    assert not all(np.array_equal(x["y"], y["y"]) for x, y in zip(a, c))


@pytest.mark.parametrize("start", [0, 3, 4, 9, 17])
def test_iterator_start_step_skips_exactly(start):
    arrs = _arrays(23)
    key = jax.random.key(7)
    full = list(itertools.islice(batch_iterator(arrs, 5, key=key), 25))
    resumed = list(itertools.islice(batch_iterator(arrs, 5, key=key, start_step=start), 25 - start))
    for x, y in zip(full[start:], resumed):
        np.testing.assert_array_equal(x["y"], y["y"])


def test_iterator_key_and_no_shuffle():
    arrs = _arrays(10)
    a = next(batch_iterator(arrs, 10, key=jax.random.key(0)))
    b = next(batch_iterator(arrs, 10, key=jax.random.PRNGKey(0)))  # raw uint32 key: same data
    np.testing.assert_array_equal(a["y"], b["y"])
    c = next(batch_iterator(arrs, 4, seed=0, shuffle=False))
    np.testing.assert_array_equal(c["y"], [0, 1, 2, 3])


def test_iterator_bad_input():
    arrs = _arrays(10)
    with pytest.raises(ValueError, match="exactly one"):
        next(batch_iterator(arrs, 2))
    with pytest.raises(ValueError, match="exactly one"):
        next(batch_iterator(arrs, 2, seed=0, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="leading dimension"):
        next(batch_iterator({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0))
    with pytest.raises(ValueError, match="exceeds"):
        next(batch_iterator(arrs, 11, seed=0))
    with pytest.raises(ValueError, match="batch_size"):
        next(batch_iterator(arrs, 0, seed=0))
    with pytest.raises(TypeError, match="seed"):
        next(batch_iterator(arrs, 2, seed=1.5))


def test_labels_are_checked_eagerly_by_the_pipeline():
    """Class ids outside [0, num_classes) raise at the batch_iterator call (before any batch), naming
    the bad values: a DiT embeds them as NaN, or -1 silently as its null label."""
    from research.data.iterators import check_labels

    x = np.zeros((6, 2), np.float32)
    good = np.array([0, 1, 2, 9, 3, 4])
    assert next(batch_iterator({"x": x, "y": good}, 2, seed=0, num_classes=10))["y"].shape == (2,)
    for bad, shown in [(np.array([0, -1, 2, 3, 4, 5]), "-1"), (np.array([0, 1, 10, 12, 4, 5]), "10, 12")]:
        with pytest.raises(ValueError, match=f"bad values {shown}"):
            batch_iterator({"x": x, "y": bad}, 2, seed=0, num_classes=10)  # no next(): raised at the call
    np.testing.assert_array_equal(check_labels([0, 10], 10, allow_null=True), [0, 10])
    with pytest.raises(ValueError, match="no 'label' entry"):
        batch_iterator({"x": x, "y": good}, 2, seed=0, num_classes=10, label_key="label")
    with pytest.raises(ValueError, match="integer class ids"):
        check_labels(np.array([0.5, 1.0]), 10)
