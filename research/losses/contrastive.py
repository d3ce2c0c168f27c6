"""Contrastive losses: InfoNCE (CPC), NT-Xent (SimCLR), a learnable clamped temperature, and the
cross-device versions that all-gather the negatives under ``jax.shard_map``.

InfoNCE (van den Oord et al. 2018, CPC eq. 4) for queries ``q_i`` and candidate keys ``k_j``::

    loss_i = -log( exp(s_{i,p(i)} / T) / sum_{j valid for i} exp(s_{ij} / T) )
    loss   = mean over the valid queries (``query_mask``)

with ``s_ij = <q̂_i, k̂_j>`` (cosine similarity, ``normalize=True``) or ``<q_i, k_j>`` and ``p(i)`` the
index of the positive key (the diagonal by default when there are as many keys as queries).

NT-Xent (Chen et al. 2020, SimCLR) for two views ``z1, z2 [N, D]`` of N examples: the 2N embeddings
``[z1; z2]`` are both the queries and the candidates; row ``i`` (view 1) has the positive ``N + i``
(its other view), row ``N + i`` has ``i``, self-similarity ``k = i`` is excluded from the denominator
(SimCLR's ``1[k != i]``), and the loss is the mean of the 2N row losses (both directions).

Numerics (every function here):
  * the similarities, logits and softmax statistics are computed in float32 whatever the embeddings'
    dtype (bfloat16 / float16 inputs are upcast before the matrix product); float64 inputs (under
    ``jax_enable_x64``) stay float64;
  * masks are applied AFTER the division by the temperature, with the finite value
    ``mask_value(dtype) = finfo(dtype).min / 2`` (not ``-inf``; applied before the scaling it would
    overflow to ``-inf`` for T < 1/2). The softmax of a row therefore never sees ``-inf - (-inf)``:
    values and gradients stay finite when every candidate but the positive is masked (row loss 0,
    gradient 0) and for padding query rows whose candidates are all masked (excluded from the mean
    by ``query_mask``; gradient exactly 0). The positive is always kept as a candidate (its ``mask``
    entry is ignored): it is the numerator;
  * normalisation is ``x / max(‖x‖, 1e-12)`` with a finite gradient at ``x = 0`` (zero padding rows).

Temperature: a float, a traced array, or the clamped learnable ``temperature_from_log(log_t, min_t,
max_t)`` (CLIP learns ``log(1/T)`` and clamps ``1/T <= 100``; here ``log T`` in ``[log min_t, log
max_t]``). Its gradient rule at the bounds is documented on ``clamp_inward``.

Cross-device (``sharded_info_nce``, ``sharded_nt_xent``; call them INSIDE ``jax.shard_map`` with the
batch split over ``axis_name``): each device all-gathers the keys (for NT-Xent both views) so that its
local queries see the negatives of the whole global batch, computes its rows' losses, and the loss
returned is the global mean ``psum(sum of row losses) / psum(number of valid rows)``: the same value on
every device and equal to the single-device loss on the full (concatenated) batch. Gradients flow
through the gathered negatives: the transpose of ``all_gather`` is a ``psum_scatter`` (reduce-scatter),
which sums the cotangents every device computed for a key and returns them to the device that holds
it. With ``check_vma=True`` (shard_map's default) the gradient of the returned loss w.r.t. a device's
local embeddings is the gradient of the global loss w.r.t. those embeddings, both when differentiating
inside the shard_map body and through the shard_map from outside (``out_specs=P()``); a replicated
parameter's gradient inside the body is already summed over devices (tests/test_contrastive.py checks
all three against the full-batch loss). With ``check_vma=False`` the transpose of the final ``psum``
is a ``psum`` again, so gradients taken INSIDE the body come out multiplied by the axis size; there,
use ``reduction="per_device"``: each device returns its own rows' share
``P * (sum of its row losses) / psum(valid rows)``, whose mean over the P devices is the global loss,
and averaging the per-device gradients (``pmean`` / ``research.parallel.collectives.ring_mean``, as
``make_train_step(grad_reduce="ring")`` does) gives the global gradient. Differentiating from outside
the shard_map is right in both modes.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.losses.margin import l2_normalize

AxisName = str | Sequence[str]
DEFAULT_TEMPERATURE = 0.1

# ---------------------------------------------------------------------------- dtypes and masks


def compute_dtype(*arrays) -> jnp.dtype:
    """float64 if any input is float64 (x64), else float32: the dtype of logits and softmax statistics."""
    dtypes = [jnp.asarray(a).dtype for a in arrays if a is not None and not isinstance(a, (int, float))]
    return jnp.dtype(jnp.float64) if any(d == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


def mask_value(dtype) -> float:
    """The finite value masked logits get: ``finfo(dtype).min / 2`` (far below any real logit; half the
    minimum so that subtracting a row maximum can never overflow to ``-inf``)."""
    return float(jnp.finfo(dtype).min) / 2


# ---------------------------------------------------------------------------- temperature


@jax.custom_vjp
def clamp_inward(x: jax.Array, lo, hi) -> jax.Array:
    """``clip(x, lo, hi)`` with a gradient that cannot leave a parameter stuck outside the interval.

    Gradient w.r.t. ``x`` (upstream ``g``): ``g`` for ``lo <= x <= hi`` (bounds included: the exact
    one-sided derivative, not jnp.clip's 1/2 at a tie); outside, ``g`` only when a gradient-descent
    step ``x - lr g`` moves ``x`` back toward the interval (``x > hi`` and ``g > 0``, or ``x < lo``
    and ``g < 0``), else 0. So the value is always clamped, the gradient is exact inside, and a
    parameter pushed past a bound (e.g. by Adam's momentum) is never frozen there, unlike a plain clip
    whose zero gradient outside keeps it out forever. No gradient flows to ``lo`` / ``hi``.
    """
    return jnp.clip(x, lo, hi)


def _clamp_fwd(x, lo, hi):
    return jnp.clip(x, lo, hi), (x, lo, hi)


def _clamp_bwd(res, g):
    x, lo, hi = res
    inward = ((x > hi) & (g > 0)) | ((x < lo) & (g < 0))
    inside = (x >= lo) & (x <= hi)
    gx = jnp.where(inside | inward, g, jnp.zeros_like(g))
    return gx, jnp.zeros_like(jnp.asarray(lo, g.dtype)), jnp.zeros_like(jnp.asarray(hi, g.dtype))


clamp_inward.defvjp(_clamp_fwd, _clamp_bwd)


def temperature_from_log(log_temperature: jax.Array, min_temperature: float = 0.01,
                         max_temperature: float = 1.0) -> jax.Array:
    """``exp(clamp_inward(log_temperature, log min_t, log max_t))``: the temperature of a learnable
    log-temperature, in ``[min_t, max_t]`` (float32 unless the parameter is float64).

    d T / d log_t = T inside the bounds (and at them); outside only the component pulling the
    parameter back in passes (``clamp_inward``). CLIP's default ``min_t = 0.01`` (logit scale <= 100).
    """
    if not 0 < min_temperature <= max_temperature:
        raise ValueError(f"need 0 < min_temperature <= max_temperature, got {min_temperature}, {max_temperature}")
    log_t = jnp.asarray(log_temperature)
    log_t = log_t.astype(compute_dtype(log_t))
    lo = jnp.asarray(math.log(min_temperature), log_t.dtype)
    hi = jnp.asarray(math.log(max_temperature), log_t.dtype)
    return jnp.exp(clamp_inward(log_t, lo, hi))


def init_log_temperature(temperature: float = 0.07) -> jax.Array:
    """The float32 scalar parameter ``log(temperature)`` (CLIP starts at T = 0.07)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return jnp.asarray(math.log(temperature), jnp.float32)


class LearnableTemperature(nn.Module):
    """Flax module holding the parameter ``log_temperature`` (scalar, initialised to ``log(initial)``); calling it
    returns the clamped temperature ``temperature_from_log(log_temperature, min_t, max_t)``."""
    initial: float = 0.07
    min_temperature: float = 0.01
    max_temperature: float = 1.0

    @nn.compact
    def __call__(self) -> jax.Array:
        log_t = self.param("log_temperature", lambda _: init_log_temperature(self.initial))
        return temperature_from_log(log_t, self.min_temperature, self.max_temperature)


def _resolve_temperature(temperature, log_temperature, dtype):
    if temperature is not None and log_temperature is not None:
        raise ValueError("pass temperature= or log_temperature=, not both")
    if log_temperature is not None:
        return jnp.exp(jnp.asarray(log_temperature, dtype))
    t = DEFAULT_TEMPERATURE if temperature is None else temperature
    if isinstance(t, (int, float)) and not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return jnp.asarray(t, dtype)


# ---------------------------------------------------------------------------- building blocks


def similarity_logits(query: jax.Array, keys: jax.Array, *, temperature=None, log_temperature=None,
                      normalize: bool = True) -> jax.Array:
    """``s_ij / T`` ``[N, M]`` in the compute dtype (float32, or float64): cosine similarities of
    ``query [N, D]`` and ``keys [M, D]`` (``normalize``) or dot products, divided by the temperature
    (``temperature``: float or array; ``log_temperature``: ``T = exp(log_temperature)``, unclamped;
    neither: T = 0.1)."""
    query, keys = jnp.asarray(query), jnp.asarray(keys)
    if query.ndim != 2 or keys.ndim != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"need query [N, D] and keys [M, D], got {query.shape} and {keys.shape}")
    dtype = compute_dtype(query, keys, temperature, log_temperature)
    q, k = query.astype(dtype), keys.astype(dtype)
    if normalize:
        q, k = l2_normalize(q), l2_normalize(k)
    t = _resolve_temperature(temperature, log_temperature, dtype)
    return jnp.matmul(q, k.T, precision=jax.lax.Precision.HIGHEST) / t


def _positive_index(positive_index, n: int, m: int) -> jax.Array:
    if positive_index is None:
        if n != m:
            raise ValueError(f"positive_index is required when the number of keys ({m}) differs from the "
                             f"number of queries ({n}); the default is the diagonal")
        return jnp.arange(n, dtype=jnp.int32)
    positive_index = jnp.asarray(positive_index)
    if positive_index.shape != (n,) or not jnp.issubdtype(positive_index.dtype, jnp.integer):
        raise ValueError(f"positive_index must be int [N={n}], got {positive_index.dtype} {positive_index.shape}")
    return positive_index.astype(jnp.int32)


def info_nce_from_logits(logits: jax.Array, positive_index: jax.Array, *, mask: jax.Array | None = None,
                         query_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Row losses of already-scaled logits ``[N, M]``: ``(row_loss [N], valid [N] bool)``.

    ``mask [N, M]`` (True = candidate) is applied here, after the scaling, with ``mask_value``; the
    positive is always a candidate. Rows with ``query_mask`` False get loss exactly 0 (and no gradient).
    """
    n, m = logits.shape
    dtype = compute_dtype(logits)
    logits = logits.astype(dtype)
    pos = jax.nn.one_hot(positive_index, m, dtype=jnp.bool_)
    if mask is not None:
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.shape != (n, m):
            raise ValueError(f"mask must be bool [N={n}, M={m}], got {mask.shape}")
        logits = jnp.where(mask | pos, logits, jnp.asarray(mask_value(dtype), dtype))
    lse = jax.nn.logsumexp(logits, axis=-1)
    pos_logit = jnp.take_along_axis(logits, positive_index[:, None], axis=-1)[:, 0]
    valid = jnp.ones((n,), jnp.bool_) if query_mask is None else jnp.asarray(query_mask, jnp.bool_)
    if valid.shape != (n,):
        raise ValueError(f"query_mask must be bool [N={n}], got {valid.shape}")
    return jnp.where(valid, lse - pos_logit, jnp.zeros((), dtype)), valid


def _masked_mean(total, count):
    return total / jnp.maximum(count, 1).astype(total.dtype)


def contrastive_accuracy(logits: jax.Array, positive_index: jax.Array | None = None, *,
                         mask: jax.Array | None = None, query_mask: jax.Array | None = None) -> jax.Array:
    """Fraction of valid queries whose positive has the largest (masked) logit (top-1 retrieval)."""
    n, m = logits.shape
    positive_index = _positive_index(positive_index, n, m)
    if mask is not None:
        pos = jax.nn.one_hot(positive_index, m, dtype=jnp.bool_)
        logits = jnp.where(jnp.asarray(mask, bool) | pos, logits, mask_value(compute_dtype(logits)))
    hit = (jnp.argmax(logits, axis=-1) == positive_index).astype(jnp.float32)
    valid = jnp.ones((n,), bool) if query_mask is None else jnp.asarray(query_mask, bool)
    return _masked_mean(jnp.sum(jnp.where(valid, hit, 0.0)), jnp.sum(valid))


def mutual_information_lower_bound(loss, num_candidates) -> jax.Array:
    """CPC's bound ``I(q; k) >= log(num_candidates) - InfoNCE loss`` (nats), ``num_candidates`` = the
    size of each query's candidate set (N for the diagonal InfoNCE; 2N - 1 for NT-Xent)."""
    return jnp.log(jnp.asarray(num_candidates, jnp.float32)) - loss


# ---------------------------------------------------------------------------- single device


def info_nce(query: jax.Array, keys: jax.Array, positive_index: jax.Array | None = None, *,
             temperature=None, log_temperature=None, mask: jax.Array | None = None,
             query_mask: jax.Array | None = None, normalize: bool = True) -> jax.Array:
    """InfoNCE loss (scalar, float32 / float64): mean over the valid queries of
    ``logsumexp_j(s_ij / T) - s_{i, positive_index[i]} / T`` (module docstring).

    Args:
      query: [N, D] embeddings; keys: [M, D] candidate embeddings.
      positive_index: int [N] column of each query's positive; None: the diagonal (needs M == N).
      temperature: float or array T > 0 (e.g. ``temperature_from_log(...)``, clamped and learnable);
        log_temperature: alternatively ``T = exp(log_temperature)`` (unclamped); neither: T = 0.1.
      mask: bool [N, M], True where key j is a candidate for query i (False: removed, e.g. a padding
        key or a known false negative); the positive is always kept. None: all candidates.
      query_mask: bool [N], False for padding queries (excluded from the mean). All False: loss 0.
      normalize: cosine similarity (L2-normalise both sides) if True, else the raw dot product.
    """
    logits = similarity_logits(query, keys, temperature=temperature, log_temperature=log_temperature,
                               normalize=normalize)
    pos = _positive_index(positive_index, *logits.shape)
    rows, valid = info_nce_from_logits(logits, pos, mask=mask, query_mask=query_mask)
    return _masked_mean(jnp.sum(rows), jnp.sum(valid))


def _nt_xent_rows(z1_q, z2_q, z1_all, z2_all, offset, valid_q, valid_all, temperature, log_temperature,
                  normalize):
    """Row losses of the local queries ``[z1_q; z2_q]`` (global rows ``offset + i``) against all
    ``2N`` candidates ``[z1_all; z2_all]``. Returns ``(sum of valid row losses, number of valid rows)``."""
    n_local, n = z1_q.shape[0], z1_all.shape[0]
    queries = jnp.concatenate([z1_q, z2_q], axis=0)
    keys = jnp.concatenate([z1_all, z2_all], axis=0)
    logits = similarity_logits(queries, keys, temperature=temperature, log_temperature=log_temperature,
                               normalize=normalize)
    g = offset + jnp.arange(n_local, dtype=jnp.int32)
    self_index = jnp.concatenate([g, g + n])
    positive = jnp.concatenate([g + n, g])
    col_valid = jnp.concatenate([valid_all, valid_all])
    mask = (jnp.arange(2 * n, dtype=jnp.int32)[None, :] != self_index[:, None]) & col_valid[None, :]
    rows, valid = info_nce_from_logits(logits, positive, mask=mask,
                                       query_mask=jnp.concatenate([valid_q, valid_q]))
    return jnp.sum(rows), jnp.sum(valid)


def _example_mask(example_mask, n):
    if example_mask is None:
        return jnp.ones((n,), jnp.bool_)
    example_mask = jnp.asarray(example_mask, jnp.bool_)
    if example_mask.shape != (n,):
        raise ValueError(f"example_mask must be bool [N={n}], got {example_mask.shape}")
    return example_mask


def _check_views(z1, z2):
    z1, z2 = jnp.asarray(z1), jnp.asarray(z2)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"need two views z1, z2 of the same shape [N, D], got {z1.shape} and {z2.shape}")
    return z1, z2


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature=None, log_temperature=None,
            example_mask: jax.Array | None = None, normalize: bool = True) -> jax.Array:
    """SimCLR's NT-Xent loss (scalar) of two views ``z1, z2 [N, D]`` (row i of each: the same example).

    The mean over the 2N anchors of ``-log exp(s(a, a+)/T) / sum_{k != a} exp(s(a, k)/T)``, the sum
    running over the other 2N - 1 embeddings. ``example_mask`` bool [N] (False: a padding example):
    both its views are removed as anchors and as negatives. Temperature arguments as in ``info_nce``
    (SimCLR uses T = 0.1 - 0.5 with cosine similarity).
    """
    z1, z2 = _check_views(z1, z2)
    valid = _example_mask(example_mask, z1.shape[0])
    total, count = _nt_xent_rows(z1, z2, z1, z2, 0, valid, valid, temperature, log_temperature, normalize)
    return _masked_mean(total, count)


