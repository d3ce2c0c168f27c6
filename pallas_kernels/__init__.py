"""Hand-written Pallas kernels and their plain-JAX references.

``flash_attention`` (Pallas, custom VJP; compiled on GPU, interpret mode elsewhere) and
``reference_attention`` (plain JAX) share one signature and one set of conventions, documented
in :mod:`pallas_kernels.reference`.
"""
from pallas_kernels.reference import reference_attention
from pallas_kernels.flash_attention import flash_attention  # noqa: E402  (binds the function)

__all__ = ["reference_attention", "flash_attention"]
