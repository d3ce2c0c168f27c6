"""research.lm.speculative: the speculative-sampling rule is exact, and the jitted loop uses it right.

* exact enumeration (float64): for context-dependent random tables p(x | prefix), q(x | prefix)
  (order-2 Markov), every draft sequence and every accept/reject branch of one round is
  enumerated with the module's own ``acceptance_probs`` / ``residual``, rounds are chained, and
  the law of the first gamma + 2 emitted tokens equals the target's autoregressive law (TV <
  1e-9) for random, p == q, disjoint supports, one-hot q and zero-probability tables; resampling
  from p instead of the residual breaks it (the test has teeth);
* Monte Carlo on the jitted ``verify``: chi-square of the first two emitted tokens vs the exact
  target law, and the same with the wrong residual fails;
* greedy ``speculative_generate`` equals ``decode.generate(temperature=0)`` token for token on a
  ragged batch for gamma in (1, 3), with an unrelated draft, a noisy copy of the target (ragged
  acceptance) and the target itself (all drafts accepted: tau == gamma + 1);
* temperature > 0, full loop: chi-square of the first two generated tokens of 4000 rows against
  the target model's exact two-token law (and not the draft's);
* bad inputs raise clear errors.
"""
import functools
import itertools
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from research.lm import LMConfig, apply_logits, init_params
from research.lm.decode import filtered_probs, generate
from research.lm.speculative.sampling import (_verify, acceptance_probs, residual, speculative_generate, summarize_stats,
                                     verify, verify_greedy)

# ----------------------------------------------------------------------------- the pure functions


def test_acceptance_probs_and_residual_closed_forms():
    p = jnp.asarray([[0.5, 0.3, 0.2, 0.0], [0.5, 0.3, 0.2, 0.0]])
    q = jnp.asarray([[0.25, 0.6, 0.0, 0.15], [0.5, 0.3, 0.2, 0.0]])
    a = acceptance_probs(p, q, jnp.asarray([1, 0]))
    np.testing.assert_allclose(np.asarray(a), [0.5, 1.0])
    a = acceptance_probs(p[:1], q[:1], jnp.asarray([0]))                       # p > q: always
    assert float(a[0]) == 1.0
    assert float(acceptance_probs(p[:1], q[:1], jnp.asarray([2]))[0]) == 1.0    # q(x) = 0 < p(x)
    assert float(acceptance_probs(p[:1], q[:1], jnp.asarray([3]))[0]) == 0.0    # p(x) = 0
    r = np.asarray(residual(p, q))
    np.testing.assert_allclose(r[0], np.asarray([0.25, 0.0, 0.2, 0.0]) / 0.45, rtol=1e-6)
    np.testing.assert_allclose(r[1], np.asarray(p[1]), rtol=1e-6)             # p == q: p, never NaN
    disjoint = np.asarray(residual(jnp.asarray([0.6, 0.4, 0.0]), jnp.asarray([0.0, 0.0, 1.0])))
    np.testing.assert_allclose(disjoint, [0.6, 0.4, 0.0], rtol=1e-6)


