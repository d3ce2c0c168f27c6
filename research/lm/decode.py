"""Autoregressive generation: prefill and decode in one jitted ``lax.while_loop``.

``generate(params, cfg, prompt_tokens [B, P], prompt_lengths [B], *, max_new_tokens, key,
temperature=0.0, top_k=None, top_p=None, stop_tokens=(), pad_id=0) -> tokens [B, P + max_new_tokens]``

* Prompts are right-padded: row ``b``'s prompt is ``prompt_tokens[b, :prompt_lengths[b]]``
  (ragged lengths in one batch). The output row holds the prompt, then the generated tokens
  from column ``prompt_lengths[b]`` on, then ``pad_id``.
* Prefill writes all ``P`` prompt columns into the KV cache in one forward pass and sets each
  row's length to its prompt length (the padding columns are stale entries, ignored and later
  overwritten); the first new token comes from the logits at column ``prompt_lengths[b] - 1``.
  Each decode step then feeds one token per row. All of it is one XLA program.
* Sampling (:func:`sample_logits`): ``temperature == 0`` is greedy (argmax); otherwise
  softmax(logits / temperature) restricted to the ``top_k`` largest logits and/or the smallest
  set of tokens whose probability reaches ``top_p`` (nucleus). Step ``i`` draws with
  ``jax.random.fold_in(key, i)``, so results depend only on ``key``. :func:`filtered_probs`
  returns that processed distribution as probabilities (speculative decoding needs it).
* ``stop_tokens``: a row that emits one of them (it is written) stops; the loop ends when every
  row has stopped or produced ``max_new_tokens``.

Works for softmax attention (KV cache) and ``attention="linear"`` (recurrent state).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research.lm.cache import forward_cached, init_cache
from research.lm.config import LMConfig
from research.lm.model import head

__all__ = ["generate", "generate_with_lengths", "sample_logits", "filtered_probs"]


def _check_sampling(temperature, top_k, top_p):
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _filtered_logits(logits, temperature, top_k, top_p, dtype):
    """``logits / temperature`` in ``dtype`` with the tokens outside the top-k / top-p sets at the
    dtype's minimum (temperature > 0); any leading shape, vocabulary last."""
    logits = logits.astype(dtype) / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1:
        shape = logits.shape
        logits = logits.reshape(-1, shape[-1])
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), axis=-1)
        # keep a token if the probability mass strictly before it is < top_p (the top token always)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg).reshape(shape)
    return logits


def filtered_probs(logits, temperature=0.0, top_k=None, top_p=None):
    """The distribution :func:`sample_logits` draws from, as probabilities [..., V].

    ``temperature == 0``: the one-hot of the argmax; otherwise softmax(logits / temperature)
    restricted to the top-k / top-p sets (exact zeros outside) and renormalised. Float32, or
    float64 for float64 logits. Speculative decoding applies it identically to draft and target.
    """
    _check_sampling(temperature, top_k, top_p)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=dtype)
    return jax.nn.softmax(_filtered_logits(logits, temperature, top_k, top_p, dtype), axis=-1)


def sample_logits(logits, key, *, temperature=0.0, top_k=None, top_p=None):
    """One token per row from logits [B, V] (see the module docstring); returns int32 [B]."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filtered_logits(logits, temperature, top_k, top_p, jnp.float32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_prompt(cfg, prompt_tokens, prompt_lengths, max_new_tokens):
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, P], got shape {prompt_tokens.shape}")
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must be integer ids, got dtype {prompt_tokens.dtype}")
    if prompt_lengths.shape != prompt_tokens.shape[:1]:
        raise ValueError(f"prompt_lengths must be [{prompt_tokens.shape[0]}], got shape {prompt_lengths.shape}")
    if not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
        raise TypeError(f"prompt_lengths must be integers, got dtype {prompt_lengths.dtype}")
    if not isinstance(prompt_lengths, jax.core.Tracer):  # concrete: check the range here
        lo, hi = int(jnp.min(prompt_lengths)), int(jnp.max(prompt_lengths))
        if lo < 1 or hi > prompt_tokens.shape[1]:
            raise ValueError(f"prompt_lengths must be in [1, {prompt_tokens.shape[1]}] (the prompt columns), "
                             f"got values in [{lo}, {hi}]")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    total = prompt_tokens.shape[1] + max_new_tokens
    if total > cfg.max_len:
        raise ValueError(f"prompt columns ({prompt_tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
                         f"{total} > LMConfig.max_len={cfg.max_len}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id"))
def _generate(params, cfg, prompt_tokens, prompt_lengths, key, *, max_new_tokens, temperature, top_k, top_p,
              stop_tokens, pad_id):
    b, p = prompt_tokens.shape
    total = p + max_new_tokens
    lengths0 = jnp.clip(prompt_lengths.astype(jnp.int32), 1, p)
    rows = jnp.arange(b)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    cache = init_cache(cfg, b, total)
    hidden, cache = forward_cached(params, cfg, prompt_tokens.astype(jnp.int32), cache, num_new=lengths0)
    last = head(params, cfg, hidden[rows, lengths0 - 1])        # [B, V]
    # (a KVCache now holds the padding columns too, as stale entries past each row's length)
    col = jnp.arange(total)[None, :]
    out = jnp.where(col < lengths0[:, None], jnp.pad(prompt_tokens.astype(jnp.int32), ((0, 0), (0, max_new_tokens))),
                    pad_id)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def emit(out, count, tok, done):
        # row b's n-th new token goes to column lengths0[b] + n; rows that have stopped are left alone
        out = out.at[rows, lengths0 + count].set(jnp.where(done, out[rows, lengths0 + count], tok))
        return out, count + (~done).astype(jnp.int32), done | jnp.isin(tok, stops)

    tok = sample(last, jax.random.fold_in(key, 0))
    out, count, done = emit(out, jnp.zeros((b,), jnp.int32), tok, jnp.zeros((b,), bool))

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, count, tok, done = carry
        hidden, cache = forward_cached(params, cfg, tok[:, None], cache, num_new=(~done).astype(jnp.int32))
        nxt = sample(head(params, cfg, hidden[:, 0]), jax.random.fold_in(key, i))
        out, count, done = emit(out, count, nxt, done)
        return i + 1, cache, out, count, nxt, done

    carry = (jnp.int32(1), cache, out, count, tok, done)
    _, _, out, count, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, count


def generate_with_lengths(params, cfg: LMConfig, prompt_tokens, prompt_lengths, *, max_new_tokens: int, key,
                          temperature: float = 0.0, top_k=None, top_p=None, stop_tokens=(), pad_id: int = 0):
    """``(tokens, num_generated [B])``: :func:`generate` plus how many tokens each row produced
    (a stop token included)."""
    prompt_tokens, prompt_lengths = jnp.asarray(prompt_tokens), jnp.asarray(prompt_lengths)
    _check_prompt(cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    return _generate(params, cfg, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k, top_p=top_p,
                     stop_tokens=tuple(int(s) for s in stop_tokens), pad_id=int(pad_id))


def generate(params, cfg: LMConfig, prompt_tokens, prompt_lengths, *, max_new_tokens: int, key,
             temperature: float = 0.0, top_k=None, top_p=None, stop_tokens=(), pad_id: int = 0):
    """Prompt continuation; returns tokens [B, P + max_new_tokens] (see the module docstring)."""
    return generate_with_lengths(params, cfg, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                                 key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop_tokens=stop_tokens, pad_id=pad_id)[0]
