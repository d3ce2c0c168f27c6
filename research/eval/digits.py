"""Sample-quality metrics for 8x8 digits: classifier accuracy and Fréchet distance.

All images here are on the dataset's original 0..16 intensity scale, shape ``[N, 8, 8]`` (or
``[N, 8, 8, 1]``, or flattened ``[N, 64]``).

* Classifier accuracy: an RBF-SVM fitted on the train split (deterministic) classifies the
  generated images; accuracy against the labels they were conditioned on.
* Fréchet distance: between Gaussians fitted to features of generated images and of held-out
  test images, in a fixed feature space (PCA fitted on the train split). The floor is the same
  distance between the real train and real test splits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from research.data.digits import load_digits, to_0_16


def _flat(images) -> np.ndarray:
    x = np.asarray(images, np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 3 and x.shape[1:] == (8, 8):
        x = x.reshape(len(x), 64)
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"digit images must be [N,8,8], [N,8,8,1] or [N,64], got {np.shape(images)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("digit images contain NaN/Inf")
    return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (float64) of features [N, d], N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, d] with N >= 2, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``, computed with symmetric
    eigendecompositions (stable for singular covariances; no complex sqrtm).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    r1 = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    dist = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(dist, 0.0)


def frechet_distance_from_features(f1, f2) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N1, d] and [N2, d]."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def fit_digit_classifier(images_0_16, labels, *, C: float = 10.0):
    """RBF-SVM (sklearn, deterministic) on flattened 0..16 images. Returns the fitted classifier."""
    from sklearn.svm import SVC

    return SVC(C=C, gamma="scale").fit(_flat(images_0_16), np.asarray(labels))


def fit_feature_pca(images_0_16, *, n_components: int = 16):
    """PCA (exact SVD, deterministic) on flattened 0..16 images: the fixed Fréchet feature space."""
    from sklearn.decomposition import PCA

    return PCA(n_components=n_components, svd_solver="full").fit(_flat(images_0_16))


def classifier_accuracy(classifier, images_0_16, labels) -> float:
    """Fraction of images the classifier assigns to their intended label."""
    x, y = _flat(images_0_16), np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return float(np.mean(classifier.predict(x) == y))


@dataclasses.dataclass
class DigitsEvaluator:
    """Fitted classifier + feature space + held-out reference statistics.

    Build with :meth:`from_split`; call :meth:`evaluate` on generated 0..16 images.
    """

    classifier: object
    pca: object
    test_images: np.ndarray  # [N, 8, 8] on 0..16
    test_labels: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray

    @classmethod
    def from_split(cls, *, seed: int = 0, test_fraction: float = 0.2, n_components: int = 16, C: float = 10.0):
        xtr, ytr = load_digits("train", seed=seed, test_fraction=test_fraction)
        xte, yte = load_digits("test", seed=seed, test_fraction=test_fraction)
        xtr, xte = to_0_16(xtr[..., 0]), to_0_16(xte[..., 0])
        return cls(
            classifier=fit_digit_classifier(xtr, ytr, C=C),
            pca=fit_feature_pca(xtr, n_components=n_components),
            test_images=xte, test_labels=yte, train_images=xtr, train_labels=ytr,
        )

    def features(self, images_0_16) -> np.ndarray:
        """PCA features [N, n_components] of 0..16 images."""
        return self.pca.transform(_flat(images_0_16))

    def frechet_to_test(self, images_0_16) -> float:
        """Fréchet distance between the images' features and the test split's features."""
        return frechet_distance_from_features(self.features(images_0_16), self.features(self.test_images))

    def floor(self) -> dict:
        """Reference numbers from real data: classifier test accuracy, Fréchet(train, test)."""
        return {
            "real_test_accuracy": classifier_accuracy(self.classifier, self.test_images, self.test_labels),
            "frechet_floor_train_vs_test": self.frechet_to_test(self.train_images),
        }

    def evaluate(self, images_0_16, labels) -> dict:
        """Metrics of conditional samples: accuracy (overall and per class), Fréchet, floor."""
        x, y = _flat(images_0_16), np.asarray(labels).reshape(-1)
        pred = self.classifier.predict(x)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        per_class = {int(c): float(np.mean(pred[y == c] == c)) for c in np.unique(y)}
        return {
            "classifier_accuracy": float(np.mean(pred == y)),
            "per_class_accuracy": per_class,
            "frechet_distance": self.frechet_to_test(x),
            **self.floor(),
            "num_samples": int(len(y)),
            "feature_space": f"PCA({self.pca.n_components_}) fitted on the train split, 0..16 scale",
        }
