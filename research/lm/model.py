"""The decoder-only Transformer (Llama architecture) in flax.linen, and its functional entry points.

Block (pre-norm)::

    h = x + o_proj(attention(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

with RMSNorm ``n1``, ``n2`` (statistics in float32), rotary position embeddings in the
``rotate_half`` layout (the first and second halves of each head are the two coordinates of a
pair; Hugging Face's convention), grouped-query attention through ``research.nn.attention``
(``segment_ids`` keep packed documents apart, positions restart at 0 per document), no biases.
The blocks run under ``nn.scan`` (``LMConfig.scan_layers``; parameters stacked on a leading
``depth`` axis under ``blocks``) and ``nn.remat`` (``LMConfig.remat_policy``; tags
``attn_out``, ``mlp_hidden``).

The model separates the **trunk** (embeddings -> blocks -> final norm, the hidden states that
Medusa / multi-token / EAGLE heads read) from the **head** (the vocabulary projection)::

    hidden = trunk(params, cfg, tokens)          # [B, T, dim]
    logits = head(params, cfg, hidden)           # [B, T, vocab] float32

Cached decoding (``research.lm.cache``) goes through the same modules with a per-layer KV cache
(or, for ``attention="linear"``, a per-layer recurrent state).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from research.data.packing import masked_mean, next_token_targets
from research.lm.config import LMConfig
from research.nn.attention import attention
from research.nn.layers import RMSNorm, dense_dot_general
from research.nn.remat import remat_policy

__all__ = ["Transformer", "init_params", "trunk", "head", "apply_logits", "lm_loss", "rope",
           "num_params"]

_REMAT_NAMES = ("attn_out", "mlp_hidden")


def rope(x, positions, theta: float):
    """Rotary position embedding. x [B, T, H, D] (D even), positions [B, T] int -> x rotated.

    Pair ``(x[..., i], x[..., i + D/2])`` is rotated by ``positions * theta**(-2i/D)``; angles
    are computed in float32 (float64 for float64 inputs), the result is cast back to x's dtype.
    """
    d = x.shape[-1]
    ft = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=ft) / d))
    ang = positions.astype(ft)[..., None] * inv_freq            # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(ft), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dense(cfg: LMConfig, features: int, name: str):
    return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=nn.initializers.normal(cfg.init_std), name=name,
                    dot_general=dense_dot_general if cfg.custom_matmul_vjp else None)


def _feature_map(x):
    """Linear attention's feature map elu(x) + 1 (> 0), computed in float32."""
    return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


def _write_cache(cache_kv, k, v, write_pos):
    """Writes k, v [B, Tq, Hkv, D] into the cache layer at rows' positions write_pos [B, Tq]."""
    kc, vc = cache_kv
    rows = jnp.arange(k.shape[0])[:, None]
    # mode="drop": a write past the cache's end is dropped, never clamped onto earlier entries
    return (kc.at[rows, write_pos].set(k.astype(kc.dtype), mode="drop"),
            vc.at[rows, write_pos].set(v.astype(vc.dtype), mode="drop"))


class Attention(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_pos, tree_mask):
        cfg = self.cfg
        b, t, _ = x.shape
        hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, hq * hd, "q_proj")(x).reshape(b, t, hq, hd)
        k = _dense(cfg, hkv * hd, "k_proj")(x).reshape(b, t, hkv, hd)
        v = _dense(cfg, hkv * hd, "v_proj")(x).reshape(b, t, hkv, hd)
        if cfg.attention == "linear":
            o, layer_cache = self._linear(q, k, v, layer_cache, segment_ids, cache_pos)
        else:
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
            if layer_cache is None:
                o = attention(q, k, v, impl=cfg.attn_impl, causal=True, segment_ids=segment_ids)
            else:
                lengths = cache_pos[0]  # committed lengths before this call; cache_pos[1]: new tokens kept
                write_pos = lengths[:, None] + jnp.arange(t)[None, :]
                layer_cache = _write_cache(layer_cache, k, v, write_pos)
                kc, vc = layer_cache
                fn = (pallas_kernels.decode_attention if cfg.attn_impl == "pallas"
                      else pallas_kernels.reference_decode_attention)
                o = fn(q, kc, vc, lengths + t, tree_mask=tree_mask)
        o = checkpoint_name(o, "attn_out")
        return _dense(cfg, cfg.dim, "o_proj")(o.reshape(b, t, hq * hd)), layer_cache

    def _linear(self, q, k, v, layer_cache, segment_ids, cache_pos):
        cfg = self.cfg
        if segment_ids is not None:
            raise ValueError("attention='linear' does not take segment_ids (its recurrent state would "
                             "carry across packed documents); train it on rows that hold one document "
                             "each or on a contiguous token stream")
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        q, k = _feature_map(q), _feature_map(k)
        if layer_cache is None:
            if cfg.attn_impl == "pallas":
                return pallas_kernels.linear_attention(q, k, v, causal=True), None
            return pallas_kernels.reference_linear_attention(q, k, v, causal=True), None
        from research.lm.cache import linear_cached_attention
        return linear_cached_attention(q, k, v, layer_cache, num_new=cache_pos[1])


