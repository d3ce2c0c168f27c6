"""Tree speculative decoding in one jitted loop, over a pluggable drafter.

:func:`tree_generate` is the loop shared by Medusa, EAGLE-style heads and DeepSeek MTP (and a
chain ``Tree`` makes it plain speculative sampling). Per row ``b`` with ``n_b`` committed
tokens (``out[b, :n_b]``), at the top of a round the **target cache** holds the first
``n_b - 1`` of them. A round:

1. the drafter proposes a tree (``tokens [B, N+1]``, node 0 = the last committed token, and the
   draft laws ``q [B, N+1, V]`` the tokens were drawn from; none under greedy decoding);
2. the target runs once on all ``N + 1`` nodes with tree attention (``tree.mask()``; node ``i``
   at RoPE position ``n_b - 1 + depth[i]``), written at cache positions ``n_b - 1 + i``;
3. a rule of :mod:`research.lm.speculative.tree` picks the accepted path (``k_b`` drafts) and the
   next token; ``out`` gets the ``k_b`` path tokens and the next token;
4. the accepted nodes' K/V entries (at most ``max_depth`` per layer) move to positions
   ``n_b - 1 + 1..k_b`` (one gather-scatter in place; the cache is never copied whole), and the
   cache is **rolled back by length** to ``n_b + k_b``: the rejected branches stay behind as stale
   entries, overwritten next round;
5. the drafter is told the accepted path, the target's hidden states along it and the next token
   (``Drafter.commit``) so it can catch up.

Rows finish independently (ragged acceptance, or a stop token among the committed tokens: the
tokens after it are dropped); a finished row writes nothing and its cache is rolled back to 0. Round ``r`` uses ``fold_in(key, r)``. Stats are those of
``research.lm.speculative.speculative_generate`` with ``accepted``/``reached`` per depth.

**Drafter protocol** (a frozen, hashable dataclass: it is a static argument; its parameters
travel separately as ``drafter_params``):

* ``init_state(params, target_params, target_cfg, prompt [B, P], lengths [B], prefill_hidden
  [B, P, dim], capacity) -> state``: ``prefill_hidden[:, i]`` is the target's trunk output at
  prompt position ``i`` (valid for ``i < lengths - 1``: the prefill runs on all prompt tokens but
  the last);
* ``draft(params, target_params, target_cfg, state, tree, root [B], n [B], active [B], key,
  probs_fn) -> (tokens [B, N+1], q [B, N+1, V] | None, state)``: ``probs_fn`` maps logits to the
  sampling law (temperature / top-k / top-p) or is ``None`` for greedy decoding, where ``q`` is
  ignored. Children of a node must be drawn without replacement from ``q`` (or be
  deterministic, with one-hot ``q``) for the multi-draft rule to be exact;
* ``commit(params, target_params, target_cfg, state, tree, path_tokens [B, D+2], path_hidden
  [B, D+1, dim], num_accepted [B], n [B], active [B]) -> state``: ``path_tokens[:, :k+1]`` are
  the root and the accepted drafts, ``path_tokens[:, k+1]`` the next token; ``path_hidden[:, j]``
  the target's trunk output at path node ``j`` (position ``n - 1 + j``, ``j <= k``); ``n`` is the
  committed count before the round.

A drafter should roll its own caches back for inactive rows (``active`` false) as the loop does
for the target's: a finished row may have accepted past its budget, and a cache that keeps
growing for it could outrun its capacity.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research.lm.cache import forward_cached, init_cache
from research.lm.config import LMConfig
from research.lm.decode import _check_prompt, _check_sampling, filtered_probs
from research.lm.model import head
from research.lm.speculative.tree import Tree, verify_tree, verify_tree_greedy, verify_tree_typical

__all__ = ["tree_generate", "ACCEPTANCE_RULES"]

ACCEPTANCE_RULES = ("exact", "typical")


def _compact(cache, start, path, num):
    """Moves the K/V entries of the accepted path nodes to consecutive positions: node
    ``path[:, j]`` (written at ``start + path[:, j]``) goes to ``start + j`` for ``1 <= j <= num``."""
    b, width = path.shape
    rows = jnp.arange(b)[:, None]
    j = jnp.arange(1, width)[None, :]
    src = start[:, None] + path[:, 1:]
    dst = jnp.where(j <= num[:, None], start[:, None] + j, cache.max_len)     # out of range -> dropped
    k = cache.k.at[:, rows, dst].set(cache.k[:, rows, src], mode="drop")
    v = cache.v.at[:, rows, dst].set(cache.v[:, rows, src], mode="drop")
    return cache.replace(k=k, v=v)


@functools.partial(jax.jit, static_argnames=("target_cfg", "drafter", "tree", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "acceptance", "typical", "stop_tokens", "pad_id"))
def _tree_loop(target_params, target_cfg, drafter, drafter_params, prompt_tokens, prompt_lengths, key, *, tree,
               max_new_tokens, temperature, top_k, top_p, acceptance, typical, stop_tokens, pad_id):
    b, p = prompt_tokens.shape
    nn_ = tree.num_nodes
    depth = tree.max_depth
    total = p + max_new_tokens
    capacity = total + nn_
    rows = jnp.arange(b)
    greedy = temperature == 0
    probs_fn = None if greedy else functools.partial(filtered_probs, temperature=temperature, top_k=top_k,
                                                     top_p=top_p)
    lengths0 = prompt_lengths.astype(jnp.int32)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    prompt = prompt_tokens.astype(jnp.int32)
    col = jnp.arange(total)[None, :]
    out = jnp.where(col < lengths0[:, None], jnp.pad(prompt, ((0, 0), (0, max_new_tokens))), pad_id)

    tcache = init_cache(target_cfg, b, capacity)
    hidden0, tcache = forward_cached(target_params, target_cfg, prompt, tcache, num_new=lengths0 - 1)
    dstate = drafter.init_state(drafter_params, target_params, target_cfg, prompt, lengths0, hidden0, capacity)
    depths = jnp.asarray(tree.depths, jnp.int32)
    mask = jnp.broadcast_to(jnp.asarray(tree.mask()), (b, nn_, nn_))

    def cond(carry):
        i, _, _, _, n, end, _ = carry
        return (i < max_new_tokens) & jnp.any(n < end)

    def body(carry):
        i, tcache, dstate, out, n, end, stats = carry
        active = n < end
        key_d, key_v = jax.random.split(jax.random.fold_in(key, i))
        root = out[rows, jnp.clip(n - 1, 0, total - 1)]
        tokens, q, dstate = drafter.draft(drafter_params, target_params, target_cfg, dstate, tree, root, n, active,
                                          key_d, probs_fn)
        tokens = tokens.at[:, 0].set(root)
        start = tcache.lengths
        hidden, tcache = forward_cached(target_params, target_cfg, tokens, tcache,
                                        num_new=jnp.where(active, nn_, 0),
                                        positions=start[:, None] + depths[None, :], tree_mask=mask)
        logits = head(target_params, target_cfg, hidden)                       # [B, N+1, V]
        if greedy:
            path, k_acc, nxt = verify_tree_greedy(tree, tokens, logits)
        elif acceptance == "typical":
            path, k_acc, nxt = verify_tree_typical(tree, tokens, probs_fn(logits), key_v, epsilon=typical[0],
                                                   delta=typical[1])
        else:
            path, k_acc, nxt = verify_tree(tree, tokens, q, probs_fn(logits), key_v)
        j = jnp.arange(depth + 2)[None, :]
        path_tok = jnp.where(j <= k_acc[:, None], tokens[rows[:, None], jnp.pad(path, ((0, 0), (0, 1)))],
                             nxt[:, None])                                      # [B, D+2]
        path_tok = jnp.where(j <= k_acc[:, None] + 1, path_tok, pad_id)
        path_hidden = hidden[rows[:, None], path]                                # [B, D+1, dim]
        # commit path_tok[1 .. k+1] at columns n.., within each row's budget, up to the first stop token
        write = active[:, None] & (j >= 1) & (j <= k_acc[:, None] + 1) & (n[:, None] + j - 1 < end[:, None])
        is_stop = write & jnp.isin(path_tok, stops)
        first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), depth + 2)
        write = write & (j <= first_stop[:, None])
        out = out.at[rows[:, None], jnp.where(write, n[:, None] + j - 1, total)].set(path_tok, mode="drop")
        dstate = drafter.commit(drafter_params, target_params, target_cfg, dstate, tree, path_tok, path_hidden,
                                k_acc, n, active)
        tcache = _compact(tcache, start, path, jnp.where(active, k_acc, 0))
        n_new = jnp.where(active, n + jnp.minimum(k_acc + 1, first_stop), n)
        end = jnp.where(active & (first_stop <= depth + 1), jnp.minimum(n_new, end), end)   # stopped rows finish
        tcache = tcache.rollback(jnp.where(n_new < end, n_new - 1, 0))
        pos = jnp.arange(depth)[None, :]
        stats = dict(target_forwards=stats["target_forwards"] + 1,
                     row_rounds=stats["row_rounds"] + active,
                     row_emitted=stats["row_emitted"] + jnp.where(active, k_acc + 1, 0),
                     accepted=stats["accepted"] + jnp.sum(active[:, None] & (k_acc[:, None] > pos), 0, dtype=jnp.int32),
                     reached=stats["reached"] + jnp.sum(active[:, None] & (k_acc[:, None] >= pos), 0, dtype=jnp.int32))
        return i + 1, tcache, dstate, out, n_new, end, stats

    zeros_b, zeros_d = jnp.zeros((b,), jnp.int32), jnp.zeros((depth,), jnp.int32)
    stats = dict(target_forwards=jnp.int32(0), row_rounds=zeros_b, row_emitted=zeros_b, accepted=zeros_d,
                 reached=zeros_d)
    carry = (jnp.int32(0), tcache, dstate, out, lengths0, lengths0 + max_new_tokens, stats)
    _, _, _, out, n, _, stats = jax.lax.while_loop(cond, body, carry)
    return out, dict(stats, num_generated=n - lengths0)


def tree_generate(target_params, target_cfg: LMConfig, drafter, drafter_params, prompt_tokens, prompt_lengths, *,
                  tree: Tree, max_new_tokens: int, key, temperature: float = 0.0, top_k=None, top_p=None,
                  acceptance: str = "exact", typical_epsilon: float = 0.09, typical_delta: float = 0.3,
                  stop_tokens=(), pad_id: int = 0):
    """Prompt continuation by the target, drafted by ``drafter`` over ``tree`` (module docstring).

    Same prompt and output conventions as ``research.lm.decode.generate``. ``acceptance="exact"``
    (default) keeps the target's law (greedy: its greedy continuation token for token);
    ``"typical"`` is Medusa's typical acceptance (``typical_epsilon``, ``typical_delta``): faster,
    **lossy**, only at temperature > 0. ``stop_tokens``: as in ``generate``, a row that emits one
    (it is written) stops and is padded with ``pad_id`` after it. Returns ``(tokens [B, P +
    max_new_tokens], stats)``; ``stats["num_generated"] [B]`` counts each row's new tokens.
    """
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be a research.lm.speculative.tree.Tree, got {type(tree).__name__}")
    if tree.num_nodes < 2:
        raise ValueError("the tree has no draft nodes")
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}")
    if target_cfg.attention != "softmax":
        raise ValueError(f"tree decoding needs softmax attention (tree masks, KV rollback); the target has "
                         f"attention={target_cfg.attention!r}")
    _check_sampling(temperature, top_k, top_p)
    if acceptance == "typical" and temperature == 0:
        raise ValueError("acceptance='typical' is a sampling rule; at temperature 0 use the exact greedy rule")
    if not (0 < typical_epsilon <= 1 and typical_delta > 0):
        raise ValueError(f"typical acceptance needs epsilon in (0, 1] and delta > 0, got "
                         f"{typical_epsilon}, {typical_delta}")
    prompt_tokens, prompt_lengths = jnp.asarray(prompt_tokens), jnp.asarray(prompt_lengths)
    _check_prompt(target_cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    need = prompt_tokens.shape[1] + max_new_tokens + tree.num_nodes
    if need > target_cfg.max_len:
        raise ValueError(f"prompt columns + max_new_tokens + tree nodes = {need} cache positions > the target's "
                         f"LMConfig.max_len={target_cfg.max_len}")
    return _tree_loop(target_params, target_cfg, drafter, drafter_params, prompt_tokens, prompt_lengths, key,
                      tree=tree, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                      top_p=top_p, acceptance=acceptance, typical=(float(typical_epsilon), float(typical_delta)),
                      stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))
