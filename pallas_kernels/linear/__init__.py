"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") in Pallas.

* ``op.py``: :func:`linear_attention` (argument checks, padding, interpret switch, custom VJP).
* ``kernel.py``: the chunked forward and backward kernel bodies (Pallas' Triton lowering on
  GPU, interpret mode on CPU) and their static plan (``LinearStatic``).
* ``reference.py``: plain-JAX forms: :func:`reference_linear_attention` (quadratic),
  :func:`recurrent_linear_attention` (token scan), :func:`chunked_linear_attention` (chunk
  scan), and the shared argument checks.
* ``step.py``: the O(1)-per-token decode step, :func:`linear_attention_init_state` and
  :func:`linear_attention_step`.
"""
from pallas_kernels.linear.reference import (chunked_linear_attention,
                                             recurrent_linear_attention,
                                             reference_linear_attention)
from pallas_kernels.linear.step import linear_attention_init_state, linear_attention_step
from pallas_kernels.linear.op import linear_attention

__all__ = ["linear_attention", "reference_linear_attention", "recurrent_linear_attention",
           "chunked_linear_attention", "linear_attention_init_state", "linear_attention_step"]
