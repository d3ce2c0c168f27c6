"""Verified checkpoints of any training-state pytree with orbax's `CheckpointManager`.

What can be saved: any pytree of arrays that flax's `serialization.to_state_dict` understands -- a
`TrainState`, a `research.train.multi.MultiTrainState`, dicts, lists, tuples, namedtuples (optax
states), flax struct dataclasses -- with PRNG keys anywhere in it, typed (`jax.random.key`) or raw
(uint32 `PRNGKey`). A typed key is stored as its raw `jax.random.key_data` and re-wrapped with the
template key's implementation on restore. `restore*(template)` restores into the structure, dtypes
and shardings of `template`.

Layout: `<directory>/<step>/state/...` (orbax StandardSave of the state dict) and
`<directory>/<step>/digest.json`, written AFTER orbax has finished the step (for async saves: in
the next `save`, `wait`, `latest_step`, `restore*` or `close`), atomically (temporary file +
rename). A step directory without a digest is an incomplete (interrupted) save.

The digest holds, per array (by its path in the state dict, e.g. `opt_state/1/0/mu/w`): shape,
dtype and the sha256 of its bytes (`np.asarray(leaf).tobytes()`, C order); the step; the run's
config (JSON) and its sha256 (when `Checkpointer(config=...)` is given); and a sha256 of the
digest itself. On restore the checkpoint is accepted only if the digest is present and intact,
the stored step matches, orbax can read every array, and every restored array hashes to its
digest entry (arrays are restored in their stored dtype, verified, then cast to the template's).

`restore_latest` walks back from the newest step: a corrupt or incomplete checkpoint gives a
`warnings.warn` naming its path and the reason, and the previous one is tried; when none is
intact it raises `CheckpointError` (one line listing every step and why). `restore(step)` raises
`CorruptCheckpointError` instead of falling back. A template of another structure raises
`CheckpointError` ("could not restore the checkpoint at ...") without falling back (every older
checkpoint would fail the same way).

Config check: with `config=` the checkpointer stores it with every digest; restoring a checkpoint
whose stored config differs raises `ConfigMismatchError` naming the differing keys as dotted paths
(`train.lr: 0.001 -> 0.002`), unless `force=True` (then it warns and restores). `ignore_keys` are
allowed to differ: a dotted path (`train.num_steps`), a prefix of one (`progress` covers
`progress.*`), or an fnmatch pattern (`*.num_steps`). Nothing is compared when either side has no
config.

Multi-process: every process calls save/restore (orbax writes each shard once); arrays that are not
fully addressable are gathered for hashing; process 0 writes the digest, then all processes meet at
a barrier.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any

DIGEST_FILE = "digest.json"
_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, incomplete or of another structure)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete (no digest) or its contents do not match its digest."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint was written by a run with another config (see `Checkpointer(config=...)`)."""


# ---------------------------------------------------------------------------------------------- trees
def _fault_point(step: int) -> None:
    """Fault drill (tests/test_faults.py): with ``RESEARCH_FAULT_KILL_IN_SAVE=<step>`` in the environment the
    process SIGKILLs itself after that step's arrays are on disk and before its digest is written, i.e.
    in the middle of the checkpoint write. Unset (always, outside the drills) this does nothing."""
    target = os.environ.get("RESEARCH_FAULT_KILL_IN_SAVE")
    if target is not None and target.strip() == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw_keys(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _to_saveable(tree: PyTree) -> dict:
    return serialization.to_state_dict(_raw_keys(tree))


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _flat(tree: PyTree) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)  # .tobytes() is C order whatever the layout


def _array_digest(x) -> dict:
    a = _host(x)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha(obj) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- config
