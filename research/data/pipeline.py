"""Input pipeline on Grain (``grain==0.2.18``): shuffled, sharded, optionally augmented batches
from in-memory arrays, with an iterator state that can be checkpointed next to the train state.

``make_grain_loader(arrays, batch_size=..., seed=...)`` returns a ``grain.DataLoaderIterator`` of
batch dicts ``{name: np.ndarray[batch_size, ...]}`` built from a dict of equal-length arrays (the
embedded digits / toy data, or ``research.data.datasets`` loaders' uint8 images and labels).

Order and randomness are pure functions of the run's ``seed`` (a 32-bit int; Grain's limit):

* shuffling: ``grain.samplers.IndexSampler(shuffle=True, seed=seed)`` -- a new permutation of the
  (shard's) records every epoch; with ``num_epochs=None`` the stream is infinite and batches run
  across epoch boundaries (the ``k``-th batch holds records ``k*B .. (k+1)*B-1`` of the stream);
  ``drop_remainder`` only drops the final incomplete batch of a finite stream.
* augmentation: a ``grain.transforms.RandomMap`` whose generator for the record at global stream
  position ``i`` is Grain's ``Philox(key=seed + i)``: the record at a given stream position is
  augmented identically in every run and after a restore.
  (Grain keys by ``seed + i``, so runs with seeds ``s`` and ``s+1`` see the same augmentation
  draws shifted by one record -- their shuffles differ, so this does not correlate examples.)

Sharding: each process reads only its slice. By default ``grain.sharding.ShardByJaxProcess``
(shard ``jax.process_index()`` of ``jax.process_count()``); pass ``shard_index``/``num_shards``
to override. Shards are contiguous, disjoint index ranges of the records, each shuffled on its own;
with ``drop_remainder=True`` every shard gets ``n // num_shards`` records (so all processes run
the same number of steps per epoch; the ``n % num_shards`` leftover records are never read), with
``drop_remainder=False`` the shards together cover all records (sizes may differ by one) -- except
that with a finite ``num_epochs`` and ``n % num_shards != 0`` Grain 0.2.18 reads only
``num_epochs * n // num_shards`` records from each shard, so a larger shard skips one (random)
record per epoch; ``make_grain_loader`` warns in that case. ``batch_size`` is the per-process batch.

Workers: ``worker_count > 0`` runs reading + augmentation in that many worker processes (Grain
starts them with ``spawn``: they import this module, which is slow on a small machine; a callable
``augment`` must then be picklable, i.e. a module-level function or object; and a script using
workers needs the ``if __name__ == "__main__":`` guard). Grain deals the stream's records to the
workers round robin and each worker forms whole batches, so the batch order (which records share
a batch) depends on ``worker_count`` -- deterministic for a given ``worker_count``, and each record
keeps its augmentation draw; a saved state can only be restored into a loader with the same
``worker_count`` (Grain checks this). With workers the batch leaves are Grain's
``SharedMemoryArray`` (an ``np.ndarray`` subclass).

Checkpointing the iterator: ``get_iterator_state(it)`` returns a JSON-serialisable dict (Grain's
state: the last consumed stream position per worker, plus the sampler/source reprs it validates on
restore); ``set_iterator_state(it, state)`` restores it. ``save_iterator_state(path, it)`` /
``restore_iterator_state(path, it)`` write/read it as JSON. Pass a checkpoint step directory
(``Checkpointer.step_path(step)`` from ``research.train.checkpoint``) and the file goes next to the
orbax item: ``<directory>/<step>/data_state.json`` with one process, or
``<directory>/<step>/data_state.process<i>-of-<n>.json`` with several (every process saves its own
state; each process writes only its own file). Capture the state (``get_iterator_state``) when the
train state of that step is saved, and write it once the step directory exists (for async saves
after ``Checkpointer.wait()``; the directory is never created here, as orbax finalises a step by
renaming its temporary directory); restore it from the step that ``restore``/``restore_latest``
actually returned (e.g. ``Checkpointer.latest_step()`` after restoring). Orbax's pruning
(``keep``) removes the file with its step directory. Writes are atomic
(temporary file + rename). ``it.get_state()`` / ``it.set_state(bytes)`` (Grain's own bytes) and
Grain's orbax ``save``/``load`` (StatefulCheckpointable) methods exist on the iterator (not used or
tested here).

Restoring gives a bitwise-identical continuation for the same program (same arrays, batch size,
seed, sharding, augmentation and worker count); Grain rejects a state whose worker count, sampler
or source repr differs (another seed, shuffle, num_epochs, shard or dataset shape), but does not
check the batch size or the augmentation (the state counts records, so another batch size resumes
at the same record).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any, Callable, Mapping

import grain
import numpy as np

DATA_STATE_FILE = "data_state.json"
AUGMENTATIONS = ("flip", "crop")


# --------------------------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------------------------

class ArraySource:
    """A Grain random-access source over a dict of equal-length arrays: ``source[i]`` is the dict
    ``{name: array[i]}``. Its repr (checked by Grain when a state is restored) names the size and
    each entry's shape and dtype, never the data."""

    def __init__(self, arrays: Mapping[str, Any]):
        if not isinstance(arrays, Mapping) or not arrays:
            raise TypeError("arrays must be a non-empty dict of name -> array")
        arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if n is None or any(s != n for s in sizes.values()):
            raise ValueError(f"all arrays need the same leading dimension, got {sizes}")
        if n == 0:
            raise ValueError("arrays hold no examples")
        self._arrays = arrays
        self._n = int(n)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}

    def __repr__(self) -> str:
        spec = ", ".join(f"{k}: {v.shape[1:]} {v.dtype}" for k, v in self._arrays.items())
        return f"ArraySource(n={self._n}, {{{spec}}})"


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

