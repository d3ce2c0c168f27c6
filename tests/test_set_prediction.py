"""DETR's set loss and box ops: batched on-device matching against scipy's linear_sum_assignment,
IoU / GIoU against a float64 NumPy transcription of the GIoU paper's Algorithm 1, and the loss
against a float64 NumPy transcription of DETR's HungarianMatcher + SetCriterion."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from research.losses.boxes import (
    box_area, box_cxcywh_to_xyxy, box_iou, box_iou_aligned, box_xyxy_to_cxcywh, generalized_box_iou,
    generalized_box_iou_aligned,
)
from research.losses.set_prediction import hungarian_match, matching_cost, set_loss
from tests.test_x64 import dtype, x64  # noqa: F401  (fixtures: float32 and float64; x64 on)

_match = jax.jit(hungarian_match)


@jax.jit
def _set_loss(logits, boxes, labels, tboxes, mask, eos_coef, w_class, w_l1, w_giou):
    # one compiled program per shape / dtype; the weights are traced arguments
    return set_loss(logits, boxes, labels, tboxes, mask, eos_coef=eos_coef, w_class=w_class, w_l1=w_l1,
                    w_giou=w_giou)


# ---------------------------------------------------------------------------- NumPy references (float64)


def giou_algorithm1(bp, bg):
    """Rezatofighi et al. 2019, Algorithm 1, for one predicted and one ground-truth xyxy box: (IoU, GIoU)."""
    x1p, y1p, x2p, y2p = (float(v) for v in bp)
    x1g, y1g, x2g, y2g = (float(v) for v in bg)
    x1p, x2p = min(x1p, x2p), max(x1p, x2p)  # step 1: ensure x2p > x1p, y2p > y1p
    y1p, y2p = min(y1p, y2p), max(y1p, y2p)
    a_g = (x2g - x1g) * (y2g - y1g)  # step 2
    a_p = (x2p - x1p) * (y2p - y1p)  # step 3
    x1i, x2i = max(x1p, x1g), min(x2p, x2g)  # step 4
    y1i, y2i = max(y1p, y1g), min(y2p, y2g)
    inter = (x2i - x1i) * (y2i - y1i) if (x2i > x1i and y2i > y1i) else 0.0
    x1c, x2c = min(x1p, x1g), max(x2p, x2g)  # step 5
    y1c, y2c = min(y1p, y1g), max(y2p, y2g)
    a_c = (x2c - x1c) * (y2c - y1c)  # step 6
    union = a_p + a_g - inter
    iou = inter / union  # step 7
    return iou, iou - (a_c - union) / a_c  # step 8


def giou_matrix_np(a, b):
    out = np.array([[giou_algorithm1(p, g) for g in b] for p in a], np.float64).reshape(len(a), len(b), 2)
    return out[..., 0], out[..., 1]


def cxcywh_to_xyxy_np(b):
    b = np.asarray(b, np.float64)
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], axis=-1)


def detr_loss_np(logits, boxes, labels, tboxes, mask, *, eos_coef, w_class, w_l1, w_giou):
    """DETR's HungarianMatcher (scipy on the real targets of each image) and SetCriterion (labels + boxes)."""
    logits, boxes, tboxes = (np.asarray(x, np.float64) for x in (logits, boxes, tboxes))
    b_, n, c1 = logits.shape
    c = c1 - 1
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    prob = np.exp(logp)
    target_classes = np.full((b_, n), c)
    src, tgt = [], []
    for b in range(b_):
        idx = np.flatnonzero(mask[b])
        if not len(idx):
            continue
        cost_l1 = np.abs(boxes[b][:, None, :] - tboxes[b, idx][None]).sum(-1)
        _, giou = giou_matrix_np(cxcywh_to_xyxy_np(boxes[b]), cxcywh_to_xyxy_np(tboxes[b, idx]))
        cost = w_l1 * cost_l1 - w_class * prob[b][:, labels[b, idx]] - w_giou * giou
        r, col = linear_sum_assignment(cost)
        target_classes[b, r] = labels[b, idx[col]]
        src.append(boxes[b, r])
        tgt.append(tboxes[b, idx[col]])
    weight = np.where(target_classes == c, eos_coef, 1.0)
    nll = -np.take_along_axis(logp, target_classes[..., None], -1)[..., 0]
    loss_ce = (weight * nll).sum() / weight.sum()
    num = max(int(mask.sum()), 1)
    if src:
        s, t = np.concatenate(src), np.concatenate(tgt)
        loss_l1 = np.abs(s - t).sum() / num
        g = np.array([giou_algorithm1(p, q)[1] for p, q in zip(cxcywh_to_xyxy_np(s), cxcywh_to_xyxy_np(t))])
        loss_giou = (1 - g).sum() / num
    else:
        loss_l1 = loss_giou = 0.0
    return w_class * loss_ce + w_l1 * loss_l1 + w_giou * loss_giou, dict(loss_ce=loss_ce, loss_l1=loss_l1,
                                                                         loss_giou=loss_giou)


