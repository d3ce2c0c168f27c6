"""PASCAL VOC mean average precision (host side, NumPy float64).

``voc_mean_average_precision(detections, ground_truths, num_classes=...)`` follows the VOC devkit's
evaluation (Everingham et al. 2010; the devkit's ``VOCevalcls`` / py-faster-rcnn's ``voc_eval``):

1. Per class, detections of all images are ranked by score (descending; ties keep their input order,
   a stable sort, where the devkit's unstable sort leaves tie order unspecified).
2. Walking down the ranking, a detection is a true positive when its best-IoU ground-truth box of the
   same class and image has IoU > ``iou_threshold`` (strictly, as in the devkit) and was not matched
   by a higher-ranked detection; a second detection of an already matched box is a false positive
   (duplicate), and so is one with no box above the threshold.
3. ``difficult`` ground truth: with ``use_difficult=False`` (VOC's protocol) it is not counted in the
   number of positives, and a detection whose best match is a difficult box is ignored (neither TP
   nor FP). With ``use_difficult=True`` difficult boxes are ordinary ground truth.
4. recall = cumTP / num_positives, precision = cumTP / (cumTP + cumFP), and AP from that curve with
   ``interpolation="11point"`` (VOC2007: mean over r in {0, 0.1, ..., 1} of the maximum precision at
   recall >= r) or ``"all"`` (VOC2010+: area under the monotone precision envelope, summed where the
   recall changes).

Boxes are continuous ``[x0, y0, x1, y1]`` coordinates and areas are ``(x1 - x0) * (y1 - y0)``; the
devkit's integer-pixel convention adds 1 to widths and heights (``pixel_inclusive=True`` reproduces
it). A class with no (counted) ground truth has AP ``nan`` and is left out of the mean, as in the
devkit's per-class loop where recall would be 0 / 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

INTERPOLATIONS = ("11point", "all")


def average_precision(recall, precision, *, interpolation: str = "all") -> float:
    """AP of one precision/recall curve (points in ranking order, recall non-decreasing)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    rec = np.asarray(recall, np.float64)
    prec = np.asarray(precision, np.float64)
    if rec.shape != prec.shape or rec.ndim != 1:
        raise ValueError(f"recall and precision must be 1-D of equal length, got {rec.shape} and {prec.shape}")
    if interpolation == "11point":
        return float(np.mean([np.max(prec[rec >= t], initial=0.0) for t in np.linspace(0.0, 1.0, 11)]))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max precision at recall >= r
    changes = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def box_iou_matrix(a, b, *, pixel_inclusive: bool = False) -> np.ndarray:
    """[n, m] IoU of xyxy boxes a [n, 4] and b [m, 4] in float64 (0 where the union is empty)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    one = 1.0 if pixel_inclusive else 0.0
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)

    def area(x):
        return np.clip(x[:, 2] - x[:, 0] + one, 0.0, None) * np.clip(x[:, 3] - x[:, 1] + one, 0.0, None)

    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _as_image_arrays(entry, i: int, what: str, num_classes: int, *, scored: bool):
    if not isinstance(entry, dict):
        raise ValueError(f"{what}[{i}] must be a dict with 'boxes' and 'labels', got {type(entry).__name__}")
    keys = ("boxes", "labels", "scores") if scored else ("boxes", "labels")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{what}[{i}] is missing {missing}")
    boxes = np.asarray(entry["boxes"], np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    labels = np.asarray(entry["labels"]).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(labels):
        raise ValueError(f"{what}[{i}]: boxes must be [k, 4] with k = len(labels), got boxes {boxes.shape} "
                         f"and {len(labels)} labels")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                        or labels.max() >= num_classes):
        raise ValueError(f"{what}[{i}]: labels must be ints in [0, {num_classes}), got {labels.tolist()}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}[{i}]: boxes contain NaN or inf")
    out = {"boxes": boxes, "labels": labels.astype(np.int64)}
    if scored:
        scores = np.asarray(entry["scores"], np.float64).reshape(-1)
        if len(scores) != len(labels) or not np.all(np.isfinite(scores)):
            raise ValueError(f"{what}[{i}]: scores must be {len(labels)} finite values, got {scores.tolist()}")
        out["scores"] = scores
    else:
        diff = np.asarray(entry.get("difficult", np.zeros(len(labels), bool))).reshape(-1)
        if len(diff) != len(labels):
            raise ValueError(f"{what}[{i}]: difficult must have {len(labels)} entries, got {len(diff)}")
        out["difficult"] = diff.astype(bool)
    return out


def class_precision_recall(detections, ground_truths, cls: int, *, iou_threshold: float,
                           use_difficult: bool, pixel_inclusive: bool):
    """(recall, precision, num_positives) of class ``cls`` over already validated per-image arrays."""
    gts = []
    for g in ground_truths:
        sel = g["labels"] == cls
        diff = g["difficult"][sel] & (not use_difficult)
        gts.append((g["boxes"][sel], diff, np.zeros(int(sel.sum()), bool)))
    num_pos = int(sum(int((~d).sum()) for _, d, _ in gts))
    img, boxes, scores = [], [], []
    for i, d in enumerate(detections):
        sel = d["labels"] == cls
        img.append(np.full(int(sel.sum()), i))
        boxes.append(d["boxes"][sel])
        scores.append(d["scores"][sel])
    img, boxes, scores = np.concatenate(img), np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores)
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for r, k in enumerate(order):
        gt_boxes, difficult, matched = gts[img[k]]
        if len(gt_boxes) == 0:
            fp[r] = 1.0
            continue
        ious = box_iou_matrix(boxes[k], gt_boxes, pixel_inclusive=pixel_inclusive)[0]
        j = int(np.argmax(ious))
        if ious[j] <= iou_threshold:
            fp[r] = 1.0
        elif difficult[j]:
            continue  # ignored: neither a hit nor a miss
        elif matched[j]:
            fp[r] = 1.0  # duplicate detection of a matched box
        else:
            tp[r], matched[j] = 1.0, True
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / num_pos if num_pos > 0 else np.full(len(ctp), np.nan)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision, num_pos


def voc_mean_average_precision(detections: Sequence[dict], ground_truths: Sequence[dict], *, num_classes: int,
                               iou_threshold: float = 0.5, interpolation: str = "all", use_difficult: bool = False,
                               pixel_inclusive: bool = False) -> dict:
    """VOC mAP over a dataset (see the module docstring for the protocol).

    detections: one dict per image, ``{"boxes": [k, 4] xyxy, "scores": [k], "labels": [k] int}``.
    ground_truths: one dict per image, ``{"boxes": [m, 4] xyxy, "labels": [m] int}`` and optionally
    ``"difficult": [m] bool``.
    Returns ``{"map": float (nan if no class has ground truth), "ap": [num_classes] float64 (nan for a
    class without counted ground truth), "num_gt": [num_classes] int (counted positives),
    "num_detections": [num_classes] int}``.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if len(detections) != len(ground_truths):
        raise ValueError(f"detections ({len(detections)} images) and ground_truths ({len(ground_truths)} images) "
                         "must have one entry per image each")
    dets = [_as_image_arrays(d, i, "detections", num_classes, scored=True) for i, d in enumerate(detections)]
    gts = [_as_image_arrays(g, i, "ground_truths", num_classes, scored=False) for i, g in enumerate(ground_truths)]
    ap = np.full(num_classes, np.nan)
    num_gt = np.zeros(num_classes, np.int64)
    num_det = np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        rec, prec, num_gt[c] = class_precision_recall(dets, gts, c, iou_threshold=iou_threshold,
                                                      use_difficult=use_difficult, pixel_inclusive=pixel_inclusive)
        num_det[c] = len(rec)
        if num_gt[c] > 0:
            ap[c] = average_precision(rec, prec, interpolation=interpolation) if len(rec) else 0.0
    present = ~np.isnan(ap)
    return {"map": float(np.mean(ap[present])) if present.any() else float("nan"), "ap": ap, "num_gt": num_gt,
            "num_detections": num_det}
