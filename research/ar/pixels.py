"""Class-conditional autoregressive models over grids of discrete tokens, on the LM stack.

A grid of ``height x width`` tokens with ``num_levels`` values each (the 17 intensity levels of the
8x8 digits, or the ``K`` codes of a VQ autoencoder's ``hh x ww`` code map) is read in raster order
and modelled by the decoder-only Transformer of :mod:`research.lm`::

    p(t_0, ..., t_{L-1} | y) = prod_i p(t_i | y, t_0, ..., t_{i-1}),     L = height * width

The vocabulary is the ``num_levels`` token values followed by ``num_classes`` class tokens (id
``num_levels + y``); the input row is ``[class_token(y), t_0, ..., t_{L-2}]`` (``L`` positions, so
``LMConfig.max_len = L``) and position ``i``'s logits give ``p(t_i | ...)``. Every conditional is a
softmax over the ``num_levels`` token logits only (the class-token logits are dropped), so the
model is a proper distribution over grids and its NLL is an exact discrete likelihood: bits per
token = mean NLL / ln 2 (bits/dim for pixels).

Sampling (:func:`sample`) is ancestral with the KV cache: ``L`` cached one-token steps (the class
token, then each drawn token) in one jitted ``lax.scan``; step ``i`` draws with
``fold_in(key, i)`` through :func:`research.lm.decode.sample_logits` (temperature, top-k) on the
token logits, so a class token is never emitted.

    grid = TokenGrid(8, 8, num_levels=17, num_classes=10)
    cfg = make_lm_config(grid, dim=96, depth=3, num_heads=4)
    params = research.lm.init_params(cfg, key)
    loss, aux = nll_loss(params, cfg, grid, {"tokens": tokens, "label": labels})
    tokens = sample(params, cfg, grid, labels, key, temperature=1.0)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from research.lm.cache import forward_cached, init_cache
from research.lm.config import LMConfig, default_mlp_hidden
from research.lm.decode import _check_sampling, sample_logits
from research.lm.model import apply_logits, head

__all__ = ["TokenGrid", "make_lm_config", "check_grid_tokens", "check_class_labels", "input_sequence",
           "token_logits", "log_likelihood", "nll_loss", "bits_per_token", "sample"]


def _positive_int(name: str, v) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """The token layout: an ``height x width`` grid of values in ``[0, num_levels)``, conditioned on
    one of ``num_classes`` labels. Hashable (a static argument of ``jax.jit``)."""

    height: int
    width: int
    num_levels: int
    num_classes: int

    def __post_init__(self):
        for name in ("height", "width", "num_levels", "num_classes"):
            _positive_int(f"TokenGrid.{name}", getattr(self, name))

    @property
    def length(self) -> int:
        """Tokens per grid (``height * width``), also the model's sequence length."""
        return self.height * self.width

    @property
    def vocab_size(self) -> int:
        return self.num_levels + self.num_classes


def make_lm_config(grid: TokenGrid, *, dim: int, depth: int, num_heads: int, num_kv_heads: int | None = None,
                   mlp_hidden: int | None = None, rope_theta: float = 10000.0, dtype: str = "float32",
                   attn_impl: str = "xla", init_std: float = 0.02) -> LMConfig:
    """The :class:`LMConfig` of a grid model: vocabulary ``grid.vocab_size``, ``max_len = grid.length``,
    untied embeddings, float32 params (float64 with ``dtype="float64"``), SwiGLU width
    ``default_mlp_hidden(dim)`` unless given."""
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    return LMConfig(vocab_size=grid.vocab_size, dim=dim, depth=depth, num_heads=num_heads,
                    num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
                    mlp_hidden=default_mlp_hidden(dim) if mlp_hidden is None else mlp_hidden,
                    rope_theta=rope_theta, max_len=grid.length, tie_embeddings=False, attn_impl=attn_impl,
                    dtype=dtype, param_dtype="float64" if dtype == "float64" else "float32", init_std=init_std)


def _check_cfg(cfg: LMConfig, grid: TokenGrid) -> None:
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"grid must be a TokenGrid, got {type(grid).__name__}")
    if cfg.vocab_size != grid.vocab_size:
        raise ValueError(f"LMConfig.vocab_size={cfg.vocab_size} but the grid needs num_levels + num_classes = "
                         f"{grid.vocab_size}")
    if cfg.max_len < grid.length:
        raise ValueError(f"LMConfig.max_len={cfg.max_len} < the grid's {grid.length} tokens")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_class_labels(grid: TokenGrid, labels, *, batch: int | None = None):
    """``labels`` as int32 [N]; raises TypeError for non-integers and ValueError for a wrong shape or
    (when concrete) values outside ``[0, num_classes)``."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch):
        want = f"[{batch}]" if batch is not None else "[N]"
        raise ValueError(f"labels must be {want}, got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if _concrete(labels) and labels.size:
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= grid.num_classes:
            raise ValueError(f"labels must be in [0, {grid.num_classes - 1}], got values in [{lo}, {hi}]")
    return labels.astype(jnp.int32)


def check_grid_tokens(grid: TokenGrid, tokens):
    """``tokens`` [N, height, width] as int32; raises TypeError for non-integers and ValueError for a
    wrong shape or (when concrete) values outside ``[0, num_levels)``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[1:] != (grid.height, grid.width):
        raise ValueError(f"tokens must be [N, {grid.height}, {grid.width}], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token values, got dtype {tokens.dtype}")
    if _concrete(tokens) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= grid.num_levels:
            raise ValueError(f"tokens must be in [0, {grid.num_levels - 1}], got values in [{lo}, {hi}]")
    return tokens.astype(jnp.int32)


