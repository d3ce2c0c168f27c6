"""scikit-learn's 8x8 handwritten digits (embedded in the package; no download).

Images are NHWC ``[N, 8, 8, 1]`` float32 in [-1, 1] (``x / 8 - 1`` of the original 0..16
intensities); labels int32 in 0..9. The train/test split is a fixed permutation of the 1,797
images drawn from ``seed``.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
MAX_VALUE = 16.0


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int32)


def to_unit_range(images_0_16: np.ndarray) -> np.ndarray:
    """0..16 intensities -> [-1, 1] (``x / 8 - 1``), float32."""
    return (np.asarray(images_0_16, np.float32) / (MAX_VALUE / 2) - 1.0).astype(np.float32)


def to_0_16(images: np.ndarray, *, clip: bool = True) -> np.ndarray:
    """[-1, 1] images (any shape) -> 0..16 intensities ``(x + 1) * 8``; clipped to [0, 16]."""
    out = (np.asarray(images, np.float32) + 1.0) * (MAX_VALUE / 2)
    return np.clip(out, 0.0, MAX_VALUE) if clip else out


def split_indices(n: int, *, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test index split of ``range(n)`` from ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_digits(split: str = "train", *, seed: int = 0, test_fraction: float = 0.2):
    """Loads a split of the digits.

    Args:
      split: "train", "test" or "all".
      seed: seed of the fixed train/test permutation.
      test_fraction: fraction of images in the test split.

    Returns:
      (images, labels): float32 [N, 8, 8, 1] in [-1, 1] and int32 [N].
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images, labels = _raw_digits()
    if split != "all":
        train_idx, test_idx = split_indices(len(labels), seed=seed, test_fraction=test_fraction)
        idx = train_idx if split == "train" else test_idx
        images, labels = images[idx], labels[idx]
    return to_unit_range(images)[..., None], labels.copy()
