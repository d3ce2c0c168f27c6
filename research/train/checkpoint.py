"""Checkpointing of a `TrainState` with orbax's `CheckpointManager`.

Layout: `<directory>/<step>/state/...` (orbax StandardSave of the state as a nested dict).
PRNG keys: a typed key (`jax.random.key`) is stored as its raw `jax.random.key_data` (uint32) and
re-wrapped with the template key's implementation on restore; a raw uint32 key is stored as is.
`restore_latest(template)` restores into the structure, dtypes and shardings of `template`.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import serialization

from research.train.state import TrainState

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, incomplete or of another structure)."""


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state: TrainState) -> dict:
    key = state.key
    if _is_typed_key(key):
        key = jax.random.key_data(key)
    return serialization.to_state_dict(state.replace(key=key))


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class Checkpointer:
    """Periodic checkpoints of a `TrainState` in `directory`, keeping the last `keep`.

    `save(step, state)` writes when `step` is a multiple of `save_every` (or `force=True`);
    saves are asynchronous (call `wait()` or `close()` before reading the files from elsewhere).
    `restore_latest(template)` returns the latest state, or None when there is no checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive int, got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        # The save decision is ours (`should_save`); orbax only writes and prunes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` (without force) would write: `step % save_every == 0`, not yet saved."""
        step = int(step)
        return step % self.save_every == 0 and step not in self._manager.all_steps()

    def save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
        """Saves `state` under `step` if due (every `save_every` steps) or if `force`; returns whether it saved."""
        step = int(step)
        if step in self._manager.all_steps():
            return False  # already saved at this step (e.g. the periodic save of the last step)
        if not (force or step % self.save_every == 0):
            return False
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state))),
                                  force=True)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest saved step in the directory, or None."""
        self.wait()
        self._manager.reload()
        return self._manager.latest_step()

    def restore(self, step: int, template: TrainState) -> TrainState:
        """Restores the checkpoint of `step` into `template`'s structure, dtypes and shardings."""
        self.wait()
        path = os.path.join(self.directory, str(step))
        typed_key = _is_typed_key(template.key)
        target = _to_saveable(template)
        abstract_target = jax.tree.map(_abstract, target)
        try:
            restored = self._manager.restore(
                int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_target)))["state"]
            state = serialization.from_state_dict(template.replace(key=target["key"]), restored)
        except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, KeyError, ...)
            raise CheckpointError(f"could not restore the checkpoint at {path}: {type(e).__name__}: {e}") from e
        if typed_key:
            state = state.replace(key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(template.key)))
        return state

    def restore_latest(self, template: TrainState) -> TrainState | None:
        """The latest checkpointed state restored into `template`, or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, template)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
