"""Hand-written Pallas kernels and their plain-JAX references.

``flash_attention`` (Pallas, custom VJP; compiled on GPU, interpret mode elsewhere) and
``reference_attention`` (plain JAX) share one signature and one set of conventions, documented
in :mod:`pallas_kernels.attention.reference`. The kernels live in :mod:`pallas_kernels.attention`,
one module per backend and direction (``triton_fwd``, ``triton_bwd``, ``mosaic_fwd``,
``mosaic_bwd``), with the op (``op``), the tables and backend policy (``tuning``) and the
shared helpers (``common``, ``mosaic_common``) beside them.
"""
from pallas_kernels.attention import flash_attention, reference_attention

__all__ = ["reference_attention", "flash_attention"]
