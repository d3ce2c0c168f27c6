"""Static draft trees and the rules that verify them in one target forward.

**Trees.** A :class:`Tree` is a static topology: node 0 is the *root* (the last committed
token), every other node ``i`` has a parent ``parents[i] < i``, a depth (root 0) and a rank
among its siblings (``0..m-1``, the order in which the drafter proposes them). Trees come from a
Medusa-style choice list (``Tree.from_choices([(0,), (1,), (0, 0), ...])``: each entry is the
path of sibling ranks from the root, the list prefix-closed) or ``Tree.chain(g)`` (a chain of
``g`` drafts: plain speculative sampling). ``tree.mask()`` is the ancestor-or-self relation that
the target's tree attention uses (``forward_cached(..., tree_mask=...)``); node ``i`` sits at RoPE
position ``committed + depth[i]``.

**Rules.** Given the drafted tokens ``tokens [B, N+1]`` (``tokens[:, 0]`` the root) and the
target's distributions ``p [B, N+1, V]`` at every node (``p[:, i]`` = the law of the token after
the path root..i), each rule walks from the root and returns the accepted path, its length
``k`` (drafts accepted, ``0..max_depth``) and the next token, so a round emits ``k + 1`` tokens:

* :func:`verify_tree_greedy` (temperature 0): descend to the child whose token is the target's
  argmax at the current node; the next token is the argmax where the walk stops. Equal to plain
  greedy decoding token for token.
* :func:`verify_tree` (the multi-draft rule; exact at any temperature). At the current node with
  target law ``p`` the children ``c_1, c_2, ...`` (rank order) are tested in turn: ``c`` with token
  ``x`` and draft law ``q_c`` (the law ``x`` was drawn from, ``draft_probs[:, c]``) restricted to the
  tokens not yet rejected at this node and renormalised, ``q'``, is accepted with probability
  ``min(1, p(x) / q'(x))``; on rejection ``p <- norm(max(0, p - q'))`` and the next sibling is
  tried. An accepted child becomes the current node (``p`` = the target at it); when every
  child is rejected, or the node is a leaf, the next token is drawn from the current ``p``.
  Exactness: each test is one step of speculative sampling, whose output has law ``p`` whatever
  the proposal; on rejection the remaining siblings and the residual produce the residual law
  exactly (induction over siblings), so the emitted token at every node has the target's law.
  This needs the siblings drawn *without replacement* from the parent's draft law (Gumbel
  top-m: ``x_2 ~ q`` without ``x_1``, ...) -- which is what removing rejected tokens from ``q``
  accounts for -- or deterministic candidates with a one-hot ``q_c`` (Medusa's top-k tree: then
  the test accepts ``x`` with probability ``p(x)`` and the residual is ``p`` without ``x``). A
  child beyond the support of its (filtered) draft law, once every supported token was
  rejected, is treated as such a deterministic candidate.
* :func:`verify_tree_typical` (Medusa's typical acceptance, **lossy**): a child is acceptable if
  ``p(x) > min(epsilon, delta * exp(-H(p)))``; the walk descends into the acceptable child of
  highest ``p(x)`` and the next token is drawn from ``p`` where it stops. Its outputs do not
  follow the target's law; ``experiments/bench_decoding.py`` measures by how much.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from research.lm.speculative.sampling import acceptance_probs, residual

__all__ = ["Tree", "verify_tree", "verify_tree_greedy", "verify_tree_typical", "MEDUSA_CHOICES_SMALL"]

# A 26-node tree over the top-k candidates of 4 heads, widest where acceptance is highest (in the
# spirit of Medusa's mc_sim_7b_63 list, scaled down for small models).
MEDUSA_CHOICES_SMALL = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 2, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 1, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
)


@dataclasses.dataclass(frozen=True)
class Tree:
    """A static draft tree (module docstring). ``parents[0] == -1``; hashable, so it can be a
    static argument of a jitted function."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self):
        if len(self.parents) != len(self.ranks) or not self.parents or self.parents[0] != -1:
            raise ValueError("Tree needs parents and ranks of one length with parents[0] == -1 (the root)")
        for i, (par, r) in enumerate(zip(self.parents, self.ranks)):
            if i and not 0 <= par < i:
                raise ValueError(f"Tree node {i}: parent {par} must be an earlier node")
        for j, kids in enumerate(self.children):
            if sorted(self.ranks[c] for c in kids) != list(range(len(kids))):
                raise ValueError(f"Tree node {j}: sibling ranks must be 0..m-1, got "
                                 f"{[self.ranks[c] for c in kids]}")

    @classmethod
    def from_choices(cls, choices) -> "Tree":
        """From a Medusa-style list of rank paths (prefix-closed; order free). Nodes are numbered
        breadth first, siblings by rank."""
        paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
        if not paths or any(len(c) == 0 for c in paths):
            raise ValueError(f"tree choices must be non-empty rank paths, got {choices!r}")
        index = {(): 0}
        parents, ranks = [-1], [0]
        for c in paths:
            if c[:-1] not in index:
                raise ValueError(f"tree choices must be prefix-closed: {c} lacks its parent {c[:-1]}")
            if min(c) < 0:
                raise ValueError(f"tree choice {c} has a negative rank")
            index[c] = len(parents)
            parents.append(index[c[:-1]])
            ranks.append(c[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def chain(cls, gamma: int) -> "Tree":
        """``gamma`` drafts in a row (speculative sampling's shape)."""
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma <= 0:
            raise ValueError(f"chain length must be a positive int, got {gamma!r}")
        return cls.from_choices([(0,) * d for d in range(1, gamma + 1)])

    @functools.cached_property
    def num_nodes(self) -> int:
        """Nodes including the root (``N + 1``)."""
        return len(self.parents)

    @functools.cached_property
    def depths(self) -> tuple[int, ...]:
        d = [0]
        for par in self.parents[1:]:
            d.append(d[par] + 1)
        return tuple(d)

    @functools.cached_property
    def max_depth(self) -> int:
        return max(self.depths)

    @functools.cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids = [[] for _ in self.parents]
        for i, par in enumerate(self.parents[1:], start=1):
            kids[par].append(i)
        return tuple(tuple(sorted(k, key=lambda c: self.ranks[c])) for k in kids)

    @functools.cached_property
    def max_children(self) -> int:
        return max(len(k) for k in self.children)

    def children_table(self) -> np.ndarray:
        """[N+1, max_children] int32: node j's children in rank order, -1 padded."""
        t = np.full((self.num_nodes, max(self.max_children, 1)), -1, np.int32)
        for j, kids in enumerate(self.children):
            t[j, :len(kids)] = kids
        return t

    def mask(self) -> np.ndarray:
        """[N+1, N+1] bool: ``mask[i, j]`` iff j is i or an ancestor of i."""
        m = np.eye(self.num_nodes, dtype=bool)
        for i, par in enumerate(self.parents[1:], start=1):
            m[i] |= m[par]
        return m

    def level_nodes(self, depth: int) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.depths) if d == depth)


