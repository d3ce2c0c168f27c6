"""Batched, device-sharded, resumable sample generation for FID.

:func:`generate_samples` calls a jittable ``sample_fn(key, n) -> uint8 [n, H, W, C]`` once per shard
with ``key = fold_in(key(seed), shard_index)``, the batch axis split over a 1-D ``data`` mesh
(``NamedSharding``; default: all devices), and writes ``out_dir/samples_{index:06d}.npz`` (key
``images``) atomically (tmp + rename). Shards already present are skipped, so an interrupted run
rerun with the same arguments continues and ends with exactly the files of an uninterrupted run
(each shard depends only on ``seed`` and its index; JAX's partitionable threefry makes the values
independent of the device count). ``manifest.json`` records ``num_samples``, ``batch_size`` and
``seed``; rerunning into the same directory with different ones is an error (the sampler itself
cannot be checked: use one directory per model / checkpoint).

:func:`iter_samples` / :func:`load_samples` read the shards back in index order. Single process
only (``jax.process_count() == 1``).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Iterator, NamedTuple

import numpy as np

__all__ = ["GeneratedSamples", "generate_samples", "iter_samples", "load_samples",
           "make_sharded_sampler", "shard_path", "write_shard"]

_SHARD_RE = re.compile(r"^samples_(\d{6})\.npz$")
MANIFEST = "manifest.json"


class GeneratedSamples(NamedTuple):
    paths: list[str]        # every shard, in index order
    generated: list[int]    # shard indices written by this call
    skipped: list[int]      # shard indices already present


def shard_path(out_dir, index: int) -> str:
    return os.path.join(os.fspath(out_dir), f"samples_{index:06d}.npz")


def write_shard(out_dir, index: int, images) -> str:
    """Writes one ``uint8 [n, H, W, C]`` shard atomically; returns its path."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"a shard must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    os.makedirs(out_dir, exist_ok=True)
    path = shard_path(out_dir, index)
    tmp = os.path.join(os.fspath(out_dir), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, images=images)
    os.replace(tmp, path)
    return path


def make_sharded_sampler(sample_fn: Callable, batch_size: int, mesh, axis: str = "data", args=()) -> Callable:
    """``jit((key, *args) -> sample_fn(key, batch_size, *args))`` with the output's batch axis split
    over ``axis`` of ``mesh``; ``args`` (e.g. the params) are passed as arguments, not baked into
    the program as constants. Checks (abstractly, before compiling) that the output is uint8
    [batch_size, H, W, C]."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}")
    ndev = mesh.shape[axis]
    if batch_size % ndev:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {ndev} devices on mesh "
                         f"axis {axis!r}")
    fn = lambda key, *a: sample_fn(key, batch_size, *a)  # noqa: E731
    out = jax.eval_shape(fn, jax.random.key(0), *args)
    ok = hasattr(out, "dtype") and out.dtype == np.uint8 and len(out.shape) == 4
    if not ok or out.shape[0] != batch_size:
        got = f"{out.dtype} {tuple(out.shape)}" if hasattr(out, "dtype") else type(out).__name__
        raise ValueError(f"sample_fn(key, {batch_size}) must return uint8 [{batch_size}, H, W, C], got {got}")
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P(axis)))


def _check_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            raise ValueError(f"{out_dir} holds samples of a different run ({old}); this run is "
                             f"{manifest}. Use a new directory or delete the old samples.")
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, sort_keys=True)
    os.replace(tmp, path)


def generate_samples(sample_fn: Callable, *, num_samples: int, batch_size: int, out_dir, seed: int,
                     mesh=None, axis: str = "data", args=()) -> GeneratedSamples:
    """Writes ``ceil(num_samples / batch_size)`` shards of ``batch_size`` samples (the last shard
    truncated) under ``out_dir``; see the module docstring. ``sample_fn(key, n, *args)``: pass
    large inputs (the model's params) through ``args``. Returns the shard paths and which
    shards this call generated / skipped."""
    import jax

    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if jax.process_count() != 1:
        raise NotImplementedError("generate_samples runs in one process; with several, give each "
                                  "process its own out_dir and seed")
    if mesh is None:
        from research.parallel.sharding import make_mesh
        mesh = make_mesh({axis: -1})
    out_dir = os.fspath(out_dir)
    num_shards = -(-num_samples // batch_size)
    gen = make_sharded_sampler(sample_fn, batch_size, mesh, axis, args)  # validates before touching disk
    os.makedirs(out_dir, exist_ok=True)
    _check_manifest(out_dir, {"num_samples": int(num_samples), "batch_size": int(batch_size),
                              "seed": int(seed), "num_shards": num_shards})
    for stale in glob.glob(os.path.join(out_dir, ".samples_*.npz.tmp-*")):  # left by a killed run
        os.remove(stale)
    root = jax.random.key(seed)
    generated, skipped = [], []
    for i in range(num_shards):
        if os.path.exists(shard_path(out_dir, i)):
            skipped.append(i)
            continue
        n = min(batch_size, num_samples - i * batch_size)
        images = np.asarray(gen(jax.random.fold_in(root, i), *args))[:n]
        write_shard(out_dir, i, images)
        generated.append(i)
    return GeneratedSamples([shard_path(out_dir, i) for i in range(num_shards)], generated, skipped)


def _shard_indices(out_dir: str) -> list[int]:
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"samples directory not found: {out_dir!r}")
    idx = sorted(int(m.group(1)) for m in map(_SHARD_RE.match, os.listdir(out_dir)) if m)
    if not idx:
        raise FileNotFoundError(f"no samples_XXXXXX.npz shards in {out_dir!r}")
    if idx != list(range(len(idx))):
        missing = sorted(set(range(idx[-1] + 1)) - set(idx))
        raise ValueError(f"{out_dir}: shards missing: {missing[:10]} (rerun generate_samples to finish)")
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            want = json.load(f).get("num_shards", len(idx))
        if len(idx) != want:
            raise ValueError(f"{out_dir}: {len(idx)} of {want} shards present (an unfinished run: "
                             f"rerun generate_samples with the same arguments)")
    return idx


def iter_samples(out_dir) -> Iterator[np.ndarray]:
    """Yields each shard's ``uint8 [n, H, W, C]`` in index order (checks none is missing)."""
    out_dir = os.fspath(out_dir)
    for i in _shard_indices(out_dir):
        path = shard_path(out_dir, i)
        try:
            with np.load(path, allow_pickle=False) as f:
                images = f["images"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: unreadable shard ({type(e).__name__}: {e}); delete it and "
                             f"rerun generate_samples") from None
        yield images


def load_samples(out_dir) -> np.ndarray:
    """All shards concatenated: ``uint8 [N, H, W, C]``."""
    return np.concatenate(list(iter_samples(out_dir)))
