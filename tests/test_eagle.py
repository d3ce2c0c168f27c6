"""research.lm.speculative.eagle: the EAGLE head, its training, and the tree drafter.

* ``eagle_forward`` is causal and keeps packed documents apart; ``eagle_loss`` ignores padding;
* float64: the cached path (ragged prefill, then more pairs) equals the full forward, and the
  drafter's tree drafting (``init_state`` / ``draft`` / ``commit``, tree attention, RoPE positions,
  cache rollback) gives every node the law of a naive recomputation along its path; siblings are
  distinct draws;
* siblings past a top-k law's support are the best remaining tokens, and the multi-draft rule
  stays exact with them (Monte Carlo on ``verify_tree``); drawing with replacement does not;
* training on a tiny repetitive corpus lowers the loss clearly and is deterministic;
* greedy ``tree_generate`` with the drafter equals ``generate`` token for token (ragged batch,
  trained / half-trained / untrained heads);
* temperature 1, the jitted loop: chi-square of the first two generated tokens against the
  target's exact two-token law (and not the head's own law).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sps

from research.lm import LMConfig, apply_logits, head, init_params, lm_loss, trunk
from research.lm.decode import filtered_probs, generate
from research.lm.speculative.eagle import (EagleDrafter, _draw_children, eagle_forward, eagle_forward_cached,
                                           eagle_loss, init_eagle, init_eagle_cache, train_eagle)
from research.lm.speculative.tree import Tree, verify_tree
from research.lm.speculative.tree_decode import tree_generate

V = 24
CFG = LMConfig(vocab_size=V, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=48, max_len=40, init_std=0.1)
TREE = Tree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
TRAIN = dict(lr=1e-2, batch_size=16)
_init_target = jax.jit(init_params, static_argnums=0)


def _corpus(rows, length, seed):
    """Arithmetic progressions mod V (random start and stride 1..3), two documents per row."""
    rng = np.random.default_rng(seed)
    col = np.arange(length)[None, :]
    cut = rng.integers(8, length - 8, (rows, 1))
    seg = np.where(col < cut, 1, 2)
    pos = np.where(seg == 1, col, col - cut)
    a, s = rng.integers(0, V, (rows, 2)), rng.integers(1, 4, (rows, 2))
    toks = np.where(seg == 1, a[:, :1] + s[:, :1] * pos, a[:, 1:] + s[:, 1:] * pos) % V
    return {k: jnp.asarray(x, jnp.int32) for k, x in (("tokens", toks), ("segment_ids", seg), ("positions", pos))}


@pytest.fixture(scope="module")
def trained():
    """A target trained on the corpus (predictable, large greedy margins) and a head trained on it."""
    data = _corpus(128, 32, 0)
    opt = optax.adamw(1e-2)

    @jax.jit
    def step(p, o, i):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(9), i), (16,), 0, 128)
        g = jax.grad(lambda p: lm_loss(p, CFG, {k: v[idx] for k, v in data.items()})[0])(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    tp = _init_target(CFG, jax.random.key(0))
    o = opt.init(tp)
    for i in range(100):
        tp, o = step(tp, o, i)
    ep, hist = train_eagle(tp, CFG, data, steps=150, key=jax.random.key(3), **TRAIN)
    return tp, ep, hist, data


# ----------------------------------------------------------------------------- the head

_fwd = jax.jit(eagle_forward, static_argnames="cfg")
_cached = jax.jit(eagle_forward_cached, static_argnames="cfg")
_trunk = jax.jit(trunk, static_argnames="cfg")
_loss = jax.jit(eagle_loss, static_argnames="cfg")
_head = jax.jit(head, static_argnames="cfg")
_logits = jax.jit(apply_logits, static_argnames="cfg")


def test_forward_is_causal_and_keeps_documents_apart():
    tp, ep = _init_target(CFG, jax.random.key(0)), init_eagle(CFG, jax.random.key(1))
    k1, k2 = jax.random.split(jax.random.key(2))
    feats, toks = jax.random.normal(k1, (1, 16, CFG.dim)), jax.random.randint(k2, (1, 16), 0, V)
    plain = dict(positions=jnp.arange(16)[None], segment_ids=jnp.ones((1, 16), jnp.int32))
    out = _fwd(ep, tp, CFG, feats, toks, **plain)
    out2 = _fwd(ep, tp, CFG, feats.at[:, 9:].set(3.0), toks.at[:, 9:].set((toks[:, 9:] + 1) % V), **plain)
    np.testing.assert_allclose(np.asarray(out2[:, :9]), np.asarray(out[:, :9]), atol=1e-6)
    assert np.abs(np.asarray(out2[:, 9:] - out[:, 9:])).min() > 0
    # a packed row [doc A (7) | doc B (6) | padding (3)] == each document alone (causal: a prefix)
    seg = jnp.asarray([[1] * 7 + [2] * 6 + [0] * 3])
    pos = jnp.asarray([list(range(7)) + list(range(6)) + [0] * 3])
    packed = _fwd(ep, tp, CFG, feats, toks, positions=pos, segment_ids=seg)
    alone_b = _fwd(ep, tp, CFG, jnp.roll(feats, -7, 1), jnp.roll(toks, -7, 1), **plain)
    np.testing.assert_allclose(np.asarray(packed[:, :7]), np.asarray(out[:, :7]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[:, 7:13]), np.asarray(alone_b[:, :6]), atol=1e-5)
    # the loss ignores padding content and counts the pairs inside documents (6 + 5)
    batch = {"tokens": toks, "segment_ids": seg, "positions": pos}
    loss, aux = _loss(ep, tp, CFG, batch)
    loss2, _ = _loss(ep, tp, CFG, {**batch, "tokens": toks.at[:, 13:].set(0)})
    assert int(aux["pairs"]) == 11 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


@pytest.fixture(scope="module")
def f64():
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64", init_std=0.3, max_len=32)
        return cfg, _init_target(cfg, jax.random.key(5)), init_eagle(cfg, jax.random.key(6))


def test_cached_equals_full_forward_f64(f64):
    cfg, tp, ep = f64
    with jax.enable_x64(True):
        k1, k2 = jax.random.split(jax.random.key(7))
        feats, toks = jax.random.normal(k1, (2, 14, cfg.dim), jnp.float64), jax.random.randint(k2, (2, 14), 0, V)
        full = np.asarray(_fwd(ep, tp, cfg, feats, toks))
        lens = np.asarray([4, 7])
        out1, cache = _cached(ep, tp, cfg, feats[:, :7], toks[:, :7], init_eagle_cache(cfg, 2, 20),
                              num_new=jnp.asarray(lens))
        assert np.asarray(cache.lengths).tolist() == [4, 7]
        rows, cols = np.arange(2)[:, None], lens[:, None] + np.arange(7)[None, :]
        out2, cache = _cached(ep, tp, cfg, feats[rows, cols], toks[rows, cols], cache)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(out1[b, :lens[b]]), full[b, :lens[b]], atol=1e-10)
            np.testing.assert_allclose(np.asarray(out2[b]), full[b, lens[b]:lens[b] + 7], atol=1e-10)


W = 14  # the naive recomputation pads every sequence to W columns (causal: padding is harmless)


def _pad(x):
    x = np.asarray(x)
    return np.pad(x, [(0, W - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _naive_feature(ep, tp, cfg, seq, path):
    """f̂ at the end of ``path`` (draft tokens after the committed ``seq``), recomputed by full
    forwards along the path: committed pairs use the target's features, drafted ones the head's."""
    feats = list(np.asarray(_trunk(tp, cfg, _pad(seq)[None]))[0, :len(seq) - 1])
    toks = list(seq[1:])
    out = np.zeros((cfg.dim,))
    for x in [None] + list(path):
        if x is not None:
            feats.append(out)
            toks.append(x)
        if toks:
            out = np.asarray(_fwd(ep, tp, cfg, _pad(np.stack(feats))[None], _pad(toks)[None]))[0, len(toks) - 1]
    return out


def _check_draft(cfg, tp, ep, seqs, tokens, q):
    tokens, q = np.asarray(tokens), np.asarray(q)
    for b, seq in enumerate(seqs):
        assert tokens[b, 0] == seq[-1]
        for j, kids in enumerate(TREE.children):
            if not kids:
                continue
            path, a = [], j
            while a:
                path.insert(0, int(tokens[b, a]))
                a = TREE.parents[a]
            logits = np.asarray(_head(tp, cfg, _naive_feature(ep, tp, cfg, seq, path)))
            want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            for c in kids:
                np.testing.assert_allclose(q[b, c], want, atol=1e-9)
            assert len({int(tokens[b, c]) for c in kids}) == len(kids)       # without replacement


_PROBS = functools.partial(filtered_probs, temperature=1.0)


def test_drafter_matches_naive_recomputation_f64(f64):
    cfg, tp, ep = f64
    d = EagleDrafter()
    init_state = jax.jit(d.init_state, static_argnums=(2, 6))
    draft = jax.jit(d.draft, static_argnums=(2, 4, 9))
    commit = jax.jit(d.commit, static_argnums=(2, 4))
    with jax.enable_x64(True):
        seqs = [[3, 7, 1, 9, 4], [5, 2], [8]]
        prompt = jnp.asarray([s + [0] * (5 - len(s)) for s in seqs])
        n = jnp.asarray([len(s) for s in seqs], jnp.int32)
        prefill = np.concatenate([np.asarray(_trunk(tp, cfg, _pad(s)[None]))[:, :5] for s in seqs])
        state = init_state(ep, tp, cfg, prompt, n, prefill, 20)
        root = prompt[jnp.arange(3), n - 1]
        tokens, q, state = draft(ep, tp, cfg, state, TREE, root, n, jnp.ones((3,), bool), jax.random.key(1), _PROBS)
        assert np.asarray(state["cache"].lengths).tolist() == [4, 1, 0]
        _check_draft(cfg, tp, ep, seqs, tokens, q)
        # commit: row 0 accepts nodes 1, 3 (k = 2), row 1 nothing (k = 0), row 2 is inactive
        tk = np.asarray(tokens)
        k = jnp.asarray([2, 0, 1], jnp.int32)
        new = [seqs[0] + [int(tk[0, 1]), int(tk[0, 3]), 11], seqs[1] + [6], seqs[2]]
        path_tok = jnp.asarray([[4, tk[0, 1], tk[0, 3], 11, 0], [2, 6, 0, 0, 0], [8, 0, 0, 0, 0]])
        hid = [np.asarray(_trunk(tp, cfg, _pad(s)[None]))[0, len(o) - 1:len(o) + 3] for s, o in zip(new, seqs)]
        act = jnp.asarray([True, True, False])
        state = commit(ep, tp, cfg, state, TREE, path_tok, np.stack(hid), k, n, act)
        assert np.asarray(state["cache"].lengths).tolist() == [7, 2, 0]
        root, n = jnp.asarray([s[-1] for s in new]), jnp.asarray([len(s) for s in new], jnp.int32)
        tokens, q, state = draft(ep, tp, cfg, state, TREE, root, n, act, jax.random.key(2), _PROBS)
        _check_draft(cfg, tp, ep, new, tokens, q)


@functools.partial(jax.jit, static_argnums=0)
def _first_tokens(rows, key):
    """First token under the multi-draft rule at a root with 4 children drawn from a top-2 law,
    for the drafter's children and for a broken variant (the supported ranks drawn with
    replacement); also returns the drafter's candidates."""
    p = jnp.asarray([0.1, 0.3, 0.15, 0.25, 0.2])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.05, 0.1, 0.15, 0.45, 0.25])), (rows, 1, 5))
    tree = Tree.from_choices([(0,), (1,), (2,), (3,)])
    k1, k2, k3 = jax.random.split(key, 3)
    cand, q = _draw_children(logits, k1, 4, functools.partial(filtered_probs, temperature=1.0, top_k=2))
    broken = cand.at[:, 0, :2].set(jax.random.categorical(k2, jnp.log(q[:, 0]), shape=(2, rows)).T)
    tokens = jnp.pad(jnp.concatenate([cand[:, 0], broken[:, 0]]), ((0, 0), (1, 0)))
    path, num, nxt = verify_tree(tree, tokens, jnp.broadcast_to(q[:1], (2 * rows, 5, 5)),
                                 jnp.broadcast_to(p, (2 * rows, 5, 5)), k3)
    first = jnp.where(num >= 1, tokens[jnp.arange(2 * rows), path[:, 1]], nxt)
    return first.reshape(2, rows), cand[:, 0]


