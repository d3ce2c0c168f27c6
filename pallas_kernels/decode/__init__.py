"""Decode attention over a KV cache (flash-decoding, split-K) in Pallas, and its reference.

* ``op.py``: :func:`decode_attention` (argument checks, interpret switch, split plan, the
  log-sum-exp combine of the splits, custom VJP through the reference).
* ``triton.py``: the split-K kernel body for Pallas' Triton lowering (any GPU; Pallas
  interpret mode on CPU).
* ``reference.py``: :func:`reference_decode_attention` (plain JAX), the semantics and
  ``check_decode_args``.
"""
from pallas_kernels.decode.reference import reference_decode_attention
from pallas_kernels.decode.op import decode_attention

__all__ = ["decode_attention", "reference_decode_attention"]