class SwiGLU(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.silu(_dense(cfg, cfg.mlp_hidden, "gate_proj")(x)) * _dense(cfg, cfg.mlp_hidden, "up_proj")(x)
        h = checkpoint_name(h, "mlp_hidden")
        return _dense(cfg, cfg.dim, "down_proj")(h)


class Block(nn.Module):
    """``(x [B, T, dim], layer_cache) -> (x, layer_cache)``; scan-compatible."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_pos, tree_mask):
        cfg = self.cfg
        norm = lambda name: RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype,  # noqa: E731
                                    param_dtype=cfg.params_dtype, name=name)
        h, layer_cache = Attention(cfg, name="attn")(norm("attn_norm")(x), layer_cache, positions,
                                                     segment_ids, cache_pos, tree_mask)
        x = x + h
        x = x + SwiGLU(cfg, name="mlp")(norm("mlp_norm")(x))
        return x, layer_cache


class Transformer(nn.Module):
    """Decoder-only LM. ``__call__(tokens) -> logits``; ``trunk`` and ``head`` separately."""

    cfg: LMConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                              embedding_init=nn.initializers.normal(cfg.init_std))
        block = Block
        policy = remat_policy(cfg.remat_policy, known_names=_REMAT_NAMES)
        if policy is not None:
            block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=cfg.depth)(cfg)
        else:
            self.blocks = [block(cfg) for _ in range(cfg.depth)]
        self.norm = RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, "lm_head")

    def trunk(self, tokens, positions=None, segment_ids=None, cache=None, cache_pos=None, tree_mask=None):
        """tokens [B, T] -> (hidden [B, T, dim], cache). ``cache``: per-layer arrays stacked on a
        leading depth axis (see ``research.lm.cache``); ``cache_pos = (lengths, num_new)``: the
        committed lengths [B] before this call and how many of the T new tokens each row keeps."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        if self.cfg.scan_layers:
            x, cache = self.blocks(x, cache, positions, segment_ids, cache_pos, tree_mask)
        else:
            new = []
            for i, blk in enumerate(self.blocks):
                layer = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
                x, layer = blk(x, layer, positions, segment_ids, cache_pos, tree_mask)
                new.append(layer)
            cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
        return self.norm(x), cache

    def head(self, hidden):
        out_dtype = self.cfg.logits_dtype
        if self.cfg.tie_embeddings:
            return self.embed.attend(hidden).astype(out_dtype)
        return self.lm_head(hidden).astype(out_dtype)

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.head(self.trunk(tokens, positions, segment_ids)[0])


def _check_tokens(cfg: LMConfig, tokens):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} > LMConfig.max_len={cfg.max_len}")


def init_params(cfg: LMConfig, key) -> Any:
    """Initial parameters (the ``params`` collection) for ``cfg``."""
    tokens = jnp.zeros((1, min(cfg.max_len, 8)), jnp.int32)
    return Transformer(cfg).init(key, tokens)["params"]


def trunk(params, cfg: LMConfig, tokens, *, positions=None, segment_ids=None):
    """Hidden states [B, T, dim] (after the final norm) of the full causal forward."""
    _check_tokens(cfg, tokens)
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids,
                                  method=Transformer.trunk)[0]


def head(params, cfg: LMConfig, hidden):
    """Vocabulary logits [..., vocab] (float32; float64 for float64 configs) of hidden states."""
    return Transformer(cfg).apply({"params": params}, hidden, method=Transformer.head)


def apply_logits(params, cfg: LMConfig, tokens, *, positions=None, segment_ids=None):
    """Full causal forward: tokens [B, T] -> logits [B, T, vocab]. ``positions`` default
    ``arange(T)``; ``segment_ids`` [B, T] keep packed documents apart (0 = padding)."""
    _check_tokens(cfg, tokens)
    return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids)


def lm_loss(params, cfg: LMConfig, batch):
    """Next-token NLL (nats/token) over real targets of a batch {"tokens", "positions",
    "segment_ids"} ([B, T] int): ``(mean, {"real_tokens", "nll_sum"})``. Targets never cross a
    document boundary and padding is masked (``research.data.packing.next_token_targets``), so
    a packed row gives each document the loss it has alone."""
    seg = batch["segment_ids"]
    logits = apply_logits(params, cfg, batch["tokens"], positions=batch.get("positions"),
                          segment_ids=None if cfg.attention == "linear" else seg)
    targets, mask = next_token_targets(batch["tokens"], seg)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return masked_mean(nll, mask), {"real_tokens": jnp.sum(mask), "nll_sum": jnp.sum(nll * mask)}


def num_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
