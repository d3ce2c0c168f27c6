"""Medusa heads (Cai et al. 2024): extra decoding heads on the target's last hidden state.

**Heads.** Head ``k`` (``0..K-1``) maps the trunk output ``h_i`` (after the final norm) to logits
for token ``t_{i+k+2}`` (the LM head predicts ``t_{i+1}``): ``h + SiLU(W_k h + b_k)`` (one
residual block, ``W_k`` and ``b_k`` zero-initialised, so a fresh head is the identity) followed by
its own vocabulary projection, initialised as a copy of the LM head (the embedding table when
embeddings are tied). Heads are float32.

**Training** (:func:`train_medusa`). Loss ``sum_k decay^k CE_k`` (``decay = 0.8``, the paper's
``lambda_k``) over packed rows, a target counting only inside its document.

* **Medusa-1** (``joint=False``): the trunk is frozen (its hidden states are computed under
  ``stop_gradient`` and its parameters never change); only the heads train.
* **Medusa-2** (``joint=True``): heads and target train together on ``lm_loss + lam *
  sum_k decay^k CE_k``, the backbone at ``backbone_lr_scale`` times the heads' learning rate (the
  paper's recipe to keep the target's quality), after ``warmup_heads`` steps of heads only.

**Drafting** (:class:`MedusaDrafter`, the ``tree_decode`` drafter protocol). The state is the
target's hidden state at the position that produced the last committed token (the root). Node
``i`` at depth ``d`` with sibling rank ``r`` gets the ``r``-th most likely token of head
``d - 1`` (Medusa's tree of top-k candidates: every node at one depth draws from the same
head). Candidates are deterministic, so their draft law is one-hot, which the multi-draft rule
verifies exactly at any temperature (a candidate ``x`` is accepted with probability ``p(x)``, the
residual is ``p`` without it); under greedy decoding the longest path matching the target's
argmax is kept. Medusa's typical acceptance is ``tree_generate(..., acceptance="typical")``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.packing import next_token_targets
from research.lm.config import LMConfig
from research.lm.model import lm_loss, trunk
from research.lm.speculative.tree import Tree

__all__ = ["init_medusa", "medusa_logits", "medusa_loss", "offset_targets", "train_medusa", "MedusaDrafter"]


def init_medusa(target_params, cfg: LMConfig, num_heads: int):
    """Fresh heads: zero residual blocks, vocabulary projections copied from the LM head."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if cfg.tie_embeddings:
        lm_head = jnp.asarray(target_params["embed"]["embedding"]).T
    else:
        lm_head = jnp.asarray(target_params["lm_head"]["kernel"])
    lm_head = lm_head.astype(jnp.float32)
    dim = cfg.dim
    return {"w": jnp.zeros((num_heads, dim, dim), jnp.float32), "b": jnp.zeros((num_heads, dim), jnp.float32),
            "head": jnp.broadcast_to(lm_head, (num_heads,) + lm_head.shape).copy()}


def medusa_logits(medusa_params, hidden):
    """hidden [..., dim] -> logits [K, ..., V] (float32)."""
    h = hidden.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    z = jnp.einsum("...d,kde->k...e", h, medusa_params["w"], precision=hi)
    bias = medusa_params["b"].reshape((-1,) + (1,) * (h.ndim - 1) + (h.shape[-1],))
    r = h[None] + jax.nn.silu(z + bias)
    return jnp.einsum("k...d,kdv->k...v", r, medusa_params["head"], precision=hi)


def offset_targets(tokens, segment_ids, offset: int):
    """Targets ``t_{i+offset}`` [B, T] and a float mask: 1 where position ``i + offset`` exists and
    lies in the same (non-padding) document as ``i``."""
    if offset == 1:
        return next_token_targets(tokens, segment_ids)
    t = tokens.shape[1]
    pad = ((0, 0), (0, offset))
    tgt = jnp.pad(tokens, pad)[:, offset:offset + t]
    seg_ahead = jnp.pad(segment_ids, pad)[:, offset:offset + t]
    mask = (segment_ids > 0) & (seg_ahead == segment_ids)
    return tgt, mask.astype(jnp.float32)


def _heads_ce(medusa_params, hidden, batch, decay):
    logits = medusa_logits(medusa_params, hidden)                         # [K, B, T, V]
    total, per_head = 0.0, []
    for k in range(logits.shape[0]):
        tgt, mask = offset_targets(batch["tokens"], batch["segment_ids"], k + 2)
        logp = jax.nn.log_softmax(logits[k])
        nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        ce = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        per_head.append(ce)
        total = total + decay ** k * ce
    return total, jnp.stack(per_head)


