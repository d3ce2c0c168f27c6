"""Multi-model train step (GANs, actor-critic, teacher-student): several models, one optimiser each,
one shared step counter and root key, and a jit-compatible per-step schedule of who is updated.

State::

    MultiTrainState(step, key, models={"generator": ModelTrainState(...), "discriminator": ...})
    ModelTrainState(step, params, opt_state, ema_params=None, model_state=None)   # step: own updates

Losses see the other models' current parameters (never differentiated)::

    loss_fn(params, others, batch, key) -> (loss, aux)                  # others: {name: params}
    loss_fn(params, model_state, others, batch, key) -> (loss, (aux, new_model_state))   # stateful

Within one step the models are visited in the order of the `loss_fns` dict; a model updated at
this step is updated with `compute_grads_with_state` / `apply_updates` (the single-model pieces), and the
models visited after it see its NEW parameters (sequential, like the usual PyTorch GAN loop:
discriminator step, then generator step against the updated discriminator). Model i's key at
step s is `fold_in(fold_in(key, s), i)`.

Schedule: a static pattern indexed by `step % len(pattern)`; entry j is the set of names updated
at steps `s` with `s % len(pattern) == j`. Examples: `None` (everyone, every step),
`alternate("discriminator", "generator")` = `[{"discriminator"}, {"generator"}]`,
`n_critic("discriminator", "generator", 5)` (discriminator every step, generator every 5th step,
after the discriminator's update). Inside `jit` the pattern is a constant boolean table looked up
with the traced step and each model's update is a `lax.cond`: a model not updated at a step
keeps its params, opt_state, ema_params and model_state bit-identical (only its loss is
evaluated, forward only, for the metrics).

Metrics are prefixed by the model name: `<name>/loss`, `<name>/grad_norm` (0 when not updated),
`<name>/lr` (when the optimiser records it), `<name>/updated` (1.0 or 0.0) and `<name>/<aux key>`.
`train_loop(..., watch="generator/loss")` watches one of them for NaN/Inf.

Not supported here (single-model features of `make_train_step`): precision policies, loss scaling
and sharded/ring steps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.train.optim import current_learning_rate
from research.train.state import _copy_tree
from research.train.step import _check_ema, apply_updates, compute_grads_with_state

PyTree = Any


@flax.struct.dataclass
class ModelTrainState:
    """One model's slice of a `MultiTrainState`.

    Attributes:
      step: int32 scalar, number of updates this model has had (<= the shared step).
      params, opt_state, ema_params, model_state: as in `TrainState`.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None = None
    model_state: PyTree | None = None


@flax.struct.dataclass
class MultiTrainState:
    """The state of a multi-model run: shared `step` (int32) and root `key`, and one entry per model."""

    step: jax.Array
    key: jax.Array
    models: dict[str, ModelTrainState]


def create_multi_train_state(params: Mapping[str, PyTree], optimizers: Mapping[str, optax.GradientTransformation],
                             key: jax.Array, *, ema: bool | Mapping[str, bool] = False,
                             model_state: Mapping[str, PyTree] | None = None) -> MultiTrainState:
    """The initial `MultiTrainState` at step 0 (params copied, so donation never hits the caller's arrays).

    `ema` is one flag for every model or a dict name -> flag; `model_state` a dict name -> model state
    (models not named get None).
    """
    if set(params) != set(optimizers):
        raise ValueError(f"params and optimizers name different models: {sorted(params)} vs {sorted(optimizers)}")
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax PRNG key array, got {type(key).__name__}")
    model_state = dict(model_state or {})
    if set(model_state) - set(params):
        raise ValueError(f"model_state names unknown models: {sorted(set(model_state) - set(params))}")
    models = {}
    for name, p in params.items():
        opt = optimizers[name]
        if not isinstance(opt, optax.GradientTransformation):
            raise TypeError(f"optimizers[{name!r}] must be an optax.GradientTransformation, got {type(opt).__name__}")
        use_ema = ema[name] if isinstance(ema, Mapping) else ema
        p = _copy_tree(p)
        ms = model_state.get(name)
        models[name] = ModelTrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt.init(p),
                                       ema_params=_copy_tree(p) if use_ema else None,
                                       model_state=None if ms is None else _copy_tree(ms))
    return MultiTrainState(step=jnp.zeros((), jnp.int32), key=key, models=models)


def alternate(*names: str) -> list[set[str]]:
    """`names[0]` at even steps, `names[1]` at the next, ... (one model per step, round robin)."""
    return [{n} for n in names]