# ---------------------------------------------------------------------------- matching


def _check_valid(match, mask, n):
    """-1 exactly at padded slots, distinct queries, and the two views inverse to each other."""
    qot, toq = np.asarray(match.query_of_target), np.asarray(match.target_of_query)
    assert qot.dtype == np.int32 and toq.dtype == np.int32
    for b in range(mask.shape[0]):
        np.testing.assert_array_equal(qot[b] >= 0, mask[b])
        q = qot[b][mask[b]]
        assert len(set(q.tolist())) == len(q) and np.all(q < n)
        assert np.sum(toq[b] >= 0) == mask[b].sum()
        for j in np.flatnonzero(mask[b]):
            assert toq[b, qot[b, j]] == j


def _scipy_cols(cost_b, mask_b):
    """scipy's optimal matching on the real columns: query index per real target slot (-1 elsewhere)."""
    idx = np.flatnonzero(mask_b)
    out = np.full(len(mask_b), -1)
    if len(idx):
        r, c = linear_sum_assignment(cost_b[:, idx])
        out[idx[c]] = r
    return out


@pytest.mark.parametrize("n, m", [(1, 1), (6, 6), (7, 3)])
def test_matching_square_and_rectangular_match_scipy(n, m, dtype):
    rng = np.random.default_rng(10 * n + m)
    cost = rng.standard_normal((4, n, m)).astype(dtype)
    match = _match(jnp.asarray(cost), jnp.ones((4, m), bool))
    mask = np.ones((4, m), bool)
    _check_valid(match, mask, n)
    for b in range(4):  # continuous costs: the optimum is unique almost surely
        np.testing.assert_array_equal(np.asarray(match.query_of_target[b]), _scipy_cols(cost[b], mask[b]))


def test_matching_with_padding_masks_never_uses_padded_costs(dtype):
    """Varied target counts (0 to M, padded slots not only at the end); the padded costs are NaN or large
    negative values that differ per query, so letting them into the optimisation (or matching a padded
    slot) would change the result."""
    rng = np.random.default_rng(3)
    b_, n, m = 6, 8, 5
    cost = rng.random((b_, n, m)).astype(dtype)
    mask = np.zeros((b_, m), bool)
    for b, k in enumerate([0, 1, 2, 3, 5, 4]):
        mask[b, rng.permutation(m)[:k]] = True
    padded = np.where(rng.random((b_, n, m)) < 0.2, np.nan, -10 * rng.random((b_, n, m)))
    cost = np.where(mask[:, None, :], cost, padded).astype(dtype)
    match = _match(jnp.asarray(cost), jnp.asarray(mask))
    _check_valid(match, mask, n)
    for b in range(b_):
        np.testing.assert_array_equal(np.asarray(match.query_of_target[b]), _scipy_cols(cost[b], mask[b]))
    assert np.all(np.asarray(match.target_of_query[0]) == -1)  # zero targets: nothing matched