def medusa_loss(params, cfg: LMConfig, batch, *, joint: bool = False, lam: float = 0.2, decay: float = 0.8):
    """``params = {"medusa": heads, "target": target params}``. Medusa-1 (``joint=False``): the
    heads' weighted CE on a frozen trunk. Medusa-2: ``lm_loss + lam * heads CE``. Returns
    ``(loss, {"heads_ce": [K], "lm": lm loss or 0})``."""
    seg = batch["segment_ids"]
    if joint:
        lm, _ = lm_loss(params["target"], cfg, batch)
        hidden = trunk(params["target"], cfg, batch["tokens"], positions=batch.get("positions"),
                       segment_ids=seg)
    else:
        lm = jnp.zeros((), jnp.float32)
        hidden = jax.lax.stop_gradient(trunk(params["target"], cfg, batch["tokens"],
                                             positions=batch.get("positions"), segment_ids=seg))
    heads, per_head = _heads_ce(params["medusa"], hidden, batch, decay)
    loss = lm + lam * heads if joint else heads
    return loss, {"heads_ce": per_head, "lm": lm}


def train_medusa(target_params, cfg: LMConfig, rows, *, num_heads: int, steps: int, lr: float = 1e-3,
                 batch_size: int = 16, key, joint: bool = False, lam: float = 0.2, decay: float = 0.8,
                 backbone_lr_scale: float = 0.1, warmup_heads: int = 0, medusa_params=None):
    """Trains Medusa heads (Medusa-1, or Medusa-2 with ``joint=True``) on ``rows`` ({"tokens",
    "segment_ids", "positions"} [R, T]); batches drawn with ``key``. Returns ``(medusa_params,
    target_params, history)``: ``target_params`` is the input (Medusa-1) or the jointly trained
    target; ``history`` a list of ``{"step", "loss", "heads_ce", "lm"}``."""
    rows = {k: np.asarray(v) for k, v in rows.items() if k in ("tokens", "segment_ids", "positions")}
    num_rows = rows["tokens"].shape[0]
    if num_rows == 0 or steps <= 0:
        raise ValueError(f"train_medusa needs rows and steps > 0, got {num_rows} rows, steps={steps}")
    params = {"medusa": init_medusa(target_params, cfg, num_heads) if medusa_params is None else medusa_params,
              "target": target_params}
    labels = {"medusa": jax.tree.map(lambda _: "heads", params["medusa"]),
              "target": jax.tree.map(lambda _: "backbone" if joint else "frozen", params["target"])}
    opt = optax.multi_transform(
        {"heads": optax.adamw(lr, weight_decay=0.0),
         "backbone": optax.adamw(lr * backbone_lr_scale, weight_decay=0.0),
         "frozen": optax.set_to_zero()}, labels)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, static_argnames=("train_backbone",))
    def step(params, opt_state, batch, train_backbone):
        (loss, aux), grads = jax.value_and_grad(
            functools.partial(medusa_loss, cfg=cfg, batch=batch, joint=joint, lam=lam, decay=decay),
            has_aux=True)(params)
        if not train_backbone:
            grads = {"medusa": grads["medusa"], "target": jax.tree.map(jnp.zeros_like, grads["target"])}
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    history = []
    for i in range(steps):
        idx = np.asarray(jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, num_rows))
        batch = {k: jnp.asarray(v[idx]) for k, v in rows.items()}
        params, opt_state, loss, aux = step(params, opt_state, batch, joint and i >= warmup_heads)
        if i % max(steps // 20, 1) == 0 or i == steps - 1:
            history.append({"step": i, "loss": float(loss), "heads_ce": np.asarray(aux["heads_ce"]).tolist(),
                            "lm": float(aux["lm"])})
    return params["medusa"], params["target"], history


@dataclasses.dataclass(frozen=True)
class MedusaDrafter:
    """The ``tree_decode`` drafter of Medusa's top-k candidate tree (module docstring)."""

    num_heads: int

    def init_state(self, params, target_params, target_cfg, prompt, lengths, prefill_hidden, capacity):
        rows = jnp.arange(prompt.shape[0])
        h = prefill_hidden[rows, jnp.maximum(lengths - 2, 0)]
        return jnp.where((lengths >= 2)[:, None], h, 0).astype(jnp.float32)

    def draft(self, params, target_params, target_cfg, state, tree: Tree, root, n, active, key, probs_fn):
        if tree.max_depth > self.num_heads:
            raise ValueError(f"a tree of depth {tree.max_depth} needs >= {tree.max_depth} Medusa heads, "
                             f"this drafter has {self.num_heads}")
        logits = medusa_logits(params, state)                                  # [K, B, V]
        b = root.shape[0]
        tokens = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(root)
        for d in range(1, tree.max_depth + 1):
            nodes = tree.level_nodes(d)
            width = max(tree.ranks[i] for i in nodes) + 1
            top = jax.lax.top_k(logits[d - 1], width)[1].astype(jnp.int32)    # [B, width]
            ranks = jnp.asarray([tree.ranks[i] for i in nodes])
            tokens = tokens.at[:, jnp.asarray(nodes)].set(top[:, ranks])
        if probs_fn is None:
            return tokens, None, state
        v = logits.shape[-1]
        q = jax.nn.one_hot(tokens, v, dtype=jnp.float64 if target_cfg.dtype == "float64" else jnp.float32)
        return tokens, q, state

    def commit(self, params, target_params, target_cfg, state, tree, path_tokens, path_hidden, num_accepted, n,
               active):
        rows = jnp.arange(path_hidden.shape[0])
        h = path_hidden[rows, num_accepted].astype(jnp.float32)
        return jnp.where(active[:, None], h, state)
