"""DeepSeek-V3 multi-token prediction (MTP; DeepSeek-V3 technical report, section 2.2).

**Modules.** ``K`` sequential modules on top of the main model. Module ``k`` (``1..K``) at
position ``i``::

    h^k_i = Block_k( M_k [ RMSNorm_h(h^{k-1}_i) ; RMSNorm_e(Emb(t_{i+k})) ] )
    logits^k_i = head_main( RMSNorm_out(h^k_i) )          # predicts t_{i+k+1}

``h^0`` is the main model's trunk output (``research.lm.model.trunk``, already after its final
norm); ``Emb`` and the output head are the main model's (shared, as in DeepSeek-V3); ``M_k`` is a
bias-free Dense ``2 dim -> dim``; ``Block_k`` is one ``research.lm.model.Block`` (causal attention
over module k's own sequence, RoPE at the main model's positions, ``segment_ids`` for packed rows).
**Final norm:** the main head expects normalised inputs (the trunk ends in RMSNorm) while a Block
returns the raw residual stream, so every module has its own ``RMSNorm_out`` before the shared
head (DeepSeek-V3's ``shared_head.norm``); the *un-normalised* ``h^k`` is what module ``k + 1``
reads. Module ``k``'s logits at ``i`` depend on ``t_0..t_{i+k}`` only.

**Loss** (:func:`mtp_loss`): ``L_main + lam * mean_k L_k`` (DeepSeek's ``L_MTP = lam / K * sum_k
L_k``), ``L_k`` the token-mean NLL of ``t_{i+k+1}`` over positions whose target is in the same
(non-padding) document. :func:`train_mtp` trains jointly (DeepSeek) or only the modules on a
frozen main model.

**Drafting** (:class:`MTPDrafter`, the drafter protocol of ``tree_decode``, chain trees
``Tree.chain(g)``, ``g <= K``). With ``n`` committed tokens the last committed target feature is
``h^0_{n-2}`` (it predicted the root ``t_{n-1}``); the draft at depth ``j`` is module ``j``'s
prediction at position ``n - 2``, whose input token is ``t_{n-2+j}`` (the root for ``j = 1``, then
the earlier drafts). Module ``j`` at ``n - 2`` needs its causal context: its entries at all
positions ``<= n - 2``, and those near the end involve drafted tokens (``t_{i+j}`` with ``i + j >=
n``). The state holds, per row: the committed tokens and target features (``h0``, filled by
``init_state`` and ``commit``) and one 1-layer :class:`~research.lm.cache.KVCache` per module.

*Cache invariant* (``W = K + 1``): at the top of a round every module's cache holds exactly the
positions ``[0, s)``, ``s = max(n - 1 - W, 0)``, each computed from committed tokens and committed
target features only. A round then recomputes, for ``j = 1..g`` in turn, module ``j`` over the
fixed window of the ``W`` positions ``s..s+W-1`` (appended to its cache; module ``j`` reads module
``j - 1``'s window outputs, module 1 reads ``h0``) and takes its logits at ``n - 2`` (window slots
past ``n - 2``, present only while ``n - 1 < W``, are garbage that nothing valid reads). ``commit``
stores the new tokens and features and **rolls every cache back by length** to ``max(n' - 1 - W,
0)`` (``n' = n + k + 1``), discarding every entry that may involve a drafted token. Why it holds:
``n' - n <= g + 1 <= W``, so consecutive windows abut (every position is computed); and an entry
at ``i`` survives only if ``i < n' - 1 - W``, i.e. ``i + j <= n' - 2 = n + k - 1`` for every
``j <= W``: module ``j``'s token ``t_{i+j}`` was committed or an accepted draft when it was last
written, and its target feature ``h^0_i`` (``i <= n - 2``) was committed. ``init_state`` runs all
modules over the prompt and rolls back to ``max(L - 1 - W, 0)`` likewise. The cached draft thus
equals the full causal forward (``mtp_logits``) on the committed tokens plus the drafts, at
``O(K * W)`` positions per round whatever the context length. A row with ``n = 1`` has no target
feature yet: its drafts come from a garbage slot, which costs acceptance, not exactness (every
draft is drawn from the ``q`` that is returned).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.packing import masked_mean, next_token_targets
from research.lm.cache import init_cache
from research.lm.config import LMConfig
from research.lm.model import Block, Transformer, head, trunk
from research.lm.speculative.tree import Tree
from research.nn.layers import RMSNorm

__all__ = ["MTPModule", "init_mtp", "mtp_logits", "mtp_targets", "mtp_loss", "train_mtp", "MTPDrafter"]


class MTPModule(nn.Module):
    """One MTP module: ``(h_prev, emb, positions, segment_ids, layer_cache, cache_pos) -> (h,
    RMSNorm_out(h), layer_cache)`` (module docstring)."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, h_prev, emb, positions, segment_ids=None, layer_cache=None, cache_pos=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype,  # noqa: E731
                                    param_dtype=cfg.params_dtype, name=name)
        x = jnp.concatenate([norm("hnorm")(h_prev), norm("enorm")(emb)], axis=-1)
        x = nn.Dense(cfg.dim, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                     kernel_init=nn.initializers.normal(cfg.init_std), name="proj")(x)
        h, layer_cache = Block(cfg, name="block")(x, layer_cache, positions, segment_ids, cache_pos, None)
        return h, norm("out_norm")(h), layer_cache


