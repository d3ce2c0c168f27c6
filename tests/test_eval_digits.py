"""Tests for research.eval.digits: Fréchet distance closed forms, classifier, evaluator."""
import numpy as np
import pytest
import scipy.linalg

from research.eval import digits as ev


@pytest.fixture(scope="module")
def evaluator():
    return ev.DigitsEvaluator.from_split(seed=0)


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T + (1e-3 * np.eye(d) if rank is None else 0)


def _frechet_sqrtm(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=5), _random_spd(rng, 5)
    assert ev.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_identity_covariances_closed_form():
    m1, m2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 2.0])
    eye = np.eye(3)
    assert ev.frechet_distance(m1, eye, m2, eye) == pytest.approx(np.sum((m1 - m2) ** 2), rel=1e-10)
    # scaled identities: |dm|^2 + d (a - b)^2
    assert ev.frechet_distance(m1, 4 * eye, m2, eye) == pytest.approx(np.sum((m1 - m2) ** 2) + 3.0, rel=1e-10)
    # 1-D: (m1-m2)^2 + (s1-s2)^2
    assert ev.frechet_distance(0.3, 2.0**2, -0.2, 0.5**2) == pytest.approx(0.25 + 1.5**2)


@pytest.mark.parametrize("d,rank", [(4, None), (10, None), (6, 3)])
def test_frechet_matches_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d)
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), _frechet_sqrtm(mu1, s1, mu2, s2), rtol=1e-6)
    # symmetric in its arguments
    np.testing.assert_allclose(ev.frechet_distance(mu1, s1, mu2, s2), ev.frechet_distance(mu2, s2, mu1, s1), rtol=1e-6)


def test_frechet_from_features_and_bad_input():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(20000, 3))
    f2 = rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, 2.0])
    assert ev.frechet_distance_from_features(f1, f2) == pytest.approx(5.0, abs=0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        ev.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        ev.gaussian_stats(np.zeros((1, 3)))


def test_classifier_on_real_test_digits(evaluator):
    fl = evaluator.floor()
    assert fl["real_test_accuracy"] > 0.95
    assert fl["frechet_floor_train_vs_test"] > 0
    # shuffled labels give chance-level accuracy: the metric can fail
    rng = np.random.default_rng(0)
    acc_shuffled = ev.classifier_accuracy(
        evaluator.classifier, evaluator.test_images, rng.permutation(evaluator.test_labels))
    assert acc_shuffled < 0.3


def test_evaluator_metrics(evaluator):
    m = evaluator.evaluate(evaluator.test_images[..., None], evaluator.test_labels)
    assert m["classifier_accuracy"] == pytest.approx(m["real_test_accuracy"])
    assert m["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # test vs itself
    assert set(m["per_class_accuracy"]) == set(range(10))
    # noise images are far from digits in the feature space, and poorly classified
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, size=(300, 8, 8))
    mn = evaluator.evaluate(noise, rng.integers(0, 10, 300))
    assert mn["frechet_distance"] > 10 * m["frechet_floor_train_vs_test"]
    assert mn["classifier_accuracy"] < 0.3
    # the floor sits between identical (0) and noise
    assert 0 < m["frechet_floor_train_vs_test"] < mn["frechet_distance"]
    with pytest.raises(ValueError, match="digit images"):
        evaluator.evaluate(np.zeros((3, 7, 7)), np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        evaluator.evaluate(np.zeros((3, 8, 8)), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        evaluator.evaluate(np.full((3, 8, 8), np.nan), np.zeros(3))