class ImageAugment(grain.transforms.RandomMap):
    """Random horizontal flip (probability 1/2) and/or random crop after zero padding of
    ``crop_padding`` pixels on each side (same output size) of ``example[image_key]``, an image
    ``[H, W, C]`` or ``[H, W]`` of any dtype (dtype and shape are preserved)."""

    def __init__(self, *, flip: bool = True, crop: bool = True, crop_padding: int = 4,
                 image_key: str = "x"):
        if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.flip, self.crop, self.crop_padding, self.image_key = bool(flip), bool(crop), int(crop_padding), image_key

    def random_map(self, element, rng: np.random.Generator):
        if self.image_key not in element:
            raise KeyError(f"ImageAugment: no {self.image_key!r} entry in {sorted(element)}")
        img = np.asarray(element[self.image_key])
        if img.ndim not in (2, 3):
            raise ValueError(f"ImageAugment: {self.image_key!r} must be an image [H, W, C] or [H, W], "
                             f"got shape {img.shape}")
        # draw both numbers always, so the stream of draws does not depend on the options
        do_flip = rng.integers(2) == 1
        p = self.crop_padding
        dy, dx = rng.integers(0, 2 * p + 1, size=2)
        if self.flip and do_flip:
            img = img[:, ::-1]
        if self.crop and p > 0:
            h, w = img.shape[:2]
            pad = [(p, p), (p, p)] + [(0, 0)] * (img.ndim - 2)
            img = np.pad(img, pad)[dy:dy + h, dx:dx + w]
        out = dict(element)
        out[self.image_key] = np.ascontiguousarray(img)
        return out

    def __repr__(self) -> str:
        return (f"ImageAugment(flip={self.flip}, crop={self.crop}, crop_padding={self.crop_padding}, "
                f"image_key={self.image_key!r})")


