"""The generic train step: `step(state, batch) -> (state, metrics)`, jitted once as a whole.

Pieces (kept separate so precision / loss scaling / sharding can wrap them):
  `step_key(state)`                      per-step key `fold_in(state.key, state.step)`
  `compute_grads(loss_fn, params, batch, key, grad_accum_steps)`  -> (loss, aux, grads)
  `apply_updates(state, grads, optimizer, ema_decay)`               -> new state
  `compute_grads_with_state(loss_fn, params, model_state, batch, key, grad_accum_steps)`
                                         -> (loss, aux, new_model_state, grads)   (stateful losses)
  `make_train_step(...)`                  composes them and jits with `donate_argnums=0`
  (the multi-model step over the same pieces is `research.train.multi.make_multi_train_step`)

Two loss signatures:
  stateless (default)   `loss_fn(params, batch, key) -> (loss, aux)`
  stateful=True         `loss_fn(params, model_state, batch, key) -> (loss, (aux, new_model_state))`
                        for models with non-gradient variables kept in `state.model_state` (flax
                        mutable collections: batch statistics, a VQ codebook's EMA, ...). The step
                        passes `state.model_state` in and stores `new_model_state` (cast to the old
                        leaves' dtypes, so the state's types never change); it is not
                        differentiated (`model_state` is an argument, not a parameter). With
                        `grad_accum_steps = n` the model state is threaded through the n
                        micro-batches in order (micro-batch i sees the state left by i - 1, like n
                        small forward passes). Typical flax use::

                          def loss_fn(params, model_state, batch, key):
                              out, new_vars = model.apply({"params": params, **model_state}, batch,
                                                          mutable=list(model_state))
                              return loss(out), (aux, new_vars)

Scale features (all optional, off by default):
  precision      a `research.train.precision.Policy` (or its string): `loss_fn` sees the
                 parameters cast to the compute dtype (the float32 master weights stay in the
                 state; gradients flow back through the cast and arrive float32); the loss is
                 cast to float32.
  loss scaling   when `state.loss_scale` is a loss-scale object (`research.train.loss_scale`):
                 the loss is multiplied by the scale before differentiation and the gradients
                 divided by it. With non-finite gradients the update is SKIPPED: params,
                 opt_state, ema_params and model_state are returned unchanged, the scale is adjusted
                 (halved), and `step` STILL ADVANCES by one, so the per-step key, the data
                 iterator position and the loop's step count stay in lock-step (the skipped
                 batch is not retried). Metrics gain `loss_scale` and `grads_finite`.
  sharding       `mesh` + `state_sharding` (from `research.parallel.sharding`): jitted with
                 `in_shardings=(state_sharding, batch split over data_axis)` and
                 `out_shardings=(state_sharding, replicated)` -- data parallel or FSDP
                 depending on `state_sharding`.
  grad_reduce    "auto" (XLA inserts the all-reduce) or "ring": per-device gradients inside
                 `shard_map` averaged with the ppermute ring all-reduce of
                 `research.parallel.collectives` (needs `mesh`; each device folds its index into
                 the step key, so random draws differ per device). A stateful loss's new
                 model state is averaged over devices (floating leaves; like synchronised batch
                 statistics), integer leaves are taken from the devices as they are.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from research.train.ema import ema_update
from research.train.loss_scale import all_finite, select_tree
from research.train.optim import current_learning_rate
from research.train.precision import Policy, get_policy
from research.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]
# (params, model_state, batch, key) -> (loss, (aux, new_model_state))
StatefulLossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, tuple[dict, PyTree]]]


def step_key(state: TrainState) -> jax.Array:
    """The key of the current step: `jax.random.fold_in(state.key, state.step)`."""
    return jax.random.fold_in(state.key, state.step)


def _split_microbatches(batch: PyTree, n: int) -> PyTree:
    def split(x):
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"grad_accum_steps={n} must divide the batch size; got a leaf of shape {x.shape}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


def _lift(loss_fn: LossFn) -> StatefulLossFn:
    """A stateless loss as a stateful one that returns the model state unchanged."""
    def lifted(params, model_state, batch, key):
        loss, aux = loss_fn(params, batch, key)
        return loss, (aux, model_state)

    return lifted


def _keep_dtypes(new: PyTree, old: PyTree) -> PyTree:
    # the new model state keeps the structure and dtypes of the old one (a fixed carry / state type)
    if jax.tree.structure(new) != jax.tree.structure(old):
        raise ValueError("a stateful loss must return a new model state of the same structure as the one "
                         f"it received; got {jax.tree.structure(new)} for {jax.tree.structure(old)}")
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new, old)


def compute_grads_with_state(loss_fn: StatefulLossFn, params: PyTree, model_state: PyTree, batch: PyTree,
                             key: jax.Array, grad_accum_steps: int = 1) -> tuple[jax.Array, dict, PyTree, PyTree]:
    """Loss, aux, new model state and gradients of a stateful
    `loss_fn(params, model_state, batch, key) -> (loss, (aux, new_model_state))`.

    Gradients are taken w.r.t. `params` only. With `grad_accum_steps = n > 1` the micro-batches are
    processed in order by `lax.scan` (keys `fold_in(key, i)`), the model state threaded through them;
    loss, aux and gradients are means over micro-batches, the model state is the last one.
    """
    def fn(p, ms, b, k):
        loss, (aux, new_ms) = loss_fn(p, ms, b, k)
        return loss, (aux, _keep_dtypes(new_ms, ms))

    grad_fn = jax.value_and_grad(fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, (aux, new_ms)), grads = grad_fn(params, model_state, batch, key)
        return loss, aux, new_ms, grads

    micro = _split_microbatches(batch, grad_accum_steps)

    def body(carry, xs):
        i, mb = xs
        acc_loss, acc_aux, acc_grads, ms = carry
        (loss, (aux, ms)), grads = grad_fn(params, ms, mb, jax.random.fold_in(key, i))
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_aux, aux), jax.tree.map(jnp.add, acc_grads, grads),
                ms), None

    first_mb = jax.tree.map(lambda x: x[0], micro)
    loss_shape, (aux_shape, _) = jax.eval_shape(fn, params, model_state, first_mb, key)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    init = (zeros(loss_shape), zeros(aux_shape), jax.tree.map(jnp.zeros_like, params), model_state)
    (loss, aux, grads, new_ms), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum_steps), micro))
    scale = lambda tree: jax.tree.map(lambda x: x / grad_accum_steps, tree)  # noqa: E731
    return scale(loss), scale(aux), new_ms, scale(grads)


def compute_grads(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array,
                  grad_accum_steps: int = 1) -> tuple[jax.Array, dict, PyTree]:
    """Loss, aux and gradients of `loss_fn(params, batch, key) -> (loss, aux)`.

    With `grad_accum_steps = n > 1` the batch (leading axis B, divisible by n) is split into n
    micro-batches of B/n processed sequentially by `lax.scan`; micro-batch i gets the key
    `fold_in(key, i)`. Loss, aux and gradients are the means over micro-batches, which equals the
    full-batch result when the loss is a mean over examples (and does not depend on the key).
    """
    loss, aux, _, grads = compute_grads_with_state(_lift(loss_fn), params, None, batch, key, grad_accum_steps)
    return loss, aux, grads


def apply_updates(state: TrainState, grads: PyTree, optimizer: optax.GradientTransformation,
                  ema_decay: float | None) -> TrainState:
    """Optimiser update, EMA update (if `ema_decay` is not None) and `step + 1`."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_decay is not None:
        ema_params = ema_update(ema_params, params, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)


