"""DETR's set-prediction loss (Carion et al. 2020): Hungarian matching of queries to targets, then a
classification loss on every query and box losses on the matched ones. All jittable, no host round
trip: the matching is ``research.generative.ot.linear_assignment`` (an exact on-device Hungarian
algorithm) vmapped over the batch.

Shapes: B images, N queries, M padded targets per image (N >= M), C real classes plus the
"no object" class at index C (the last logit). Boxes are ``cxcywh`` normalised to [0, 1].
``tgt_mask [B, M]`` marks the real targets; padded slots may hold any labels and boxes (they are
replaced before use and never matched). An image may have zero targets.

Matching (``hungarian_match``). Per image, rows = the N queries, columns = the M target slots padded
to N. The [N, N] square cost holds the real cost in the columns of real targets and one constant
(0) in every other column: the padded slots of ``tgt_mask`` and the N - M extra columns. A perfect
matching of the square problem assigns every column, so it pays the constant once for each of the
N - m_b non-real columns (m_b = real targets of image b) whichever queries take them: the total is
``sum of the real matched costs + (N - m_b) * constant``, and its minimiser restricted to the real
columns is exactly the optimal one-to-one assignment of the m_b targets to distinct queries (the
rectangular problem scipy's ``linear_sum_assignment`` solves on the real columns). A masked slot's
column holds only the constant, whatever its cost entries were (NaN included), and its match is
reported as -1, so a padded target never contributes a real cost and never claims a query.

Cost (``matching_cost``, DETR's ``HungarianMatcher``)::

    cost[b, i, j] = -w_class * softmax(logits[b, i])[label_j] + w_l1 * ||box_i - box_j||_1
                    - w_giou * GIoU(box_i, box_j)

Loss (``set_loss``, DETR's ``SetCriterion`` with labels + boxes losses), matching under
``stop_gradient``::

    loss_ce   = sum_{b,i} w_i * (-log p_{b,i}(c_{b,i})) / sum_{b,i} w_i    c = matched label or C,
                w_i = eos_coef for "no object" targets, 1 otherwise (torch's weighted-mean
                cross-entropy, as in DETR)
    loss_l1   = sum over matched pairs of ||box - target||_1 / num_targets
    loss_giou = sum over matched pairs of (1 - GIoU) / num_targets
    loss      = w_class * loss_ce + w_l1 * loss_l1 + w_giou * loss_giou

``num_targets`` = real targets in the whole batch, floored at 1 (zero targets: box losses 0, every
query is trained towards "no object"). DETR's defaults: w_class 1, w_l1 5, w_giou 2 (for both the
matching cost and the loss) and eos_coef 0.1.

Dtypes: float32 at least; float64 inputs under x64 stay float64 (cost, matching and loss).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from research.generative.ot import linear_assignment
from research.losses.boxes import box_cxcywh_to_xyxy, generalized_box_iou_aligned


class Match(NamedTuple):
    """Result of ``hungarian_match``.

    query_of_target: int32 [B, M], the query matched to each target slot; -1 for padded slots.
    target_of_query: int32 [B, N], the target slot matched to each query; -1 when unmatched.
    """
    query_of_target: jax.Array
    target_of_query: jax.Array


def _float_dtype(*xs):
    dts = [jnp.result_type(x) for x in xs if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.promote_types(jnp.result_type(*dts), jnp.float32) if dts else jnp.dtype(jnp.float32)


def hungarian_match(cost, target_mask=None) -> Match:
    """Optimal one-to-one assignment of the real targets to distinct queries, per image.

    Args:
      cost: [B, N, M] float, cost of matching query i to target slot j (finite on real targets).
      target_mask: [B, M] bool, True for real targets (None: all real). Needs N >= M.

    Returns:
      ``Match(query_of_target [B, M], target_of_query [B, N])`` (int32, -1 = none); the construction
      (padding to a square cost with a constant) is in the module docstring.
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 3:
        raise ValueError(f"hungarian_match: cost must be [B, N, M], got shape {cost.shape}")
    b, n, m = cost.shape
    if n < m:
        raise ValueError(f"hungarian_match: needs at least as many queries as target slots, got N={n} < M={m}")
    cost = cost.astype(_float_dtype(cost))
    mask = jnp.ones((b, m), bool) if target_mask is None else jnp.asarray(target_mask, bool)
    if mask.shape != (b, m):
        raise ValueError(f"hungarian_match: target_mask must be [B, M] = {(b, m)}, got {mask.shape}")
    square = jnp.where(mask[:, None, :], cost, 0.0)  # padded slots: constant 0 (NaN-safe select)
    square = jnp.pad(square, ((0, 0), (0, 0), (0, n - m)))  # extra columns: the same constant
    col_of_row = jax.vmap(linear_assignment)(square)  # [B, N]: query i -> column
    real_col = jnp.concatenate([mask, jnp.zeros((b, n - m), bool)], axis=1)  # [B, N] columns
    matched = jnp.take_along_axis(real_col, col_of_row, axis=1)
    target_of_query = jnp.where(matched, col_of_row, -1).astype(jnp.int32)
    row_of_col = jax.vmap(lambda p: jnp.zeros((n,), jnp.int32).at[p].set(jnp.arange(n, dtype=jnp.int32)))(col_of_row)
    query_of_target = jnp.where(mask, row_of_col[:, :m], -1).astype(jnp.int32)
    return Match(query_of_target, target_of_query)


