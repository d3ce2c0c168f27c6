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

__all__ = [
    "DigitsEvaluator", "classifier_accuracy", "fit_digit_classifier", "fit_feature_pca",
    "frechet_distance", "frechet_distance_from_features", "gaussian_stats",
]