def test_filtered_probs_matches_the_sampling_rule():
    logits = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.25, 0.2]))
    batch = jnp.stack([jnp.stack([logits, logits[::-1]])] * 2)                    # [2, 2, 5]
    nuc = np.asarray(filtered_probs(batch, 1.0, None, 0.7))
    want = np.where(np.isin(np.arange(5), [1, 3, 4]), [0.05, 0.4, 0.1, 0.25, 0.2], 0) / 0.85
    np.testing.assert_allclose(nuc[1, 0], want, rtol=1e-5)
    np.testing.assert_allclose(nuc[0, 1], want[::-1], rtol=1e-5)
    top2 = np.asarray(filtered_probs(logits, 2.0, 2))
    np.testing.assert_allclose(top2, np.asarray([0, 0.4, 0, 0.25, 0]) ** 0.5 / (0.4 ** 0.5 + 0.25 ** 0.5), rtol=1e-5)
    assert np.asarray(filtered_probs(batch, 0.0)).tolist()[0] == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_verify_edge_cases_jitted():
    key = jax.random.key(0)
    probs = jax.nn.softmax(jax.random.normal(key, (64, 4, 5)), axis=-1)
    drafts = jax.random.categorical(jax.random.key(1), jnp.log(probs[:, :3]), axis=-1)
    n, nxt = verify(drafts, probs[:, :3], probs, key)                          # p == q: all accepted
    assert (np.asarray(n) == 3).all() and np.isfinite(np.asarray(nxt)).all()
    p = jnp.zeros((64, 4, 5)).at[..., :2].set(0.5)                              # disjoint supports
    q = jnp.zeros((64, 3, 5)).at[..., 2:].set(1 / 3)
    n, nxt = verify(jnp.full((64, 3), 3), q, p, key)
    assert (np.asarray(n) == 0).all() and set(np.asarray(nxt).tolist()) == {0, 1}
    n, nxt = verify_greedy(jnp.asarray([[1, 2, 3], [1, 0, 3]]), jax.nn.one_hot(jnp.asarray([[1, 2, 3, 4]] * 2), 5))
    assert np.asarray(n).tolist() == [3, 1] and np.asarray(nxt).tolist() == [4, 2]


# ----------------------------------------------------------------------------- exact enumeration

V, START = 5, 5


def _tables(kind, seed):
    """p, q [V+1, V+1, V]: next-token tables given the last two tokens (START before the text)."""
    rng = np.random.default_rng(seed)
    shape = (V + 1, V + 1, V)
    p, q = rng.dirichlet(np.ones(V), shape[:2]), rng.dirichlet(np.ones(V), shape[:2])
    if kind == "equal":
        q = p.copy()
    elif kind == "disjoint":                      # p on {0, 1, 2}, q on {3, 4} in every context
        p[..., 3:], q[..., :3] = 0, 0
    elif kind == "onehot_q":
        q = np.eye(V)[rng.integers(0, V, shape[:2])]
    elif kind == "zeros":                          # random zeros in both (each row keeps one token)
        for t in (p, q):
            t *= rng.random(shape) < 0.5
            t[..., 0] += (t.sum(-1) == 0)
    elif kind == "mixed":                          # per context: equal, disjoint-ish, or random
        sel = rng.integers(0, 3, shape[:2])
        q = np.where((sel == 0)[..., None], p, q)
        q = np.where((sel == 1)[..., None], np.roll(p, 2, axis=-1) * (p < 0.2), q)
        q[..., 0] += q.sum(-1) == 0
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


def _ctx(prefix):
    h = (START, START) + tuple(prefix)
    return h[-2], h[-1]


def _round_law(ctx, p, q, gamma, residual_fn):
    """Exact law of one round's emitted tokens (a dict tuple -> probability) after a prefix ending in
    ``ctx``, enumerating every draft sequence and every accept / reject branch of the rule."""
    drafts = np.asarray(list(itertools.product(range(V), repeat=gamma)))            # [N, g]
    hist = [tuple(ctx) + tuple(d) for d in drafts]
    qs = np.stack([[q[h[i], h[i + 1]] for i in range(gamma)] for h in hist])        # [N, g, V]
    ps = np.stack([[p[h[i], h[i + 1]] for i in range(gamma + 1)] for h in hist])    # [N, g+1, V]
    weight = np.prod(np.take_along_axis(qs, drafts[..., None], -1)[..., 0], axis=1)
    acc = np.asarray(acceptance_probs(jnp.asarray(ps[:, :gamma]), jnp.asarray(qs), jnp.asarray(drafts)))
    q_pad = np.concatenate([qs, np.zeros_like(qs[:, :1])], axis=1)                   # bonus = residual(p_g, 0)
    res = np.asarray(residual_fn(jnp.asarray(ps), jnp.asarray(q_pad)))
    law = defaultdict(float)
    for d, w, a, r in zip(drafts, weight, acc, res):
        for k in range(gamma + 1):
            if w == 0:
                break
            stop = 1.0 if k == gamma else 1.0 - a[k]
            for t in range(V):
                if r[k, t] * stop > 0:
                    law[tuple(d[:k]) + (t,)] += w * stop * r[k, t]
            if k < gamma:
                w = w * a[k]
    return law


