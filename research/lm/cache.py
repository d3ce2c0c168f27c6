"""Decoding state: a KV cache (softmax attention) or a recurrent state (linear attention).

Both are pytrees with a static capacity and per-row lengths, so a batch of ragged rows lives in
one set of arrays and every update is in place under ``jit``:

* :class:`KVCache`: ``k``, ``v`` ``[depth, B, max_len, kv_heads, head_dim]`` and ``lengths``
  ``[B]`` int32 (how many positions of each row are committed). Entries at positions
  ``>= lengths[b]`` are ignored by attention, so **rollback is** ``cache.rollback(new_lengths)``:
  it only lowers the lengths (no copies); the stale entries are overwritten by the next write.
  This is what speculative decoding needs to discard rejected draft tokens.
* :class:`LinearState`: ``s`` ``[depth, B, heads, head_dim, head_dim]`` (sum of ``k^T v``) and
  ``z`` ``[depth, B, heads, head_dim]`` (sum of ``k``), float32, plus ``lengths``: O(1) memory
  and O(1) work per token however long the context. It cannot be rolled back.

:func:`forward_cached` runs the model on ``T`` new tokens per row, appends them to the state and
returns their hidden states; ``num_new`` says how many of the ``T`` each row keeps (ragged
prefill: a row with a shorter prompt keeps fewer; the rest are padding).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from research.lm.config import LMConfig
from research.lm.model import Transformer

__all__ = ["KVCache", "LinearState", "init_cache", "forward_cached", "linear_cached_attention"]

_EPS = 1e-6  # linear attention's denominator epsilon (pallas_kernels.linear_attention's default)


@flax.struct.dataclass
class KVCache:
    k: jax.Array        # [depth, B, max_len, kv_heads, head_dim]
    v: jax.Array
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rollback(self, lengths) -> "KVCache":
        """The cache truncated to ``lengths`` [B] (must not exceed the current lengths)."""
        return self.replace(lengths=jnp.minimum(jnp.asarray(lengths, jnp.int32), self.lengths))

    def layers(self):
        return (self.k, self.v)


@flax.struct.dataclass
class LinearState:
    s: jax.Array        # [depth, B, heads, head_dim, head_dim] float32
    z: jax.Array        # [depth, B, heads, head_dim] float32
    lengths: jax.Array  # [B] int32
    max_len: int = flax.struct.field(pytree_node=False, default=0)

    def layers(self):
        return (self.s, self.z)


def init_cache(cfg: LMConfig, batch: int, max_len: int | None = None, dtype=None):
    """Empty decoding state for ``batch`` rows: a :class:`KVCache` of ``max_len`` positions
    (default ``cfg.max_len``) in ``dtype`` (default the compute dtype), or a
    :class:`LinearState` for ``attention="linear"``."""
    max_len = cfg.max_len if max_len is None else int(max_len)
    if not 0 < max_len <= cfg.max_len:
        raise ValueError(f"cache max_len must be in [1, LMConfig.max_len={cfg.max_len}], got {max_len}")
    lengths = jnp.zeros((batch,), jnp.int32)
    if cfg.attention == "linear":
        ft = jnp.float64 if cfg.dtype == "float64" else jnp.float32
        h, d = cfg.num_heads, cfg.head_dim
        return LinearState(jnp.zeros((cfg.depth, batch, h, d, d), ft), jnp.zeros((cfg.depth, batch, h, d), ft),
                           lengths, max_len)
    if cfg.attn_impl not in ("xla", "pallas"):
        raise ValueError(f"cached decoding supports attn_impl 'xla' or 'pallas', got {cfg.attn_impl!r}; "
                         "use cfg.replace(attn_impl='xla')")
    shape = (cfg.depth, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), lengths)


def linear_cached_attention(q, k, v, state, *, num_new):
    """Causal linear attention of T new (feature-mapped) tokens continuing a recurrent state.

    q, k [B, T, H, Dk], v [B, T, H, Dv]; state ``(s [B, H, Dk, Dv], z [B, H, Dk])``; tokens
    ``i >= num_new[b]`` are padding and leave the state unchanged. Returns ``(o, new_state)``
    with ``o_i = (q_i s + sum_{j<=i} (q_i.k_j) v_j) / (q_i z + sum_{j<=i} q_i.k_j + eps)``,
    the same as ``pallas_kernels.reference_linear_attention`` over the whole history.
    Plain JAX: the intra-call part is a T x T causal product (T = 1 per decode step).
    """
    s, z = state
    ft = s.dtype
    t = q.shape[1]
    keep = (jnp.arange(t)[None, :] < num_new[:, None]).astype(ft)[:, :, None, None]
    q, k, v = q.astype(ft), k.astype(ft) * keep, v.astype(ft) * keep
    hi = jax.lax.Precision.HIGHEST
    causal = jnp.tril(jnp.ones((t, t), ft))
    scores = jnp.einsum("bihd,bjhd->bhij", q, k, precision=hi) * causal
    num = jnp.einsum("bihd,bhde->bihe", q, s, precision=hi) + jnp.einsum("bhij,bjhe->bihe", scores, v,
                                                                          precision=hi)
    den = jnp.einsum("bihd,bhd->bih", q, z, precision=hi) + jnp.sum(scores, axis=-1).transpose(0, 2, 1)
    o = num / (den[..., None] + _EPS)
    s = s + jnp.einsum("bjhd,bjhe->bhde", k, v, precision=hi)
    z = z + jnp.sum(k, axis=1)
    return o, (s, z)


def forward_cached(params, cfg: LMConfig, tokens, cache, *, num_new=None, positions=None, tree_mask=None):
    """Runs ``T`` new tokens per row through the model, appending them to ``cache``.

    Args:
      tokens: [B, T] int, written at positions ``cache.lengths[b] + i``.
      cache: :class:`KVCache` or :class:`LinearState` from :func:`init_cache`.
      num_new: [B] int, how many of the T tokens each row keeps (default T); the new lengths
        are ``cache.lengths + num_new``.
      positions: [B, T] RoPE positions (default the write positions; tree decoding passes
        each node's depth instead).
      tree_mask: [B, T, T] bool, which of the new tokens each new token sees (default causal);
        softmax attention only.

    Returns:
      ``(hidden [B, T, dim], cache)``; the logits are ``research.lm.head(params, cfg, hidden)``.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if cache.lengths.shape != (b,):
        raise ValueError(f"cache holds {cache.lengths.shape[0]} rows but tokens has {b}")
    if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of max_len={cache.max_len}")
    lengths = cache.lengths
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    if positions is None:
        positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if isinstance(cache, LinearState) and tree_mask is not None:
        raise ValueError("tree_mask needs softmax attention (a KV cache); attention='linear' decodes causally")
    hidden, layers = Transformer(cfg).apply(
        {"params": params}, tokens, positions, None, cache.layers(), (lengths, num_new), tree_mask,
        method=Transformer.trunk)
    if isinstance(cache, KVCache):
        cache = cache.replace(k=layers[0], v=layers[1], lengths=lengths + num_new)
    else:
        cache = cache.replace(s=layers[0], z=layers[1], lengths=lengths + num_new)
    return hidden, cache