def _check_ema(state: TrainState, ema_decay):
    if ema_decay is not None and state.ema_params is None:
        raise ValueError("ema_decay is set but the state has no ema_params (create_train_state(..., ema=True))")
    if ema_decay is None and state.ema_params is not None:
        raise ValueError("the state has ema_params but ema_decay is None; pass ema_decay (e.g. "
                         "ema_decay_from_half_life) or create the state with ema=False")


def _float32_aux(aux):
    return jax.tree.map(lambda a: jnp.asarray(a).astype(jnp.float32)
                        if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, aux)


def _with_precision(loss_fn: StatefulLossFn, policy: Policy | None) -> StatefulLossFn:
    """loss_fn seeing compute-dtype params; float32 loss and aux (the model state keeps its dtypes)."""
    if policy is None:
        return loss_fn

    def wrapped(params, model_state, batch, key):
        loss, (aux, new_ms) = loss_fn(policy.cast_to_compute(params), model_state, batch, key)
        return jnp.asarray(loss, jnp.float32), (_float32_aux(aux), new_ms)

    return wrapped


def _with_loss_scale(loss_fn: StatefulLossFn, loss_scale) -> StatefulLossFn:
    """(scaled loss, ((aux, unscaled loss), model state)) so the unscaled loss survives value_and_grad."""
    def wrapped(params, model_state, batch, key):
        loss, (aux, new_ms) = loss_fn(params, model_state, batch, key)
        return loss_scale.scale(loss), ((aux, loss), new_ms)

    return wrapped


def _pmean_floats(tree, axis):
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                        else x, tree)