def _speculative_law(p, q, gamma, length, residual_fn=residual):
    """Law of the first ``length`` emitted tokens when rounds are chained from the empty prefix."""
    memo = {}

    def rnd(prefix):
        c = _ctx(prefix)
        if c not in memo:
            memo[c] = _round_law(c, p, q, gamma, residual_fn)
        return memo[c]

    def stream(prefix, n):
        out = defaultdict(float)
        for s, w in rnd(prefix).items():
            if len(s) >= n:
                out[s[:n]] += w
            else:
                for s2, w2 in stream(prefix + s, n - len(s)).items():
                    out[s + s2] += w * w2
        return out

    return stream((), length)


def _target_law(p, length):
    law = {}
    for seq in itertools.product(range(V), repeat=length):
        law[seq] = np.prod([p[_ctx(seq[:i])][seq[i]] for i in range(length)])
    return law


def _tv(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "equal", "disjoint", "onehot_q", "zeros", "mixed"])
def test_exact_law_equals_target(kind, gamma):
    with jax.enable_x64(True):
        p, q = _tables(kind, seed=gamma)
        length = gamma + 2                          # always spans at least two rounds
        spec = _speculative_law(p, q, gamma, length)
        assert abs(sum(spec.values()) - 1) < 1e-12
        assert _tv(spec, _target_law(p, length)) < 1e-9


def test_exact_law_catches_a_wrong_residual():
    with jax.enable_x64(True):
        p, q = _tables("random", seed=0)
        wrong = _speculative_law(p, q, 2, 3, residual_fn=lambda p, q: p)    # resample from p on rejection
        assert _tv(wrong, _target_law(p, 3)) > 1e-2


# ----------------------------------------------------------------------------- Monte Carlo, jitted verify


def _sample_rows(probs, rng):
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[-1] - 1)


def _mc_round(hist, p, q, gamma, rng, key, verify_fn):
    """One round for every row (history [N, H], START-padded) with numpy drafts and ``verify_fn``."""
    drafts, qs, ps, h = [], [], [], hist
    for _ in range(gamma):
        qs.append(q[h[:, -2], h[:, -1]])
        ps.append(p[h[:, -2], h[:, -1]])
        drafts.append(_sample_rows(qs[-1], rng))
        h = np.concatenate([h, drafts[-1][:, None]], 1)
    ps.append(p[h[:, -2], h[:, -1]])
    d = np.stack(drafts, 1)
    n, nxt = verify_fn(jnp.asarray(d), jnp.asarray(np.stack(qs, 1), jnp.float32),
                       jnp.asarray(np.stack(ps, 1), jnp.float32), key)
    return d, np.asarray(n), np.asarray(nxt)


def _first_two_chi2(verify_fn, rows=40000, gamma=2):
    p, q = _tables("random", seed=11)
    rng = np.random.default_rng(0)
    hist = np.full((rows, 2), START)
    d, n, nxt = _mc_round(hist, p, q, gamma, rng, jax.random.key(0), verify_fn)
    first = np.where(n >= 1, d[:, 0], nxt)
    second = np.where(n >= 2, d[:, 1], nxt)                           # n == 1: the next token
    hist2 = np.concatenate([hist, first[:, None]], 1)                 # rows with n == 0 need round 2
    d2, n2, nxt2 = _mc_round(hist2, p, q, gamma, rng, jax.random.key(1), verify_fn)
    second = np.where(n == 0, np.where(n2 >= 1, d2[:, 0], nxt2), second)
    counts = np.bincount(first * V + second, minlength=V * V)
    law = np.asarray([p[START, START][a] * p[START, a][b] for a in range(V) for b in range(V)])
    return np.sum((counts - rows * law) ** 2 / (rows * law)), V * V - 1


