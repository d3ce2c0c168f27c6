"""Sample-quality metrics.

CPU-sized stand-ins on 8x8 digits (``digits``: classifier accuracy, Fréchet distance in PCA space),
and the literature's FID / Inception Score with pytorch-fid's InceptionV3 ported to JAX
(``inception``, ``fid``; resumable sharded sampling for FID in ``fid_sampling``), VOC mAP
(``detection``).
"""
from research.eval.digits import (
    DigitsEvaluator,
    classifier_accuracy,
    fit_digit_classifier,
    fit_feature_pca,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
)
from research.eval.detection import average_precision, voc_mean_average_precision
from research.eval.fid import (
    compute_statistics,
    fid_from_images,
    image_statistics,
    inception_score,
    load_statistics,
    save_statistics,
)
from research.eval.fid import frechet_distance as inception_frechet_distance

__all__ = [
    "DigitsEvaluator", "classifier_accuracy", "fit_digit_classifier", "fit_feature_pca",
    "average_precision", "frechet_distance", "frechet_distance_from_features", "gaussian_stats",
    "voc_mean_average_precision", "compute_statistics", "fid_from_images", "image_statistics",
    "inception_frechet_distance", "inception_score", "load_statistics", "save_statistics",
]