@pytest.mark.parametrize("n, m", [(12, 12), (10, 4)])
def test_matching_with_ties_has_the_optimal_total_cost(n, m):
    """Integer costs with many duplicates: several optima; the total cost and validity are what is fixed."""
    rng = np.random.default_rng(100 + n + m)
    b_ = 5
    cost = rng.integers(0, 3, size=(b_, n, m)).astype(np.float32)
    mask = rng.random((b_, m)) < 0.7
    mask[0] = False
    mask[1] = True
    match = _match(jnp.asarray(cost), jnp.asarray(mask))
    _check_valid(match, mask, n)
    qot = np.asarray(match.query_of_target)
    for b in range(b_):
        idx = np.flatnonzero(mask[b])
        ours = cost[b, qot[b, idx], idx].sum()
        if len(idx):
            r, c = linear_sum_assignment(cost[b][:, idx])
            assert ours == cost[b][:, idx][r, c].sum()
        else:
            assert ours == 0


def test_matching_under_vmap_and_jit_equals_per_batch():
    rng = np.random.default_rng(5)
    cost = jnp.asarray(rng.random((3, 2, 6, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 2, 4)) < 0.6)
    batched = jax.jit(jax.vmap(hungarian_match))(cost, mask)
    for k in range(3):
        single = _match(cost[k], mask[k])
        np.testing.assert_array_equal(batched.query_of_target[k], single.query_of_target)
        np.testing.assert_array_equal(batched.target_of_query[k], single.target_of_query)
        for b in range(2):
            np.testing.assert_array_equal(np.asarray(single.query_of_target[b]),
                                          _scipy_cols(np.asarray(cost[k, b]), np.asarray(mask[k, b])))


def test_matching_rejects_fewer_queries_than_targets():
    with pytest.raises(ValueError, match="N=3 < M=4"):
        hungarian_match(jnp.zeros((1, 3, 4)))


# ---------------------------------------------------------------------------- boxes


def _random_boxes(rng, k):
    xy = rng.random((k, 2)) * 0.8
    wh = rng.random((k, 2)) * 0.5 + 0.01
    return np.concatenate([xy, xy + wh], axis=1)


