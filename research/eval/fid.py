"""FID and Inception Score on the standard (pytorch-fid / TF) InceptionV3 features.

* :func:`compute_statistics` -> ``(mu, sigma)`` in float64, ``sigma`` with ``ddof=1`` (``np.cov``,
  as pytorch-fid). :class:`StatsAccumulator` gives the same from batches (shifted running sums).
* :func:`frechet_distance`: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` in float64.
  ``method="eigh"`` (default): ``tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2))`` from two
  symmetric eigendecompositions (negative round-off eigenvalues clipped to 0), which is exact for
  singular (rank-deficient, N < 2048 samples) covariances and never complex. ``method="sqrtm"``:
  pytorch-fid's algorithm (``scipy.linalg.sqrtm(S1 @ S2)``, retried with ``eps * I`` added to both
  covariances when the result is not finite, the real part kept).
* :func:`save_statistics` / :func:`load_statistics`: pytorch-fid's ``.npz`` (keys ``mu``, ``sigma``).
* :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` contiguous chunks
  (mean, std), on the softmax of the 1008 logits, as the original (OpenAI improved-GAN) code.
  That code takes its logits as ``pool3 @ W`` *without* the fc bias (``softmax/logits/MatMul``);
  pytorch-fid's port keeps the TF fc layer with its bias, but pytorch-fid itself returns pool3
  only and has no IS. Our network returns both: ``logits_unbiased`` (default here, the original
  IS, as torch-fidelity) and ``logits``.
* :func:`image_statistics` / :func:`fid_from_images`: the batch driver (uint8 or [0, 1] float
  images, any size, grey or RGB) -> pool3 stats, IS, FID against reference stats.
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple

import numpy as np

__all__ = [
    "ImageStats", "StatsAccumulator", "compute_statistics", "fid_from_images", "frechet_distance",
    "image_batches", "image_statistics", "inception_score", "load_statistics", "save_statistics",
]


# ------------------------------------------------------------------------------------------------
# statistics and the Fréchet distance
# ------------------------------------------------------------------------------------------------

def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """[N, d] features -> ``(mu [d], sigma [d, d])`` in float64; ``sigma`` unbiased (ddof=1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, d], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise FloatingPointError("features contain NaN or Inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class StatsAccumulator:
    """Streaming mean / covariance in float64: sums of ``x - shift`` and ``(x - shift)(x - shift)^T``
    with ``shift`` the first batch's mean (avoids the cancellation of raw second moments)."""

    def __init__(self):
        self.count, self._shift, self._sum, self._outer = 0, None, None, None

    def update(self, features) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {f.shape}")
        if not np.isfinite(f).all():
            raise FloatingPointError("features contain NaN or Inf")
        if len(f) == 0:
            return
        if self._shift is None:
            self._shift = f.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((f.shape[1], f.shape[1]))
        elif f.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dim {f.shape[1]} != earlier {self._shift.shape[0]}")
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c
        self.count += len(f)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` as :func:`compute_statistics` of everything seen."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        m = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
        return self._shift + m, (sigma + sigma.T) / 2


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: need mu [d] and sigma [d, d], got mu {mu.shape}, sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or Inf")
    return mu, sigma


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eigh(s1, s2) -> float:
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def _trace_sqrt_sqrtm(s1, s2, eps: float) -> float:
    from scipy import linalg

    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 (see module doc for
    ``method``; ``eps`` only used by ``"sqrtm"``, as pytorch-fid). Not clipped: a tiny negative
    value means round-off between near-identical statistics."""
    mu1, s1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, s2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    if method == "eigh":
        tr = _trace_sqrt_eigh(s1, s2)
    elif method == "sqrtm":
        tr = _trace_sqrt_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)


# ------------------------------------------------------------------------------------------------
# stats files (pytorch-fid layout)
# ------------------------------------------------------------------------------------------------

def save_statistics(path, mu, sigma) -> str:
    """Writes ``mu``, ``sigma`` (float64) as pytorch-fid does (``np.savez_compressed``), atomically
    (tmp + rename) and exactly at ``path`` (NumPy would otherwise append ``.npz``)."""
    mu, sigma = _check_stats(mu, sigma, os.fspath(path))
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)
    return path


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` float64 from a pytorch-fid-style ``.npz`` (keys ``mu``, ``sigma``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path!r} (make one with "
                                f"`eval_fid.py stats` or pytorch-fid's --save-stats)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k][:] for k in f.files if k in ("mu", "sigma")}
            files = sorted(f.files)
    except Exception as e:  # noqa: BLE001 - unreadable file, one clear error
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    for k in ("mu", "sigma"):
        if k not in arrays:
            raise ValueError(f"{path}: missing key {k!r} (found {files}); expected pytorch-fid's "
                             f"layout with 'mu' and 'sigma'")
    mu, sigma = arrays["mu"], arrays["sigma"]
    return _check_stats(mu, sigma, path)


# ------------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------------

def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` over ``splits`` contiguous chunks (OpenAI's ``i * N // splits`` bounds) of
    ``exp(mean_x KL(softmax(logits_x) || mean_x softmax(logits_x)))``, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [N, num_classes >= 2], got shape {z.shape}")
    if not isinstance(splits, (int, np.integer)) or not 1 <= splits <= z.shape[0]:
        raise ValueError(f"splits must be an int in [1, N={z.shape[0]}], got {splits!r}")
    if not np.isfinite(z).all():
        raise FloatingPointError("logits contain NaN or Inf")
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    n, scores = z.shape[0], []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part_p, part_logp = p[lo:hi], logp[lo:hi]
        py = part_p.mean(axis=0)
        log_py = np.log(np.where(py > 0, py, 1.0))
        kl = np.where(part_p > 0, part_p * (part_logp - log_py), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# batch driver
# ------------------------------------------------------------------------------------------------

class ImageStats(NamedTuple):
    mu: np.ndarray           # float64 [2048]
    sigma: np.ndarray        # float64 [2048, 2048]
    logits: np.ndarray       # float32 [N, 1008] (the kind asked for), or empty if not kept
    count: int


def _to_unit_rgb(x: np.ndarray) -> np.ndarray:
    """uint8 (0..255) or float ([0, 1]) [B, H, W(, 1|3)] -> float32 [B, H, W, 3] in [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"image batches must be [B, H, W], [B, H, W, 1] or [B, H, W, 3], got {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError("float images must be finite and in [0, 1] (uint8 images: 0..255)")
    else:
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x  # grey -> RGB, as PIL .convert("RGB")


def image_batches(images, batch_size: int) -> Iterable[np.ndarray]:
    """An array [N, ...] or an iterable of batches -> batches of exactly ``batch_size`` (the last
    may be shorter), so the network compiles once."""
    if isinstance(images, np.ndarray) or (hasattr(images, "__array__") and not hasattr(images, "__next__")):
        arr = np.asarray(images)
        for i in range(0, len(arr), batch_size):
            yield arr[i:i + batch_size]
        return
    buf, held = [], 0
    for b in images:
        b = np.asarray(b)
        buf.append(b)
        held += len(b)
        while held >= batch_size:
            cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
            yield cat[:batch_size]
            buf, held = [cat[batch_size:]], held - batch_size
    if held:
        yield np.concatenate(buf)


def image_statistics(images, variables, *, batch_size: int = 50, mesh=None, keep_logits: bool = True,
                     logits: str = "logits_unbiased", num_images: int | None = None) -> ImageStats:
    """Runs the jitted FID InceptionV3 over ``images`` (array or iterable of batches; uint8 or
    [0, 1] float; grey or RGB; any size) and returns pool3 ``(mu, sigma)`` plus ``logits`` (the
    ``"logits_unbiased"`` or ``"logits"`` output, for :func:`inception_score`). The last batch is
    zero-padded to ``batch_size`` (padding rows dropped). ``mesh``: a mesh with a ``data`` axis to
    shard each batch over (``batch_size`` divisible by its size). ``num_images`` stops early."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from research.eval.inception import inception_apply

    if logits not in ("logits", "logits_unbiased"):
        raise ValueError(f"logits must be 'logits' or 'logits_unbiased', got {logits!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    put = None
    if mesh is not None:
        if "data" not in mesh.axis_names or batch_size % mesh.shape["data"]:
            raise ValueError(f"batch_size {batch_size} must divide by the mesh's 'data' axis "
                             f"({dict(mesh.shape)})")
        sharding, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        variables = jax.device_put(variables, rep)
        put = lambda x: jax.device_put(x, sharding)  # noqa: E731
    acc, kept, seen = StatsAccumulator(), [], 0
    for batch in image_batches(images, batch_size):
        if num_images is not None and seen >= num_images:
            break
        x = _to_unit_rgb(batch)
        if num_images is not None:
            x = x[:num_images - seen]
        n = len(x)
        if n == 0:
            continue
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        out = inception_apply(variables, put(x) if put else x)
        acc.update(np.asarray(out["pool3"])[:n])
        if keep_logits:
            kept.append(np.asarray(out[logits], np.float32)[:n])
        seen += n
    mu, sigma = acc.finalize()
    return ImageStats(mu, sigma, np.concatenate(kept) if kept else np.zeros((0, 1008), np.float32), seen)


def fid_from_images(images, reference, variables, *, batch_size: int = 50, splits: int = 10, mesh=None,
                    logits: str = "logits_unbiased", method: str = "eigh") -> dict:
    """FID of ``images`` against ``reference`` (a stats path or ``(mu, sigma)``), with the
    Inception Score of the same images. Returns ``{"fid", "inception_score", "inception_score_std",
    "num_images", "is_splits", "is_logits"}``."""
    ref_mu, ref_sigma = load_statistics(reference) if isinstance(reference, (str, os.PathLike)) \
        else _check_stats(*reference, "reference statistics")
    st = image_statistics(images, variables, batch_size=batch_size, mesh=mesh, logits=logits)
    if ref_mu.shape != st.mu.shape:
        raise ValueError(f"reference statistics are {ref_mu.shape[0]}-d, pool3 features are "
                         f"{st.mu.shape[0]}-d")
    is_mean, is_std = inception_score(st.logits, splits=min(splits, st.count))
    return {"fid": frechet_distance(st.mu, st.sigma, ref_mu, ref_sigma, method=method),
            "inception_score": is_mean, "inception_score_std": is_std, "num_images": st.count,
            "is_splits": min(splits, st.count), "is_logits": logits}
