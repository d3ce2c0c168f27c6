"""Sample-quality metrics."""
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

__all__ = [
    "DigitsEvaluator", "classifier_accuracy", "fit_digit_classifier", "fit_feature_pca",
    "average_precision", "frechet_distance", "frechet_distance_from_features", "gaussian_stats",
    "voc_mean_average_precision",
]