def test_siblings_past_a_filtered_support_keep_the_rule_exact():
    rows = 20000
    first, cand = map(np.asarray, _first_tokens(rows, jax.random.key(0)))
    # ranks 0, 1: the support {3, 4} without replacement; ranks 2, 3: the best tokens outside it
    assert (np.sort(cand[:, :2], 1) == [3, 4]).all() and (cand[:, 2:] == [2, 1]).all()
    exp = np.asarray([0.1, 0.3, 0.15, 0.25, 0.2]) * rows
    assert sps.chisquare(np.bincount(first[0], minlength=5), exp).pvalue > 1e-3
    assert sps.chisquare(np.bincount(first[1], minlength=5), exp).pvalue < 1e-6       # the test has teeth


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_is_deterministic(trained):
    tp, ep, hist, data = trained
    assert np.mean(hist[-10:]) < 0.1 * hist[0], (hist[0], hist[-10:])
    a, h1 = train_eagle(tp, CFG, data, steps=30, key=jax.random.key(4), **TRAIN)
    b, h2 = train_eagle(tp, CFG, data, steps=30, key=jax.random.key(4), **TRAIN)
    assert h1 == h2 and np.mean(h1[-5:]) < 0.5 * h1[0]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    loss, aux = _loss(ep, tp, CFG, data)
    assert float(aux["cls"]) < 0.5            # the head predicts the corpus' next-next token


