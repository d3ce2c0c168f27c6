"""Train state: the one pytree a train step consumes and returns.

`TrainState` holds everything that must survive a restart for bit-identical
resumption: the step counter, parameters, optimiser state, EMA parameters, the root
PRNG key, (for mixed precision) the dynamic loss-scale state and the model state.

`model_state` holds a model's non-gradient variables: flax mutable collections other than
"params" (e.g. `{"batch_stats": ...}`, a VQ codebook's EMA statistics) or any pytree of arrays a
stateful loss returns (see `make_train_step(..., stateful=True)`). It is None for stateless
models, is never differentiated or touched by the optimiser, and is checkpointed with the rest.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Pytree of the training state.

    Attributes:
      step: int32 scalar array, number of optimiser steps already taken.
      params: model parameters (float32 by convention).
      opt_state: optax state of `optimizer` for `params`.
      ema_params: exponential moving average of `params`, or None when EMA is off.
      key: root PRNG key (typed `jax.random.key` or raw uint32 `PRNGKey`); never
        consumed directly: the step uses `fold_in(key, step)`.
      loss_scale: None, or the dynamic loss-scale pytree of a precision policy.
      model_state: None, or the model's non-gradient state (flax mutable collections such as
        batch statistics or codebook EMAs); updated by stateful losses only.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None
    key: jax.Array
    loss_scale: PyTree | None = None
    model_state: PyTree | None = None


def _copy_tree(tree: PyTree) -> PyTree:
    # A real copy, so that donating the state never invalidates the caller's params.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation, key: jax.Array,
                       *, ema: bool = True, loss_scale: PyTree | None = None,
                       model_state: PyTree | None = None) -> TrainState:
    """Builds the initial `TrainState` at step 0.

    Args:
      params: parameter pytree.
      optimizer: the optax transformation used by the train step.
      key: root PRNG key of the run (typed or raw); it is stored, not split.
      ema: keep an EMA copy of the parameters (initialised to `params`).
      loss_scale: optional loss-scale state (see the precision helpers).
      model_state: optional non-gradient model state (e.g. the non-"params" collections of
        `model.init(...)`), copied like `params`.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax PRNG key array, got {type(key).__name__}")
    params = _copy_tree(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=_copy_tree(params) if ema else None,
        key=key,
        loss_scale=loss_scale,
        model_state=None if model_state is None else _copy_tree(model_state),
    )
