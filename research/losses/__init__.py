"""Representation-learning and set-prediction losses: contrastive (InfoNCE / NT-Xent, cross-device),
margin softmax (NormFace, SphereFace, CosFace, ArcFace) and DETR's Hungarian set loss."""