def test_verify_monte_carlo_first_two_tokens():
    chi2, dof = _first_two_chi2(verify)
    assert chi2 < sps.chi2.ppf(1 - 1e-4, dof), chi2
    wrong = jax.jit(functools.partial(_verify, residual_fn=lambda p, q: p))
    chi2_wrong, _ = _first_two_chi2(wrong)
    assert chi2_wrong > 10 * sps.chi2.ppf(1 - 1e-4, dof), chi2_wrong


# ----------------------------------------------------------------------------- the jitted loop

TARGET = LMConfig(vocab_size=29, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=40, max_len=24,
                  init_std=0.4)
DRAFT = LMConfig(vocab_size=29, dim=16, depth=1, num_heads=2, num_kv_heads=1, mlp_hidden=24, max_len=24,
                 init_std=0.4)
PROMPTS = [[3, 7, 1, 9, 4], [5], [2, 2, 8]]


def _batch(prompts):
    p = max(len(x) for x in prompts)
    toks = np.zeros((len(prompts), p), np.int32)
    for i, x in enumerate(prompts):
        toks[i, :len(x)] = x
    return jnp.asarray(toks), jnp.asarray([len(x) for x in prompts], jnp.int32)


@pytest.fixture(scope="module")
def models():
    tp = init_params(TARGET, jax.random.key(0))
    noise = jax.tree.map(lambda x, k: x + 0.01 * jax.random.normal(k, x.shape),
                         tp, jax.tree.unflatten(jax.tree.structure(tp),
                                                list(jax.random.split(jax.random.key(7), len(jax.tree.leaves(tp))))))
    return tp, {"small": (init_params(DRAFT, jax.random.key(1)), DRAFT), "noisy": (noise, TARGET),
                "same": (tp, TARGET)}