def _ring_compute_grads(loss_fn: StatefulLossFn, params, model_state, batch, key, grad_accum_steps, mesh, axis):
    """compute_grads_with_state per device inside shard_map, gradients averaged by the ring all-reduce."""
    from jax.sharding import PartitionSpec as P

    from research.parallel.collectives import ring_mean

    def local(params, model_state, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        loss, aux, new_ms, grads = compute_grads_with_state(loss_fn, params, model_state, batch, key,
                                                            grad_accum_steps)
        loss, aux = jax.lax.pmean((loss, aux), axis)
        return loss, aux, _pmean_floats(new_ms, axis), ring_mean(grads, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis), P()), out_specs=(P(), P(), P(), P()),
                         check_vma=False)(params, model_state, batch, key)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, ema_decay: float | None = None,
                    grad_accum_steps: int = 1, donate: bool = True, jit: bool = True,
                    precision: Policy | str | None = None, mesh=None, state_sharding=None,
                    data_axis: str = "data", grad_reduce: str = "auto", stateful: bool = False,
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
    """Builds `step(state, batch) -> (state, metrics)`.

    `loss_fn(params, batch, key) -> (loss, aux)` with a float32 scalar loss and a dict of scalar aux
    metrics; with `stateful=True`, `loss_fn(params, model_state, batch, key) -> (loss, (aux,
    new_model_state))`, reading and replacing `state.model_state` (module docstring). The step uses `key = fold_in(state.key, state.step)`, computes gradients (with
    micro-batch accumulation if `grad_accum_steps > 1`), applies the optimiser, updates the EMA and
    increments `step`. Metrics (device arrays; fetch them only when logging): the aux entries, then
    `loss`, `grad_norm` (global norm of the gradients before any clipping) and `lr` (learning rate of
    this update, when the optimiser records it, e.g. `research.train.optim.adamw`).

    With `jit=True` the step is `jax.jit(step, donate_argnums=0 if donate else ())`: compiled once
    for fixed shapes; the input state's buffers are donated (do not reuse it after the call).

    `precision`, loss scaling (via `state.loss_scale`), `mesh`/`state_sharding`/`data_axis` and
    `grad_reduce` are described in the module docstring.
    """
    policy = None if precision is None else get_policy(precision)
    if grad_reduce not in ("auto", "ring"):
        raise ValueError(f"grad_reduce must be 'auto' or 'ring', got {grad_reduce!r}")
    if grad_reduce == "ring" and mesh is None:
        raise ValueError("grad_reduce='ring' needs a mesh (research.parallel.sharding.make_mesh)")
    if state_sharding is not None and mesh is None:
        raise ValueError("state_sharding needs mesh as well")
    if mesh is not None and data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
    if ema_decay is not None and not (0.0 <= float(ema_decay) < 1.0):
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

    base_fn = loss_fn if stateful else _lift(loss_fn)

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        _check_ema(state, ema_decay)
        if stateful and state.model_state is None:
            raise ValueError("stateful=True needs state.model_state (create_train_state(..., model_state=...))")
        fn = _with_precision(base_fn, policy)
        ls = state.loss_scale
        if ls is not None:
            fn = _with_loss_scale(fn, ls)
        if grad_reduce == "ring":
            loss, aux, new_ms, grads = _ring_compute_grads(fn, state.params, state.model_state, batch,
                                                           step_key(state), grad_accum_steps, mesh, data_axis)
        else:
            loss, aux, new_ms, grads = compute_grads_with_state(fn, state.params, state.model_state, batch,
                                                                step_key(state), grad_accum_steps)
        if ls is not None:
            aux, loss = aux
            grads = ls.unscale(grads)
            finite = all_finite(grads)
            updated = apply_updates(state, grads, optimizer, ema_decay)
            new_state = updated.replace(
                params=select_tree(finite, updated.params, state.params),
                opt_state=select_tree(finite, updated.opt_state, state.opt_state),
                ema_params=select_tree(finite, updated.ema_params, state.ema_params),
                model_state=select_tree(finite, new_ms, state.model_state),
                loss_scale=ls.adjust(finite))
        else:
            new_state = apply_updates(state, grads, optimizer, ema_decay).replace(model_state=new_ms)
        metrics = dict(aux)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        lr = current_learning_rate(new_state.opt_state)
        if lr is not None:
            metrics["lr"] = lr
        if ls is not None:
            metrics["grads_finite"] = finite.astype(jnp.float32)
            if hasattr(ls, "loss_scale"):
                metrics["loss_scale"] = ls.loss_scale  # the scale this step used
        return new_state, metrics

    if not jit:
        return step
    if state_sharding is not None:
        from research.parallel.sharding import jit_sharded_step

        return jit_sharded_step(step, state_sharding, mesh, axis=data_axis, donate=donate)
    return jax.jit(step, donate_argnums=(0,) if donate else ())