def test_iou_and_giou_match_algorithm1(dtype):
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    b[0] = a[0]  # identical pair
    iou_ref, giou_ref = giou_matrix_np(a, b)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=2e-5, atol=2e-6)
    iou = box_iou(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
    giou = generalized_box_iou(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
    assert iou.dtype == dtype and giou.dtype == dtype and iou.shape == (7, 5)
    np.testing.assert_allclose(np.asarray(iou), iou_ref, **tol)
    np.testing.assert_allclose(np.asarray(giou), giou_ref, **tol)
    assert np.any(giou_ref < 0) and np.any(iou_ref > 0)  # the draw covers disjoint and overlapping pairs
    aligned = generalized_box_iou_aligned(jnp.asarray(a[:5], dtype), jnp.asarray(b, dtype))
    np.testing.assert_allclose(np.asarray(aligned), np.diag(giou_ref[:5]), **tol)


def test_giou_hand_cases():
    boxes = jnp.asarray([[0, 0, 2, 2], [0, 0, 2, 2],   # identical: IoU = GIoU = 1
                         [0, 0, 1, 1], [2, 0, 3, 1],   # disjoint, C = 3 x 1: GIoU = 0 - (3 - 2) / 3
                         [0, 0, 4, 4], [1, 1, 2, 2],   # nested: IoU = 1/16, C = outer, GIoU = IoU
                         [0, 0, 1, 1], [1, 0, 2, 1]],  # touching edges: IoU 0, GIoU = 0 - 0 / 2 = 0
                        jnp.float32)
    a, b = boxes[0::2], boxes[1::2]
    np.testing.assert_allclose(box_iou_aligned(a, b), [1.0, 0.0, 1 / 16, 0.0], atol=1e-7)
    np.testing.assert_allclose(generalized_box_iou_aligned(a, b), [1.0, -1 / 3, 1 / 16, 0.0], atol=1e-7)
    np.testing.assert_allclose(box_area(boxes[:4]), [4.0, 4.0, 1.0, 1.0])
    far = generalized_box_iou_aligned(jnp.asarray([0.0, 0, 1, 1]), jnp.asarray([99.0, 99, 100, 100]))
    assert -1.0 < float(far) < -0.999  # GIoU -> -1 as the boxes move apart


def test_box_format_round_trip(dtype):
    rng = np.random.default_rng(1)
    cxcywh = jnp.asarray(rng.random((3, 4, 4)), dtype)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    np.testing.assert_allclose(np.asarray(xyxy[..., 2:] - xyxy[..., :2]), np.asarray(cxcywh[..., 2:]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(box_xyxy_to_cxcywh(xyxy)), np.asarray(cxcywh), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xyxy), cxcywh_to_xyxy_np(np.asarray(cxcywh)), rtol=1e-5, atol=1e-6)


def test_degenerate_boxes_have_finite_values_and_gradients(dtype):
    """Points, segments, identical points and inverted boxes: finite IoU / GIoU and gradients."""
    a = jnp.asarray([[0.5, 0.5, 0.5, 0.5], [0.2, 0.3, 0.2, 0.3], [0.1, 0.1, 0.4, 0.1], [0.3, 0.3, 0.6, 0.6],
                     [0.6, 0.6, 0.3, 0.3]], dtype)
    b = jnp.asarray([[0.5, 0.5, 0.5, 0.5], [0.2, 0.3, 0.2, 0.3], [0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3],
                     [0.3, 0.3, 0.6, 0.6]], dtype)
    iou, giou = box_iou_aligned(a, b), generalized_box_iou_aligned(a, b)
    np.testing.assert_array_equal(np.asarray(iou), np.zeros(5))  # every pair has a zero-area box
    assert np.all(np.isfinite(np.asarray(giou))) and np.all(np.asarray(giou) <= 0) and np.all(np.asarray(giou) >= -1)
    assert float(giou[0]) == 0.0 and float(giou[1]) == 0.0  # identical points: 0, not NaN
    for fn in (box_iou, generalized_box_iou):
        ga, gb = jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y)), argnums=(0, 1)))(a, b)
        assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gb)))
        assert float(jnp.max(jnp.abs(ga))) < 1e3
    # a degenerate predicted box in cxcywh (w = h = 0) through the whole loss
    logits = jnp.zeros((1, 2, 3), dtype)
    pred = jnp.asarray([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.1]]], dtype)
    tgt = jnp.asarray([[[0.5, 0.5, 0.0, 0.0]]], dtype)
    grads = jax.jit(jax.grad(lambda l, p: set_loss(l, p, jnp.zeros((1, 1), jnp.int32), tgt)[0], argnums=(0, 1)))(
        logits, pred)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ---------------------------------------------------------------------------- loss


def _loss_problem(rng, b_, n, m, c, counts):
    logits = rng.standard_normal((b_, n, c + 1)) * 2
    boxes = np.concatenate([rng.random((b_, n, 2)) * 0.6 + 0.2, rng.random((b_, n, 2)) * 0.3 + 0.05], -1)
    labels = rng.integers(0, c, (b_, m))
    tboxes = np.concatenate([rng.random((b_, m, 2)) * 0.6 + 0.2, rng.random((b_, m, 2)) * 0.3 + 0.05], -1)
    mask = np.zeros((b_, m), bool)
    for b, k in enumerate(counts):
        mask[b, rng.permutation(m)[:k]] = True
    labels = np.where(mask, labels, -7)  # padding labels out of range, padding boxes NaN: must not matter
    tboxes = np.where(mask[..., None], tboxes, np.nan)
    return logits, boxes, labels, tboxes, mask


WEIGHTS = dict(eos_coef=0.1, w_class=1.0, w_l1=5.0, w_giou=2.0)


