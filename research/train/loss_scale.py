"""Loss scaling for float16 training: static, dynamic, and a no-op, as small pytrees.

Float16 has a narrow exponent range (max ~6.5e4, smallest normal ~6.1e-5): small gradients
underflow to zero. Multiplying the loss by ``S`` before differentiation multiplies every
gradient by ``S`` (moving them into range); dividing the gradients by ``S`` afterwards restores
them. Dynamic scaling adapts ``S``:

* gradients all finite: count the step; after ``period`` consecutive finite steps multiply
  ``S`` by ``factor`` (and reset the count);
* any gradient non-finite (the scaled backward pass overflowed): the train step **skips the
  update** (params, optimiser state and EMA untouched), ``S`` is divided by ``factor`` (never
  below ``min_loss_scale``) and the count resets.

The scale state (``loss_scale``, ``counter``) is made of arrays, so it lives in
``TrainState.loss_scale``, goes through ``jit`` and is checkpointed; the hyper-parameters
(``period``, ``factor``, ``min_loss_scale``, ``max_loss_scale``) are static pytree metadata, so
``jax.tree.map``/``jit``/``vmap`` keep them (unlike jmp 0.0.4, whose ``min_loss_scale`` is lost
when the object is rebuilt from its leaves).

Usage inside a train step::

    scaled_loss_fn = lambda p: ls.scale(loss_fn(p))        # loss in float32
    grads = ls.unscale(jax.grad(scaled_loss_fn)(params))
    finite = all_finite(grads)
    ls = ls.adjust(finite)
    new_params = select_tree(finite, updated_params, params)
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

__all__ = [
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
    "all_finite",
    "select_tree",
    "make_loss_scale",
]


def all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every floating leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack(leaves).all()


def select_tree(pred, on_true, on_false):
    """``jnp.where(pred, a, b)`` leaf by leaf for two trees of the same structure."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _scale_tree(tree, s):
    return jax.tree_util.tree_map(lambda x: (x * s.astype(x.dtype)) if jnp.issubdtype(
        jnp.asarray(x).dtype, jnp.inexact) else x, tree)


def _unscale_tree(tree, s):
    # divide in float32 (the gradients of float32 master weights are float32 anyway)
    inv = (1.0 / s).astype(jnp.float32)
    return jax.tree_util.tree_map(lambda x: (x * inv.astype(x.dtype)) if jnp.issubdtype(
        jnp.asarray(x).dtype, jnp.inexact) else x, tree)


@flax.struct.dataclass
class NoOpLossScale:
    """No scaling (float32 / bfloat16 training). ``adjust`` is the identity."""

    def scale(self, tree):
        return tree

    def unscale(self, tree):
        return tree

    def adjust(self, grads_finite):
        del grads_finite
        return self


@flax.struct.dataclass
class StaticLossScale:
    """A fixed scale ``loss_scale`` (float32 scalar array)."""

    loss_scale: jax.Array

    def scale(self, tree):
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        return _unscale_tree(tree, self.loss_scale)

    def adjust(self, grads_finite):
        del grads_finite
        return self


@flax.struct.dataclass
class DynamicLossScale:
    """Dynamic loss scale.

    Attributes:
      loss_scale: float32 scalar, current scale ``S``.
      counter: int32 scalar, consecutive finite steps since the last change.
      period: finite steps before growing (static).
      factor: growth / back-off factor (static).
      min_loss_scale: lower bound for ``S`` (static).
      max_loss_scale: upper bound for ``S`` (static; float32 max by default).
    """

    loss_scale: jax.Array
    counter: jax.Array
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)
    min_loss_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    max_loss_scale: float = flax.struct.field(pytree_node=False, default=2.0 ** 24)

    @classmethod
    def create(cls, initial_scale: float = 2.0 ** 15, *, period: int = 2000, factor: float = 2.0,
               min_loss_scale: float = 1.0, max_loss_scale: float = 2.0 ** 24) -> "DynamicLossScale":
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not factor > 1.0:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        if not 0.0 < min_loss_scale <= initial_scale <= max_loss_scale:
            raise ValueError("need 0 < min_loss_scale <= initial_scale <= max_loss_scale, got "
                             f"{min_loss_scale}, {initial_scale}, {max_loss_scale}")
        return cls(loss_scale=jnp.asarray(initial_scale, jnp.float32),
                   counter=jnp.asarray(0, jnp.int32), period=period, factor=float(factor),
                   min_loss_scale=float(min_loss_scale), max_loss_scale=float(max_loss_scale))

    def scale(self, tree):
        """Multiplies floating leaves (normally the float32 loss) by ``S``."""
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        """Divides floating leaves (the gradients) by ``S``."""
        return _unscale_tree(tree, self.loss_scale)

    def adjust(self, grads_finite) -> "DynamicLossScale":
        """New state after a step whose unscaled gradients were (not) all finite."""
        grads_finite = jnp.asarray(grads_finite)
        grown = self.counter + 1 >= self.period
        up = jnp.where(grown, jnp.minimum(self.loss_scale * self.factor, self.max_loss_scale),
                       self.loss_scale)
        up_counter = jnp.where(grown, 0, self.counter + 1)
        down = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
        return self.replace(
            loss_scale=jnp.where(grads_finite, up, down).astype(jnp.float32),
            counter=jnp.where(grads_finite, up_counter, 0).astype(jnp.int32))


def make_loss_scale(kind: str, *, initial_scale: float = 2.0 ** 15, period: int = 2000,
                    factor: float = 2.0, min_loss_scale: float = 1.0):
    """``"none"`` | ``"static"`` | ``"dynamic"`` -> the matching loss-scale object."""
    if kind == "none":
        return NoOpLossScale()
    if kind == "static":
        return StaticLossScale(jnp.asarray(initial_scale, jnp.float32))
    if kind == "dynamic":
        return DynamicLossScale.create(initial_scale, period=period, factor=factor,
                                       min_loss_scale=min_loss_scale)
    raise ValueError(f"unknown loss scale {kind!r}; choose 'none', 'static' or 'dynamic'")