def _assert_greedy_margins(params, cfg, seqs, lens, n):
    """Every greedy decision behind ``seqs`` wins by far more than the float32 differences between
    a (gamma+1)-token and a 1-token forward (~1e-6), so token equality cannot flip on other machines."""
    for r, p in enumerate(np.asarray(lens)):
        logits = np.asarray(apply_logits(params, cfg, jnp.asarray(seqs[r:r + 1, :p + n])))[0, p - 1:p + n - 1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4, "ambiguous greedy step; pick another seed"


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("draft", ["small", "noisy", "same"])
def test_greedy_equals_generate(models, draft, gamma):
    tp, drafts = models
    dp, dcfg = drafts[draft]
    toks, lens = _batch(PROMPTS)
    n = 10
    want = np.asarray(generate(tp, TARGET, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    _assert_greedy_margins(tp, TARGET, want, lens, n)
    out, st = speculative_generate(tp, TARGET, dp, dcfg, toks, lens, max_new_tokens=n, gamma=gamma,
                                   key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), want)
    s = summarize_stats(st)
    assert np.asarray(st["row_emitted"]).min() >= n
    if draft == "same":                                     # every draft accepted, gamma + 1 per forward
        assert s["tau"] == gamma + 1 and s["alpha"] == [1.0] * gamma
        assert s["target_forwards"] == -(-n // (gamma + 1))
    if draft == "noisy":                                    # ragged acceptance across rows and rounds
        assert 0 < s["acceptance"] < 1 and 1 < s["tau"] < gamma + 1
        assert int(st["accepted"][-1]) > 0          # some rounds accepted all drafts (draft catches up 2)


def _two_token_law(params, cfg, first, temperature, top_k):
    p0 = filtered_probs(apply_logits(params, cfg, jnp.asarray([[first]]))[0, -1], temperature, top_k)
    seqs = jnp.asarray([[first, a] for a in range(cfg.vocab_size)])
    p1 = filtered_probs(apply_logits(params, cfg, seqs)[:, -1], temperature, top_k)
    return np.asarray(p0[:, None] * p1).ravel()


def _pooled_chi2(counts, law, rows):
    exp = rows * law
    big = exp >= 5
    c = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    return np.sum((c[keep] - e[keep]) ** 2 / e[keep]), keep.sum() - 1


def test_sampled_loop_first_two_tokens_have_target_law():
    tcfg = LMConfig(vocab_size=8, dim=16, depth=1, num_heads=2, num_kv_heads=2, mlp_hidden=24, max_len=8,
                    init_std=0.5)
    dcfg = tcfg.replace(dim=8, num_heads=1, num_kv_heads=1, mlp_hidden=16, init_std=0.2)
    tp, dp = init_params(tcfg, jax.random.key(3)), init_params(dcfg, jax.random.key(4))
    rows, first, temp, top_k = 4000, 5, 1.0, 6
    toks, lens = jnp.full((rows, 1), first, jnp.int32), jnp.ones((rows,), jnp.int32)
    out, st = speculative_generate(tp, tcfg, dp, dcfg, toks, lens, max_new_tokens=2, gamma=2, key=jax.random.key(5),
                                   temperature=temp, top_k=top_k)
    out = np.asarray(out)
    assert (out[:, 0] == first).all()
    counts = np.bincount(out[:, 1] * 8 + out[:, 2], minlength=64)
    law = _two_token_law(tp, tcfg, first, temp, top_k)
    assert counts[law == 0].sum() == 0                      # top-k support respected
    chi2, dof = _pooled_chi2(counts, law, rows)
    assert chi2 < sps.chi2.ppf(1 - 1e-4, dof), chi2
    chi2_draft, dof = _pooled_chi2(counts, _two_token_law(dp, dcfg, first, temp, top_k), rows)
    assert chi2_draft > sps.chi2.ppf(1 - 1e-4, dof), chi2_draft          # the test can tell the models apart
    s = summarize_stats(st)
    assert 0 < s["acceptance"] < 1 and s["target_forwards"] <= 2


def test_bad_inputs_raise():
    tp, dp = init_params(TARGET, jax.random.key(0)), init_params(DRAFT, jax.random.key(1))
    toks, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=4, gamma=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(tp, TARGET, dp, DRAFT.replace(vocab_size=30), toks, lens, **kw)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(tp, TARGET, dp, DRAFT, toks, lens, **{**kw, "gamma": 0})
    with pytest.raises(ValueError, match="softmax"):
        speculative_generate(tp, TARGET, dp, DRAFT.replace(attention="linear", num_kv_heads=2), toks, lens, **kw)
    with pytest.raises(ValueError, match="in flight"):                 # 5 + 19 fits max_len, + gamma - 1 does not
        speculative_generate(tp, TARGET, dp, DRAFT, toks, lens, **{**kw, "max_new_tokens": 19})
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(tp, TARGET, dp, DRAFT, toks, lens, **kw, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        speculative_generate(tp, TARGET, dp, DRAFT, toks, lens[:2], **kw)
    probs = jnp.full((2, 3, 5), 0.2)
    with pytest.raises(ValueError, match="target_probs"):
        verify(jnp.zeros((2, 3), jnp.int32), probs, probs, jax.random.key(0))
    with pytest.raises(ValueError, match="target_logits"):
        verify_greedy(jnp.zeros((2, 3), jnp.int32), probs)


@pytest.mark.parametrize("draft", ["noisy", "same"])
def test_stop_tokens_end_rows_like_generate(models, draft):
    tp, drafts = models
    dp, dcfg = drafts[draft]
    toks, lens = _batch(PROMPTS)
    n = 10
    free = np.asarray(generate(tp, TARGET, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    stop = int(free[0, int(lens[0]) + 2])                   # row 0 emits it as its 3rd new token
    want = np.asarray(generate(tp, TARGET, toks, lens, max_new_tokens=n, key=jax.random.key(0), stop_tokens=(stop,)))
    out, st = speculative_generate(tp, TARGET, dp, dcfg, toks, lens, max_new_tokens=n, gamma=3, key=jax.random.key(0),
                                   stop_tokens=(stop,))
    np.testing.assert_array_equal(np.asarray(out), want)
    assert int(st["num_generated"][0]) <= 3
