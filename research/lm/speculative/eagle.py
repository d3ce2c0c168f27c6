"""An EAGLE-style draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking
Feature Uncertainty"): autoregression at the feature level, drafting a token tree.

**The head.** Let ``f_i`` be the target's trunk output at position ``i`` (``research.lm.model.trunk``:
the hidden state after the final norm, which the target's LM head turns into the law of
``t_{i+1}``). The *pair* at position ``i`` is ``(f_i, t_{i+1})``; the head reads

    x_i = fc([f_i ; Emb(t_{i+1})])            # Dense(2 dim -> dim), Emb = the target's table (frozen)
    f̂_{i+1} = Block(x)_i                      # ONE decoder layer (research.lm.model.Block), causal

so it predicts the *next feature* knowing which token was actually sampled (the token resolves
the feature's uncertainty), and the target's own head gives ``logits(t_{i+2}) = head(f̂_{i+1})``.
Pair ``i`` sits at RoPE position ``i``. Training (:func:`eagle_loss`, :func:`train_eagle`) uses
teacher features ``f = stop_gradient(trunk(target))`` and minimises
``SmoothL1(f̂_{i+1}, f_{i+1}) + w_cls * CE(head(f̂_{i+1}), t_{i+2})`` over pairs that stay inside
one document of a packed row.

**Drafting** (:class:`EagleDrafter`, the Drafter protocol of ``research.lm.speculative.tree_decode``).
With ``n`` committed tokens the drafter's 1-layer KV cache holds the ``n - 1`` pairs
``(f_j, t_{j+1})``, ``j <= n - 2``, built from the target's *true* features, and it keeps
``f̂_{n-1}``, its prediction at the root (the last committed token, whose true feature the target
has not computed yet). A round:

1. level 1: the root's children are drawn from ``q = probs_fn(head(f̂_{n-1}))``;
2. deeper levels (a ``lax.fori_loop`` over ``d = 1..max_depth-1``: one compiled layer whatever
   the depth): to draw the children of the depth-``d`` nodes the head runs once on all nodes
   ``1..N`` with tree attention (``tree.mask()[1:, 1:]``) over the committed cache; node ``c``'s
   input is ``[f̂_parent(c) ; Emb(token c)]`` at position ``n - 2 + depth(c)`` and its output is
   ``f̂_c``, kept for the depth-``d`` nodes (their ancestors' inputs are final; deeper nodes get
   placeholder inputs and unused outputs). The K/V written for the nodes lie past the cache's
   length: the cache is rolled back by length, nothing moves;
3. children of a node with ``m`` children: greedy -> the top-``m`` tokens of its logits; otherwise
   Gumbel top-``m`` (``log q + Gumbel``, the first ``m`` in order: ``m`` draws without replacement
   from ``q``), and ``q[:, c]`` is the parent's law for every sibling. When ``q``'s support (a
   top-k / top-p law) has ``s < m`` tokens, ranks ``s..m-1`` are the best unsupported tokens by
   the head's logits: the multi-draft rule reaches them only once the whole support was
   rejected and then tests them as deterministic (one-hot) candidates, which is exact;
4. commit: the accepted path's ``k + 1`` pairs ``(f_{n-1+j}, t_{n+j})`` (the target's true
   features ``path_hidden``) are appended to the cache (ragged ``num_new``) and the head's output
   at the last one becomes the next round's ``f̂``.

All shapes are static; raggedness lives in ``num_new`` and masks, so it runs inside the
``lax.while_loop`` of ``tree_generate``.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.packing import masked_mean, next_token_targets
from research.lm.cache import KVCache, init_cache
from research.lm.config import LMConfig
from research.lm.model import Block, head, trunk

__all__ = ["EagleHead", "init_eagle", "init_eagle_cache", "eagle_forward", "eagle_forward_cached", "eagle_loss",
           "train_eagle", "EagleDrafter"]


class EagleHead(nn.Module):
    """``(features [B, T, dim], token embeddings [B, T, dim]) -> (predicted features, layer cache)``."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, features, token_emb, positions, segment_ids=None, layer_cache=None, cache_pos=None,
                 tree_mask=None):
        cfg = self.cfg
        x = jnp.concatenate([features.astype(cfg.compute_dtype), token_emb.astype(cfg.compute_dtype)], axis=-1)
        x = nn.Dense(cfg.dim, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                     kernel_init=nn.initializers.normal(cfg.init_std), name="fc")(x)
        return Block(cfg, name="block")(x, layer_cache, positions, segment_ids, cache_pos, tree_mask)