# ----------------------------------------------------------------------------- the loop


def test_greedy_tree_generate_equals_generate(trained):
    tp, ep, _, data = trained
    half, _ = train_eagle(tp, CFG, data, steps=30, key=jax.random.key(4), **TRAIN)
    seqs = [[3, 5, 7, 9, 11], [6], [2, 5, 8]]
    prompt = jnp.asarray([s + [0] * (5 - len(s)) for s in seqs])
    lens = jnp.asarray([len(s) for s in seqs], jnp.int32)
    n = 16
    want = np.asarray(generate(tp, CFG, prompt, lens, max_new_tokens=n, key=jax.random.key(0)))
    all_logits = np.asarray(_logits(tp, CFG, jnp.asarray(want)))
    for r, p in enumerate(np.asarray(lens)):   # every greedy step wins by far more than float32 noise
        top2 = np.sort(all_logits[r, p - 1:p + n - 1], -1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "ambiguous greedy step; pick another seed"
    taus = []
    for params in (ep, half, init_eagle(CFG, jax.random.key(8))):
        out, st = tree_generate(tp, CFG, EagleDrafter(), params, prompt, lens, tree=TREE, max_new_tokens=n,
                                key=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out), want)
        taus.append(float(np.sum(st["row_emitted"]) / np.sum(st["row_rounds"])))
    assert taus[0] > 3.5 and taus[0] > taus[2], taus           # the trained head drafts whole levels


