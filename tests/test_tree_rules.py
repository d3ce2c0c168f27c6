"""research.lm.speculative.tree: the three verification rules (topology: test_tree_structure.py).

* exact enumeration (float64, NumPy): for order-2 context tables p(x | path), q(x | path),
  every way the drafter fills the tree (children = ordered samples without replacement from
  q(. | path to the parent), weight = product of successively renormalised q's; or deterministic
  top-m candidates with one-hot q) is enumerated, the exact law of (accepted path, next token)
  of each filled tree is computed by an independent NumPy re-implementation of the rule, rounds
  are chained, and the law of the first ``max_depth + 2`` emitted tokens equals the target's
  autoregressive law (TV < 1e-9) for random, p == q, disjoint supports, zeros, one-hot q (with
  and without zeros / top-p in p) and temperature / top-k / top-p tables (``filtered_probs``)
  on three trees. Teeth: not removing rejected siblings from q, or resampling from p instead of
  the residual, gives TV > 1e-3;
* the module's ``verify_tree`` equals that reference branch by branch, exactly: on every filled
  tree of one context and every branch of positive probability, the uniforms are injected
  just below / above the reference acceptance probabilities (so every tested node's acceptance
  probability is pinned to +-1e-9 in float64, +-1e-5 in float32), the returned path must be the
  branch, and the distribution the next token is drawn from must equal the reference residual;
* Monte Carlo on the jitted ``verify_tree`` (float32): chi-square of (end node, next token) over
  20000 identical rows of a fixed stochastic and a fixed one-hot filled tree vs the reference
  law; the whole pipeline (Gumbel top-m drafting per row in NumPy + ``verify_tree``, two rounds)
  gives the target's law of the first two tokens, and passing p as the draft law fails;
* greedy: ``verify_tree_greedy`` == a brute-force longest matching path (distinct siblings), and
  equals ``sampling.verify_greedy`` on a chain;
* typical: closed-form threshold semantics (strict ``>``, ``min(epsilon, delta * exp(-H))``,
  highest acceptable ``p(x)`` wins), and it is lossy: its exact emitted law is measurably far
  from the target's (TV > 1e-2 on a Medusa-style case);
* a node whose draft law has fewer nonzero tokens than it has children (top-k / top-p on a
  sampling drafter): the surplus children are tested as deterministic candidates and the output
  keeps the target's law (a regression test: they used to be accepted with probability 1).
"""
import functools
import itertools
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from research.lm.decode import filtered_probs
from research.lm.speculative import tree as tree_mod
from research.lm.speculative.sampling import verify_greedy
from research.lm.speculative.tree import (MEDUSA_CHOICES_SMALL, Tree, verify_tree, verify_tree_greedy,
                                          verify_tree_typical)

from tests.test_tree_structure import START, TREES, VOCAB, _node_path

# ============================================================================ 2. exact enumeration

def _tables(kind, v, width, seed):
    """p, q [V+1, V+1, V]: next-token laws given the last two tokens (index V = START). ``mode``:
    'sample' (children drawn without replacement from q) or 'topm' (top-m of q, one-hot q)."""
    rng = np.random.default_rng(seed)
    shape = (v + 1, v + 1, v)
    p, q = rng.dirichlet(np.ones(v), shape[:2]), rng.dirichlet(np.ones(v), shape[:2])
    mode = "topm" if kind.startswith("onehot") else "sample"

    def zeros(t, keep):                              # random zeros, keeping >= keep random tokens per row
        t = t * (rng.random(shape) < 0.5)
        forced = np.argsort(rng.random(shape), axis=-1)[..., :keep]
        np.put_along_axis(t, forced, np.take_along_axis(t, forced, -1) + 0.05, -1)
        return t

    if kind == "equal":
        q = p.copy()
    elif kind == "disjoint":                         # p on the first V - width tokens, q on the rest
        p[..., v - width:], q[..., :v - width] = 0, 0
    elif kind in ("zeros", "onehot_zeros"):
        p, q = zeros(p, 1), zeros(q, width)
    elif kind in ("temp", "topk", "topp", "onehot_topp"):
        lp, lq = rng.normal(size=shape) * 0.8, rng.normal(size=shape) * 0.8
        opts = {"temp": (0.6, None, None), "topk": (1.0, max(width, 2), None), "topp": (1.3, None, 0.9),
                "onehot_topp": (1.0, None, 0.7)}[kind]
        with jax.enable_x64(True):
            p, q = (np.asarray(filtered_probs(jnp.asarray(x, jnp.float64), *opts)) for x in (lp, lq))
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    if mode == "sample":                             # drawing m children without replacement needs >= m tokens
        assert ((q > 0).sum(-1) >= width).all(), "bad test tables"
    return p, q, mode