def _check_cfg(cfg: LMConfig):
    if cfg.attention != "softmax":
        raise ValueError(f"the EAGLE head needs softmax attention (KV cache, tree masks), got {cfg.attention!r}")


def _embed(target_params, cfg: LMConfig, tokens):
    """The target's (frozen) token embeddings of ``tokens``."""
    table = jax.lax.stop_gradient(target_params["embed"]["embedding"])
    return jnp.take(table, tokens.astype(jnp.int32), axis=0).astype(cfg.compute_dtype)


def init_eagle(cfg: LMConfig, key):
    """Initial EAGLE head parameters for a target of config ``cfg`` (``{"fc", "block"}``)."""
    _check_cfg(cfg)
    return _init_eagle(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_eagle(cfg, key):
    t = min(cfg.max_len, 8)
    x = jnp.zeros((1, t, cfg.dim), cfg.compute_dtype)
    pos = jnp.arange(t)[None, :]
    return EagleHead(cfg).init(key, x, x, pos)["params"]


def init_eagle_cache(cfg: LMConfig, batch: int, max_len: int | None = None) -> KVCache:
    """An empty 1-layer KV cache for the head (``init_cache`` with ``depth=1``)."""
    return init_cache(cfg.replace(depth=1), batch, max_len)


def eagle_forward(eagle_params, target_params, cfg: LMConfig, features, next_tokens, *, positions=None,
                  segment_ids=None):
    """Full causal forward over pairs: ``features[:, i] = f_i``, ``next_tokens[:, i] = t_{i+1}``
    ([B, T, dim], [B, T]) -> ``f̂_{i+1}`` [B, T, dim]. ``positions`` default ``arange(T)``;
    ``segment_ids`` keep packed documents apart (0 = padding)."""
    _check_cfg(cfg)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(next_tokens.shape[1]), next_tokens.shape)
    out, _ = EagleHead(cfg).apply({"params": eagle_params}, features, _embed(target_params, cfg, next_tokens),
                                  positions, segment_ids)
    return out


def eagle_forward_cached(eagle_params, target_params, cfg: LMConfig, features, next_tokens, cache: KVCache, *,
                         num_new=None, positions=None, tree_mask=None):
    """``T`` new pairs per row, appended to the head's 1-layer ``cache`` at positions
    ``cache.lengths + i`` (as ``research.lm.cache.forward_cached``): ``num_new`` [B] (default T)
    pairs are kept, ``positions`` default the write positions, ``tree_mask`` [B, T, T] / [T, T]
    (default causal). Returns ``(f̂ [B, T, dim], cache)``."""
    _check_cfg(cfg)
    b, t = next_tokens.shape
    lengths = cache.lengths
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    if positions is None:
        positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    out, (k, v) = EagleHead(cfg).apply({"params": eagle_params}, features, _embed(target_params, cfg, next_tokens),
                                       positions, None, (cache.k[0], cache.v[0]), (lengths, num_new), tree_mask)
    return out, cache.replace(k=k[None], v=v[None], lengths=lengths + num_new)


def _smooth_l1(x, y):
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1, 0.5 * d * d, d - 0.5), axis=-1)


def _shift(x, s):
    """``x[:, i + s]`` (the last ``s`` columns repeat the last one; they are masked)."""
    return jnp.concatenate([x[:, s:], jnp.repeat(x[:, -1:], s, axis=1)], axis=1)