def test_sampled_loop_first_two_tokens_have_target_law():
    # a random target of CFG's shapes (the compiled functions are shared), weights x3 for a peakier law
    cfg, rows, ctx = CFG, 3000, [5, 2]
    tp = jax.tree_util.tree_map_with_path(
        lambda path, x: 3 * x if "kernel" in str(path) or "embedding" in str(path) else x,
        _init_target(cfg, jax.random.key(3)))
    ep = init_eagle(cfg, jax.random.key(4))
    prompt = jnp.asarray([ctx] * rows, jnp.int32)
    out, st = tree_generate(tp, cfg, EagleDrafter(), ep, prompt, jnp.full((rows,), 2, jnp.int32), tree=TREE,
                            max_new_tokens=2, key=jax.random.key(5), temperature=1.0)
    out = np.asarray(out)
    counts = np.bincount(out[:, 2] * V + out[:, 3], minlength=V * V)
    seqs = jnp.asarray([ctx + [a] for a in range(V)])
    lg = _logits(tp, cfg, seqs)                                 # causal: row 0's column 1 is the law after ctx
    p0, p1 = jax.nn.softmax(lg[0, 1]), jax.nn.softmax(lg[:, 2])
    law = np.asarray(p0[:, None] * p1).ravel()
    # the head's own two-token law (what accepting every draft would give)
    f0 = _trunk(tp, cfg, seqs)[:, :1]                            # f_0 (all rows equal)
    g1 = _fwd(ep, tp, cfg, jnp.concatenate([f0, f0], 1), seqs[:, 1:])[:, :1]     # f̂_1 from the pair (f_0, ctx[1])
    g2 = _fwd(ep, tp, cfg, jnp.concatenate([f0, g1], 1), seqs[:, 1:])             # column 1: f̂_2 after a
    q = jax.nn.softmax(_head(tp, cfg, g2), -1)
    q_law = np.asarray(q[0, 0][:, None] * q[:, 1]).ravel()

    def pooled(law):
        exp = rows * law
        big = exp >= 5
        c, e = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
        keep = e > 0
        return sps.chi2.sf(np.sum((c[keep] - e[keep]) ** 2 / e[keep]), keep.sum() - 1)

    assert pooled(law) > 1e-3
    assert pooled(q_law) < 1e-6                                # the test can tell the two laws apart
    acc = np.asarray(st["accepted"])
    assert acc[0] > 0.1 * rows and acc[1] > 0, acc            # drafts are accepted at depths 1 and 2