def _fills(tree, ctx, p_tab, q_tab, mode):
    """Every filled tree after a history ending in ``ctx``: tokens [F, N+1], weight [F] (its
    probability under the drafter), draft laws qn [F, N+1, V] and target laws pn [F, N+1, V]."""
    v = p_tab.shape[-1]
    tok = np.full((1, tree.num_nodes), -1)
    tok[:, 0] = ctx[1]
    w = np.ones(1)

    def law(tab, j):                                 # tab[last two tokens of history + path root..j]
        before = np.full(len(tok), ctx[0]) if j == 0 else tok[:, tree.parents[j]]
        return tab[before, tok[:, j]]

    for j in range(tree.num_nodes):                 # BFS: node j is filled before its children
        kids = list(tree.children[j])
        if not kids:
            continue
        q = law(q_tab, j)
        if mode == "sample":
            perms = np.asarray(list(itertools.permutations(range(v), len(kids))))       # [P, m]
            qx = q[:, perms]                                                              # [F, P, m]
            left = q.sum(-1)[:, None, None] - np.cumsum(qx, -1) + qx                      # mass not yet drawn
            ws = np.prod(np.where(left > 0, qx / np.where(left > 0, left, 1), 0), -1)
            f, k = np.nonzero(ws > 0)
            tok, w = tok[f], w[f] * ws[f, k]
            tok[:, kids] = perms[k]
        else:
            tok[:, kids] = np.argsort(-q, axis=-1, kind="stable")[:, :len(kids)]
    pn = np.stack([law(p_tab, i) for i in range(tree.num_nodes)], 1)
    if mode == "sample":
        qn = np.stack([law(q_tab, max(tree.parents[i], 0)) for i in range(tree.num_nodes)], 1)
    else:
        qn = np.eye(v)[tok]
    tok[:, 0] = 0                                    # the root's token is not used by the rules
    return tok, w, qn, pn


def _np_acc(p, q, x):
    r = np.arange(len(x))
    px, qx = p[r, x], q[r, x]
    return np.where(qx > 0, np.minimum(px / np.where(qx > 0, qx, 1), 1), (px > 0).astype(float))


def _np_res(p, q):
    r = np.maximum(p - q, 0)
    s = r.sum(-1, keepdims=True)
    return np.where(s > 0, r / np.where(s > 0, s, 1), p)


def _reference(tree, tok, qn, pn, variant="exact"):
    """Independent NumPy rule. Returns ``law [F, N+1, V]`` (P(walk ends at node e, next token t))
    and ``branches[e] = (weight [F], final p [F, V], [(node, a [F], accepted)])``.
    variant 'keep_q': rejected siblings stay in q; 'target_p': p is never replaced by the residual."""
    f, n1, v = pn.shape
    rows = np.arange(f)
    law, branches = np.zeros((f, n1, v)), {}
    for e in range(n1):
        path = _node_path(tree, e)
        w, p, tested = np.ones(f), pn[:, 0], []
        for d, node in enumerate(path):
            target = path[d + 1] if d + 1 < len(path) else None
            removed = np.zeros((f, v), bool)
            for c in tree.children[node]:
                q = qn[:, c]
                if variant != "keep_q":
                    q = np.where(removed, 0, q)
                    s = q.sum(-1, keepdims=True)
                    q = q / np.where(s > 0, s, 1)
                a = _np_acc(p, q, tok[:, c])
                tested.append((c, a, c == target))
                if c == target:
                    w, p = w * a, pn[:, c]
                    break
                w = w * (1 - a)
                if variant != "target_p":
                    p = _np_res(p, q)
                removed[rows, tok[:, c]] = True
        law[:, e] = w[:, None] * p
        branches[e] = (w, p, tested)
    return law, branches


def _ctx(prefix):
    h = (START, START) + tuple(prefix)
    return h[-2], h[-1]


