"""FlashAttention in Pallas: the op, its kernels by backend and direction, and the reference.

* ``op.py``: :func:`flash_attention` (argument checks, padding, custom VJP, backend dispatch).
* ``triton_fwd.py`` / ``triton_bwd.py``: kernels for Pallas' Triton lowering (any GPU;
  Pallas interpret mode on CPU).
* ``mosaic_fwd.py`` / ``mosaic_bwd.py``: Hopper kernels in Pallas Mosaic GPU (TMA, wgmma,
  warp specialisation); ``mosaic_common.py`` holds what they share (the one Hopper check,
  budgets, SMEM layouts, masks).
* ``tpu_fwd.py`` / ``tpu_bwd.py``: kernels for Pallas TPU / Mosaic TPU (BlockSpec grids with
  the key axis as the "arbitrary" reduction, VMEM scratch); Pallas TPU interpret mode on CPU,
  and verified only there (no TPU has run them).
* ``common.py``: the static plan (``AttnStatic``), block ranges, masks and index maps shared by
  every kernel.
* ``tuning.py``: every block-size table and the backend policy.
* ``reference.py``: :func:`reference_attention` (plain JAX) and ``check_attention_args``.
"""
from pallas_kernels.attention.reference import reference_attention
from pallas_kernels.attention.op import flash_attention

__all__ = ["flash_attention", "reference_attention"]
