"""Optimisers as optax transformations: AdamW identical to `torch.optim.AdamW`, and the usual recipe.

The learning rate actually used at each update is recorded in the optimiser state
(`LearningRateState`), so the train step can report it: `current_learning_rate(opt_state)`.

Weight-decay mask rule (`decay_mask="default"`): a parameter leaf is decayed unless the last
key of its path (lower-cased) is one of `NO_DECAY_NAMES` (bias, scale, embedding, pos_embed, ...)
or ends with one of `NO_DECAY_SUFFIXES` (`_bias`, `_scale`, `_embedding`, `_embed`). With flax.linen
this excludes Dense/Conv biases, LayerNorm/RMSNorm scales, `nn.Embed` tables and learned position
embeddings, while every `kernel` decays. The rule looks at names only (not ndim), so stacked
(scanned) parameters are classified like unstacked ones.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]

NO_DECAY_NAMES = frozenset({"bias", "scale", "embedding", "embeddings", "pos_embed", "pos_embedding",
                            "position_embedding", "null_embedding"})
NO_DECAY_SUFFIXES = ("_bias", "_scale", "_embedding", "_embed")


class LearningRateState(NamedTuple):
    """State of `scale_by_learning_rate_recorded`: update count and the last learning rate used."""
    count: jax.Array          # int32 scalar
    learning_rate: jax.Array  # float32 scalar: the rate used by the most recent update (schedule(0) at init)


def _lr_at(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def scale_by_learning_rate_recorded(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Multiplies updates by `-learning_rate(count)` and records that rate in the state."""
    def init_fn(params):
        del params
        count = jnp.zeros((), jnp.int32)
        return LearningRateState(count, jnp.asarray(_lr_at(learning_rate, count), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        lr = _lr_at(learning_rate, state.count)
        updates = jax.tree.map(lambda u: (-jnp.asarray(lr, u.dtype) * u).astype(u.dtype), updates)
        return updates, LearningRateState(optax.safe_increment(state.count), jnp.asarray(lr, jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def current_learning_rate(opt_state: PyTree) -> jax.Array | None:
    """The learning rate of the most recent update found in `opt_state` (first `LearningRateState`), or None."""
    found = []

    def visit(x):
        if isinstance(x, LearningRateState):
            found.append(x.learning_rate)
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, LearningRateState))
    return found[0] if found else None


def _path_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def is_decayed(path) -> bool:
    """Default rule on one leaf path (a tuple of jax key entries or of strings): True if it decays."""
    if not path:
        return True
    last = _path_name(path[-1]) if not isinstance(path[-1], str) else path[-1]
    last = last.lower()
    return not (last in NO_DECAY_NAMES or last.endswith(NO_DECAY_SUFFIXES))


def default_decay_mask(params: PyTree) -> PyTree:
    """Boolean pytree like `params`: True where weight decay applies (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params)


def _check_hparams(b1, b2, eps, weight_decay):
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"b1 must be in [0, 1), got {b1}")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2 must be in [0, 1), got {b2}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def adamw(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, mask: PyTree | Callable[[PyTree], PyTree] | None = None
          ) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, the same update as `torch.optim.AdamW` (amsgrad=False).

    Per step t (1-based), with lr = learning_rate(t - 1):
      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
      p <- p - lr * (wd * p + (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps))
    which equals torch's `p *= 1 - lr * wd` followed by the bias-corrected Adam step (eps added
    after the square root). A schedule is evaluated at the 0-based update count, like
    `torch.optim.lr_scheduler.LambdaLR` stepped after each `optimizer.step()`.

    Args:
      learning_rate: float or schedule `count -> lr`.
      mask: pytree of bools (or a function params -> such pytree) selecting the leaves that decay;
        None decays every leaf (torch's behaviour).
    """
    _check_hparams(b1, b2, eps, weight_decay)
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(scale_by_learning_rate_recorded(learning_rate))
    return optax.chain(*parts)


def warmup_cosine_schedule(peak_lr: float, *, warmup_steps: int, total_steps: int,
                           end_lr_frac: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `end_lr_frac * peak_lr`.

    lr(s) = peak * s / warmup                                for s < warmup
          = end + (peak - end) * (1 + cos(pi * q)) / 2        q = (s - warmup) / (total - warmup), clipped to [0, 1]
    (the first update, s = 0, therefore uses lr 0 when warmup_steps > 0).
    """
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= end_lr_frac <= 1.0:
        raise ValueError(f"end_lr_frac must be in [0, 1], got {end_lr_frac}")
    end_lr = peak_lr * end_lr_frac
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = peak_lr * s / max(warmup_steps, 1)
        q = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * q))
        return jnp.where(s < warmup_steps, warm, cos)

    return schedule


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   end_lr_frac: float = 0.0,
                   decay_mask: str | Callable[[PyTree], PyTree] = "default") -> optax.GradientTransformation:
    """The usual recipe: global-norm clipping -> AdamW with warmup+cosine schedule and a decay mask.

    Args:
      learning_rate: peak learning rate.
      clip_norm: max global gradient norm (`optax.clip_by_global_norm`); None disables clipping.
      decay_mask: "default" (no decay on biases, norm scales, embeddings; see module docstring),
        "all" (decay every leaf) or a function params -> bool pytree.
    """
    if decay_mask == "default":
        mask = default_decay_mask
    elif decay_mask == "all":
        mask = None
    elif callable(decay_mask):
        mask = decay_mask
    else:
        raise ValueError(f"decay_mask must be 'default', 'all' or a callable, got {decay_mask!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    schedule = warmup_cosine_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                                      end_lr_frac=end_lr_frac)
    opt = adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    if clip_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt)
