"""Attention dispatch: one signature, several implementations.

Layout ``[batch, seq, heads, head_dim]`` (grouped-query attention when ``Hq % Hkv == 0``).
Implementations (``IMPLS``):

* ``"xla"``: the plain-JAX reference, ``pallas_kernels.reference_attention``; any backend.
* ``"pallas"``: ``pallas_kernels.flash_attention`` (kernels in ``pallas_kernels/attention/``,
  backend chosen by its ``tuning`` policy); compiled on a GPU (Triton / Mosaic GPU kernels)
  and on a TPU (the Pallas TPU kernels, ``backend="tpu"``, picked automatically when
  ``jax.default_backend() == "tpu"``; verified only in TPU interpret mode so far), Pallas
  interpret mode elsewhere (slow: tiny shapes only on CPU).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``; CUDA GPU only, no
  ``segment_ids``, causal only with ``Tq == Tk``.
"""
from __future__ import annotations

import jax

import pallas_kernels

IMPLS = ("xla", "pallas", "cudnn")


def attention(q, k, v, *, impl: str = "xla", causal: bool = False, segment_ids=None, sm_scale=None) -> jax.Array:
    """Multi-head (grouped-query) attention.

    Args:
      q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with Hq % Hkv == 0.
      impl: implementation name, one of ``IMPLS``.
      causal: causal mask (bottom-right aligned).
      segment_ids: int32 [B, T] (or a ``(q_ids, kv_ids)`` pair for xla / pallas); attention
        only within equal ids.
      sm_scale: softmax scale, default 1/sqrt(D); a finite number > 0.

    Returns:
      o: [B, Tq, Hq, D] in q's dtype.
    """
    if impl == "xla":
        return pallas_kernels.reference_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    if impl == "pallas":
        # Pallas FlashAttention: compiled on GPU/TPU, interpret mode elsewhere (slow: tiny shapes).
        return pallas_kernels.flash_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise RuntimeError(
                f"impl='cudnn' needs a CUDA GPU backend, but jax.default_backend() is "
                f"{jax.default_backend()!r}; use impl='xla' or impl='pallas'"
            )
        if segment_ids is not None:
            raise ValueError("impl='cudnn' does not support segment_ids; use 'pallas' or 'xla'")
        if causal and q.shape[1] != k.shape[1]:
            raise ValueError(
                "impl='cudnn' with causal=True needs Tq == Tk (its causal mask is not "
                "bottom-right aligned); use 'pallas' or 'xla'"
            )
        return jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn"
        )
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
