"""FID statistics, Fréchet distance, stats files and Inception Score against pytorch-fid's own
functions and closed forms (float64 NumPy; no network needed)."""
import numpy as np
import pytest

from research.eval import fid

pytest.importorskip("scipy")
pytorch_fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _random_stats(rng, d, n, shift=0.0):
    """Stats of n samples in d dims (rank-deficient sigma when n <= d)."""
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ a + shift + rng.normal(size=d)
    return fid.compute_statistics(x)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
@pytest.mark.parametrize("d, n1, n2", [(16, 400, 300), (64, 2000, 1500), (64, 30, 2000),
                                      (48, 20, 25)],
                         ids=["well16", "well64", "rankdef-one", "rankdef-both"])
def test_frechet_matches_pytorch_fid(method, d, n1, n2):
    rng = np.random.default_rng(d + n1 + n2)
    mu1, s1 = _random_stats(rng, d, n1)
    mu2, s2 = _random_stats(rng, d, n2, shift=0.3)
    ref = pytorch_fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    ours = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frechet_diagonal_closed_form(dtype):
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    args = [a.astype(dtype) for a in (mu1, np.diag(v1), mu2, np.diag(v2))]
    exact = np.sum((args[0].astype(np.float64) - args[2]) ** 2) + np.sum(
        (np.sqrt(np.diag(args[1]).astype(np.float64)) - np.sqrt(np.diag(args[3]).astype(np.float64))) ** 2)
    for method in ("eigh", "sqrtm"):
        got = fid.frechet_distance(*args, method=method)
        assert got == pytest.approx(exact, rel=1e-10)  # computed in float64 whatever the input dtype
        assert got == pytest.approx(closed, rel=1e-6 if dtype == np.float32 else 1e-10)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    mu, s = _random_stats(rng, 32, 500)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    mu2, s2 = _random_stats(rng, 32, 500)
    assert fid.frechet_distance(mu, s, mu2, s2) == pytest.approx(fid.frechet_distance(mu2, s2, mu, s), rel=1e-10)


def test_frechet_errors():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="sigma"):
        fid.frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="dims differ"):
        fid.frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid.frechet_distance(mu, s, mu, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu, s, mu, s, method="svd")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compute_statistics_and_accumulator(dtype):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(103, 12)) * 3 + 100).astype(dtype)  # large mean: cancellation test
    mu, sigma = fid.compute_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-12)
    acc = fid.StatsAccumulator()
    for chunk in np.array_split(x, [7, 8, 50]):  # uneven batches, one of size 1
        acc.update(chunk)
    amu, asig = acc.finalize()
    assert acc.count == 103
    np.testing.assert_allclose(amu, mu, rtol=1e-13)
    np.testing.assert_allclose(asig, sigma, rtol=1e-10, atol=1e-11)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.compute_statistics(x[:1])
    with pytest.raises(FloatingPointError):
        fid.compute_statistics(np.full((3, 2), np.inf))
    with pytest.raises(ValueError, match="at least 2"):
        fid.StatsAccumulator().finalize()


def test_stats_file_round_trip_and_pytorch_fid_layout(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = _random_stats(rng, 8, 50)
    path = fid.save_statistics(tmp_path / "s.npz", mu, sigma)
    assert path.endswith("s.npz")
    m2, s2 = fid.load_statistics(path)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    # what pytorch-fid reads (its compute_statistics_of_path on an .npz) ...
    with np.load(path) as f:
        np.testing.assert_array_equal(f["mu"][:], mu)
    # ... and what pytorch-fid writes (np.savez_compressed(path, mu=, sigma=)), plus plain np.savez
    np.savez_compressed(tmp_path / "pf.npz", mu=mu.astype(np.float32), sigma=sigma)
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)
    for name in ("pf.npz", "plain.npz"):
        m3, s3 = fid.load_statistics(tmp_path / name)
        assert m3.dtype == np.float64
        np.testing.assert_allclose(m3, mu, rtol=1e-6)
        np.testing.assert_array_equal(s3, sigma)


def test_stats_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="'sigma'"):
        fid.load_statistics(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "nan.npz", mu=np.zeros(2), sigma=np.array([[1, 0], [0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid.load_statistics(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npz"):
        fid.load_statistics(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="sigma"):
        fid.save_statistics(tmp_path / "x.npz", np.zeros(3), np.eye(2))


@pytest.mark.parametrize("splits", [1, 4])
def test_inception_score_closed_forms(splits):
    n, k = 40, 1008
    uniform = np.zeros((n, k))  # every p(y|x) uniform -> KL 0 -> IS 1
    assert fid.inception_score(uniform, splits) == pytest.approx((1.0, 0.0), abs=1e-12)
    same = np.zeros((n, k)); same[:, 5] = 1e4  # confident but all the same class -> IS 1
    assert fid.inception_score(same, splits)[0] == pytest.approx(1.0, abs=1e-12)
    onehot = np.zeros((n, k)); onehot[np.arange(n), np.arange(n)] = 1e4  # n distinct classes
    mean, std = fid.inception_score(onehot, splits)
    assert mean == pytest.approx(n / splits, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(30, 10)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for part in (p[:10], p[10:20], p[20:]):  # i * N // splits bounds for N=30, splits=3
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    assert fid.inception_score(z, 3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)
    assert fid.inception_score(z.astype(np.float32), 3)[0] == pytest.approx(np.mean(scores), rel=1e-6)


def test_inception_score_errors():
    with pytest.raises(ValueError, match="num_classes"):
        fid.inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(np.zeros((5, 3)), splits=6)
    with pytest.raises(FloatingPointError):
        fid.inception_score(np.full((5, 3), np.nan), splits=1)


def test_image_batches_rebatching_and_conversion():
    batches = [np.zeros((3, 4, 4), np.uint8), np.ones((5, 4, 4), np.uint8), np.ones((1, 4, 4), np.uint8)]
    sizes = [len(b) for b in fid.image_batches(iter(batches), 4)]
    assert sizes == [4, 4, 1]
    assert [len(b) for b in fid.image_batches(np.zeros((10, 2, 2, 3)), 4)] == [4, 4, 2]
    x = fid._to_unit_rgb(np.full((2, 3, 3), 255, np.uint8))
    assert x.shape == (2, 3, 3, 3) and x.dtype == np.float32 and (x == 1).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid._to_unit_rgb(np.full((1, 2, 2, 3), 2.0))
    with pytest.raises(ValueError, match="image batches"):
        fid._to_unit_rgb(np.zeros((1, 2, 2, 4), np.uint8))
