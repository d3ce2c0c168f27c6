"""VOC mAP against hand-computed precision/recall curves (every number below is worked out by hand in
the comments from the devkit's definitions, not produced by the code under test)."""
import numpy as np
import pytest

from research.eval.detection import average_precision, box_iou_matrix, voc_mean_average_precision

G0, G1 = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def _det(boxes, scores, labels):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
            "labels": np.array(labels, int)}


def _gt(boxes, labels, difficult=None):
    out = {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels, int)}
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


def _map(dets, gts, **kw):
    kw.setdefault("num_classes", 1)
    return voc_mean_average_precision(dets, gts, **kw)


# TP (0.9), FP (0.8), TP (0.7) over 2 ground-truth boxes: recall [.5, .5, 1], precision [1, .5, 2/3].
# all-point: envelope [1, 1, 2/3] -> 0.5 * 1 + 0.5 * 2/3 = 5/6.
# 11-point: r in {0,...,.5} (6 points) max precision 1; r in {.6,...,1} (5 points) 2/3 -> (6 + 10/3) / 11.
@pytest.mark.parametrize("interpolation,expected", [("all", 5 / 6), ("11point", (6 + 10 / 3) / 11)])
def test_tp_fp_tp_curve(interpolation, expected):
    dets = [_det([G0, FAR, G1], [0.9, 0.8, 0.7], [0, 0, 0])]
    out = _map(dets, [_gt([G0, G1], [0, 0])], interpolation=interpolation)
    assert out["map"] == pytest.approx(expected, abs=1e-12)
    assert out["num_gt"].tolist() == [2] and out["num_detections"].tolist() == [3]


def test_ranking_is_by_score_across_images():
    # image 0: FP at 0.95; image 1: TP at 0.6; image 0: TP at 0.5. Ranked: FP, TP, TP -> recall [0, .5, 1],
    # precision [0, .5, 2/3]; envelope at recall .5 is 2/3 -> all-point AP = .5 * 2/3 + .5 * 2/3 = 2/3.
    dets = [_det([FAR, G0], [0.95, 0.5], [0, 0]), _det([G1], [0.6], [0])]
    gts = [_gt([G0], [0]), _gt([G1], [0])]
    assert _map(dets, gts)["map"] == pytest.approx(2 / 3, abs=1e-12)
    # the same detections listed in a different order give the same AP (the ranking decides)
    dets_swapped = [_det([G0, FAR], [0.5, 0.95], [0, 0]), _det([G1], [0.6], [0])]
    assert _map(dets_swapped, gts)["map"] == pytest.approx(2 / 3, abs=1e-12)