def n_critic(critic: str, generator: str, n: int) -> list[set[str]]:
    """The critic every step, the generator every n-th step (after that step's critic update)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return [{critic} for _ in range(n - 1)] + [{critic, generator}]


def _schedule_table(schedule, names: Sequence[str]) -> np.ndarray:
    if schedule is None:
        return np.ones((1, len(names)), bool)
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError("schedule must be None or a non-empty sequence of sets of model names, "
                         f"e.g. [{{'discriminator'}}, {{'generator'}}]; got {schedule!r}")
    table = np.zeros((len(schedule), len(names)), bool)
    for j, entry in enumerate(schedule):
        entry = {entry} if isinstance(entry, str) else set(entry)
        unknown = entry - set(names)
        if unknown:
            raise ValueError(f"schedule entry {j} names unknown models {sorted(unknown)}; models: {list(names)}")
        table[j] = [n in entry for n in names]
    if not table.any(axis=0).all():
        never = [n for n, u in zip(names, table.any(axis=0)) if not u]
        raise ValueError(f"schedule never updates {never}")
    return table


def _per_model(value, names, what):
    if isinstance(value, Mapping):
        missing = set(names) - set(value)
        if missing:
            raise ValueError(f"{what} has no entry for {sorted(missing)}")
        return {n: value[n] for n in names}
    return {n: value for n in names}


def make_multi_train_step(loss_fns: Mapping[str, Callable], optimizers: Mapping[str, optax.GradientTransformation],
                          *, schedule: Sequence | None = None, ema_decay: float | None | Mapping = None,
                          stateful: bool | Mapping[str, bool] = False, grad_accum_steps: int = 1,
                          donate: bool = True, jit: bool = True,
                          ) -> Callable[[MultiTrainState, PyTree], tuple[MultiTrainState, dict]]:
    """Builds `step(state: MultiTrainState, batch) -> (state, metrics)` (module docstring).

    Args:
      loss_fns: name -> loss; the dict order is the update order within a step.
      optimizers: name -> optax transformation (same names).
      schedule: None (every model every step) or a static pattern (see `alternate`, `n_critic`).
      ema_decay: one decay (or None) for every model, or a dict name -> decay.
      stateful: whether the losses (or, as a dict, each loss) take and return a model state.
      grad_accum_steps: micro-batch accumulation, as in `make_train_step`.
    """
    names = list(loss_fns)
    if set(names) != set(optimizers):
        raise ValueError(f"loss_fns and optimizers name different models: {sorted(names)} vs {sorted(optimizers)}")
    table = _schedule_table(schedule, names)
    decays = _per_model(ema_decay, names, "ema_decay")
    statefuls = _per_model(stateful, names, "stateful")
    for n, d in decays.items():
        if d is not None and not (0.0 <= float(d) < 1.0):
            raise ValueError(f"ema_decay[{n!r}] must be in [0, 1), got {d}")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}")

    def step(state: MultiTrainState, batch: PyTree) -> tuple[MultiTrainState, dict]:
        if set(state.models) != set(names):
            raise ValueError(f"state holds models {sorted(state.models)}, the step was built for {sorted(names)}")
        row = jnp.asarray(table)[state.step % table.shape[0]]
        base_key = jax.random.fold_in(state.key, state.step)
        models = dict(state.models)
        metrics = {}
        for i, name in enumerate(names):
            entry = models[name]
            _check_ema(entry, decays[name])
            others = {n: jax.lax.stop_gradient(models[n].params) for n in names if n != name}
            key = jax.random.fold_in(base_key, i)
            if statefuls[name]:
                if entry.model_state is None:
                    raise ValueError(f"stateful loss for {name!r} needs a model_state "
                                     "(create_multi_train_state(..., model_state={name: ...}))")
                fn4 = lambda p, ms, b, k, f=loss_fns[name], o=others: f(p, ms, o, b, k)  # noqa: E731
            else:
                fn4 = lambda p, ms, b, k, f=loss_fns[name], o=others: (lambda r: (r[0], (r[1], ms)))(  # noqa: E731
                    f(p, o, b, k))

            def update(entry, fn4=fn4, key=key, name=name):
                loss, aux, new_ms, grads = compute_grads_with_state(fn4, entry.params, entry.model_state, batch,
                                                                    key, grad_accum_steps)
                new = apply_updates(entry, grads, optimizers[name], decays[name]).replace(model_state=new_ms)
                return new, loss, aux, optax.global_norm(grads).astype(jnp.float32)

            def evaluate(entry, fn4=fn4, key=key):
                loss, (aux, _) = fn4(entry.params, entry.model_state, batch, key)
                return entry, loss, aux, jnp.zeros((), jnp.float32)

            # forward-only loss of the branch not taken must have the update branch's types
            new_entry, loss, aux, gnorm = jax.lax.cond(row[i], update, _match(evaluate, update, entry), entry)
            models[name] = new_entry
            metrics.update({f"{name}/{k}": v for k, v in dict(aux).items()})
            metrics[f"{name}/loss"] = loss
            metrics[f"{name}/grad_norm"] = gnorm
            lr = current_learning_rate(new_entry.opt_state)
            if lr is not None:
                metrics[f"{name}/lr"] = lr
            metrics[f"{name}/updated"] = row[i].astype(jnp.float32)
        return state.replace(step=state.step + 1, models=models), metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _match(evaluate, update, entry):
    """`evaluate` with its outputs cast to the dtypes of `update`'s (grad accumulation averages in
    the loss's dtype; a forward pass might differ in weak types)."""
    shapes = jax.eval_shape(update, entry)

    def fn(entry):
        out = evaluate(entry)
        return jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), out, shapes)

    return fn


__all__ = ["ModelTrainState", "MultiTrainState", "create_multi_train_state", "make_multi_train_step",
           "alternate", "n_critic"]