def init_mtp(cfg: LMConfig, num_modules: int, key):
    """Parameters of ``num_modules`` fresh MTP modules: a tuple, module ``k`` at index ``k - 1``.

    Flax's initial law for :class:`MTPModule` (RMSNorm scales 1, every matrix ``N(0, init_std)``),
    drawn as one normal vector per module cut into the leaves (``jax.eval_shape`` gives the
    shapes): no init program is traced and compiled for the module's forward."""
    if not isinstance(num_modules, int) or isinstance(num_modules, bool) or num_modules <= 0:
        raise ValueError(f"num_modules must be a positive int, got {num_modules!r}")
    t = min(cfg.max_len, 8)
    shapes = jax.eval_shape(lambda k: MTPModule(cfg).init(k, jnp.zeros((1, t, cfg.dim), cfg.compute_dtype),
                                                          jnp.zeros((1, t, cfg.dim), cfg.compute_dtype),
                                                          jnp.zeros((1, t), jnp.int32))["params"], key)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(s.shape)) for _, s in paths]
    offsets = np.cumsum([0] + sizes)
    out = []
    for k in jax.random.split(key, num_modules):
        flat = cfg.init_std * jax.random.normal(k, (int(offsets[-1]),), cfg.params_dtype)
        leaves = [jnp.ones(s.shape, s.dtype) if jax.tree_util.keystr(path).endswith("['scale']")
                  else flat[offsets[i]:offsets[i + 1]].reshape(s.shape).astype(s.dtype)
                  for i, (path, s) in enumerate(paths)]
        out.append(jax.tree_util.tree_unflatten(treedef, leaves))
    return tuple(out)


def _embed(main_params, cfg: LMConfig, tokens):
    """The main model's token embedding (shared with the MTP modules)."""
    return Transformer(cfg).apply({"params": main_params}, tokens, method=lambda m, t: m.embed(t))


def _shift(x, k: int):
    """``x[:, i + k]`` at column ``i`` ([B, T]); columns past the end get 0 (never a valid target)."""
    return jnp.concatenate([x[:, k:], jnp.zeros_like(x[:, :k])], axis=1)[:, :x.shape[1]]


def _modules_forward(mtp_params, main_params, cfg: LMConfig, h0, tokens, positions, segment_ids):
    """Full causal forward of every module from the trunk output ``h0``: normalised outputs
    ``[K, B, T, dim]``."""
    h, outs = h0, []
    for k, p in enumerate(mtp_params, start=1):
        h, normed, _ = MTPModule(cfg).apply({"params": p}, h, _embed(main_params, cfg, _shift(tokens, k)),
                                            positions, segment_ids)
        outs.append(normed)
    return jnp.stack(outs)


