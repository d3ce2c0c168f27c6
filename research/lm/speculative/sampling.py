"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): exact, batched, one jitted loop.

A small *draft* model proposes ``gamma`` tokens autoregressively; the *target* model scores all
of them in one forward pass; a rejection rule keeps a prefix of the drafts and adds one more
token, so every target forward yields between 1 and ``gamma + 1`` tokens, and the emitted
stream has exactly the target's law (the same law as ``research.lm.decode.generate`` with the
same temperature / top-k / top-p).

**The rule** (:func:`verify`). With draft tokens ``x_0..x_{g-1}``, the draft's distributions
``q_i`` (the one each ``x_i`` was drawn from) and the target's ``p_0..p_g`` (``p_i`` given the
context and ``x_<i``): for ``i = 0, 1, ...`` accept ``x_i`` with probability
:func:`acceptance_probs` ``= min(1, p_i(x_i) / q_i(x_i))`` and stop at the first rejection. On a
rejection at ``i`` the next token is drawn from :func:`residual` ``(p_i, q_i) = norm(max(0, p_i -
q_i))``; if all ``g`` drafts are accepted it is drawn from ``p_g`` (the "bonus" token, which is
``residual(p_g, 0)``). Edge cases: ``q_i(x) = 0`` accepts iff ``p_i(x) > 0`` (the limit of the
ratio; a draft sampled from ``q_i`` never has ``q_i(x) = 0``); when ``p_i <= q_i`` everywhere
(``p == q``) the residual is empty, but then every draft is accepted with probability 1 and the
residual is never drawn from; :func:`residual` returns ``p_i`` there so nothing is ever NaN.
Disjoint supports give acceptance 0 and residual ``p_i``. Greedy decoding
(:func:`verify_greedy`) accepts while the draft equals the target's argmax.

**The loop** (:func:`speculative_generate`), per row ``b`` with ``n_b`` committed tokens
(prompt + generated, stored in ``out[b, :n_b]``; the last one is ``out[b, n_b - 1]``). At the
top of each round:

* the **target cache** holds exactly the first ``n_b - 1`` committed tokens (all but the last);
* the **draft cache** holds the first ``n_b - 1`` committed tokens, or ``n_b - 2`` when all
  drafts of the previous round were accepted (the draft never ran on its own last draft).

A round: (1) the draft runs on the committed tokens it lacks (1 or 2 per row, ragged
``num_new``) and then on its own samples, producing ``x_0..x_{g-1}`` and ``q_0..q_{g-1}``
(``g`` draft forwards); (2) the target runs once on ``[out[n_b - 1], x_0, ..., x_{g-1}]``
(``T = g + 1``), giving ``p_0..p_g``; (3) :func:`verify` accepts ``k_b`` drafts and returns the
next token; ``out`` gets ``x_0..x_{k_b - 1}`` and the next token, ``n_b += k_b + 1``; (4) both
caches are rolled back (``KVCache.rollback``: only the lengths move, nothing is copied) to
``n_b - 1``; the target always has those entries, the draft has ``min(n_b - 1, its length)``,
which restores the invariants. A row whose ``n_b`` reaches ``prompt_length + max_new_tokens``
is finished: it writes nothing more, keeps its tokens, and its caches are rolled back to 0 so
the padding work of the remaining rounds stays inside the cache. Tokens accepted past
``max_new_tokens`` are dropped. The loop ends when every row is finished.

Randomness: round ``r`` uses ``fold_in(key, r)``, split into ``gamma`` draft keys and one
verification key, so results depend only on ``key``. Both caches have ``P + max_new_tokens +
gamma - 1`` positions (the drafts in flight), which must fit both configs' ``max_len``.

**Stats** (arrays returned next to the tokens; :func:`summarize_stats` turns them into numbers):
``target_forwards`` (rounds = target forward passes after the prefill), ``row_rounds [B]`` (rounds
in which the row was active), ``row_emitted [B]`` (tokens the rule produced for the row, ``k + 1``
per round, bonus included, counting those dropped past ``max_new_tokens``), ``accepted [g]`` and
``reached [g]`` (over active rows and rounds: how often draft ``i`` was accepted, and how often it
was tested, i.e. drafts ``0..i-1`` were accepted). ``alpha_i = accepted[i] / reached[i]`` and
``tau = sum(row_emitted) / sum(row_rounds)`` (mean tokens per target forward).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from research.lm.cache import forward_cached, init_cache
from research.lm.config import LMConfig
from research.lm.decode import _check_prompt, _check_sampling, filtered_probs
from research.lm.model import head