def test_duplicate_detection_is_false_positive():
    # two detections of G0 (0.9 TP, 0.8 duplicate -> FP), then G1 (0.7 TP): same curve as TP, FP, TP.
    dets = [_det([G0, [0.5, 0.5, 10.0, 10.0], G1], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert _map(dets, [_gt([G0, G1], [0, 0])])["map"] == pytest.approx(5 / 6, abs=1e-12)


def test_iou_threshold_is_strict():
    # [0,0,20,10] vs G0: intersection 100, union 200 -> IoU exactly 0.5: not > 0.5, so a false positive.
    box = [0.0, 0.0, 20.0, 10.0]
    assert box_iou_matrix([box], [G0])[0, 0] == 0.5
    assert _map([_det([box], [1.0], [0])], [_gt([G0], [0])])["map"] == 0.0
    assert _map([_det([box], [1.0], [0])], [_gt([G0], [0])], iou_threshold=0.49)["map"] == 1.0


def test_difficult_boxes():
    gts = [_gt([G0, G1], [0, 0], difficult=[False, True])]
    # only G0 detected. VOC protocol: the difficult G1 is not a positive -> recall 1 at precision 1, AP 1.
    dets = [_det([G0], [0.9], [0])]
    assert _map(dets, gts)["map"] == 1.0
    assert _map(dets, gts)["num_gt"].tolist() == [1]
    # use_difficult: 2 positives, recall .5 at precision 1 -> all-point .5, 11-point 6/11.
    assert _map(dets, gts, use_difficult=True)["map"] == pytest.approx(0.5, abs=1e-12)
    assert _map(dets, gts, use_difficult=True, interpolation="11point")["map"] == pytest.approx(6 / 11, abs=1e-12)
    # a detection of the difficult box ranked first is ignored (neither TP nor FP) under VOC's protocol:
    # ranking [ignored, TP] -> AP 1; counted as ordinary ground truth it is a TP -> recall 1 -> AP 1 as well,
    # but a false positive ranked between them separates the two protocols:
    dets = [_det([G1, FAR, G0], [0.9, 0.8, 0.7], [0, 0, 0])]
    # VOC: [ignored, FP, TP] -> recall [0, 0, 1], precision [0, 0, .5] -> AP .5
    assert _map(dets, gts)["map"] == pytest.approx(0.5, abs=1e-12)
    # use_difficult: [TP, FP, TP] -> 5/6 as in test_tp_fp_tp_curve
    assert _map(dets, gts, use_difficult=True)["map"] == pytest.approx(5 / 6, abs=1e-12)


def test_classes_without_ground_truth_are_left_out_and_wrong_class_is_a_miss():
    # class 1 has no ground truth anywhere: nan, not in the mean. A class-1 detection of G0 does not
    # count for class 0; class 0's only detection is a TP -> class 0 AP 1, class 2 (missed) AP 0.
    dets = [_det([G0, G0], [0.9, 0.8], [0, 1])]
    gts = [_gt([G0, G1], [0, 2])]
    out = _map(dets, gts, num_classes=3)
    assert out["ap"][0] == 1.0 and np.isnan(out["ap"][1]) and out["ap"][2] == 0.0
    assert out["map"] == 0.5


def test_perfect_and_empty():
    gts = [_gt([G0, G1], [0, 1]), _gt(np.zeros((0, 4)), [])]
    perfect = [_det([G0, G1], [0.9, 0.3], [0, 1]), _det(np.zeros((0, 4)), [], [])]
    assert _map(perfect, gts, num_classes=2)["map"] == 1.0
    empty = [_det(np.zeros((0, 4)), [], []), _det(np.zeros((0, 4)), [], [])]
    assert _map(empty, gts, num_classes=2)["map"] == 0.0
    assert np.isnan(_map(empty, [_gt(np.zeros((0, 4)), [])] * 2, num_classes=2)["map"])


def test_average_precision_direct():
    # precision [1, 1/2, 1/3, 1/2] at recall [.25, .25, .25, .5]: envelope 1 up to .25, then 1/2 up to .5,
    # 0 beyond -> all-point .25 * 1 + .25 * .5 = .375; 11-point: r in {0, .1, .2} -> 1, {.3, .4, .5} -> .5,
    # {.6 .. 1} -> 0 -> 4.5 / 11.
    rec, prec = [0.25, 0.25, 0.25, 0.5], [1.0, 0.5, 1 / 3, 0.5]
    assert average_precision(rec, prec, interpolation="all") == pytest.approx(0.375, abs=1e-12)
    assert average_precision(rec, prec, interpolation="11point") == pytest.approx(4.5 / 11, abs=1e-12)


def test_pixel_inclusive_convention():
    # devkit integer boxes: [0,0,9,9] covers 10x10 pixels; [0,0,4,9] 5x10 -> IoU .5 inclusive, 4*9/81 not.
    assert box_iou_matrix([[0, 0, 4, 9]], [[0, 0, 9, 9]], pixel_inclusive=True)[0, 0] == pytest.approx(0.5)
    assert box_iou_matrix([[0, 0, 4, 9]], [[0, 0, 9, 9]])[0, 0] == pytest.approx(36 / 81)


@pytest.mark.parametrize("dets,gts,kw,match", [
    ([_det([G0], [0.9], [3])], [_gt([G0], [0])], {}, "labels must be ints in"),
    ([_det([G0], [np.nan], [0])], [_gt([G0], [0])], {}, "scores must be"),
    ([_det([G0], [0.9], [0])], [], {}, "one entry per image"),
    ([{"boxes": np.zeros((1, 3)), "scores": [1.0], "labels": [0]}], [_gt([G0], [0])], {}, r"\[k, 4\]"),
    ([_det([G0], [0.9], [0])], [_gt([G0], [0])], {"interpolation": "101point"}, "interpolation"),
    ([_det([G0], [0.9], [0])], [{"boxes": [G0]}], {}, "missing"),
])
def test_bad_input_one_clear_error(dets, gts, kw, match):
    with pytest.raises(ValueError, match=match):
        _map(dets, gts, **kw)
