"""Axis-aligned box operations in jnp: format conversions, areas, IoU and generalised IoU.

Formats: ``xyxy`` = ``[x0, y0, x1, y1]`` (corners, x1 >= x0, y1 >= y0) and ``cxcywh`` =
``[cx, cy, w, h]`` (DETR's prediction format, normalised to [0, 1] there). Coordinates are
continuous: the area is ``(x1 - x0) * (y1 - y0)`` (no VOC "+1" pixel convention).

Generalised IoU (Rezatofighi et al. 2019, Algorithm 1)::

    IoU  = |A ∩ B| / |A ∪ B|
    GIoU = IoU - (|C| - |A ∪ B|) / |C|      C = the smallest box enclosing A and B

IoU is in [0, 1], GIoU in (-1, 1]; GIoU = 1 only for identical boxes and GIoU < 0 for disjoint
ones (it keeps a gradient that pulls disjoint boxes together, where IoU is flat 0).

Two forms of each: pairwise ``box_iou(a [N, 4], b [M, 4]) -> [N, M]`` (the matching cost) and
aligned ``box_iou_aligned(a [..., 4], b [..., 4]) -> [...]`` (broadcasting; the loss on matched
pairs). Both are the same elementwise function.

Degenerate boxes: widths and heights are clipped at 0 (an inverted box has area 0, gradient 0 in
the inverted extent), and each ratio ``p / q`` is ``p / max(q, eps)`` where ``q > 0`` and exactly 0
(value and gradient) where ``q == 0``. A zero-area box therefore gives finite values and finite
gradients: IoU 0 against anything (where 0/0 would be NaN); GIoU = IoU - (|C| - |U|) / |C|, which
is 0 for two identical points (|C| = |U| = 0: both ratios 0) and in [-1, 0] otherwise. For
non-degenerate boxes (union and enclosure >= ``eps`` = 1e-9 by default, far below a pixel on a
[0, 1] or a pixel scale) the values are exactly the paper's.

Dtypes: computed in the floating dtype of the inputs, at least float32 (float64 under x64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-9


def _float(*xs):
    dts = [jnp.result_type(x) for x in xs]
    dts = [d for d in dts if jnp.issubdtype(d, jnp.floating)]
    dtype = jnp.promote_types(jnp.result_type(*dts), jnp.float32) if dts else jnp.dtype(jnp.float32)
    return tuple(jnp.asarray(x, dtype) for x in xs)


def _check_last(x, name):
    if x.shape[-1:] != (4,):
        raise ValueError(f"{name} must have a last axis of size 4, got shape {x.shape}")


def box_cxcywh_to_xyxy(boxes) -> jax.Array:
    """``[cx, cy, w, h] -> [cx - w/2, cy - h/2, cx + w/2, cy + h/2]`` on the last axis."""
    (b,) = _float(boxes)
    _check_last(b, "boxes")
    cx, cy, w, h = jnp.moveaxis(b, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes) -> jax.Array:
    """``[x0, y0, x1, y1] -> [(x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0]`` on the last axis."""
    (b,) = _float(boxes)
    _check_last(b, "boxes")
    x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
    return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], axis=-1)


def box_area(boxes) -> jax.Array:
    """Area of xyxy boxes ``[..., 4] -> [...]``, widths and heights clipped at 0."""
    (b,) = _float(boxes)
    _check_last(b, "boxes")
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def _iou_parts(a, b):
    """(intersection, union, enclosure area) of broadcasting xyxy boxes a [..., 4], b [..., 4]."""
    area_a, area_b = box_area(a), box_area(b)
    iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    cw = jnp.maximum(jnp.maximum(a[..., 2], b[..., 2]) - jnp.minimum(a[..., 0], b[..., 0]), 0.0)
    ch = jnp.maximum(jnp.maximum(a[..., 3], b[..., 3]) - jnp.minimum(a[..., 1], b[..., 1]), 0.0)
    return inter, union, cw * ch


def _safe_ratio(num, den, eps):
    # num / max(den, eps) where den > 0, exactly 0 where den == 0; the where also zeroes the
    # cotangent of the unselected branch, so a zero denominator has no 1/eps gradient either
    return jnp.where(den > 0, num / jnp.maximum(den, eps), 0.0)


def box_iou_aligned(a, b, *, eps: float = EPS) -> jax.Array:
    """IoU of corresponding xyxy boxes ``a [..., 4]``, ``b [..., 4]`` (broadcasting) -> ``[...]``."""
    a, b = _float(a, b)
    _check_last(a, "a")
    _check_last(b, "b")
    inter, union, _ = _iou_parts(a, b)
    return _safe_ratio(inter, union, eps)


def generalized_box_iou_aligned(a, b, *, eps: float = EPS) -> jax.Array:
    """GIoU of corresponding xyxy boxes ``a [..., 4]``, ``b [..., 4]`` (broadcasting) -> ``[...]``."""
    a, b = _float(a, b)
    _check_last(a, "a")
    _check_last(b, "b")
    inter, union, enclosure = _iou_parts(a, b)
    return _safe_ratio(inter, union, eps) - _safe_ratio(enclosure - union, enclosure, eps)


def _pairwise(fn, a, b, eps):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"pairwise box ops need a [N, 4] and b [M, 4], got {a.shape} and {b.shape}")
    return fn(a[:, None, :], b[None, :, :], eps=eps)


def box_iou(a, b, *, eps: float = EPS) -> jax.Array:
    """Pairwise IoU of xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    return _pairwise(box_iou_aligned, a, b, eps)


def generalized_box_iou(a, b, *, eps: float = EPS) -> jax.Array:
    """Pairwise generalised IoU of xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    return _pairwise(generalized_box_iou_aligned, a, b, eps)