def _round_law(tree, ctx, p_tab, q_tab, mode, rule):
    tok, w, qn, pn = _fills(tree, ctx, p_tab, q_tab, mode)
    assert abs(w.sum() - 1) < 1e-12
    law = rule(tree, tok, qn, pn)
    np.testing.assert_allclose(law.sum((1, 2)), 1, atol=1e-12)
    v = pn.shape[-1]
    out = defaultdict(float)
    for e in range(tree.num_nodes):
        path = _node_path(tree, e)[1:]
        code = np.zeros(len(tok), np.int64)
        for node in path:
            code = code * v + tok[:, node]
        codes = code[:, None] * v + np.arange(v)[None, :]
        mass = np.bincount(codes.ravel(), weights=(w[:, None] * law[:, e]).ravel(), minlength=v ** (len(path) + 1))
        for idx in np.nonzero(mass)[0]:
            out[tuple(int(i) for i in np.unravel_index(idx, (v,) * (len(path) + 1)))] += mass[idx]
    return out


def _stream_law(tree, p_tab, q_tab, mode, length, rule):
    """Law of the first ``length`` emitted tokens, rounds chained from the empty prefix."""
    memo, final = {}, defaultdict(float)
    pending = [defaultdict(float) for _ in range(length)]
    pending[0][()] = 1.0
    for n in range(length):
        for s, m in pending[n].items():
            c = _ctx(s)
            if c not in memo:
                memo[c] = _round_law(tree, c, p_tab, q_tab, mode, rule)
            for r, pr in memo[c].items():
                new = s + r
                if len(new) >= length:
                    final[new[:length]] += m * pr
                else:
                    pending[len(new)][new] += m * pr
    return final


def _target_law(p_tab, length):
    v = p_tab.shape[-1]
    return {seq: float(np.prod([p_tab[_ctx(seq[:i])][seq[i]] for i in range(length)]))
            for seq in itertools.product(range(v), repeat=length)}


def _tv(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def _law_fn(variant="exact"):
    return lambda tree, tok, qn, pn: _reference(tree, tok, qn, pn, variant)[0]


KINDS = ["random", "equal", "disjoint", "zeros", "onehot", "onehot_zeros", "temp", "topk", "topp", "onehot_topp"]


@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("kind", KINDS)
def test_exact_law_equals_target(kind, tree_name):
    tree = TREES[tree_name]
    p, q, mode = _tables(kind, VOCAB[tree_name], tree.max_children, seed=KINDS.index(kind))
    length = tree.max_depth + 2                     # spans at least two rounds
    spec = _stream_law(tree, p, q, mode, length, _law_fn())
    assert abs(sum(spec.values()) - 1) < 1e-12
    assert _tv(spec, _target_law(p, length)) < 1e-9


@pytest.mark.parametrize("tree_name, kind, variant", [
    ("mixed", "random", "keep_q"),       # siblings drawn without replacement but tested as if i.i.d.
    ("full2", "random", "keep_q"),
    ("mixed", "random", "target_p"),     # resample from p instead of the residual
    ("chain3", "random", "target_p"),
    ("mixed", "onehot", "target_p"),
])
def test_exact_law_has_teeth(tree_name, kind, variant):
    tree = TREES[tree_name]
    p, q, mode = _tables(kind, VOCAB[tree_name], tree.max_children, seed=KINDS.index(kind))
    length = tree.max_depth + 2
    wrong = _stream_law(tree, p, q, mode, length, _law_fn(variant))
    assert _tv(wrong, _target_law(p, length)) > 1e-3


# ---------------------------------------------------------------------------- the module, branch by branch


def _probe(tree, tok, qn, pn, branches, dtype):
    """Runs ``verify_tree`` on one row per (filled tree, positive-probability branch) with the
    uniforms injected just inside each tested node's reference acceptance probability; returns
    (expected end node, module path, module num, expected final p, module final p)."""
    f64 = dtype == jnp.float64
    delta = 1e-9 if f64 else 1e-5
    rows, ends, us, finals = [], [], [], []
    for e, (w, p_final, tested) in branches.items():
        # branches of negligible weight (a rejection of probability ~ rounding) are left out: their
        # residuals are rounding noise, different in float32
        for f in np.nonzero(w > (1e-9 if f64 else 1e-4))[0]:
            u = np.full(tree.num_nodes, 0.5)
            for c, a, accepted in tested:
                u[c] = max(a[f] - delta, 0.0) if accepted else min(a[f] + delta, 1.0)
            rows.append(f)
            ends.append(e)
            us.append(u)
            finals.append(p_final[f])
    rows, u = np.asarray(rows), np.asarray(us)
    pad = _probe_rows(tree) - len(rows)              # one compiled shape per tree and dtype
    assert pad >= 0
    idx = np.concatenate([rows, np.zeros(pad, int)])
    u = np.concatenate([u, np.full((pad, tree.num_nodes), 0.5)])
    path, num, got_p = _probe_fn(tree)(jnp.asarray(tok[idx]), jnp.asarray(qn[idx], dtype),
                                       jnp.asarray(pn[idx], dtype), jnp.asarray(u, dtype))
    n = len(rows)
    return np.asarray(ends), np.asarray(path)[:n], np.asarray(num)[:n], np.asarray(finals), np.asarray(got_p)[:n]


def _probe_rows(tree):
    """Rows of the largest probe: every sampled fill of the tree times every end node."""
    v = VOCAB[[k for k, t in TREES.items() if t == tree][0]]
    fills = np.prod([np.prod(np.arange(v - len(k) + 1, v + 1)) for k in tree.children if k])
    return int(fills) * tree.num_nodes


@functools.lru_cache(maxsize=None)
def _probe_fn(tree):
    """``verify_tree`` jitted with its uniforms replaced by an argument ``u [B, N+1]`` and its
    next-token draw replaced by returning the distribution it would be drawn from."""
    def run(tok, qn, pn, u):                         # the patches are only needed while tracing
        captured = {}

        def fake_uniform(key, shape, dtype=None, **kw):
            assert tuple(shape) == u.shape, (shape, u.shape)
            return u.astype(dtype)

        def fake_categorical(key, probs):
            captured["p"] = probs
            return jnp.zeros(probs.shape[:-1], jnp.int32)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax.random, "uniform", fake_uniform)
            mp.setattr(tree_mod, "_categorical", fake_categorical)
            path, num, _ = verify_tree(tree, tok, qn, pn, jax.random.key(0))
        return path, num, captured["p"]

    return jax.jit(run)


