"""Attention dispatch: one signature, several implementations.

Layout ``[batch, seq, heads, head_dim]``. ``impl="xla"`` is the plain-JAX reference
(``pallas_kernels.reference_attention``); the kernel issue adds ``"pallas"`` and ``"cudnn"``.
"""
from __future__ import annotations

import jax

import pallas_kernels

IMPLS = ("xla",)


def attention(q, k, v, *, impl: str = "xla", causal: bool = False, segment_ids=None, sm_scale=None) -> jax.Array:
    """Multi-head (grouped-query) attention.

    Args:
      q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq % Hkv == 0.
      impl: implementation name, one of ``IMPLS``.
      causal: causal mask (bottom-right aligned).
      segment_ids: int32 [B, T]; attention only within equal ids.
      sm_scale: softmax scale, default 1/sqrt(D).

    Returns:
      o: [B, Tq, Hq, D] in q's dtype.
    """
    if impl == "xla":
        return pallas_kernels.reference_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