def input_sequence(grid: TokenGrid, tokens, labels):
    """The model input ``[class_token(y), t_0, ..., t_{L-2}]``: int32 [N, L] (raster order)."""
    tokens = check_grid_tokens(grid, tokens)
    labels = check_class_labels(grid, labels, batch=tokens.shape[0])
    flat = tokens.reshape(tokens.shape[0], grid.length)
    return jnp.concatenate([(grid.num_levels + labels)[:, None], flat[:, :-1]], axis=1)


def token_logits(params, cfg: LMConfig, grid: TokenGrid, tokens, labels):
    """Logits [N, L, num_levels] of every token's conditional ``p(t_i | y, t_<i)`` (full causal forward;
    float32, float64 for float64 configs)."""
    _check_cfg(cfg, grid)
    return apply_logits(params, cfg, input_sequence(grid, tokens, labels))[..., :grid.num_levels]


def log_likelihood(params, cfg: LMConfig, grid: TokenGrid, tokens, labels):
    """Exact ``log p(tokens | labels)`` in nats, [N] (sum over the grid's L tokens)."""
    logp = jax.nn.log_softmax(token_logits(params, cfg, grid, tokens, labels), axis=-1)
    flat = jnp.asarray(tokens).reshape(logp.shape[0], grid.length).astype(jnp.int32)
    return jnp.sum(jnp.take_along_axis(logp, flat[..., None], -1)[..., 0], axis=-1)


def nll_loss(params, cfg: LMConfig, grid: TokenGrid, batch, *, label_key: str = "label"):
    """Mean NLL per token (nats) of ``batch = {"tokens": [B, h, w], label_key: [B]}``:
    ``(loss, {"bits_per_token": loss / ln 2})``."""
    loss = -jnp.mean(log_likelihood(params, cfg, grid, batch["tokens"], batch[label_key])) / grid.length
    return loss, {"bits_per_token": loss / math.log(2.0)}


def bits_per_token(log_p_nats, num_tokens: int):
    """Exact bits per token of discrete data from ``log p`` per example (nats): ``-log p / (L ln 2)``."""
    _positive_int("num_tokens", num_tokens)
    return -jnp.asarray(log_p_nats) / (num_tokens * math.log(2.0))


@functools.partial(jax.jit, static_argnames=("cfg", "grid", "temperature", "top_k", "return_logits"))
def _sample(params, cfg, grid, labels, key, *, temperature, top_k, return_logits):
    n = labels.shape[0]
    cache = init_cache(cfg, n, grid.length)

    def step(carry, i):
        cache, tok = carry
        hidden, cache = forward_cached(params, cfg, tok[:, None], cache)
        logits = head(params, cfg, hidden[:, 0])[:, :grid.num_levels]
        nxt = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k)
        return (cache, nxt), ((nxt, logits) if return_logits else nxt)

    _, out = jax.lax.scan(step, (cache, grid.num_levels + labels), jnp.arange(grid.length))
    toks = (out[0] if return_logits else out).T.reshape(n, grid.height, grid.width)
    if return_logits:
        return toks, jnp.swapaxes(out[1], 0, 1)
    return toks


def sample(params, cfg: LMConfig, grid: TokenGrid, labels, key, *, temperature: float = 1.0, top_k=None,
           return_logits: bool = False):
    """Ancestral samples ``tokens`` int32 [N, height, width] given ``labels`` [N] (module docstring):
    ``grid.length`` cached steps (network calls) per sample. ``temperature == 0`` is greedy; ``top_k``
    keeps the k most likely values. With ``return_logits`` also the logits [N, L, num_levels] each
    step drew from (before temperature / top-k)."""
    _check_cfg(cfg, grid)
    if cfg.attention != "softmax":
        raise ValueError("grid sampling uses the KV cache: LMConfig.attention must be 'softmax'")
    labels = check_class_labels(grid, labels)
    _check_sampling(temperature, top_k, None)
    return _sample(params, cfg, grid, labels, key, temperature=float(temperature), top_k=top_k,
                   return_logits=bool(return_logits))