# ---------------------------------------------------------------------------- cross-device (inside shard_map)


def _gather(x, axis_name):
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _offset(n_local, axis_name):
    return jax.lax.axis_index(axis_name).astype(jnp.int32) * n_local


REDUCTIONS = ("global", "per_device")


def _reduce(total, count, axis_name, reduction):
    """"global": psum(total) / psum(count); "per_device": P * total / psum(count) (mean over devices = global)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    global_count = jax.lax.psum(count.astype(jnp.int32), axis_name)
    if reduction == "global":
        return _masked_mean(jax.lax.psum(total, axis_name), global_count)
    return _masked_mean(total * jax.lax.axis_size(axis_name), global_count)


def sharded_info_nce(query: jax.Array, keys: jax.Array, *, axis_name: AxisName, positive_index=None,
                     temperature=None, log_temperature=None, mask: jax.Array | None = None,
                     query_mask: jax.Array | None = None, key_mask: jax.Array | None = None,
                     normalize: bool = True, reduction: str = "global") -> jax.Array:
    """InfoNCE with the negatives of the whole global batch; call inside ``jax.shard_map`` with the batch
    split over ``axis_name`` (module docstring).

    Args:
      query: this device's queries [n, D]; keys: this device's keys [m, D] (equal shard sizes; the global
        keys are the devices' shards concatenated in mesh order along ``axis_name``, [m * P, D]).
      positive_index: int [n], GLOBAL column of each local query's positive. None: the global diagonal
        (local query i of device d <-> key ``d * m + i``; needs n == m).
      mask: bool [n, m * P] over the global keys; key_mask: bool [m], this device's valid keys
        (gathered, e.g. padding keys); query_mask: bool [n].
      reduction: "global" (default): the global mean loss, the same on every device and equal to
        ``info_nce`` of the full batch; "per_device": this device's share (module docstring).
    """
    query, keys = jnp.asarray(query), jnp.asarray(keys)
    n, m = query.shape[0], keys.shape[0]
    all_keys = _gather(keys, axis_name)
    if positive_index is None:
        if n != m:
            raise ValueError(f"the default (diagonal) positives need as many local queries as keys, got {n} and {m}")
        positive_index = _offset(m, axis_name) + jnp.arange(n, dtype=jnp.int32)
    logits = similarity_logits(query, all_keys, temperature=temperature, log_temperature=log_temperature,
                               normalize=normalize)
    positive_index = _positive_index(positive_index, *logits.shape)
    if key_mask is not None:
        col = _gather(jnp.asarray(key_mask, jnp.bool_), axis_name)
        mask = jnp.broadcast_to(col[None, :], logits.shape) if mask is None else jnp.asarray(mask, bool) & col[None, :]
    rows, valid = info_nce_from_logits(logits, positive_index, mask=mask, query_mask=query_mask)
    return _reduce(jnp.sum(rows), jnp.sum(valid), axis_name, reduction)


def sharded_nt_xent(z1: jax.Array, z2: jax.Array, *, axis_name: AxisName, temperature=None, log_temperature=None,
                    example_mask: jax.Array | None = None, normalize: bool = True,
                    reduction: str = "global") -> jax.Array:
    """NT-Xent over the global batch; call inside ``jax.shard_map``: ``z1, z2 [n, D]`` are this device's
    examples (both views), ``example_mask`` bool [n] its valid ones. Both views are all-gathered, so
    every anchor sees the 2N - 1 other embeddings of the global batch (N = n * P). Returns the global
    mean (the same on every device), equal to ``nt_xent`` of the concatenated views, or with
    ``reduction="per_device"`` this device's share (module docstring)."""
    z1, z2 = _check_views(z1, z2)
    n = z1.shape[0]
    valid = _example_mask(example_mask, n)
    total, count = _nt_xent_rows(z1, z2, _gather(z1, axis_name), _gather(z2, axis_name), _offset(n, axis_name),
                                 valid, _gather(valid, axis_name), temperature, log_temperature, normalize)
    return _reduce(total, count, axis_name, reduction)


def make_sharded_nt_xent(mesh, axis_name: AxisName = "data", *, temperature=None, normalize: bool = True,
                         check_vma: bool = True):
    """``loss(z1 [N, D], z2 [N, D], example_mask [N] | None = None) -> scalar``: ``sharded_nt_xent`` wrapped
    in ``jax.shard_map`` over ``mesh`` (batch split over ``axis_name``, result replicated), for callers
    outside a shard_map; differentiable in ``z1``, ``z2`` (N divisible by the axis size)."""
    from jax.sharding import PartitionSpec as P

    def body(a, b, valid):
        return sharded_nt_xent(a, b, axis_name=axis_name, temperature=temperature, example_mask=valid,
                               normalize=normalize)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(axis_name)), out_specs=P(),
                           check_vma=check_vma)

    def loss(z1, z2, example_mask=None):
        if example_mask is None:
            example_mask = jnp.ones((jnp.shape(z1)[0],), jnp.bool_)
        return mapped(z1, z2, example_mask)

    return loss