class _CallableRandomMap(grain.transforms.RandomMap):
    """Wraps ``fn(example: dict, rng: np.random.Generator) -> dict`` as a Grain RandomMap."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def random_map(self, element, rng: np.random.Generator):
        return self.fn(element, rng)


def make_augment(augment, *, image_key: str = "x", crop_padding: int = 4):
    """The RandomMap for ``augment``: None -> None; a sequence of names from ``AUGMENTATIONS``
    (``("flip", "crop")``); a ``grain.transforms.RandomMap`` (used as is); or a callable
    ``fn(example, rng) -> example`` (``rng`` a ``np.random.Generator`` derived from the seed)."""
    if augment is None:
        return None
    if isinstance(augment, grain.transforms.RandomMap):
        return augment
    if isinstance(augment, str):
        augment = (augment,)
    if isinstance(augment, (tuple, list)):
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad or not augment:
            raise ValueError(f"augment: unknown augmentation(s) {bad} (known: {AUGMENTATIONS})")
        return ImageAugment(flip="flip" in augment, crop="crop" in augment, crop_padding=crop_padding,
                            image_key=image_key)
    if callable(augment):
        return _CallableRandomMap(augment)
    raise TypeError(f"augment must be None, names from {AUGMENTATIONS}, a RandomMap or a callable, "
                    f"got {type(augment).__name__}")


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------

def _shard_options(shard_index, num_shards, drop_remainder):
    if shard_index is None and num_shards is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if shard_index is None or num_shards is None:
        raise ValueError("pass both shard_index and num_shards, or neither (then: one shard per JAX process)")
    if not (isinstance(num_shards, (int, np.integer)) and num_shards >= 1):
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if not (isinstance(shard_index, (int, np.integer)) and 0 <= shard_index < num_shards):
        raise ValueError(f"shard_index must be an int in [0, {num_shards}), got {shard_index!r}")
    return grain.sharding.ShardOptions(shard_index=int(shard_index), shard_count=int(num_shards),
                                       drop_remainder=drop_remainder)


def _absl_flags_parsed() -> None:
    # Grain's worker pool reads an absl flag (grain_enable_multiprocess_worker_profiling) that
    # raises UnparsedFlagAccessError outside an absl app; mark the flags parsed (with their
    # defaults, as Grain's own tests do) unless something already parsed them.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_grain_loader(
    arrays: Mapping[str, Any],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    num_shards: int | None = None,
    worker_count: int = 0,
    augment=None,
    image_key: str = "x",
    crop_padding: int = 4,
    num_classes: int | None = None,
    label_key: str = "y",
    read_options: grain.ReadOptions | None = None,
) -> grain.DataLoaderIterator:
    """An iterator (``grain.DataLoaderIterator``) of batch dicts ``{name: array[batch_size, ...]}``.

    Args:
      arrays: dict of arrays sharing the leading (example) dimension.
      batch_size: examples per batch (per process when sharded).
      seed: int in [0, 2**32): fixes the shuffles and the augmentation draws.
      num_epochs: epochs of this shard to read (None: forever).
      shuffle: a new permutation each epoch (False: records in order).
      drop_remainder: drop a final incomplete batch; with several shards also make them equal-sized.
      shard_index / num_shards: read only this shard (both or neither; default: this JAX process's).
      worker_count: worker processes for reading/augmentation (0: in this process).
      augment: None, names from ``("flip", "crop")``, a ``grain.transforms.RandomMap`` or a callable
        ``fn(example, rng) -> example`` (see ``make_augment``); applied per example before batching.
      image_key / crop_padding: the image entry and the padding for the built-in augmentations.
      num_classes / label_key: if given, ``arrays[label_key]`` is checked once with ``check_labels``.
      read_options: ``grain.ReadOptions`` (threads/prefetch of the reader), default Grain's.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32) (Grain's limit), got {seed}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if isinstance(worker_count, bool) or not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
        raise ValueError(f"worker_count must be an int >= 0, got {worker_count!r}")
    source = ArraySource(arrays)
    if num_classes is not None:
        from research.data.iterators import check_labels
        if label_key not in source._arrays:
            raise ValueError(f"make_grain_loader: num_classes given but no {label_key!r} entry in {sorted(source._arrays)}")
        check_labels(source._arrays[label_key], num_classes, name=f"make_grain_loader: arrays[{label_key!r}]")
    shard = _shard_options(shard_index, num_shards, bool(drop_remainder))
    per_shard = len(source) // shard.shard_count if drop_remainder else -(-len(source) // shard.shard_count)
    if drop_remainder and num_epochs is not None and batch_size > per_shard * num_epochs:
        raise ValueError(f"batch_size {batch_size} exceeds the {per_shard * num_epochs} examples this shard "
                         f"reads with drop_remainder=True")
    if (not drop_remainder and num_epochs is not None and shard.shard_count > 1
            and len(source) % shard.shard_count):
        warnings.warn(f"make_grain_loader: {len(source)} records do not split evenly into {shard.shard_count} "
                      f"shards; with drop_remainder=False and num_epochs={num_epochs} Grain reads only "
                      f"{num_epochs * len(source) // shard.shard_count} records of this shard (a larger "
                      "shard skips one record per epoch)", stacklevel=2)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=bool(shuffle), num_epochs=num_epochs,
        seed=int(seed))
    ops = []
    aug = make_augment(augment, image_key=image_key, crop_padding=crop_padding)
    if aug is not None:
        ops.append(aug)
    ops.append(grain.transforms.Batch(batch_size=int(batch_size), drop_remainder=bool(drop_remainder)))
    if worker_count > 0:
        _absl_flags_parsed()
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                              worker_count=int(worker_count), shard_options=shard,
                              read_options=read_options)
    return iter(loader)


