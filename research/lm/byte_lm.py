"""ByteLM: a small byte-level causal transformer over packed rows (the seed of ``research.lm``).

``ByteLM(width, depth, heads, max_len)`` maps tokens [B, T] (bytes, vocabulary 256), positions
[B, T] (restarting at 0 per packed document) and segment_ids [B, T] (attention stays inside equal
ids; 0 = padding) to logits [B, T, 256]. ``byte_lm_loss`` is the token-weighted next-token NLL over
real (same-document) targets, so packed and padded rows optimise the same objective.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.data.packing import masked_mean, next_token_targets
from research.nn.attention import attention


class Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, segment_ids):
        b, t, d = x.shape
        h = nn.RMSNorm()(x)
        qkv = nn.Dense(3 * d, use_bias=False)(h).reshape(b, t, 3, self.heads, d // self.heads)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, segment_ids=segment_ids)
        x = x + nn.Dense(d, use_bias=False)(o.reshape(b, t, d))
        h = nn.gelu(nn.Dense(4 * d)(nn.RMSNorm()(x)))
        return x + nn.Dense(d)(h)


class ByteLM(nn.Module):
    """tokens [B, T] int, positions [B, T], segment_ids [B, T] -> logits [B, T, 256]."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 128

    @nn.compact
    def __call__(self, tokens, positions, segment_ids):
        x = nn.Embed(256, self.width)(tokens) + nn.Embed(self.max_len, self.width, name="pos_embedding")(positions)
        for _ in range(self.depth):
            x = Block(self.width, self.heads)(x, segment_ids)
        return nn.Dense(256)(nn.RMSNorm()(x))


def byte_lm_loss(model: ByteLM, params, batch):
    """(mean next-token NLL in nats over real targets, {"real_tokens": count}) for a packed batch
    {"tokens", "positions", "segment_ids"} of [B, T] int arrays."""
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, mask = next_token_targets(batch["tokens"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return masked_mean(nll, mask), {"real_tokens": jnp.sum(mask)}