def matching_cost(logits, pred_boxes, tgt_labels, tgt_boxes, *, w_class: float = 1.0, w_l1: float = 5.0,
                  w_giou: float = 2.0) -> jax.Array:
    """DETR's matching cost [B, N, M] (module docstring).

    Args:
      logits: [B, N, C + 1] (the last class is "no object").
      pred_boxes: [B, N, 4] cxcywh in [0, 1].
      tgt_labels: [B, M] int in [0, C) for real targets (padded slots: anything; clipped).
      tgt_boxes: [B, M, 4] cxcywh in [0, 1].
    """
    dtype = _float_dtype(logits, pred_boxes, tgt_boxes)
    logits = jnp.asarray(logits, dtype)
    pred_boxes, tgt_boxes = jnp.asarray(pred_boxes, dtype), jnp.asarray(tgt_boxes, dtype)
    _check_shapes(logits, pred_boxes, tgt_labels, tgt_boxes)
    num_classes = logits.shape[-1] - 1
    prob = jax.nn.softmax(logits, axis=-1)  # [B, N, C + 1]
    labels = jnp.clip(jnp.asarray(tgt_labels), 0, num_classes).astype(jnp.int32)
    idx = jnp.broadcast_to(labels[:, None, :], prob.shape[:2] + labels.shape[1:])
    cost_class = -jnp.take_along_axis(prob, idx, axis=-1)  # [B, N, M]
    cost_l1 = jnp.sum(jnp.abs(pred_boxes[:, :, None, :] - tgt_boxes[:, None, :, :]), axis=-1)
    giou = generalized_box_iou_aligned(box_cxcywh_to_xyxy(pred_boxes)[:, :, None, :],
                                       box_cxcywh_to_xyxy(tgt_boxes)[:, None, :, :])
    return w_l1 * cost_l1 + w_class * cost_class - w_giou * giou


def _check_shapes(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask=None):
    if logits.ndim != 3 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be [B, N, C + 1] with C >= 1, got shape {logits.shape}")
    b, n = logits.shape[:2]
    if pred_boxes.shape != (b, n, 4):
        raise ValueError(f"pred_boxes must be [B, N, 4] = {(b, n, 4)}, got {pred_boxes.shape}")
    tgt_labels = jnp.asarray(tgt_labels)
    if tgt_labels.ndim != 2 or tgt_labels.shape[0] != b:
        raise ValueError(f"tgt_labels must be [B, M] with B = {b}, got shape {tgt_labels.shape}")
    m = tgt_labels.shape[1]
    if tgt_boxes.shape != (b, m, 4):
        raise ValueError(f"tgt_boxes must be [B, M, 4] = {(b, m, 4)}, got {tgt_boxes.shape}")
    if tgt_mask is not None and jnp.shape(tgt_mask) != (b, m):
        raise ValueError(f"tgt_mask must be [B, M] = {(b, m)}, got {jnp.shape(tgt_mask)}")