def _check(tree: Tree, tokens, dists, name):
    if tokens.ndim != 2 or tokens.shape[1] != tree.num_nodes:
        raise ValueError(f"{name}: tokens must be [B, {tree.num_nodes}] (root + {tree.num_nodes - 1} nodes), "
                         f"got {tokens.shape}")
    if dists.shape[:2] != tokens.shape or dists.ndim != 3:
        raise ValueError(f"{name}: expected [B, {tree.num_nodes}, V] target values, got {dists.shape}")


def _walk(tree: Tree, tokens, choose):
    """Shared descent. ``choose(level_state, cur, child, token, valid) -> (accept [B], state)`` is
    called for each rank at each level; returns ``(path [B, D+1], num_accepted [B], cur [B], state)``."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    table = jnp.asarray(tree.children_table())
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    path = jnp.zeros((b, tree.max_depth + 1), jnp.int32)
    num = jnp.zeros((b,), jnp.int32)
    state = None
    for d in range(tree.max_depth):
        moved = jnp.zeros((b,), bool)
        new_cur = cur
        state = choose("level", cur, None, None, None, state)
        for r in range(table.shape[1]):
            c = table[cur, r]
            valid = alive & ~moved & (c >= 0)
            c = jnp.maximum(c, 0)
            acc, state = choose("test", cur, c, tokens[rows, c], valid, state)
            acc = acc & valid
            new_cur = jnp.where(acc, c, new_cur)
            moved = moved | acc
        alive, cur = moved, new_cur
        state = choose("moved", cur, None, None, moved, state)
        path = path.at[:, d + 1].set(jnp.where(moved, cur, 0))
        num = num + moved
    return path, num, cur, state


def _categorical(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def verify_tree(tree: Tree, tokens, draft_probs, target_probs, key):
    """The multi-draft rule (module docstring), exact at any temperature.

    Args:
      tree: the static topology.
      tokens: [B, N+1] int, ``tokens[:, 0]`` the root (unused).
      draft_probs: [B, N+1, V], ``draft_probs[:, c]`` the law child c's token was drawn from
        (before removing its earlier siblings); one-hot rows for deterministic candidates.
      target_probs: [B, N+1, V], the target's law after each node.
      key: PRNG key.

    Returns:
      ``(path [B, D+1] node ids (path[:, 0] = 0; entries past num_accepted are 0),
      num_accepted [B], next_token [B])``.
    """
    _check(tree, tokens, target_probs, "verify_tree")
    if draft_probs.shape != target_probs.shape:
        raise ValueError(f"verify_tree: draft_probs {draft_probs.shape} must match target_probs {target_probs.shape}")
    b, _, v = target_probs.shape
    rows = jnp.arange(b)
    key_u, key_next = jax.random.split(key)
    u = jax.random.uniform(key_u, (b, tree.num_nodes), dtype=target_probs.dtype)

    def choose(stage, cur, c, x, valid, st):
        if stage == "level":
            p = target_probs[rows, cur] if st is None else st[0]
            return p, jnp.zeros((b, v), bool)
        p, removed = st
        if stage == "moved":
            return jnp.where(valid[:, None], target_probs[rows, cur], p), removed
        q = jnp.where(removed, 0, draft_probs[rows, c])
        qs = jnp.sum(q, axis=-1, keepdims=True)
        # a child past the draft law's support (a node wider than a top-k / top-p law): nothing is
        # left to draw from, so it is a deterministic candidate with a one-hot law
        onehot = (jnp.arange(v)[None, :] == x[:, None]).astype(q.dtype)
        q = jnp.where(qs > 0, q / jnp.where(qs > 0, qs, 1), onehot)
        acc = u[rows, c] < acceptance_probs(p, q, x)
        rej = valid & ~acc
        p = jnp.where(rej[:, None], residual(p, q), p)
        removed = removed | (rej[:, None] & (jnp.arange(v)[None, :] == x[:, None]))
        return acc, (p, removed)

    path, num, _, (p, _) = _walk(tree, tokens, choose)
    return path, num, _categorical(key_next, p)


def verify_tree_greedy(tree: Tree, tokens, target_logits):
    """Greedy tree verification: ``(path, num_accepted, next_token)`` as :func:`verify_tree`."""
    _check(tree, tokens, target_logits, "verify_tree_greedy")
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)      # [B, N+1]
    rows = jnp.arange(tokens.shape[0])

    def choose(stage, cur, c, x, valid, st):
        if stage != "test":
            return st
        return x == best[rows, cur], st

    path, num, cur, _ = _walk(tree, tokens, choose)
    return path, num, best[rows, cur]


def verify_tree_typical(tree: Tree, tokens, target_probs, key, *, epsilon: float = 0.09, delta: float = 0.3):
    """Medusa's typical acceptance (**lossy**: the output law is not the target's).

    A child with token x under a node whose target law is p is acceptable iff
    ``p(x) > min(epsilon, delta * exp(-H(p)))``; among acceptable siblings the one with the
    highest ``p(x)`` is taken. The next token is drawn from p where the walk stops.
    Returns ``(path, num_accepted, next_token)`` as :func:`verify_tree`."""
    _check(tree, tokens, target_probs, "verify_tree_typical")
    b = tokens.shape[0]
    rows = jnp.arange(b)
    logp = jnp.log(jnp.where(target_probs > 0, target_probs, 1))
    entropy = -jnp.sum(target_probs * logp, axis=-1)                  # [B, N+1]
    thresh = jnp.minimum(epsilon, delta * jnp.exp(-entropy))

    def choose(stage, cur, c, x, valid, st):
        if stage == "level":
            return jnp.full((b,), -1.0, target_probs.dtype)
        px = target_probs[rows, cur, x]
        acc = (px > thresh[rows, cur]) & (px > st)
        return acc, jnp.where(acc & valid, px, st)

    # every sibling is tested and the best acceptable one wins (not the first, as in _walk)
    path, num, cur = _walk_best(tree, tokens, choose)
    return path, num, _categorical(key, target_probs[rows, cur])


def _walk_best(tree: Tree, tokens, choose):
    """Like :func:`_walk`, but every sibling is tested and the last accepted one (``choose``
    only accepts improvements) wins."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    table = jnp.asarray(tree.children_table())
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    path = jnp.zeros((b, tree.max_depth + 1), jnp.int32)
    num = jnp.zeros((b,), jnp.int32)
    for d in range(tree.max_depth):
        best = choose("level", cur, None, None, None, None)
        new_cur, moved = cur, jnp.zeros((b,), bool)
        for r in range(table.shape[1]):
            c = table[cur, r]
            valid = alive & (c >= 0)
            c = jnp.maximum(c, 0)
            acc, best = choose("test", cur, c, tokens[rows, c], valid, best)
            acc = acc & valid
            new_cur = jnp.where(acc, c, new_cur)
            moved = moved | acc
        alive, cur = moved, new_cur
        path = path.at[:, d + 1].set(jnp.where(moved, cur, 0))
        num = num + moved
    return path, num, cur
