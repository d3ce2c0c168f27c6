"""Embedded datasets and host-side batching."""
from research.data.digits import load_digits, to_0_16, to_unit_range
from research.data.iterators import batch_iterator, steps_per_epoch
from research.data.toy import (
    TOY_DISTRIBUTIONS,
    GaussianMixture,
    checkerboard,
    eight_gaussians,
    eight_gaussians_mixture,
    get_toy,
    sample_toy,
    spirals,
    two_moons,
)

__all__ = [
    "GaussianMixture", "TOY_DISTRIBUTIONS", "batch_iterator", "checkerboard", "eight_gaussians",
    "eight_gaussians_mixture", "get_toy", "load_digits", "sample_toy", "spirals",
    "steps_per_epoch", "to_0_16", "to_unit_range", "two_moons",
]