def eagle_loss(eagle_params, target_params, cfg: LMConfig, batch, *, w_cls: float = 0.1):
    """EAGLE's loss on a batch {"tokens", "segment_ids", "positions"} ([B, T] int, packed rows):
    ``(mean SmoothL1(f̂_{i+1}, f_{i+1}) + w_cls * mean CE(head(f̂_{i+1}), t_{i+2}), aux)``, each mean
    over the pairs whose targets lie in the same document (``aux``: "reg", "cls", "pairs")."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    pos = batch.get("positions")
    feats = jax.lax.stop_gradient(trunk(target_params, cfg, tokens, positions=pos, segment_ids=seg))
    nxt, m1 = next_token_targets(tokens, seg)               # t_{i+1}; pair i in one document with i + 1
    m2 = m1 * _shift(m1, 1)                                 # ... and with i + 2
    pred = eagle_forward(eagle_params, target_params, cfg, feats, nxt, positions=pos, segment_ids=seg)
    ft = cfg.logits_dtype
    reg = _smooth_l1(pred.astype(ft), _shift(feats, 1).astype(ft))
    logp = jax.nn.log_softmax(head(target_params, cfg, pred).astype(ft))
    ce = -jnp.take_along_axis(logp, _shift(tokens, 2)[..., None].astype(jnp.int32), -1)[..., 0]
    reg_m, cls_m = masked_mean(reg, m1.astype(ft)), masked_mean(ce, m2.astype(ft))
    return reg_m + w_cls * cls_m, {"reg": reg_m, "cls": cls_m, "pairs": jnp.sum(m1)}


def _optimizer(lr, weight_decay):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnames=("cfg", "lr", "weight_decay", "w_cls", "batch_size"))
def _train_step(eagle_params, opt_state, target_params, rows, key, step, *, cfg, lr, weight_decay, w_cls,
                batch_size):
    num_rows = rows["tokens"].shape[0]
    idx = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, num_rows)
    batch = {k: v[idx] for k, v in rows.items()}
    (loss, _), grads = jax.value_and_grad(eagle_loss, has_aux=True)(eagle_params, target_params, cfg, batch,
                                                                      w_cls=w_cls)
    updates, opt_state = _optimizer(lr, weight_decay).update(grads, opt_state, eagle_params)
    return optax.apply_updates(eagle_params, updates), opt_state, loss


def train_eagle(target_params, cfg: LMConfig, rows, *, steps: int, lr: float, batch_size: int, key,
                w_cls: float = 0.1, weight_decay: float = 0.0, init=None):
    """Trains a head on ``rows`` (a dict of [R, T] arrays like :func:`eagle_loss`'s batch; each
    step draws ``batch_size`` rows with replacement) with AdamW (global-norm clip 1) and the
    target frozen. Deterministic given ``key``. ``init``: parameters to start from (default
    :func:`init_eagle`). Returns ``(eagle_params, history)``, history = the loss of every step."""
    if not isinstance(steps, int) or steps <= 0 or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive ints, got {steps!r}, {batch_size!r}")
    k_init, k_data = jax.random.split(key)
    params = init_eagle(cfg, k_init) if init is None else init
    rows = {k: jnp.asarray(rows[k], jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    opt_state = _optimizer(float(lr), float(weight_decay)).init(params)
    losses = []
    for s in range(steps):
        params, opt_state, loss = _train_step(params, opt_state, target_params, rows, k_data, jnp.int32(s), cfg=cfg,
                                              lr=float(lr), weight_decay=float(weight_decay), w_cls=float(w_cls),
                                              batch_size=batch_size)
        losses.append(loss)
    return params, [float(x) for x in jax.device_get(losses)]


def _draw_children(logits, key, m, probs_fn):
    """``m`` distinct children per parent row of ``logits`` [B, L, V]: ``(tokens [B, L, m], q | None)``.
    Greedy: the top-m logits. Otherwise Gumbel top-m from ``q = probs_fn(logits)`` while its
    support lasts, then the best unsupported tokens by logit (module docstring, step 3)."""
    if probs_fn is None:
        return jax.lax.top_k(logits, m)[1].astype(jnp.int32), None
    q = probs_fn(logits)
    inside = q > 0
    gumbel = jax.random.gumbel(key, q.shape, q.dtype)
    drawn = jax.lax.top_k(jnp.where(inside, jnp.log(jnp.where(inside, q, 1)) + gumbel, -jnp.inf), m)[1]
    rest = jax.lax.top_k(jnp.where(inside, -jnp.inf, logits.astype(q.dtype)), m)[1]
    s = jnp.minimum(jnp.sum(inside, axis=-1, keepdims=True), m)                     # [B, L, 1]
    r = jnp.arange(m)
    cand = jnp.where(r < s, drawn, jnp.take_along_axis(rest, jnp.clip(r - s, 0, m - 1), -1))
    return cand.astype(jnp.int32), q


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """The EAGLE tree drafter (module docstring); its parameters are :func:`init_eagle`'s.
    State: ``{"cache": the head's KVCache (n - 1 committed pairs), "last": f̂ at the root [B, dim]}``."""

    def init_state(self, params, target_params, target_cfg, prompt, lengths, prefill_hidden, capacity):
        cfg = target_cfg
        b, p = prompt.shape
        cache = init_eagle_cache(cfg, b, capacity)
        last = jnp.zeros((b, cfg.dim), cfg.compute_dtype)   # a 1-token prompt has no pair: f̂ = 0
        if p > 1:
            lengths = jnp.asarray(lengths, jnp.int32)
            pred, cache = eagle_forward_cached(params, target_params, cfg, prefill_hidden[:, :p - 1], prompt[:, 1:],
                                               cache, num_new=jnp.maximum(lengths - 1, 0))
            at = pred[jnp.arange(b), jnp.clip(lengths - 2, 0, p - 2)]
            last = jnp.where((lengths >= 2)[:, None], at, last)
        return {"cache": cache, "last": last}

    def draft(self, params, target_params, target_cfg, state, tree, root, n, active, key, probs_fn):
        cfg = target_cfg
        b, nn_, depth = root.shape[0], tree.num_nodes, tree.max_depth
        parents, depths = np.asarray(tree.parents), np.asarray(tree.depths)
        m = max(tree.max_children, 1)
        # static tables: level d's nodes (padded with the out-of-range id nn_) and their children by rank
        levels = [tree.level_nodes(d) for d in range(depth)]
        width = max(len(lv) for lv in levels)
        level_tab = np.full((depth, width), nn_, np.int32)
        child_tab = np.full((depth, width, m), nn_, np.int32)
        for d, lv in enumerate(levels):
            level_tab[d, :len(lv)] = lv
            for i, j in enumerate(lv):
                child_tab[d, i, :len(tree.children[j])] = tree.children[j]
        level_tab, child_tab = jnp.asarray(level_tab), jnp.asarray(child_tab)
        # n - 1 committed pairs; a finished row drops its pairs, so its (unused) writes stay in the cache
        base = jnp.where(active, state["cache"].lengths, 0)
        cache = state["cache"].rollback(base)

        def expand(d, tokens, q_all, feats):                   # draw the children of the depth-d nodes
            logits = head(target_params, cfg, feats[:, jnp.minimum(level_tab[d], nn_ - 1)])  # [B, width, V]
            cand, q = _draw_children(logits, jax.random.fold_in(key, d), m, probs_fn)       # [B, width, m]
            tokens = tokens.at[:, child_tab[d]].set(cand, mode="drop")
            if q is not None:
                q_all = q_all.at[:, child_tab[d]].set(
                    jnp.broadcast_to(q[:, :, None], (b, width, m, q.shape[-1])).astype(q_all.dtype), mode="drop")
            return tokens, q_all

        def level(d, carry):                                   # f̂ of the depth-d nodes, then their children
            tokens, q_all, feats, cache = carry
            pred, cache = eagle_forward_cached(
                params, target_params, cfg, feats[:, parents[1:]], tokens[:, 1:], cache,
                num_new=jnp.zeros((b,), jnp.int32), positions=base[:, None] + jnp.asarray(depths[1:] - 1),
                tree_mask=jnp.asarray(tree.mask()[1:, 1:]))
            at_d = (jnp.asarray(depths[1:]) == d)[None, :, None]
            feats = feats.at[:, 1:].set(jnp.where(at_d, pred, feats[:, 1:]))
            tokens, q_all = expand(d, tokens, q_all, feats)
            return tokens, q_all, feats, cache

        tokens = jnp.zeros((b, nn_), jnp.int32).at[:, 0].set(root.astype(jnp.int32))
        feats = jnp.zeros((b, nn_, cfg.dim), cfg.compute_dtype).at[:, 0].set(state["last"])
        q_all = None if probs_fn is None else jnp.zeros((b, nn_, cfg.vocab_size),
                                                        jnp.promote_types(cfg.logits_dtype, jnp.float32))
        tokens, q_all = expand(0, tokens, q_all, feats)
        tokens, q_all, _, cache = jax.lax.fori_loop(1, depth, level, (tokens, q_all, feats, cache))
        # the node entries past each row's length are stale: the cache is rolled back by length
        return tokens, q_all, {"cache": cache.rollback(base), "last": state["last"]}

    def commit(self, params, target_params, target_cfg, state, tree, path_tokens, path_hidden, num_accepted, n,
               active):
        cfg = target_cfg
        b, width = path_hidden.shape[:2]                      # width = max_depth + 1
        k = jnp.asarray(num_accepted, jnp.int32)
        pred, cache = eagle_forward_cached(params, target_params, cfg, path_hidden, path_tokens[:, 1:width + 1],
                                           state["cache"], num_new=jnp.where(active, k + 1, 0))
        last = jnp.where(active[:, None], pred[jnp.arange(b), k], state["last"])
        return {"cache": cache, "last": last}