@pytest.mark.parametrize("counts", [(0, 1, 3, 4), (4, 4, 4, 4), (0, 0, 0, 0)])
def test_set_loss_matches_numpy_detr(dtype, counts):
    rng = np.random.default_rng(sum(counts))
    logits, boxes, labels, tboxes, mask = _loss_problem(rng, 4, 6, 4, 5, counts)
    ref, parts = detr_loss_np(logits, boxes, labels, tboxes, mask, **WEIGHTS)
    args = [jnp.asarray(x, dtype) for x in (logits, boxes)] + [jnp.asarray(labels), jnp.asarray(tboxes, dtype),
                                                               jnp.asarray(mask)]
    loss, metrics = _set_loss(*args, *WEIGHTS.values())
    assert loss.dtype == dtype
    tol = dict(rtol=1e-10) if dtype == jnp.float64 else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), ref, **tol)
    for k, v in parts.items():
        np.testing.assert_allclose(float(metrics[k]), v, **tol)
    assert float(metrics["num_targets"]) == sum(counts)
    if sum(counts) == 0:
        assert float(metrics["loss_l1"]) == 0.0 and float(metrics["loss_giou"]) == 0.0


def test_set_loss_eos_coef_and_weights_are_used():
    rng = np.random.default_rng(7)
    logits, boxes, labels, tboxes, mask = _loss_problem(rng, 2, 5, 3, 4, (1, 3))
    for kw in (dict(eos_coef=1.0, w_class=2.0, w_l1=1.0, w_giou=0.5), dict(eos_coef=0.01, w_class=1.0, w_l1=0.0,
                                                                            w_giou=3.0)):
        ref, _ = detr_loss_np(logits, boxes, labels, tboxes, mask, **kw)
        loss, _ = _set_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(boxes, jnp.float32), labels,
                            jnp.asarray(tboxes, jnp.float32), mask, *kw.values())
        np.testing.assert_allclose(float(loss), ref, rtol=2e-5)


def test_set_loss_gradient_matches_finite_differences(x64):
    """Matching under stop_gradient: the loss is locally the fixed-matching loss, whose directional derivative
    the gradient must reproduce (float64 central differences)."""
    rng = np.random.default_rng(11)
    logits, boxes, labels, tboxes, mask = _loss_problem(rng, 3, 5, 3, 4, (2, 3, 0))
    logits, boxes = jnp.asarray(logits), jnp.asarray(boxes)
    vg = jax.jit(jax.value_and_grad(lambda l, p: set_loss(l, p, labels, jnp.asarray(tboxes), mask)[0],
                                    argnums=(0, 1)))  # one compiled program for the gradient and the values
    _, (gl, gp) = vg(logits, boxes)
    dl, dp = jnp.asarray(rng.standard_normal(logits.shape)), jnp.asarray(rng.standard_normal(boxes.shape))
    h = 1e-6
    fd = (vg(logits + h * dl, boxes + h * dp)[0] - vg(logits - h * dl, boxes - h * dp)[0]) / (2 * h)
    np.testing.assert_allclose(float(jnp.sum(gl * dl) + jnp.sum(gp * dp)), float(fd), rtol=1e-6)
    assert float(jnp.abs(gp).sum()) > 0 and float(jnp.abs(gl).sum()) > 0


def test_matching_cost_matches_numpy(dtype):
    rng = np.random.default_rng(2)
    logits, boxes, labels, tboxes, mask = _loss_problem(rng, 2, 4, 3, 5, (3, 3))
    cost_fn = jax.jit(functools.partial(matching_cost, w_class=1.5, w_l1=5.0, w_giou=2.0))
    cost = cost_fn(jnp.asarray(logits, dtype), jnp.asarray(boxes, dtype), labels, jnp.asarray(tboxes, dtype))
    assert cost.shape == (2, 4, 3) and cost.dtype == dtype
    z = np.exp(logits - logits.max(-1, keepdims=True))
    prob = z / z.sum(-1, keepdims=True)
    tol = dict(rtol=1e-10) if dtype == jnp.float64 else dict(rtol=1e-5, atol=1e-5)
    for b in range(2):
        _, giou = giou_matrix_np(cxcywh_to_xyxy_np(boxes[b]), cxcywh_to_xyxy_np(tboxes[b]))
        ref = 5.0 * np.abs(boxes[b][:, None] - tboxes[b][None]).sum(-1) - 1.5 * prob[b][:, labels[b]] - 2.0 * giou
        np.testing.assert_allclose(np.asarray(cost[b]), ref, **tol)