def set_loss(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask=None, *, eos_coef: float = 0.1,
             w_class: float = 1.0, w_l1: float = 5.0, w_giou: float = 2.0, match_w_class: float | None = None,
             match_w_l1: float | None = None, match_w_giou: float | None = None) -> tuple[jax.Array, dict]:
    """DETR's Hungarian set loss (module docstring): ``(loss, metrics)``.

    Args:
      logits: [B, N, C + 1]; pred_boxes: [B, N, 4] cxcywh in [0, 1].
      tgt_labels: [B, M] int; tgt_boxes: [B, M, 4] cxcywh; tgt_mask: [B, M] bool (None: all real).
      eos_coef: weight of the "no object" class in the cross-entropy.
      w_class, w_l1, w_giou: loss weights; match_w_*: matching-cost weights (None: the loss weight).

    Returns:
      loss (scalar) and a dict of scalars: ``loss_ce``, ``loss_l1``, ``loss_giou`` (unweighted),
      ``matched_class_accuracy`` (argmax over all C + 1 classes equals the label, over matched
      queries; 1 when there are none), ``cardinality_error`` (mean over images of |#queries whose
      argmax is a real class - #targets|), ``num_targets`` (real targets in the batch).
    """
    dtype = _float_dtype(logits, pred_boxes, tgt_boxes)
    logits = jnp.asarray(logits, dtype)
    pred_boxes, tgt_boxes = jnp.asarray(pred_boxes, dtype), jnp.asarray(tgt_boxes, dtype)
    _check_shapes(logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask)
    b, n, c1 = logits.shape
    m = tgt_boxes.shape[1]
    num_classes = c1 - 1
    mask = jnp.ones((b, m), bool) if tgt_mask is None else jnp.asarray(tgt_mask, bool)
    labels = jnp.where(mask, jnp.clip(jnp.asarray(tgt_labels), 0, num_classes - 1), 0).astype(jnp.int32)
    # padded slots get a harmless unit box, so nothing downstream (even under a 0 weight) sees NaN
    tgt_boxes = jnp.where(mask[..., None], tgt_boxes, jnp.asarray([0.5, 0.5, 1.0, 1.0], dtype))

    cost = matching_cost(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(pred_boxes), labels, tgt_boxes,
                         w_class=w_class if match_w_class is None else match_w_class,
                         w_l1=w_l1 if match_w_l1 is None else match_w_l1,
                         w_giou=w_giou if match_w_giou is None else match_w_giou)
    match = hungarian_match(jax.lax.stop_gradient(cost), mask)

    # classification: every query, target = matched label or "no object" (index C)
    tq = match.target_of_query
    matched_q = tq >= 0
    target_classes = jnp.where(matched_q, jnp.take_along_axis(labels, jnp.maximum(tq, 0), axis=1), num_classes)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == num_classes, jnp.asarray(eos_coef, dtype), jnp.asarray(1.0, dtype))
    loss_ce = jnp.sum(weight * nll) / jnp.sum(weight)

    # boxes: matched pairs only, normalised by the number of real targets in the batch
    qt = match.query_of_target
    src = jnp.take_along_axis(pred_boxes, jnp.maximum(qt, 0)[..., None], axis=1)  # [B, M, 4]
    num_targets = jnp.sum(mask).astype(dtype)
    denom = jnp.maximum(num_targets, 1.0)
    l1 = jnp.sum(jnp.abs(src - tgt_boxes), axis=-1)
    giou = generalized_box_iou_aligned(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt_boxes))
    loss_l1 = jnp.sum(jnp.where(mask, l1, 0.0)) / denom
    loss_giou = jnp.sum(jnp.where(mask, 1.0 - giou, 0.0)) / denom
    loss = w_class * loss_ce + w_l1 * loss_l1 + w_giou * loss_giou

    pred_cls = jnp.argmax(logits, axis=-1)
    n_matched = jnp.sum(matched_q)
    correct = jnp.sum(jnp.where(matched_q, pred_cls == target_classes, False))
    accuracy = jnp.where(n_matched > 0, correct / jnp.maximum(n_matched, 1), 1.0).astype(dtype)
    card = jnp.abs(jnp.sum(pred_cls != num_classes, axis=1) - jnp.sum(mask, axis=1))
    metrics = {"loss_ce": loss_ce, "loss_l1": loss_l1, "loss_giou": loss_giou, "matched_class_accuracy": accuracy,
               "cardinality_error": jnp.mean(card.astype(dtype)), "num_targets": num_targets}
    return loss, metrics