def _flatten_config(cfg, prefix="") -> dict[str, Any]:
    out = {}
    if isinstance(cfg, Mapping) and cfg:
        for k, v in cfg.items():
            out.update(_flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = cfg
    return out


def _ignored(path: str, ignore_keys: Iterable[str]) -> bool:
    return any(path == k or path.startswith(k + ".") or fnmatch.fnmatchcase(path, k) for k in ignore_keys)


def config_diff(old: Mapping, new: Mapping, ignore_keys: Iterable[str] = ()) -> list[str]:
    """`["a.b: old -> new", ...]` for the dotted paths whose values differ (after a JSON round trip)."""
    old = _flatten_config(json.loads(_canonical(old)))
    new = _flatten_config(json.loads(_canonical(new)))
    diffs = []
    for k in sorted(set(old) | set(new)):
        if _ignored(k, ignore_keys):
            continue
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            diffs.append(f"{k}: {json.dumps(a) if a != '<absent>' else a} -> {json.dumps(b) if b != '<absent>' else b}")
    return diffs


# ------------------------------------------------------------------------------------------ checkpointer
def _abstract(x, dtype):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


class Checkpointer:
    """Periodic, verified checkpoints of a training-state pytree in `directory`, keeping the last `keep`.

    `save(step, state)` writes when `step` is a multiple of `save_every` (or `force=True`);
    saves are asynchronous (call `wait()` or `close()` before reading the files from elsewhere).
    `restore_latest(template)` returns the newest intact state, or None when there is no checkpoint.
    `config` (a plain JSON-able dict of the run's config) is stored with each checkpoint and checked
    on restore, except for `ignore_keys` (module docstring).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True, config: Mapping | None = None, ignore_keys: Iterable[str] = ()):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive int, got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a plain dict (e.g. the run's config as a dict), got {type(config).__name__}")
        if isinstance(ignore_keys, str):
            ignore_keys = (ignore_keys,)
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.config = None if config is None else json.loads(_canonical(config))
        self.ignore_keys = tuple(ignore_keys)
        self._pending: list[tuple[int, dict]] = []
        # The save decision is ours (`should_save`); orbax only writes and prunes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------- saving
    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` (without force) would write: `step % save_every == 0`, not yet saved."""
        step = int(step)
        return step % self.save_every == 0 and step not in self._manager.all_steps()

    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Saves `state` under `step` if due (every `save_every` steps) or if `force`; returns whether it saved."""
        step = int(step)
        if step in self._manager.all_steps():
            return False  # already saved at this step (e.g. the periodic save of the last step)
        if not (force or step % self.save_every == 0):
            return False
        self._finish_pending()  # the previous save's digest goes down before the next save starts
        saveable = _to_saveable(state)
        digest = {"format": _FORMAT, "step": step,
                  "arrays": {k: _array_digest(v) for k, v in _flat(saveable).items()},
                  "config": self.config, "config_sha256": None if self.config is None else _sha(self.config)}
        saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saveable)), force=True)
        if saved:
            self._pending.append((step, digest))
        return saved

    def _finish_pending(self) -> None:
        self._manager.wait_until_finished()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if jax.process_index() == 0:
            for step, digest in pending:
                path = self.step_path(step)
                if not os.path.isdir(path):
                    continue  # orbax did not finalise it (or it was pruned already)
                _fault_point(step)
                digest = dict(digest, digest_sha256=_sha(digest))
                tmp = os.path.join(path, f".{DIGEST_FILE}.tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(digest, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(path, DIGEST_FILE))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("research_checkpoint_digest")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk, with their digests."""
        self._finish_pending()

    def all_steps(self) -> list[int]:
        self._finish_pending()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest saved step in the directory (intact or not), or None."""
        self._finish_pending()
        self._manager.reload()
        return self._manager.latest_step()

    # ----------------------------------------------------------------------------------- restoring
    def _read_digest(self, step: int) -> dict:
        file = os.path.join(self.step_path(step), DIGEST_FILE)
        if not os.path.exists(file):
            raise CorruptCheckpointError(f"incomplete checkpoint at {self.step_path(step)}: no {DIGEST_FILE} "
                                         "(the save was interrupted)")
        try:
            with open(file, encoding="utf-8") as f:
                digest = json.load(f)
            ok = isinstance(digest, dict) and digest.pop("digest_sha256", None) == _sha(digest)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"corrupt checkpoint at {self.step_path(step)}: unreadable {DIGEST_FILE} "
                                         f"({type(e).__name__}: {e})") from None
        if not ok:
            raise CorruptCheckpointError(f"corrupt checkpoint at {self.step_path(step)}: {DIGEST_FILE} fails its own hash")
        if digest.get("step") != step:
            raise CorruptCheckpointError(f"corrupt checkpoint at {self.step_path(step)}: its digest is for step "
                                         f"{digest.get('step')}")
        return digest

    def _check_config(self, step: int, digest: dict, force: bool) -> None:
        stored = digest.get("config")
        if stored is None or self.config is None:
            return
        diffs = config_diff(stored, self.config, self.ignore_keys)
        if not diffs:
            return
        msg = (f"the checkpoint at {self.step_path(step)} was written with another config: " + "; ".join(diffs))
        if force:
            warnings.warn(msg + " (restoring anyway: force=True)", stacklevel=3)
            return
        raise ConfigMismatchError(msg + " (restore_latest(..., force=True) restores anyway; "
                                  "Checkpointer(ignore_keys=...) lists keys allowed to differ)")

    def restore(self, step: int, template: PyTree, *, force: bool = False) -> PyTree:
        """Restores and verifies the checkpoint of `step` into `template`'s structure, dtypes and shardings.

        Raises `CorruptCheckpointError` (incomplete/corrupt), `ConfigMismatchError` (unless `force`) or
        `CheckpointError` (another structure).
        """
        self._finish_pending()
        step = int(step)
        path = self.step_path(step)
        digest = self._read_digest(step)
        self._check_config(step, digest, force)
        raw_template = _raw_keys(template)
        target = serialization.to_state_dict(raw_template)
        flat_t = _flat(target)
        stored = digest["arrays"]
        missing, extra = sorted(set(flat_t) - set(stored)), sorted(set(stored) - set(flat_t))
        shapes = [f"{k} {list(stored[k]['shape'])} vs {list(np.shape(v))}" for k, v in flat_t.items()
                  if k in stored and list(stored[k]["shape"]) != list(np.shape(v))]
        if missing or extra or shapes:
            parts = ([f"not in the checkpoint: {missing[:5]}"] if missing else []) + \
                    ([f"not in the template: {extra[:5]}"] if extra else []) + \
                    ([f"shapes differ (checkpoint vs template): {shapes[:5]}"] if shapes else [])
            raise CheckpointError(f"could not restore the checkpoint at {path}: the template has another structure; "
                                  + "; ".join(parts))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        abstract = jax.tree_util.tree_unflatten(
            treedef, [_abstract(x, np.dtype(stored[_path_str(p)]["dtype"])) for p, x in leaves])
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # orbax/tensorstore raise many types (ValueError, OSError, KeyError, ImportError...)
            raise CorruptCheckpointError(f"corrupt checkpoint at {path}: orbax could not read it "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from e
        flat_r = _flat(restored)
        bad = [k for k in flat_t if k not in flat_r or _array_digest(flat_r[k]) != stored[k]]
        if bad:
            raise CorruptCheckpointError(f"corrupt checkpoint at {path}: {len(bad)} array(s) do not match the digest "
                                         f"(first: {bad[0]})")
        cast = jax.tree_util.tree_unflatten(
            treedef, [flat_r[_path_str(p)].astype(jnp.asarray(x).dtype)
                      if flat_r[_path_str(p)].dtype != jnp.asarray(x).dtype else flat_r[_path_str(p)]
                      for p, x in leaves])
        try:
            out = serialization.from_state_dict(raw_template, cast)
        except Exception as e:
            raise CheckpointError(f"could not restore the checkpoint at {path}: {type(e).__name__}: {e}") from e
        return jax.tree.map(lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
                            if _is_typed_key(t) else r, template, out)

    def restore_latest(self, template: PyTree, *, force: bool = False) -> PyTree | None:
        """The newest intact checkpoint restored into `template`, or None if there is none at all.

        Corrupt/incomplete ones are skipped with a warning naming their path; `CheckpointError` when
        none is intact. `force=True` restores despite a config mismatch.
        """
        steps = self.all_steps()
        if not steps:
            return None
        reasons, bad = [], []
        for step in reversed(steps):
            try:
                state = self.restore(step, template, force=force)
            except CorruptCheckpointError as e:
                reasons.append(f"step {step}: {e}")
                bad.append(step)
                warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
                continue
            self._quarantine(bad)
            return state
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + " | ".join(reasons))

    def _quarantine(self, steps: list[int]) -> None:
        """Moves the corrupt checkpoints newer than the restored one to ``<directory>.corrupt/`` (kept for
        inspection, nothing deleted), so the resumed run writes those steps afresh."""
        if not steps or jax.process_index() != 0:
            return
        dest_root = self.directory + ".corrupt"
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
            os.replace(self.step_path(step), dest)
            warnings.warn(f"moved the corrupt checkpoint {self.step_path(step)} to {dest}", stacklevel=3)
        self._manager.reload()

    def close(self) -> None:
        self._finish_pending()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
