"""Meshes and shardings: data parallel (DP) and fully sharded data parallel (FSDP).

* :func:`make_mesh` builds a :class:`jax.sharding.Mesh` with named axes from the available
  (global) devices, e.g. ``make_mesh({"data": -1})``.
* DP: parameters, optimiser state and EMA replicated; the batch's leading axis split over the
  ``data`` axis. XLA inserts the gradient all-reduce.
* FSDP (ZeRO-3 style): every parameter (and the matching optimiser moments and EMA copy) is
  split over the ``data`` axis along its largest dimension divisible by the axis size; leaves
  with no such dimension (or fewer than ``min_shard_size`` elements) stay replicated. XLA
  all-gathers weights for the forward/backward and reduce-scatters the gradients.

Shape-first initialisation (:func:`init_sharded`): ``jax.eval_shape`` gives the state's shapes
without computing it, the rule above turns them into shardings, and the init function is jitted
with ``out_shardings`` so each device only ever materialises its own shard; full parameters
never sit on one device.

The sharded train step (:func:`jit_sharded_step`) is the plain ``step(state, batch)`` jitted with
``in_shardings=(state_shardings, batch_sharding)``, ``out_shardings=(state_shardings,
replicated)`` and the state donated, so the state keeps its layout step after step.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "SHARDING_MODES",
    "make_mesh",
    "replicated",
    "batch_sharding",
    "fsdp_spec",
    "tree_shardings",
    "state_shardings",
    "init_sharded",
    "shard_batch",
    "jit_sharded_step",
]

SHARDING_MODES = ("dp", "fsdp")
_STATE_SHARDED_FIELDS = ("params", "opt_state", "ema_params")


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all global devices) with named axes.

    Args:
      axes: ``{"data": -1}`` (default), ``{"data": 4, "model": 2}``, ... At most one size may
        be ``-1`` (= all remaining devices). The product must equal the number of devices.
      devices: devices to use (default ``jax.devices()``).
    """
    axes = dict(axes if axes is not None else {"data": -1})
    if not axes:
        raise ValueError("make_mesh needs at least one named axis")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = list(axes.values())
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {axes}")
    for name, s in axes.items():
        if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
            raise ValueError(f"mesh axis {name!r} has bad size {s!r}; use a positive int or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into mesh axes {axes}")
        axes = {k: (n // known if s == -1 else s) for k, s in axes.items()}
    if int(np.prod(list(axes.values()))) != n:
        raise ValueError(f"mesh axes {axes} need {int(np.prod(list(axes.values())))} devices, "
                         f"{n} available")
    grid = np.asarray(devices, dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes.keys()))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading (batch) axis split over ``axis``; the rest replicated."""
    _check_axis(mesh, axis)
    return NamedSharding(mesh, P(axis))


def _check_axis(mesh: Mesh, axis: str):
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}")


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str = "data", *,
              min_shard_size: int = 0) -> P:
    """PartitionSpec splitting the largest dimension of ``shape`` divisible by ``axis_size``.

    Ties go to the earliest dimension. Replicated (``P()``) if no dimension is divisible or the
    leaf has fewer than ``min_shard_size`` elements.
    """
    shape = tuple(int(d) for d in shape)
    if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < max(min_shard_size, 1):
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % axis_size == 0 and d > 0 and (best is None or d > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*([None] * best + [axis]))


def tree_shardings(tree, mesh: Mesh, *, mode: str = "dp", axis: str = "data",
                   min_shard_size: int = 0):
    """NamedSharding per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s).

    ``mode="dp"``: everything replicated. ``mode="fsdp"``: :func:`fsdp_spec` per leaf.
    """
    if mode not in SHARDING_MODES:
        raise ValueError(f"unknown sharding mode {mode!r}; choose one of {SHARDING_MODES}")
    _check_axis(mesh, axis)
    if mode == "dp":
        return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
    size = mesh.shape[axis]

    def leaf(x):
        return NamedSharding(mesh, fsdp_spec(np.shape(x), size, axis,
                                             min_shard_size=min_shard_size))
    return jax.tree_util.tree_map(leaf, tree)


def state_shardings(state, mesh: Mesh, *, mode: str = "dp", axis: str = "data",
                    min_shard_size: int = 0):
    """Shardings for a train state (a ``TrainState`` or a plain pytree).

    For an object with ``params``/``opt_state``/``ema_params`` fields (``TrainState``) those
    fields follow ``mode``; everything else (step, PRNG key, loss scale) is replicated.
    Any other pytree follows ``mode`` leaf by leaf.
    """
    if not all(hasattr(state, f) for f in ("params", "opt_state")) or not hasattr(state, "replace"):
        return tree_shardings(state, mesh, mode=mode, axis=axis, min_shard_size=min_shard_size)
    shard = tree_shardings(state, mesh, mode="dp", axis=axis)  # replicated everywhere first
    updates = {f: tree_shardings(getattr(state, f), mesh, mode=mode, axis=axis,
                                 min_shard_size=min_shard_size)
               for f in _STATE_SHARDED_FIELDS if getattr(state, f, None) is not None}
    return shard.replace(**updates)


def init_sharded(init_fn: Callable, *args, mesh: Mesh, mode: str = "dp", axis: str = "data",
                 min_shard_size: int = 0):
    """Shape-first init: ``eval_shape`` -> shardings -> ``jit(init_fn, out_shardings)(*args)``.

    Returns ``(state, shardings)``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, mode=mode, axis=axis,
                                min_shard_size=min_shard_size)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
    """Host batch (numpy pytree) -> global arrays split over ``axis``.

    Each process passes *its own* slice of the global batch (leading axis = per-process batch);
    with one process that is the whole batch. Uses ``jax.make_array_from_process_local_data``,
    so the same call works single- and multi-host. The per-process batch must be divisible by
    the number of this process's devices on ``axis``.
    """
    sharding = batch_sharding(mesh, axis)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch leaves need a leading batch axis; got a scalar")
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree_util.tree_map(put, batch)


def jit_sharded_step(step: Callable, state_sharding, mesh: Mesh, *, axis: str = "data",
                     donate: bool = True) -> Callable:
    """``jit(step, in_shardings=(state, batch), out_shardings=(state, replicated))``.

    ``step`` is an *unjitted* ``step(state, batch) -> (state, metrics)`` (e.g.
    ``make_train_step(..., jit=False)``); metrics come back replicated.
    """
    return jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh, axis)),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