# --------------------------------------------------------------------------------------------
# Iterator state
# --------------------------------------------------------------------------------------------

def get_iterator_state(it: grain.DataLoaderIterator) -> dict:
    """The iterator's state as a JSON-serialisable dict."""
    return json.loads(it.get_state().decode())


def set_iterator_state(it: grain.DataLoaderIterator, state: Mapping | str | bytes) -> None:
    """Restores ``it`` (a fresh loader of the same program) to ``state`` (from ``get_iterator_state``,
    or Grain's bytes / a JSON string); its next batch is the one after the saved position."""
    if isinstance(state, Mapping):
        state = json.dumps(dict(state))
    if isinstance(state, str):
        state = state.encode()
    it.set_state(state)


def data_state_path(path: str | os.PathLike) -> str:
    """The file for this process's state: ``path`` itself if it ends in ``.json``, otherwise
    ``path/data_state.json`` (one process) or ``path/data_state.process<i>-of-<n>.json``."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return path
    import jax
    n = jax.process_count()
    name = DATA_STATE_FILE if n == 1 else f"data_state.process{jax.process_index()}-of-{n}.json"
    return os.path.join(path, name)


def save_iterator_state(path: str | os.PathLike, it) -> str:
    """Writes the state of ``it`` (an iterator, or a state from ``get_iterator_state`` captured
    earlier) as JSON, atomically, to ``data_state_path(path)``; returns the file written.

    ``path`` is an existing directory (a checkpoint step directory) or a ``.json`` file in one. The
    directory is never created: with async orbax saves the step directory appears only when orbax
    finalises it, and creating it early would break that. So for a checkpoint: capture
    ``state = get_iterator_state(it)`` when the train state is saved, ``Checkpointer.wait()``, then
    ``save_iterator_state(ckpt.step_path(step), state)``."""
    file = data_state_path(path)
    folder = os.path.dirname(file) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_iterator_state: no directory {folder!r} (for a checkpoint step: save the "
                                "train state and wait for it first)")
    state = dict(it) if isinstance(it, Mapping) else get_iterator_state(it)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".data_state.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file


def restore_iterator_state(path: str | os.PathLike, it: grain.DataLoaderIterator) -> grain.DataLoaderIterator:
    """Restores ``it`` from the state saved by ``save_iterator_state(path, ...)``; returns ``it``.
    Raises FileNotFoundError if there is none, ValueError if it belongs to another loader."""
    file = data_state_path(path)
    with open(file) as f:
        state = json.load(f)
    set_iterator_state(it, state)
    return it


__all__ = [
    "AUGMENTATIONS", "ArraySource", "DATA_STATE_FILE", "ImageAugment", "data_state_path",
    "get_iterator_state", "make_augment", "make_grain_loader", "restore_iterator_state",
    "save_iterator_state", "set_iterator_state",
]