def _positions(tokens, positions):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions


def mtp_logits(mtp_params, main_params, cfg: LMConfig, tokens, *, positions=None, segment_ids=None):
    """Full causal forward: tokens [B, T] -> logits [K, B, T, V]; ``[k-1, :, i]`` is module k's
    prediction of ``t_{i+k+1}`` (a function of ``t_0..t_{i+k}``; columns with ``i + k >= T`` read a
    0 token and are meaningless). ``positions`` default ``arange(T)``; ``segment_ids`` as in
    ``research.lm.model.apply_logits``."""
    positions = _positions(tokens, positions)
    h0 = trunk(main_params, cfg, tokens, positions=positions, segment_ids=segment_ids)
    return head(main_params, cfg, _modules_forward(mtp_params, main_params, cfg, h0, tokens, positions,
                                                   segment_ids))


def mtp_targets(tokens, segment_ids, offset: int):
    """``(targets, mask)`` [B, T]: ``t_{i+offset}`` at ``i``, counted iff it is in ``i``'s
    (non-padding) document (``offset = 1`` is ``next_token_targets``)."""
    return _shift(tokens, offset), ((segment_ids != 0) & (_shift(segment_ids, offset) == segment_ids)
                                    ).astype(jnp.float32)


def _nll(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def mtp_loss(params, cfg: LMConfig, batch, *, num_modules: int, lam: float):
    """``(L_main + lam * mean_k L_k, aux)`` on packed rows ``batch`` {"tokens", "segment_ids",
    "positions"} [B, T] (``params`` = {"main", "mtp"}; the first ``num_modules`` modules). ``L_main``
    equals ``research.lm.model.lm_loss``; ``L_k`` (module k, target ``t_{i+k+1}``) counts a target
    only inside its document. ``aux``: ``main_loss``, ``mtp_losses`` [K], ``real_tokens``."""
    mtp = tuple(params["mtp"])
    if not 0 < num_modules <= len(mtp):
        raise ValueError(f"num_modules={num_modules} but params['mtp'] holds {len(mtp)} modules")
    tokens, seg = batch["tokens"], batch["segment_ids"]
    positions = _positions(tokens, batch.get("positions"))
    attn_seg = None if cfg.attention == "linear" else seg
    h0 = trunk(params["main"], cfg, tokens, positions=positions, segment_ids=attn_seg)
    targets, mask = next_token_targets(tokens, seg)
    main_nll = _nll(head(params["main"], cfg, h0), targets)
    main_loss = masked_mean(main_nll, mask)
    logits = head(params["main"], cfg, _modules_forward(mtp[:num_modules], params["main"], cfg, h0, tokens,
                                                        positions, attn_seg))
    losses = []
    for k in range(1, num_modules + 1):
        tk, mk = mtp_targets(tokens, seg, k + 1)
        losses.append(masked_mean(_nll(logits[k - 1], tk), mk))
    losses = jnp.stack(losses)
    total = main_loss + lam * jnp.mean(losses)
    return total, {"main_loss": main_loss, "mtp_losses": losses, "real_tokens": jnp.sum(mask)}


def train_mtp(main_params, cfg: LMConfig, rows, *, num_modules: int, steps: int, lr: float = 1e-3,
              batch_size: int = 16, key, joint: bool = True, lam: float = 0.3, weight_decay: float = 0.0,
              mtp_params=None):
    """Trains MTP modules on ``rows`` ({"tokens", "segment_ids", "positions"} [R, T]) with AdamW.

    ``joint=True`` (DeepSeek-V3) trains the main model and the modules on :func:`mtp_loss`;
    ``joint=False`` trains only the modules, the main model frozen (returned as given). Batches are
    drawn with replacement from ``fold_in(key, step)``; the modules are initialised from ``key``
    unless ``mtp_params`` is given. Deterministic given ``key``. Returns ``(mtp_params,
    main_params, history)``, ``history`` a list of ``{"step", "loss", "main_loss", "mtp_losses"}``.
    """
    rows = {k: np.asarray(v) for k, v in rows.items() if k in ("tokens", "segment_ids", "positions")}
    num_rows = rows["tokens"].shape[0]
    if num_rows == 0 or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"train_mtp needs rows and steps > 0, got {num_rows} rows, steps={steps!r}")
    k_init, k_data = jax.random.split(key)
    mtp = init_mtp(cfg, num_modules, k_init) if mtp_params is None else tuple(mtp_params)
    train = {"main": main_params, "mtp": mtp} if joint else {"mtp": mtp}
    opt = optax.adamw(lr, weight_decay=weight_decay)
    opt_state = opt.init(train)

    @jax.jit
    def step(train, opt_state, frozen_main, batch):
        def loss_fn(tr):
            params = tr if joint else {"main": frozen_main, "mtp": tr["mtp"]}
            return mtp_loss(params, cfg, batch, num_modules=num_modules, lam=lam)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, aux

    history = []
    for i in range(steps):
        idx = np.asarray(jax.random.randint(jax.random.fold_in(k_data, i), (batch_size,), 0, num_rows))
        batch = {k: jnp.asarray(v[idx]) for k, v in rows.items()}
        train, opt_state, loss, aux = step(train, opt_state, None if joint else main_params, batch)
        history.append({"step": i, "loss": float(loss), "main_loss": float(aux["main_loss"]),
                        "mtp_losses": np.asarray(aux["mtp_losses"]).tolist()})
    return train["mtp"], train["main"] if joint else main_params, history


