"""Medusa heads and the tree-verification loop (research.lm.speculative.medusa / tree_decode).

* fresh heads are the LM head (zero residual blocks), offset targets respect documents;
* Medusa-1 trains the heads and leaves the target bit-identical; Medusa-2 trains both;
* greedy ``tree_generate`` with Medusa's top-k tree equals plain greedy decoding token for token
  (ragged batch, untrained and trained heads); with heads that copy the target's own next-token
  predictions every depth-1 candidate is accepted;
* temperature 1, the whole jitted loop: chi-square of the first two generated tokens against the
  target's exact two-token law; typical acceptance (lossy) fails the same test;
* bad inputs raise clear errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sps

from research.lm import LMConfig, apply_logits, head, init_params, trunk
from research.lm.decode import generate
from research.lm.model import lm_loss
from research.lm.speculative import summarize_stats
from research.lm.speculative.medusa import (MedusaDrafter, init_medusa, medusa_logits, medusa_loss, offset_targets,
                                            train_medusa)
from research.lm.speculative.tree import Tree
from research.lm.speculative.tree_decode import tree_generate
from tests.test_speculative import _assert_greedy_margins, _batch, _pooled_chi2, _two_token_law

CFG = LMConfig(vocab_size=29, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=40, max_len=48, init_std=0.4)
TREE = Tree.from_choices([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)])
PROMPTS = [[3, 7, 1, 9, 4], [5], [2, 2, 8]]


def _noisy_heads(tp, cfg, k, scale, seed):
    mp = init_medusa(tp, cfg, k)
    keys = jax.random.split(jax.random.key(seed), 2)
    return {**mp, "w": scale * jax.random.normal(keys[0], mp["w"].shape),
            "head": mp["head"] + scale * jax.random.normal(keys[1], mp["head"].shape)}


@pytest.fixture(scope="module")
def target():
    return init_params(CFG, jax.random.key(0))


def test_fresh_heads_are_the_lm_head(target):
    for cfg in (CFG, CFG.replace(tie_embeddings=False)):
        tp = init_params(cfg, jax.random.key(1))
        mp = init_medusa(tp, cfg, 3)
        h = trunk(tp, cfg, jnp.asarray([[1, 2, 3, 4]]))
        np.testing.assert_allclose(np.asarray(medusa_logits(mp, h)),
                                   np.broadcast_to(np.asarray(head(tp, cfg, h)), (3, 1, 4, 29)), rtol=1e-5, atol=1e-5)


def test_offset_targets_stay_inside_documents():
    tokens = jnp.asarray([[10, 11, 12, 13, 20, 21, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0]])
    tgt, mask = offset_targets(tokens, seg, 2)
    np.testing.assert_array_equal(np.asarray(tgt)[0, :5], [12, 13, 20, 21, 0])
    np.testing.assert_array_equal(np.asarray(mask)[0], [1, 1, 0, 0, 0, 0, 0])    # 12->20 crosses a document


def _rows(num=24, length=16, seed=0):
    # a repetitive corpus: documents are shifted copies of one short cycle, so t_{i+k} is learnable
    rng = np.random.default_rng(seed)
    cycle = np.asarray([3, 9, 4, 17, 11, 6, 20, 8])
    starts = rng.integers(0, len(cycle), num)
    toks = np.stack([np.roll(cycle, -s)[np.arange(length) % len(cycle)] for s in starts]).astype(np.int32)
    return {"tokens": toks, "segment_ids": np.ones_like(toks), "positions": np.tile(np.arange(length), (num, 1))}


@pytest.fixture(scope="module")
def medusa1(target):
    return train_medusa(target, CFG, _rows(), num_heads=4, steps=60, lr=3e-2, batch_size=8, key=jax.random.key(2))


def test_medusa1_trains_heads_on_a_frozen_trunk(target, medusa1):
    mp, tp, hist = medusa1
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], hist
    for a, b in zip(jax.tree.leaves(tp), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_medusa2_trains_heads_and_target(target):
    mp, tp, hist = train_medusa(target, CFG, _rows(), num_heads=2, steps=30, lr=3e-2, batch_size=8,
                                key=jax.random.key(2), joint=True, warmup_heads=5)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"] and hist[-1]["lm"] < hist[0]["lm"], hist
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tp), jax.tree.leaves(target))]
    assert max(moved) > 1e-3
    batch = {k: jnp.asarray(v[:4]) for k, v in _rows().items()}
    loss1, aux1 = medusa_loss({"medusa": mp, "target": tp}, CFG, batch)
    assert float(aux1["lm"]) == 0.0 and aux1["heads_ce"].shape == (2,)


@pytest.mark.parametrize("heads", ["fresh", "noisy", "trained"])
def test_greedy_tree_generate_equals_generate(target, medusa1, heads):
    mp = {"fresh": init_medusa(target, CFG, 4), "noisy": _noisy_heads(target, CFG, 4, 0.3, 5),
          "trained": medusa1[0]}[heads]
    toks, lens = _batch(PROMPTS)
    n = 14
    want = np.asarray(generate(target, CFG, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    _assert_greedy_margins(target, CFG, want, lens, n)
    out, st = tree_generate(target, CFG, MedusaDrafter(4), mp, toks, lens, tree=TREE, max_new_tokens=n,
                            key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), want)
    s = summarize_stats(st)
    assert 1 <= s["tau"] <= TREE.max_depth + 1 and np.asarray(st["row_emitted"]).min() >= n


def test_trained_heads_on_learnable_data_accept_several_tokens_per_forward():
    # target and heads trained on one periodic corpus: the greedy target continues the cycle and
    # the heads predict it, so most rounds accept several drafts (tau well above 1)
    tp = init_params(CFG, jax.random.key(3))
    rows = _rows(num=32)
    opt = optax.adam(3e-2)
    state = opt.init(tp)

    @jax.jit
    def step(tp, state, batch):
        g = jax.grad(lambda p: lm_loss(p, CFG, batch)[0])(tp)
        u, state = opt.update(g, state)
        return optax.apply_updates(tp, u), state

    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    for _ in range(80):
        tp, state = step(tp, state, batch)
    mp, _, _ = train_medusa(tp, CFG, rows, num_heads=4, steps=80, lr=3e-2, batch_size=16, key=jax.random.key(4))
    toks = jnp.asarray(rows["tokens"][:2, :6])
    lens = jnp.asarray([6, 6])
    want = np.asarray(generate(tp, CFG, toks, lens, max_new_tokens=20, key=jax.random.key(0)))
    out, st = tree_generate(tp, CFG, MedusaDrafter(4), mp, toks, lens, tree=TREE, max_new_tokens=20,
                            key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), want)
    s = summarize_stats(st)
    assert s["alpha"][0] > 0.6 and s["tau"] > 3.0, s


def test_sampled_tree_loop_first_two_tokens_have_target_law():
    tcfg = LMConfig(vocab_size=8, dim=16, depth=1, num_heads=2, num_kv_heads=2, mlp_hidden=24, max_len=16,
                    init_std=0.5)
    tp = init_params(tcfg, jax.random.key(3))
    mp = _noisy_heads(tp, tcfg, 2, 0.5, 6)
    tree = Tree.from_choices([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
    rows, first, temp, top_k = 4000, 5, 1.0, 6
    toks, lens = jnp.full((rows, 1), first, jnp.int32), jnp.ones((rows,), jnp.int32)
    law = _two_token_law(tp, tcfg, first, temp, top_k)
    results = {}
    for rule in ("exact", "typical"):
        out, st = tree_generate(tp, tcfg, MedusaDrafter(2), mp, toks, lens, tree=tree, max_new_tokens=2,
                                key=jax.random.key(5), temperature=temp, top_k=top_k, acceptance=rule)
        out = np.asarray(out)
        assert (out[:, 0] == first).all()
        counts = np.bincount(out[:, 1] * 8 + out[:, 2], minlength=64)
        assert counts[law == 0].sum() == 0                                 # top-k support respected
        results[rule] = (_pooled_chi2(counts, law, rows), summarize_stats(st))
    (chi2, dof), s = results["exact"]
    assert chi2 < sps.chi2.ppf(1 - 1e-4, dof), chi2
    assert 0 < s["acceptance"] < 1
    (chi2_typ, dof), s_typ = results["typical"]
    assert chi2_typ > sps.chi2.ppf(1 - 1e-4, dof), chi2_typ                 # lossy, and the test can see it
    assert s_typ["tau"] > s["tau"]


def test_bad_inputs_raise(target):
    toks, lens = _batch(PROMPTS)
    mp = init_medusa(target, CFG, 2)
    kw = dict(tree=TREE, max_new_tokens=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="Medusa heads"):                  # depth 4 tree, 2 heads
        tree_generate(target, CFG, MedusaDrafter(2), mp, toks, lens, **kw)
    with pytest.raises(ValueError, match="typical"):
        tree_generate(target, CFG, MedusaDrafter(4), mp, toks, lens, **kw, acceptance="typical")
    with pytest.raises(ValueError, match="acceptance"):
        tree_generate(target, CFG, MedusaDrafter(4), mp, toks, lens, **kw, acceptance="fast")
    with pytest.raises(ValueError, match="max_len"):
        tree_generate(target, CFG, MedusaDrafter(4), mp, toks, lens, **{**kw, "max_new_tokens": 36})
    with pytest.raises(ValueError, match="softmax"):
        tree_generate(target, CFG.replace(attention="linear", num_kv_heads=4), MedusaDrafter(4), mp, toks, lens, **kw)
    with pytest.raises(TypeError, match="Tree"):
        tree_generate(target, CFG, MedusaDrafter(4), mp, toks, lens, **{**kw, "tree": [(0,)]})
    with pytest.raises(ValueError, match="prefix-closed"):
        Tree.from_choices([(0,), (1, 0)])
    with pytest.raises(ValueError, match="num_heads"):
        init_medusa(target, CFG, 0)


def test_stop_tokens_end_rows_like_generate(target):
    toks, lens = _batch(PROMPTS)
    n = 14
    free = np.asarray(generate(target, CFG, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    stop = int(free[0, int(lens[0]) + 3])                   # row 0 emits it as its 4th new token
    want = np.asarray(generate(target, CFG, toks, lens, max_new_tokens=n, key=jax.random.key(0), stop_tokens=(stop,)))
    out, st = tree_generate(target, CFG, MedusaDrafter(4), _noisy_heads(target, CFG, 4, 0.3, 5), toks, lens,
                            tree=TREE, max_new_tokens=n, key=jax.random.key(0), stop_tokens=(stop,))
    np.testing.assert_array_equal(np.asarray(out), want)
    assert int(st["num_generated"][0]) <= 4 and (want[0, int(lens[0]) + 4:] == 0).all()


def test_tree_attention_through_the_pallas_decode_kernel():
    """attn_impl="pallas": the target's tree verification runs pallas_kernels.decode_attention with
    the tree mask (interpret mode on CPU); greedy output is still plain greedy decoding's."""
    cfg = LMConfig(vocab_size=29, dim=64, depth=1, num_heads=4, num_kv_heads=2, mlp_hidden=64, max_len=24,
                   init_std=0.4)                                   # head_dim 16: a kernel size
    tp = init_params(cfg, jax.random.key(0))
    toks, lens = _batch(PROMPTS[:2])
    want = np.asarray(generate(tp, cfg, toks, lens, max_new_tokens=4, key=jax.random.key(0)))
    _assert_greedy_margins(tp, cfg, want, lens, 4)
    tree = Tree.from_choices([(0,), (1,), (0, 0)])
    out, _ = tree_generate(tp, cfg.replace(attn_impl="pallas"), MedusaDrafter(2), _noisy_heads(tp, cfg, 2, 0.3, 5),
                           toks, lens, tree=tree, max_new_tokens=4, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), want)