PROBE_CASES = [("mixed", "random"), ("mixed", "zeros"), ("mixed", "onehot_zeros"), ("mixed", "topk"),
               ("full2", "disjoint"), ("full2", "equal"), ("chain3", "topp")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tree_name, kind", PROBE_CASES)
def test_verify_tree_equals_reference_branch_by_branch(tree_name, kind, dtype):
    tree = TREES[tree_name]
    p, q, mode = _tables(kind, VOCAB[tree_name], tree.max_children, seed=KINDS.index(kind))
    tok, w, qn, pn = _fills(tree, (START, START), p, q, mode)
    _, branches = _reference(tree, tok, qn, pn)
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        ends, path, num, want_p, got_p = _probe(tree, tok, qn, pn, branches, dt)
    assert len(ends) >= len(tok)
    want_path = np.zeros_like(path)
    for i, e in enumerate(ends):
        nodes = _node_path(tree, e)
        want_path[i, :len(nodes)] = nodes
    np.testing.assert_array_equal(num, [tree.depths[e] for e in ends])
    np.testing.assert_array_equal(path, want_path)
    np.testing.assert_allclose(got_p, want_p, atol=1e-12 if dtype == "float64" else 2e-5)
    if (tree_name, kind, dtype) == ("mixed", "random", "float64"):
        # teeth: thresholds of the wrong variant are not the module's
        _, wrong = _reference(tree, tok, qn, pn, "keep_q")
        ends, path, num, _, _ = _probe(tree, tok, qn, pn, wrong, jnp.float32)
        assert (num != np.asarray([tree.depths[e] for e in ends])).mean() > 0.05


# ============================================================================ 3. Monte Carlo, jitted verify_tree

ROWS = 20000
_verify_jit = jax.jit(verify_tree, static_argnums=0)
_typical_jit = jax.jit(verify_tree_typical, static_argnums=0)
_greedy_jit = jax.jit(verify_tree_greedy, static_argnums=0)


def _chi2_pvalue(counts, law):
    """Chi-square p-value of ``counts`` against ``law`` (cells of expectation < 5 pooled); cells of
    probability 0 must be empty."""
    counts, law = np.asarray(counts, float).ravel(), np.asarray(law, float).ravel()
    assert counts[law == 0].sum() == 0
    exp = counts.sum() * law / law.sum()
    small = (exp < 5) & (law > 0)
    obs = np.concatenate([counts[exp >= 5], [counts[small].sum()]])
    exp = np.concatenate([exp[exp >= 5], [exp[small].sum()]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return sps.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("kind", ["random", "onehot"])
def test_monte_carlo_fixed_filled_tree(kind):
    tree = TREES["mixed"]
    p, q, mode = _tables(kind, 4, 3, seed=KINDS.index(kind))
    tok, w, qn, pn = _fills(tree, (START, START), p, q, mode)
    f = int(np.random.default_rng(1).choice(len(w), p=w / w.sum()))     # one drafted tree
    law, _ = _reference(tree, tok[f:f + 1], qn[f:f + 1], pn[f:f + 1])
    rep = lambda x, dt=jnp.float32: jnp.asarray(np.repeat(x[f:f + 1], ROWS, 0), dt)   # noqa: E731
    path, num, nxt = (np.asarray(x) for x in _verify_jit(tree, rep(tok, jnp.int32), rep(qn), rep(pn),
                                                        jax.random.key(3)))
    end = path[np.arange(ROWS), num]
    assert (path[np.arange(path.shape[1])[None, :] > num[:, None]] == 0).all()     # entries past num are 0
    counts = np.bincount(end * 4 + nxt, minlength=tree.num_nodes * 4)
    assert _chi2_pvalue(counts, law[0]) > 1e-3


def _gumbel_fill(tree, hist, p_tab, q_tab, rng):
    """Draft a tree per row (children: Gumbel top-m of log q, i.e. without replacement)."""
    b, n1 = len(hist), tree.num_nodes
    tok = np.zeros((b, n1), np.int64)
    tok[:, 0] = hist[:, -1]
    before = lambda j: hist[:, -2] if j == 0 else tok[:, tree.parents[j]]   # noqa: E731
    for j in range(n1):
        kids = list(tree.children[j])
        if kids:
            q = q_tab[before(j), tok[:, j]]
            with np.errstate(divide="ignore"):
                scores = np.log(q) + rng.gumbel(size=q.shape)
            tok[:, kids] = np.argsort(-scores, axis=-1)[:, :len(kids)]
    pn = np.stack([p_tab[before(i), tok[:, i]] for i in range(n1)], 1)
    qn = np.stack([q_tab[before(max(tree.parents[i], 0)), tok[:, max(tree.parents[i], 0)]] for i in range(n1)], 1)
    tok[:, 0] = 0
    return tok, qn, pn


def _emitted(tree, tok, path, num, nxt):
    rows = np.arange(len(tok))
    toks = tok[rows[:, None], path]                                    # [B, D+1], column 0 the root
    cols = np.arange(1, path.shape[1] + 1)[None, :]
    return np.where(cols <= num[:, None], np.pad(toks[:, 1:], ((0, 0), (0, 1))), nxt[:, None])   # [B, D+1]


def _pipeline_first_two(tree, p_tab, q_tab, use_p_as_q=False, seed=0):
    rng = np.random.default_rng(seed)
    hist = np.full((ROWS, 2), START % (p_tab.shape[0]))
    out = []
    for r in range(2):
        tok, qn, pn = _gumbel_fill(tree, hist, p_tab, q_tab, rng)
        path, num, nxt = (np.asarray(x) for x in _verify_jit(
            tree, jnp.asarray(tok, jnp.int32), jnp.asarray(pn if use_p_as_q else qn, jnp.float32),
            jnp.asarray(pn, jnp.float32), jax.random.key(10 + r)))
        out.append((_emitted(tree, tok, path, num, nxt), num))
        hist = np.concatenate([hist, out[0][0][:, :1]], 1)             # round 2: after the first token
    (em1, n1), (em2, _) = out
    first = em1[:, 0]
    second = np.where(n1 >= 1, em1[:, 1], em2[:, 0])
    return first, second


@pytest.mark.parametrize("tree_name", ["mixed", "full2"])
def test_monte_carlo_pipeline_first_two_tokens(tree_name):
    tree, v = TREES[tree_name], VOCAB[tree_name]
    p, q, _ = _tables("random", v, tree.max_children, seed=7)
    law = np.asarray([p[START, START][a] * p[START, a][b] for a in range(v) for b in range(v)])
    first, second = _pipeline_first_two(tree, p, q)
    assert _chi2_pvalue(np.bincount(first * v + second, minlength=v * v), law) > 1e-3
    first, second = _pipeline_first_two(tree, p, q, use_p_as_q=True)
    assert _chi2_pvalue(np.bincount(first * v + second, minlength=v * v), law) < 1e-6


# ============================================================================ 4. greedy and typical


def _plant(tree, logits, rng, v):
    """Tokens with distinct siblings; at each node one child matches the argmax with prob 0.7."""
    b = logits.shape[0]
    best = logits.argmax(-1)
    tok = np.zeros((b, tree.num_nodes), np.int64)
    for row in range(b):
        for j, kids in enumerate(tree.children):
            if not kids:
                continue
            others = [t for t in rng.permutation(v) if t != best[row, j]]
            chosen = others[:len(kids)]
            if rng.random() < 0.7:
                chosen[int(rng.integers(len(kids)))] = best[row, j]
            tok[row, list(kids)] = chosen
    return tok


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["mixed", "full2", "chain3", "medusa"])
def test_greedy_is_the_longest_matching_path(name, dtype):
    tree = Tree.from_choices(MEDUSA_CHOICES_SMALL) if name == "medusa" else TREES[name]
    rng = np.random.default_rng(len(name))
    v, b = 6, 64
    logits = rng.normal(size=(b, tree.num_nodes, v))
    tok = _plant(tree, logits, rng, v)
    best = logits.argmax(-1)
    with jax.enable_x64(dtype == "float64"):
        path, num, nxt = (np.asarray(x) for x in _greedy_jit(tree, jnp.asarray(tok, jnp.int32),
                                                             jnp.asarray(logits, dtype)))
    for row in range(b):
        matching = [e for e in range(tree.num_nodes)
                    if all(tok[row, c] == best[row, tree.parents[c]] for c in _node_path(tree, e)[1:])]
        e = max(matching, key=lambda i: tree.depths[i])
        assert sum(tree.depths[i] == tree.depths[e] for i in matching) == 1
        nodes = _node_path(tree, e)
        assert num[row] == len(nodes) - 1
        assert path[row].tolist() == nodes + [0] * (tree.max_depth + 1 - len(nodes))
        assert nxt[row] == best[row, e]
    assert 0 < num.mean() < tree.max_depth                            # ragged: the test is not trivial


def test_greedy_chain_equals_chain_rule_and_duplicate_siblings_take_first_rank():
    rng = np.random.default_rng(0)
    tree = Tree.chain(3)
    logits = rng.normal(size=(32, 4, 5))
    tok = _plant(tree, logits, rng, 5)
    path, num, nxt = _greedy_jit(tree, jnp.asarray(tok, jnp.int32), jnp.asarray(logits, jnp.float32))
    n2, nxt2 = jax.jit(verify_greedy)(jnp.asarray(tok[:, 1:], jnp.int32), jnp.asarray(logits, jnp.float32))
    np.testing.assert_array_equal(num, n2)
    np.testing.assert_array_equal(nxt, nxt2)
    # duplicate siblings (a drafter defect): the first in rank order is taken even if a later one goes deeper
    t = Tree.from_choices([(0,), (1,), (1, 0)])
    logits = np.asarray(jax.nn.one_hot(jnp.asarray([[2, 0, 3, 1]]), 4))    # argmax at root 2, at node 2: 3
    path, num, nxt = _greedy_jit(t, jnp.asarray([[9, 2, 2, 3]]), jnp.asarray(logits))
    assert path.tolist() == [[0, 1, 0]] and num.tolist() == [1] and nxt.tolist() == [0]


def test_typical_threshold_semantics_closed_form():
    t = Tree.from_choices([(0,), (1,), (2,), (0, 0)])
    v = 4
    p_root = np.asarray([0.5, 0.3, 0.15, 0.05])
    h = -np.sum(p_root * np.log(p_root))
    thresh = min(0.09, 0.3 * np.exp(-h))                    # = 0.09
    assert thresh == 0.09
    pn = np.tile(p_root, (t.num_nodes, 1))
    pn[3] = np.eye(v)[2]                                    # next token at node 3 is deterministic
    with jax.enable_x64(True):
        run = lambda tok, pn, **kw: [np.asarray(x)[0] for x in _typical_jit(   # noqa: E731
            t, jnp.asarray([tok]), jnp.asarray([pn]), jax.random.key(0), **kw)]
        # children: token 3 (p 0.05, not acceptable, has a child), 2 (0.15), 1 (0.3, the best) -> node 3
        path, num, nxt = run([0, 3, 2, 1, 0], pn)
        assert path.tolist() == [0, 3, 0] and num == 1 and nxt == 2
        # only node 1 acceptable -> descend, then its child (token 0, p 0.5) -> depth 2
        path, num, nxt = run([0, 1, 3, 3, 0], pn)
        assert path.tolist() == [0, 1, 4] and num == 2
        # strict '>': p(x) == epsilon is rejected, just above is accepted (epsilon binds: high entropy)
        flat = np.full((t.num_nodes, v), 0.25)
        path, num, _ = run([0, 1, 2, 3, 0], flat, epsilon=0.25, delta=10.0)
        assert num == 0
        path, num, _ = run([0, 1, 2, 3, 0], flat, epsilon=0.2499, delta=10.0)
        assert num == 2 and path.tolist() == [0, 1, 4]     # ties: the first in rank order wins
        # the entropy term binds: thresh = delta * exp(-ln 4) = delta / 4
        assert run([0, 1, 2, 3, 0], flat, epsilon=0.9, delta=1.01)[1] == 0
        assert run([0, 1, 2, 3, 0], flat, epsilon=0.9, delta=0.99)[1] == 2


def _typical_law(tree, tok, qn, pn):
    path, num, _ = _typical_jit(tree, jnp.asarray(tok), jnp.asarray(pn), jax.random.key(0))
    end = np.asarray(path)[np.arange(len(tok)), np.asarray(num)]
    law = np.zeros(pn.shape)
    law[np.arange(len(tok)), end] = pn[np.arange(len(tok)), end]
    return law


def test_typical_is_lossy():
    """Medusa-style top-m candidates with typical acceptance: the emitted law is not the target's
    (while ``verify_tree`` on the same drafts is exact: test_exact_law_equals_target[onehot])."""
    tree = TREES["mixed"]
    p, q, mode = _tables("onehot", 4, 3, seed=KINDS.index("onehot"))
    length = tree.max_depth + 2
    with jax.enable_x64(True):
        lossy = _stream_law(tree, p, q, mode, length, _typical_law)
    assert abs(sum(lossy.values()) - 1) < 1e-9
    assert _tv(lossy, _target_law(p, length)) > 1e-2
    # and a one-line closed form: one candidate x = argmax p, always acceptable -> emitted with prob 1
    path, num, _ = verify_tree_typical(Tree.chain(1), jnp.asarray([[0, 0]]), jnp.asarray([[[0.6, 0.4]] * 2]),
                                       jax.random.key(0))
    assert num.tolist() == [1]                              # P(first token = 0) = 1 vs the target's 0.6


# ============================================================================ support narrower than the node


def test_support_smaller_than_width_is_exact():
    tree = Tree.from_choices([(0,), (1,)])
    p = np.asarray([0.4, 0.3, 0.3])
    q = np.asarray([1.0, 0.0, 0.0])                        # e.g. top_k=1: only token 0 can be drawn
    tok = np.repeat([[0, 0, 1]], ROWS, 0)                   # 2nd child: the next pick of Gumbel top-2 (q = 0)
    path, num, nxt = (np.asarray(x) for x in _verify_jit(
        tree, jnp.asarray(tok), jnp.asarray(np.tile(q, (ROWS, 3, 1)), jnp.float32),
        jnp.asarray(np.tile(p, (ROWS, 3, 1)), jnp.float32), jax.random.key(0)))
    first = _emitted(tree, tok, path, num, nxt)[:, 0]
    assert _chi2_pvalue(np.bincount(first, minlength=3), p) > 1e-3     # the old rule: token 2 never, 1 w.p. 0.6