def _run_module(p, main_params, cfg, cache, h_prev, tok, positions, start):
    """Module ``p`` on ``T`` positions ``start + 0..T-1`` per row, appended to its 1-layer cache
    after ``cache.lengths`` is set to ``start``: ``(h, normed, cache)``."""
    t = tok.shape[1]
    layer = (cache.k[0], cache.v[0])
    num_new = jnp.full_like(start, t)
    h, normed, (kc, vc) = MTPModule(cfg).apply({"params": p}, h_prev, _embed(main_params, cfg, tok), positions,
                                               None, layer, (start, num_new))
    return h, normed, cache.replace(k=kc[None], v=vc[None], lengths=start + num_new)


@dataclasses.dataclass(frozen=True)
class MTPDrafter:
    """Chain drafter over ``num_modules`` MTP modules (``tree_decode`` protocol; module docstring).
    ``drafter_params`` are the modules' parameters (:func:`init_mtp` / :func:`train_mtp`);
    ``target_params`` the main model (shared embedding and head)."""

    num_modules: int

    def __post_init__(self):
        if not isinstance(self.num_modules, int) or isinstance(self.num_modules, bool) or self.num_modules <= 0:
            raise ValueError(f"MTPDrafter.num_modules must be a positive int, got {self.num_modules!r}")

    @property
    def window(self) -> int:
        """``W = K + 1``: positions each module recomputes per round (>= g + 1 covers the largest
        advance of a round, >= g the positions whose inputs may involve drafts)."""
        return self.num_modules + 1

    def _check_params(self, params):
        if len(params) < self.num_modules:
            raise ValueError(f"MTPDrafter({self.num_modules}) got parameters of {len(params)} modules")

    def init_state(self, params, target_params, target_cfg, prompt, lengths, prefill_hidden, capacity):
        self._check_params(params)
        b, p = prompt.shape
        kv_cfg = target_cfg.replace(depth=1)
        tokens = jnp.zeros((b, capacity), jnp.int32).at[:, :p].set(prompt.astype(jnp.int32))
        h0 = jnp.zeros((b, capacity, target_cfg.dim), prefill_hidden.dtype).at[:, :p].set(prefill_hidden)
        start = jnp.zeros((b,), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        keep = jnp.maximum(lengths.astype(jnp.int32) - 1 - self.window, 0)
        ptoks = jnp.pad(prompt.astype(jnp.int32), ((0, 0), (0, self.num_modules)))
        h, caches = prefill_hidden, []
        for k in range(1, self.num_modules + 1):
            h, _, c = _run_module(params[k - 1], target_params, target_cfg, init_cache(kv_cfg, b, capacity), h,
                                  ptoks[:, k:k + p], positions, start)
            caches.append(c.rollback(keep))
        return {"tokens": tokens, "h0": h0, "caches": tuple(caches)}

    def draft(self, params, target_params, target_cfg, state, tree: Tree, root, n, active, key, probs_fn):
        g = tree.max_depth
        if tree.parents != tuple(range(-1, tree.num_nodes - 1)):
            raise ValueError("MTPDrafter drafts a chain: use Tree.chain(g)")
        if g > self.num_modules:
            raise ValueError(f"Tree.chain({g}) needs {g} MTP modules; the drafter has {self.num_modules}")
        self._check_params(params)
        w, b = self.window, root.shape[0]
        rows = jnp.arange(b)
        start = jnp.maximum(n - 1 - w, 0)                                  # == every cache's length
        slot = jnp.clip(n - 2 - start, 0, w - 1)                          # window slot of position n - 2
        cols = start[:, None] + jnp.arange(w + self.num_modules + 1)[None, :]
        seq = state["tokens"][rows[:, None], jnp.minimum(cols, state["tokens"].shape[1] - 1)]
        seq = seq.at[rows, n - 1 - start].set(root.astype(jnp.int32))     # seq[:, u] = t_{start + u}
        positions = start[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
        h = state["h0"][rows[:, None], jnp.minimum(positions, state["h0"].shape[1] - 1)]
        caches, drafts, qs = list(state["caches"]), [], []
        for j in range(1, g + 1):
            h, normed, caches[j - 1] = _run_module(params[j - 1], target_params, target_cfg, caches[j - 1], h,
                                                   seq[:, j:j + w], positions, start)
            logits = head(target_params, target_cfg, normed[rows, slot])   # module j at n - 2: t_{n-1+j}
            if probs_fn is None:
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                q = probs_fn(logits)
                tok = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(q), axis=-1).astype(jnp.int32)
                qs.append(q)
            drafts.append(tok)
            seq = seq.at[rows, n - 1 + j - start].set(tok, mode="drop")
        tokens = jnp.stack([root.astype(jnp.int32)] + drafts, axis=1)
        q = None if probs_fn is None else jnp.stack([jnp.zeros_like(qs[0])] + qs, axis=1)
        return tokens, q, {**state, "caches": tuple(caches)}

    def commit(self, params, target_params, target_cfg, state, tree, path_tokens, path_hidden, num_accepted, n,
               active):
        b, width = path_tokens.shape
        rows = jnp.arange(b)[:, None]
        cap = state["tokens"].shape[1]
        j = jnp.arange(width)[None, :]
        k = num_accepted[:, None]
        # tokens t_{n-1+j}, j = 1..k+1 (accepted drafts and the next token); features h0_{n-1+j}, j <= k
        tok_pos = jnp.where(active[:, None] & (j >= 1) & (j <= k + 1), n[:, None] - 1 + j, cap)
        tokens = state["tokens"].at[rows, tok_pos].set(path_tokens.astype(jnp.int32), mode="drop")
        jh = j[:, :path_hidden.shape[1]]
        h_pos = jnp.where(active[:, None] & (jh <= k), n[:, None] - 1 + jh, cap)
        h0 = state["h0"].at[rows, h_pos].set(path_hidden.astype(state["h0"].dtype), mode="drop")
        n_new = jnp.where(active, n + num_accepted + 1, n)
        keep = jnp.maximum(n_new - 1 - self.window, 0)                    # the cache invariant
        caches = tuple(c.rollback(keep) for c in state["caches"])
        return {"tokens": tokens, "h0": h0, "caches": caches}
