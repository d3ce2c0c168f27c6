"""Host-side batching iterator feeding the jitted train step.

``batch_iterator`` shuffles with a fresh permutation per epoch derived from (seed, epoch), so
the batch at global step ``s`` is a pure function of (seed, s): ``start_step`` skips exactly to
where an interrupted run stopped.

``check_labels`` (also run by ``batch_iterator(..., num_classes=K)`` on the whole label array before
the first batch) rejects class ids outside ``[0, K)`` with a ValueError naming the bad values: a
DiT embeds such labels as NaN, or -1 silently as its null (unconditional) label.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np


def _seed_from(key, seed) -> list[int]:
    if (key is None) == (seed is None):
        raise ValueError("pass exactly one of key= (a JAX PRNG key) or seed= (an int)")
    if seed is not None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return [int(seed)]
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key, dtype=np.uint32).ravel()]


def check_labels(labels, num_classes: int, *, allow_null: bool = False, name: str = "labels") -> np.ndarray:
    """Eager NumPy check of integer class ids: every value in ``[0, num_classes)`` (``[0, num_classes]``
    with ``allow_null``, num_classes being the null label). Returns the labels as an array; raises a
    ValueError naming the bad values (and their count) otherwise."""
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"check_labels: num_classes must be a positive int, got {num_classes!r}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        if labels.size and not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype} with non-integer values")
    hi = num_classes + 1 if allow_null else num_classes
    bad = (labels < 0) | (labels >= hi)
    if np.any(bad):
        vals = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in vals[:10]) + (", ..." if vals.size > 10 else "")
        raise ValueError(f"{name}: {int(bad.sum())} value(s) outside [0, {hi - 1}] (num_classes={num_classes}"
                         f"{', null label allowed' if allow_null else ''}): bad values {shown}")
    return labels


def batch_iterator(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    *,
    key=None,
    seed: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    start_step: int = 0,
    num_classes: int | None = None,
    label_key: str = "y",
) -> Iterator[dict[str, np.ndarray]]:
    """An iterator of dicts of numpy batches ``{name: array[batch_size, ...]}``; the arguments (and the
    labels, with ``num_classes``) are checked when it is called, before any batch.

    Args:
      arrays: dict of arrays sharing the leading (example) dimension.
      batch_size: examples per batch.
      key / seed: exactly one; a JAX key or an int that fixes all shuffles.
      shuffle: shuffle each epoch (a new permutation per epoch).
      drop_remainder: drop the last incomplete batch of each epoch.
      num_epochs: stop after this many epochs (None: forever).
      start_step: skip the first ``start_step`` batches (exactly, without materialising them).
      num_classes: if given, ``arrays[label_key]`` is checked once, eagerly, with ``check_labels``.
      label_key: the entry holding the class labels (default "y").
    """
    base_seed = _seed_from(key, seed)
    if not isinstance(arrays, dict) or not arrays:
        raise TypeError("arrays must be a non-empty dict of name -> array")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()) or n is None:
        raise ValueError(f"all arrays need the same leading dimension, got {sizes}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if drop_remainder and batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples with drop_remainder=True")
    if num_classes is not None:
        if label_key not in arrays:
            raise ValueError(f"batch_iterator: num_classes given but no {label_key!r} entry in {sorted(arrays)}")
        check_labels(arrays[label_key], num_classes, name=f"batch_iterator: arrays[{label_key!r}]")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    # the checks above run at the call; the batches come from a generator
    return _batches(arrays, int(batch_size), base_seed, shuffle, num_epochs, steps, int(start_step), n)


def _batches(arrays, batch_size, base_seed, shuffle, num_epochs, steps_per_epoch, start_step, n):
    epoch, offset = divmod(start_step, steps_per_epoch)
    while num_epochs is None or epoch < num_epochs:
        if shuffle:
            perm = np.random.default_rng([*base_seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        for b in range(offset, steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield {k: v[idx] for k, v in arrays.items()}
        offset = 0
        epoch += 1


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of batches per epoch."""
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
