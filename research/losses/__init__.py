"""Representation-learning and set-prediction losses: contrastive (InfoNCE / NT-Xent, cross-device),
margin softmax (NormFace, SphereFace, CosFace, ArcFace), box ops and DETR's Hungarian set loss."""
from research.losses.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from research.losses.contrastive import (
    LearnableTemperature,
    contrastive_accuracy,
    info_nce,
    info_nce_from_logits,
    make_sharded_info_nce,
    make_sharded_nt_xent,
    mutual_information_lower_bound,
    nt_xent,
    sharded_info_nce,
    sharded_nt_xent,
    temperature_from_log,
)
from research.losses.margin import KINDS as MARGIN_KINDS
from research.losses.margin import margin_logits, margin_softmax_loss
from research.losses.set_prediction import Match, hungarian_match, matching_cost, set_loss

__all__ = [
    "LearnableTemperature", "MARGIN_KINDS", "Match", "box_area", "box_cxcywh_to_xyxy", "box_iou",
    "box_xyxy_to_cxcywh", "contrastive_accuracy", "generalized_box_iou", "hungarian_match", "info_nce", "info_nce_from_logits",
    "make_sharded_info_nce", "make_sharded_nt_xent", "margin_logits", "margin_softmax_loss", "matching_cost",
    "mutual_information_lower_bound", "nt_xent", "set_loss", "sharded_info_nce", "sharded_nt_xent",
    "temperature_from_log",
]
