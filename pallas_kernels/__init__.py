"""Hand-written Pallas kernels and their plain-JAX references.

``flash_attention`` (Pallas, custom VJP; compiled on GPU or TPU, interpret mode elsewhere) and
``reference_attention`` (plain JAX) share one signature and one set of conventions, documented
in :mod:`pallas_kernels.attention.reference`. The kernels live in :mod:`pallas_kernels.attention`,
one module per backend and direction (``triton_fwd``, ``triton_bwd``, ``mosaic_fwd``,
``mosaic_bwd``, ``tpu_fwd``, ``tpu_bwd``; the TPU pair verified only in TPU interpret mode), with the op (``op``), the tables and backend policy (``tuning``) and the
shared helpers (``common``, ``mosaic_common``) beside them. ``decode_attention`` (split-K
flash-decoding over a KV cache with per-row lengths and optional tree masks) and its plain-JAX
``reference_decode_attention`` live in :mod:`pallas_kernels.decode`.
``linear_attention`` (chunked causal linear attention, Pallas with a Pallas custom VJP), its
quadratic plain-JAX ``reference_linear_attention`` and the O(1)-per-token decode step
(``linear_attention_init_state``, ``linear_attention_step``) live in :mod:`pallas_kernels.linear`.
"""
from pallas_kernels.attention import flash_attention, reference_attention
from pallas_kernels.decode import decode_attention, reference_decode_attention
from pallas_kernels.linear import (linear_attention, linear_attention_init_state,
                                   linear_attention_step, reference_linear_attention)

__all__ = ["reference_attention", "flash_attention", "decode_attention",
           "reference_decode_attention", "linear_attention", "reference_linear_attention",
           "linear_attention_step", "linear_attention_init_state"]