def make_sharded_info_nce(mesh, axis_name: AxisName = "data", *, temperature=None, normalize: bool = True,
                          check_vma: bool = True):
    """``loss(query [N, D], keys [N, D], key_mask [N] | None = None, query_mask [N] | None = None) -> scalar``:
    ``sharded_info_nce`` with the default diagonal positives (query i <-> key i) wrapped in ``jax.shard_map``
    over ``mesh`` (queries and keys split over ``axis_name``, result replicated), for callers outside a
    shard_map; equal to ``info_nce(query, keys, mask=key_mask[None, :], query_mask=query_mask)`` and
    differentiable in ``query`` and ``keys`` (N divisible by the axis size)."""
    from jax.sharding import PartitionSpec as P

    def body(q, k, km, qm):
        return sharded_info_nce(q, k, axis_name=axis_name, temperature=temperature, key_mask=km, query_mask=qm,
                                normalize=normalize)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name),) * 4, out_specs=P(), check_vma=check_vma)

    def loss(query, keys, key_mask=None, query_mask=None):
        n = jnp.shape(query)[0]
        key_mask = jnp.ones((n,), jnp.bool_) if key_mask is None else jnp.asarray(key_mask, jnp.bool_)
        query_mask = jnp.ones((n,), jnp.bool_) if query_mask is None else jnp.asarray(query_mask, jnp.bool_)
        return mapped(query, keys, key_mask, query_mask)

    return loss
