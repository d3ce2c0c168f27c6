"""``LMConfig``: the decoder-only Transformer's configuration (a frozen, hashable dataclass).

The architecture is Llama's (pre-norm RMSNorm, rotary position embeddings, grouped-query
attention, SwiGLU MLP, no biases), so :mod:`research.lm.hf` converts to and from
``transformers.LlamaForCausalLM`` exactly. ``attention="linear"`` swaps softmax attention for
causal linear attention (Katharopoulos et al. 2020, feature map ``elu + 1``, no RoPE), which
decodes with an O(1) recurrent state instead of a KV cache.

Because the config is hashable it can be a static argument of ``jax.jit``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from research.nn.attention import IMPLS
from research.nn.remat import remat_policy

ATTENTIONS = ("softmax", "linear")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Decoder-only LM hyper-parameters.

    Attributes:
      vocab_size: number of token ids.
      dim: model width; ``dim % num_heads == 0`` and the head dim ``dim // num_heads`` is even
        (RoPE rotates pairs).
      depth: number of Transformer blocks.
      num_heads: query heads; ``num_kv_heads``: key/value heads (``num_heads % num_kv_heads ==
        0``; equal = multi-head, 1 = multi-query, else grouped-query attention).
      mlp_hidden: SwiGLU hidden width.
      rope_theta: RoPE base. ``max_len``: longest sequence (training rows and KV cache).
      tie_embeddings: the output head reuses the token embedding matrix.
      norm_eps: RMSNorm epsilon.
      attn_impl: attention implementation for full sequences (``research.nn.attention.IMPLS``:
        "xla" | "pallas" | "cudnn") and for cached decoding ("xla" -> the plain-JAX
        ``reference_decode_attention``, "pallas" -> the split-K ``decode_attention`` kernel).
      attention: "softmax" (the Llama block) or "linear" (see the module docstring).
      remat_policy: :func:`research.nn.remat.remat_policy` name for the blocks in training.
      scan_layers: stack the blocks' parameters and run them with ``nn.scan`` (one compiled
        block; compile time independent of depth).
      dtype: activation/compute dtype; ``param_dtype``: parameter dtype. Logits and the loss
        are float32 (float64 when ``dtype`` is float64).
      init_std: standard deviation of the normal initialiser of every matrix.
      custom_matmul_vjp: every projection's matmul through ``research.nn.layers.dense_dot_general``
        (a custom VJP whose weight gradient XLA:CPU runs ~1.7x faster; same numbers, GPUs get the
        plain dot). Off by default: a custom VJP has no forward-mode derivative (``jax.jvp``), and
        the ``dots_*`` remat policies do not see through it.
    """

    vocab_size: int
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    mlp_hidden: int = 688
    rope_theta: float = 10000.0
    max_len: int = 512
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    attn_impl: str = "xla"
    attention: str = "softmax"
    remat_policy: str = "none"
    scan_layers: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    custom_matmul_vjp: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "mlp_hidden", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"LMConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LMConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                             f"({self.num_kv_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"LMConfig head dim dim/num_heads = {self.dim // self.num_heads} must be even "
                             "(RoPE rotates pairs of features)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v == float("inf"):
                raise ValueError(f"LMConfig.{name} must be a finite number > 0, got {v!r}")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"LMConfig.attn_impl must be one of {IMPLS}, got {self.attn_impl!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"LMConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.attention == "linear" and self.attn_impl == "cudnn":
            raise ValueError("LMConfig.attention='linear' runs on 'xla' or 'pallas', not attn_impl='cudnn'")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"LMConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("tie_embeddings", "scan_layers", "custom_matmul_vjp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.custom_matmul_vjp and self.remat_policy.startswith("dots"):
            raise ValueError(f"LMConfig.custom_matmul_vjp hides the dots that remat_policy="
                             f"{self.remat_policy!r} saves; use 'full', 'none' or 'save_names:...'")
        remat_policy(self.remat_policy, known_names=("attn_out", "mlp_hidden"))  # validates the name

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def logits_dtype(self):
        return jnp.dtype("float64") if self.dtype == "float64" else jnp.dtype("float32")

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)


def default_mlp_hidden(dim: int, multiple_of: int = 16) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * dim (same parameter count as a 4x GELU MLP), rounded up."""
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)