__all__ = ["acceptance_probs", "residual", "verify", "verify_greedy", "speculative_generate",
           "summarize_stats"]


def acceptance_probs(p, q, x):
    """``min(1, p(x) / q(x))`` for distributions p, q [..., V] and tokens x [...]; 1 where
    ``q(x) = 0 < p(x)``, 0 where ``p(x) = 0``."""
    px = jnp.take_along_axis(p, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
    qx = jnp.take_along_axis(q, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ratio = px / jnp.where(qx > 0, qx, 1)
    return jnp.where(qx > 0, jnp.minimum(ratio, 1), (px > 0).astype(p.dtype))


def residual(p, q):
    """``norm(max(0, p - q))`` over the last axis; ``p`` (normalised) where that is empty (p <= q
    everywhere, e.g. ``p == q``: a case the rule reaches with probability 0)."""
    r = jnp.maximum(p - q, 0)
    s = jnp.sum(r, axis=-1, keepdims=True)
    ok = s > jnp.finfo(r.dtype).tiny
    ps = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.where(ok, r / jnp.where(ok, s, 1), p / jnp.where(ps > 0, ps, 1))


def _categorical(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _verify(draft_tokens, draft_probs, target_probs, key, residual_fn=residual):
    b, g = draft_tokens.shape
    key_accept, key_next = jax.random.split(key)
    a = acceptance_probs(target_probs[:, :g], draft_probs, draft_tokens)      # [B, g]
    u = jax.random.uniform(key_accept, (b, g), dtype=a.dtype)                 # in [0, 1)
    num_accepted = jnp.sum(jnp.cumprod(u < a, axis=1), axis=1).astype(jnp.int32)
    rows = jnp.arange(b)
    p_n = target_probs[rows, num_accepted]
    # q at position g is 0, so the "residual" after g acceptances is the bonus distribution p_g
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    next_token = _categorical(key_next, residual_fn(p_n, q_pad[rows, num_accepted]))
    return num_accepted, next_token


@jax.jit
def verify(draft_tokens, draft_probs, target_probs, key):
    """The speculative-sampling rule (module docstring), batched.

    Args:
      draft_tokens: [B, g] int, ``x_i`` drawn from ``draft_probs[:, i]``.
      draft_probs: [B, g, V], the draft distributions ``q_i``.
      target_probs: [B, g + 1, V], the target distributions ``p_i`` (``p_g``: after all drafts).
      key: PRNG key.

    Returns:
      ``(num_accepted [B] int32 in [0, g], next_token [B] int32)``: the row emits
      ``draft_tokens[b, :num_accepted[b]]`` then ``next_token[b]``.
    """
    if draft_tokens.ndim != 2 or draft_probs.ndim != 3 or target_probs.ndim != 3:
        raise ValueError(f"verify needs draft_tokens [B, g], draft_probs [B, g, V], target_probs [B, g+1, V]; "
                         f"got {draft_tokens.shape}, {draft_probs.shape}, {target_probs.shape}")
    b, g = draft_tokens.shape
    v = draft_probs.shape[-1]
    if draft_probs.shape != (b, g, v) or target_probs.shape != (b, g + 1, v):
        raise ValueError(f"verify: draft_probs must be [{b}, {g}, V] and target_probs [{b}, {g + 1}, V] "
                         f"(same V), got {draft_probs.shape} and {target_probs.shape}")
    return _verify(draft_tokens, draft_probs, target_probs, key)


def verify_greedy(draft_tokens, target_logits):
    """Greedy verification: accept while ``draft_tokens[:, i] == argmax(target_logits[:, i])``;
    the next token is the target's argmax at the first mismatch (or the bonus position ``g``).
    draft_tokens [B, g], target_logits [B, g + 1, V] -> ``(num_accepted [B], next_token [B])``."""
    b, g = draft_tokens.shape
    if target_logits.shape[:2] != (b, g + 1):
        raise ValueError(f"verify_greedy: target_logits must be [{b}, {g + 1}, V], got {target_logits.shape}")
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)              # [B, g + 1]
    num_accepted = jnp.sum(jnp.cumprod(draft_tokens == best[:, :g], axis=1), axis=1).astype(jnp.int32)
    return num_accepted, best[jnp.arange(b), num_accepted]


@functools.partial(jax.jit, static_argnames=("target_cfg", "draft_cfg", "max_new_tokens", "gamma", "temperature",
                                             "top_k", "top_p", "stop_tokens", "pad_id"))
def _speculative(target_params, target_cfg, draft_params, draft_cfg, prompt_tokens, prompt_lengths, key, *,
                 max_new_tokens, gamma, temperature, top_k, top_p, stop_tokens, pad_id):
    b, p = prompt_tokens.shape
    total = p + max_new_tokens
    capacity = total + gamma - 1
    rows = jnp.arange(b)
    greedy = temperature == 0
    probs = functools.partial(filtered_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    lengths0 = jnp.clip(prompt_lengths.astype(jnp.int32), 1, p)
    end0 = lengths0 + max_new_tokens                   # a row is finished once n >= end
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    prompt = prompt_tokens.astype(jnp.int32)
    col = jnp.arange(total)[None, :]
    out = jnp.where(col < lengths0[:, None], jnp.pad(prompt, ((0, 0), (0, max_new_tokens))), pad_id)

    # Prefill: both caches get all prompt tokens but the last (the round feeds it), so n = lengths0.
    tcache = init_cache(target_cfg, b, capacity)
    dcache = init_cache(draft_cfg, b, capacity)
    _, tcache = forward_cached(target_params, target_cfg, prompt, tcache, num_new=lengths0 - 1)
    _, dcache = forward_cached(draft_params, draft_cfg, prompt, dcache, num_new=lengths0 - 1)

    def draw(logits, k):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        q = probs(logits)
        return _categorical(k, q), q

    def cond(carry):
        i, _, _, _, n, end, _ = carry
        return (i < max_new_tokens) & jnp.any(n < end)

    def body(carry):
        # At the top: out[:, :n] committed; tcache.lengths == n - 1; dcache.lengths in {n - 2, n - 1}
        # (finished rows: n >= end and both lengths 0).
        i, tcache, dcache, out, n, end, stats = carry
        active = n < end
        keys = jax.random.split(jax.random.fold_in(key, i), gamma + 1)
        # (1) draft: catch up on the 1 or 2 committed tokens it lacks, then run on its own samples
        d = dcache.lengths
        catch_up = jnp.where(active, n - d, 0)
        first = out[rows[:, None], jnp.clip(d[:, None] + jnp.arange(2), 0, total - 1)]   # [B, 2]
        hidden, dcache = forward_cached(draft_params, draft_cfg, first, dcache, num_new=catch_up)
        tok0, q0 = draw(head(draft_params, draft_cfg, hidden[rows, jnp.maximum(catch_up - 1, 0)]), keys[0])

        def draft_step(c, k):
            dc, tok = c
            h, dc = forward_cached(draft_params, draft_cfg, tok[:, None], dc, num_new=active.astype(jnp.int32))
            tok, q = draw(head(draft_params, draft_cfg, h[:, 0]), k)
            return (dc, tok), (tok, q)

        (dcache, _), (toks, qs) = jax.lax.scan(draft_step, (dcache, tok0), keys[1:gamma])
        drafts = jnp.concatenate([tok0[:, None], toks.T], axis=1)                 # [B, gamma]
        # (2) target: one forward on [last committed, drafts]
        last = out[rows, jnp.clip(n - 1, 0, total - 1)]
        hidden, tcache = forward_cached(target_params, target_cfg, jnp.concatenate([last[:, None], drafts], 1),
                                        tcache, num_new=jnp.where(active, gamma + 1, 0))
        tlogits = head(target_params, target_cfg, hidden)                          # [B, gamma + 1, V]
        # (3) verify
        if greedy:
            k_acc, nxt = verify_greedy(drafts, tlogits)
        else:
            q = jnp.concatenate([q0[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)    # [B, gamma, V]
            k_acc, nxt = _verify(drafts, q, probs(tlogits), keys[gamma])
        # (4) commit drafts[:k] and the next token at columns n.., within each row's budget
        j = jnp.arange(gamma + 1)[None, :]
        vals = jnp.where(j < k_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
        write = active[:, None] & (j <= k_acc[:, None]) & (n[:, None] + j < end[:, None])
        is_stop = write & jnp.isin(vals, stops)                    # a stop token ends the row (it is written)
        first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), gamma + 1)
        write = write & (j <= first_stop[:, None])
        out = out.at[rows[:, None], jnp.where(write, n[:, None] + j, total)].set(vals, mode="drop")
        n = jnp.where(active, n + jnp.minimum(k_acc, first_stop) + 1, n)
        end = jnp.where(active & (first_stop <= gamma), jnp.minimum(n, end), end)
        # (5) roll back (lengths only): n - 1 committed entries; finished rows to 0
        keep = jnp.where(n < end, n - 1, 0)
        tcache, dcache = tcache.rollback(keep), dcache.rollback(keep)
        pos = jnp.arange(gamma)[None, :]
        stats = dict(target_forwards=stats["target_forwards"] + 1,
                     row_rounds=stats["row_rounds"] + active,
                     row_emitted=stats["row_emitted"] + jnp.where(active, k_acc + 1, 0),
                     accepted=stats["accepted"] + jnp.sum(active[:, None] & (k_acc[:, None] > pos), 0, dtype=jnp.int32),
                     reached=stats["reached"] + jnp.sum(active[:, None] & (k_acc[:, None] >= pos), 0, dtype=jnp.int32))
        return i + 1, tcache, dcache, out, n, end, stats

    zeros_b, zeros_g = jnp.zeros((b,), jnp.int32), jnp.zeros((gamma,), jnp.int32)
    stats = dict(target_forwards=jnp.int32(0), row_rounds=zeros_b, row_emitted=zeros_b, accepted=zeros_g,
                 reached=zeros_g)
    carry = (jnp.int32(0), tcache, dcache, out, lengths0, end0, stats)
    _, _, _, out, n, _, stats = jax.lax.while_loop(cond, body, carry)
    return out, dict(stats, num_generated=n - lengths0)


def speculative_generate(target_params, target_cfg: LMConfig, draft_params, draft_cfg: LMConfig, prompt_tokens,
                         prompt_lengths, *, max_new_tokens: int, gamma: int, key, temperature: float = 0.0,
                         top_k=None, top_p=None, stop_tokens=(), pad_id: int = 0):
    """Prompt continuation by the target model, accelerated by the draft (module docstring).

    Same prompt and output conventions as ``research.lm.decode.generate`` (right-padded ragged
    prompts, tokens [B, P + max_new_tokens], ``pad_id`` after each row's ``max_new_tokens``);
    the output has the target's law under the given temperature / top-k / top-p, which are
    applied identically to draft and target (``temperature == 0``: greedy, token-for-token the
    target's greedy continuation). ``gamma``: drafts per round. Both models must share the
    vocabulary and use softmax attention (a KV cache; linear-attention states cannot roll back).

    ``stop_tokens``: as in ``generate``, a row that emits one (it is written) stops, ``pad_id``
    after it. Returns ``(tokens, stats)``; ``stats`` is a dict of arrays described in the module
    docstring, plus ``num_generated [B]`` (each row's new tokens).
    """
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(f"target and draft must share the vocabulary: vocab_size {target_cfg.vocab_size} vs "
                         f"{draft_cfg.vocab_size}")
    for name, cfg in (("target", target_cfg), ("draft", draft_cfg)):
        if cfg.attention != "softmax":
            raise ValueError(f"speculative decoding rolls KV caches back; the {name} model has "
                             f"attention={cfg.attention!r} (needs 'softmax')")
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma <= 0:
        raise ValueError(f"gamma must be a positive int, got {gamma!r}")
    prompt_tokens, prompt_lengths = jnp.asarray(prompt_tokens), jnp.asarray(prompt_lengths)
    _check_sampling(temperature, top_k, top_p)
    for name, cfg in (("target", target_cfg), ("draft", draft_cfg)):
        _check_prompt(cfg, prompt_tokens, prompt_lengths, max_new_tokens)
        need = prompt_tokens.shape[1] + max_new_tokens + gamma - 1
        if need > cfg.max_len:
            raise ValueError(f"prompt columns + max_new_tokens + gamma - 1 = {need} cache positions (drafts in "
                             f"flight) > the {name}'s LMConfig.max_len={cfg.max_len}")
    return _speculative(target_params, target_cfg, draft_params, draft_cfg, prompt_tokens, prompt_lengths, key,
                        max_new_tokens=max_new_tokens, gamma=gamma, temperature=float(temperature), top_k=top_k,
                        top_p=top_p, stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))


def summarize_stats(stats) -> dict:
    """Host-side numbers from ``speculative_generate``'s stats: ``tau`` (mean tokens per target
    forward, bonus included), ``alpha`` (per-position acceptance rates, NaN if never tested),
    ``acceptance`` (all accepted drafts over all tested ones), ``target_forwards``."""
    s = {k: np.asarray(v) for k, v in stats.items()}
    reached = s["reached"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(reached > 0, s["accepted"] / reached, np.nan)
    return dict(tau=float(s["row_emitted"].sum() / max(int(s["row_rounds"].sum()), 1)), alpha=alpha.tolist(),
                acceptance=float(s["accepted"].sum() / max(reached.sum(), 1.0)),
                target_forwards=int(s["target_forwards"]))
