"""research.lm.speculative.mtp: DeepSeek-V3 multi-token prediction modules, loss, training, drafter.

* causality: module k's logits at position i depend on t_0..t_{i+k} only (and do depend on t_{i+k});
* packed rows: each document gets the logits and the loss it has alone (segment isolation);
* loss: lam = 0 is ``lm_loss``; joint training lowers the main and every MTP loss; frozen training
  lowers the MTP losses and leaves the main parameters bit-identical;
* the cached drafter (init_state / draft / commit over ragged rounds, float64) equals the full
  forward ``mtp_logits`` on the committed tokens plus the drafts; a window one position too short
  breaks it (the test has teeth);
* greedy ``tree_generate`` with ``MTPDrafter`` equals ``decode.generate`` token for token on a ragged
  batch, with drafts accepted;
* temperature 1 on the jitted loop: chi-square of the first two generated tokens against the
  target's exact two-token law.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from research.lm import LMConfig, lm_loss, trunk
from research.lm.decode import filtered_probs, generate
from research.lm.model import head, init_params
from research.lm.speculative.mtp import MTPDrafter, init_mtp, mtp_logits, mtp_loss, train_mtp
from research.lm.speculative.tree import Tree
from research.lm.speculative.tree_decode import tree_generate

CFG = LMConfig(vocab_size=24, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=48, max_len=96,
               init_std=0.3, scan_layers=False)         # unrolled blocks: XLA:CPU compiles them ~2x faster
K = 3
T = 24                                                   # every full forward below is [2, T]: one compile


@jax.jit
def _fwd(mtp, main, tokens, positions, seg):
    """(main logits [2, T, V], MTP logits [K, 2, T, V])."""
    h0 = trunk(main, CFG, tokens, positions=positions, segment_ids=seg)
    return head(main, CFG, h0), mtp_logits(mtp, main, CFG, tokens, positions=positions, segment_ids=seg)


_loss = jax.jit(lambda params, batch, lam: mtp_loss(params, CFG, batch, num_modules=K, lam=lam))
_POS = jnp.broadcast_to(jnp.arange(T), (2, T))
_ONE = jnp.ones((2, T), jnp.int32)


def _numpy_init(shapes, seed):
    """Flax's initial law (RMSNorm scales 1, every matrix N(0, init_std)) drawn with numpy: the
    shapes come from ``jax.eval_shape``, so no init program is compiled (seconds on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
        else jnp.asarray(CFG.init_std * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def random_model():
    key = jax.random.key(0)
    return (_numpy_init(jax.eval_shape(lambda k: init_params(CFG, k), key), 0),
            init_mtp(CFG, K, jax.random.key(1)))


def _corpus(num_rows=64, row_len=32, seed=0):
    """Packed rows of arithmetic sequences mod V (stride 1 or 3): two or three documents a row."""
    rng = np.random.default_rng(seed)
    rows = {k: np.zeros((num_rows, row_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
    for r in range(num_rows):
        col, seg = 0, 1
        while row_len - col >= 6:
            n = int(min(rng.integers(6, 17), row_len - col))
            doc = (rng.integers(0, CFG.vocab_size) + rng.choice([1, 3]) * np.arange(n)) % CFG.vocab_size
            rows["tokens"][r, col:col + n], rows["segment_ids"][r, col:col + n] = doc, seg
            rows["positions"][r, col:col + n] = np.arange(n)
            col, seg = col + n, seg + 1
    return rows


@pytest.fixture(scope="module")
def trained(random_model):
    rows = _corpus()
    main0 = random_model[0]
    mtp, main, hist = train_mtp(main0, CFG, rows, num_modules=K, steps=40, lr=1e-2, batch_size=16,
                                key=jax.random.key(3), joint=True, lam=0.3)
    return rows, main0, mtp, main, hist


# ----------------------------------------------------------------------------- the forward


def test_causality_of_the_mtp_chain(random_model):
    main, mtp = random_model
    base = np.random.default_rng(0).integers(0, CFG.vocab_size, T)
    i = np.arange(T)
    for j in range(T):                                                # perturb t_j
        batch = np.stack([base, np.where(i == j, (base + 5) % CFG.vocab_size, base)])
        logits = np.asarray(_fwd(mtp, main, jnp.asarray(batch, jnp.int32), _POS, _ONE)[1])   # [K, 2, T, V]
        for k in range(1, K + 1):
            diff = np.abs(logits[k - 1, 1] - logits[k - 1, 0]).max(-1)                   # [T] over positions i
            assert diff[i + k < j].max(initial=0) < 2e-5, (k, j)        # depends on t_0..t_{i+k} only
            if j - k >= 0:
                assert diff[j - k] > 1e-3, (k, j)                       # and on t_{i+k} (teeth)


def _docs():
    rng = np.random.default_rng(1)
    return [rng.integers(1, CFG.vocab_size, 7), rng.integers(1, CFG.vocab_size, 6)]


def _packed_and_separate(docs):
    """Both [2, T]: the documents packed in row 0 (row 1 all padding), and one document a row."""
    packed = {k: np.zeros((2, T), np.int32) for k in ("tokens", "segment_ids", "positions")}
    sep = {k: np.zeros((len(docs), T), np.int32) for k in ("tokens", "segment_ids", "positions")}
    col = 0
    for s, d in enumerate(docs):
        packed["tokens"][0, col:col + len(d)], packed["segment_ids"][0, col:col + len(d)] = d, s + 1
        packed["positions"][0, col:col + len(d)] = np.arange(len(d))
        sep["tokens"][s, :len(d)], sep["segment_ids"][s, :len(d)] = d, 1
        sep["positions"][s, :len(d)] = np.arange(len(d))
        col += len(d)
    return ({k: jnp.asarray(v) for k, v in packed.items()}, {k: jnp.asarray(v) for k, v in sep.items()})


def test_packed_rows_keep_documents_apart(random_model):
    main, mtp = random_model
    docs = _docs()
    packed, sep = _packed_and_separate(docs)
    lp, ls = (np.asarray(_fwd(mtp, main, b["tokens"], b["positions"], b["segment_ids"])[1]) for b in (packed, sep))
    leak = np.asarray(_fwd(mtp, main, packed["tokens"], packed["positions"], _ONE)[1])
    off = 0
    for s, d in enumerate(docs):
        for k in range(1, K + 1):
            valid = np.arange(len(d) - k - 1)                          # targets t_{i+k+1} inside the document
            np.testing.assert_allclose(lp[k - 1, 0, off + valid], ls[k - 1, s, valid], atol=2e-5)
            if s == 1:                                                  # without segment_ids doc 2 sees doc 1
                assert np.abs(leak[k - 1, 0, off + valid] - ls[k - 1, s, valid]).max() > 1e-3
        off += len(d)
    (tp, ap), (ts, as_) = (_loss({"main": main, "mtp": mtp}, b, 0.3) for b in (packed, sep))
    np.testing.assert_allclose(float(tp), float(ts), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ap["mtp_losses"]), np.asarray(as_["mtp_losses"]), rtol=1e-5)
    assert int(ap["real_tokens"]) == sum(len(d) - 1 for d in docs)


def test_lam_zero_is_lm_loss(random_model):
    main, mtp = random_model
    packed, _ = _packed_and_separate(_docs())
    total, aux = _loss({"main": main, "mtp": mtp}, packed, 0.0)
    want, _ = jax.jit(lm_loss, static_argnums=1)(main, CFG, packed)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    assert aux["mtp_losses"].shape == (K,) and float(aux["main_loss"]) == float(total)
    assert (np.asarray(aux["mtp_losses"]) > 0).all()


# ----------------------------------------------------------------------------- training


def test_joint_training_lowers_main_and_mtp_losses(trained):
    _, main0, _, main, hist = trained
    first, last = hist[:3], hist[-3:]
    mean = lambda h, key: np.mean([x[key] for x in h], axis=0)  # noqa: E731
    assert mean(last, "main_loss") < 0.6 * mean(first, "main_loss")
    assert (mean(last, "mtp_losses") < 0.6 * mean(first, "mtp_losses")).all(), (first, last)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(main0), jax.tree.leaves(main)))


def test_frozen_training_leaves_the_main_model_alone(trained):
    rows, _, _, main, _ = trained
    before = [np.array(x) for x in jax.tree.leaves(main)]
    mtp2, main2, hist = train_mtp(main, CFG, rows, num_modules=2, steps=20, lr=1e-2, batch_size=16,
                                  key=jax.random.key(4), joint=False)
    assert len(mtp2) == 2
    for a, b in zip(before, jax.tree.leaves(main2)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (np.mean([h["mtp_losses"] for h in hist[-3:]], 0) < 0.8 * np.asarray(hist[0]["mtp_losses"])).all()
    assert abs(hist[-1]["main_loss"] - hist[0]["main_loss"]) < 0.5       # the main model is not trained


# ----------------------------------------------------------------------------- the cached drafter


class _NarrowWindow(MTPDrafter):
    """W = K: one position short of a round's largest advance (g + 1)."""

    @property
    def window(self):
        return self.num_modules


def _simulate(drafter, cfg, main, mtp, fwd, g, rounds=6, width=40, invariant=True):
    """Ragged rounds of init_state / draft / commit with random acceptance; returns the largest
    deviation of the draft laws from the full forward on committed tokens + drafts."""
    rng = np.random.default_rng(0)
    tree = Tree.chain(g)
    seqs = [list(rng.integers(0, cfg.vocab_size, 9)), list(rng.integers(0, cfg.vocab_size, 2))]

    def padded(ss):
        a = np.zeros((len(ss), width), np.int32)
        for i, s in enumerate(ss):
            a[i, :len(s)] = s
        return jnp.asarray(a)

    trunk_j = lambda t: fwd(t)[0]  # noqa: E731
    n = np.asarray([len(s) for s in seqs])
    state = jax.jit(drafter.init_state, static_argnums=(2, 6))(mtp, main, cfg, padded(seqs)[:, :9], jnp.asarray(n),
                                                               trunk_j(padded(seqs))[:, :9], width)
    draft = jax.jit(drafter.draft, static_argnums=(2, 4, 9))
    commit = jax.jit(drafter.commit, static_argnums=(2, 4))
    worst = 0.0
    for r in range(rounds):
        act = np.asarray([True, r != 2])                          # row 1 sits out round 2 (a finished row)
        root = jnp.asarray([s[-1] for s in seqs])
        toks, q, state = draft(mtp, main, cfg, state, tree, root, jnp.asarray(n), jnp.asarray(act),
                               jax.random.key(r), jax.nn.softmax)
        toks, q = np.asarray(toks), np.asarray(q)
        full = np.asarray(jax.nn.softmax(fwd(padded([s + list(toks[i, 1:]) for i, s in enumerate(seqs)]))[1]))
        for i in np.flatnonzero(act):
            worst = max(worst, np.abs(full[:g, i, n[i] - 2] - q[i, 1:]).max())
        ks = rng.integers(0, g + 1, 2)
        ks[r % 2] = g if r < 4 else ks[r % 2]                     # full acceptances: the largest advance
        path = np.zeros((2, g + 2), np.int32)
        for i in range(2):
            nxt = int(rng.integers(0, cfg.vocab_size))
            path[i, :ks[i] + 1], path[i, ks[i] + 1] = toks[i, :ks[i] + 1], nxt
            if act[i]:
                seqs[i] = seqs[i] + list(toks[i, 1:1 + ks[i]]) + [nxt]
        hid = trunk_j(padded(seqs))
        ph = jnp.stack([hid[i, n[i] - 1:n[i] + g] for i in range(2)])
        state = commit(mtp, main, cfg, state, tree, jnp.asarray(path), ph, jnp.asarray(ks), jnp.asarray(n),
                       jnp.asarray(act))
        n = np.where(act, n + ks + 1, n)
        lens = np.asarray([np.asarray(c.lengths) for c in state["caches"]])
        assert not invariant or (lens == np.maximum(n - 1 - drafter.window, 0)[None]).all()   # the invariant
    return worst


def test_cached_drafting_equals_the_full_forward_float64(random_model):
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64", max_len=48)
        main, mtp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), random_model)
        fwd = jax.jit(lambda t: (trunk(main, cfg, t), mtp_logits(mtp, main, cfg, t)))
        assert _simulate(MTPDrafter(K), cfg, main, mtp, fwd, g=K) < 1e-10
        # teeth: with W = K a fully accepted round (advance K + 1) skips a position (K = 2: smaller compile)
        assert _simulate(_NarrowWindow(2), cfg, main, mtp[:2], fwd, g=2, invariant=False) > 1e-3


# ----------------------------------------------------------------------------- the decoding loop


def _batch(prompts):
    toks = np.zeros((len(prompts), max(len(x) for x in prompts)), np.int32)
    for i, x in enumerate(prompts):
        toks[i, :len(x)] = x
    return jnp.asarray(toks), jnp.asarray([len(x) for x in prompts], jnp.int32)


def test_greedy_tree_generate_equals_generate(trained):
    _, _, mtp, main, _ = trained
    toks, lens = _batch([[5, 6, 7, 8, 9, 10], [2], [10, 13, 16]])
    n = 14
    want = np.asarray(generate(main, CFG, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    seqs = np.zeros((4, T), np.int32)
    seqs[:3, :want.shape[1]] = want
    logits = np.concatenate([np.asarray(_fwd(mtp, main, jnp.asarray(seqs[r:r + 2]), _POS, _ONE)[0]) for r in (0, 2)])
    for r, p in enumerate(np.asarray(lens)):        # every greedy decision wins by far more than float noise
        top2 = np.sort(logits[r, p - 1:p + n - 1], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "ambiguous greedy step; pick another seed"
    out, st = tree_generate(main, CFG, MTPDrafter(K), mtp, toks, lens, tree=Tree.chain(K), max_new_tokens=n,
                            key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), want)
    assert int(st["accepted"][0]) > 0 and int(st["accepted"][-1]) > 0      # drafts at every depth accepted
    assert int(st["target_forwards"]) < n


def test_sampled_loop_first_two_tokens_have_target_law(random_model):
    main, mtp = random_model                                  # untrained: drafts often rejected
    v, rows, prompt = CFG.vocab_size, 3000, [5, 3]
    toks, lens = jnp.asarray([prompt] * rows, jnp.int32), jnp.full((rows,), 2, jnp.int32)
    out, st = tree_generate(main, CFG, MTPDrafter(K), mtp, toks, lens, tree=Tree.chain(2), max_new_tokens=2,
                            key=jax.random.key(9), temperature=1.0)        # g = 2 < K = 3
    out = np.asarray(out)
    assert (out[:, :2] == prompt).all()
    counts = np.bincount(out[:, 2] * v + out[:, 3], minlength=v * v)

    def law(ctx):                                             # exact law of the first two tokens after ctx
        c = len(ctx)
        seqs = np.zeros((v, T), np.int32)
        seqs[:, :c], seqs[:, c] = ctx, np.arange(v)
        lg = np.concatenate([np.asarray(_fwd(mtp, main, jnp.asarray(seqs[r:r + 2]), _POS, _ONE)[0])
                             for r in range(0, v, 2)])
        p0, p1 = filtered_probs(lg[0, c - 1], 1.0), filtered_probs(lg[:, c], 1.0)
        return np.asarray(p0[:, None] * p1, np.float64).ravel()

    def chi2_p(exp_law):
        exp = rows * exp_law / exp_law.sum()
        big = exp >= 5
        c, e = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
        return sps.chi2.sf(np.sum((c - e) ** 2 / e), len(c) - 1)

    assert chi2_p(law(prompt)) > 1e-3
    assert chi2_p(law([4, 3])) < 1e-6                                     # the test tells contexts apart
    acc = np.asarray(st["accepted"]) / np.maximum(np.asarray(st["reached"]), 1)
    assert 0 < acc[0] < 1                                                   # both verify branches exercised
