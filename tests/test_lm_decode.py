"""research.lm.decode: generation against a cache-free argmax loop, and the sampling rules.

* greedy ``generate`` (one jitted while_loop, ragged prompts in one batch) equals re-running the
  full forward on the growing sequence and taking the argmax, row by row;
* a row's output does not depend on the other rows of the batch;
* stop tokens end a row (the stop token is written, padding after it);
* ``sample_logits``: empirical frequencies match softmax(logits / T) (chi-square bound), top-k
  and top-p restrict the support to exactly the closed-form set, top_k=1 is greedy;
* sampling is a pure function of the key.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.lm import LMConfig, apply_logits, init_params
from research.lm.decode import generate, generate_with_lengths, sample_logits

CFG = LMConfig(vocab_size=29, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=40, max_len=24, init_std=0.4)
LIN = CFG.replace(attention="linear", num_kv_heads=4)
_logits = jax.jit(apply_logits, static_argnums=1)


@pytest.fixture(scope="module", params=["softmax", "linear"])
def model(request):
    cfg = CFG if request.param == "softmax" else LIN
    return cfg, init_params(cfg, jax.random.key(0))


PROMPTS = [[3, 7, 1, 9, 4], [5], [2, 2, 8]]


def _batch(prompts):
    p = max(len(x) for x in prompts)
    toks = np.zeros((len(prompts), p), np.int32)
    for i, x in enumerate(prompts):
        toks[i, :len(x)] = x
    return jnp.asarray(toks), jnp.asarray([len(x) for x in prompts], jnp.int32)


def naive_greedy(params, cfg, prompt, n):
    """Greedy continuation by re-running the full forward; also checks that every argmax wins by a
    margin far above the cached-vs-full float32 differences (~1e-6), so the comparison cannot flip
    on another machine's kernels."""
    seq = list(prompt)
    for _ in range(n):
        last = np.asarray(_logits(params, cfg, jnp.asarray([seq], jnp.int32))[0, -1])
        top2 = np.sort(last)[-2:]
        assert top2[1] - top2[0] > 1e-4, f"ambiguous argmax (margin {top2[1] - top2[0]:.2e}); pick another seed"
        seq.append(int(np.argmax(last)))
    return seq


def test_greedy_equals_full_forward_argmax_ragged_batch(model):
    cfg, params = model
    toks, lens = _batch(PROMPTS)
    n = 6
    out = np.asarray(generate(params, cfg, toks, lens, max_new_tokens=n, key=jax.random.key(0)))
    assert out.shape == (3, toks.shape[1] + n)
    for r, p in enumerate(PROMPTS):
        want = naive_greedy(params, cfg, p, n)
        assert out[r, :len(want)].tolist() == want
        assert (out[r, len(want):] == 0).all()
    assert len({tuple(out[r, len(p):len(p) + n]) for r, p in enumerate(PROMPTS)}) > 1  # not a constant model


def test_row_independent_of_batch(model):
    cfg, params = model
    toks, lens = _batch(PROMPTS)
    key = jax.random.key(4)
    both = np.asarray(generate(params, cfg, toks, lens, max_new_tokens=5, key=key, temperature=0.0))
    alone = np.asarray(generate(params, cfg, toks[1:2, :1], lens[1:2], max_new_tokens=5, key=key))
    assert both[1, :6].tolist() == alone[0].tolist()


def test_stop_tokens_end_a_row():
    params = init_params(CFG, jax.random.key(0))
    toks, lens = _batch(PROMPTS)
    free = np.asarray(generate(params, CFG, toks, lens, max_new_tokens=6, key=jax.random.key(0)))
    stop = int(free[0, len(PROMPTS[0]) + 1])  # row 0's second generated token
    out, count = generate_with_lengths(params, CFG, toks, lens, max_new_tokens=6, key=jax.random.key(0),
                                       stop_tokens=(stop,), pad_id=-1)
    out, count = np.asarray(out), np.asarray(count)
    first = free[0, len(PROMPTS[0]):].tolist().index(stop)
    assert count[0] == first + 1
    assert out[0, len(PROMPTS[0]):len(PROMPTS[0]) + first + 1].tolist() == free[0, len(PROMPTS[0]):][:first + 1].tolist()
    assert (out[0, len(PROMPTS[0]) + first + 1:] == -1).all()
    for r in (1, 2):  # rows that never emit the stop token run the full length
        gen = free[r, len(PROMPTS[r]):len(PROMPTS[r]) + 6].tolist()
        if stop not in gen:
            assert count[r] == 6 and out[r, len(PROMPTS[r]):len(PROMPTS[r]) + 6].tolist() == gen


def test_sampling_is_a_function_of_the_key():
    params = init_params(CFG, jax.random.key(0))
    toks, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=10)
    a = generate(params, CFG, toks, lens, key=jax.random.key(1), **kw)
    b = generate(params, CFG, toks, lens, key=jax.random.key(1), **kw)
    c = generate(params, CFG, toks, lens, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


LOGITS = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.25, 0.2]]))


def _freqs(n=40000, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: sample_logits(LOGITS, k, **kw)[0])(keys)
    return np.bincount(np.asarray(draws), minlength=5) / n


def _check_freqs(freq, probs, n=40000):
    # chi-square with 4 dof: 99.99% quantile ~ 23.5; a wrong temperature / mask is off by >> that
    probs = np.asarray(probs)
    support = probs > 0
    assert (freq[~support] == 0).all()
    chi2 = n * np.sum((freq[support] - probs[support]) ** 2 / probs[support])
    assert chi2 < 23.5, chi2


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    probs = jax.nn.softmax(LOGITS[0] / temperature)
    _check_freqs(_freqs(temperature=temperature), probs)


def test_top_k_and_top_p_supports():
    p = np.asarray([0.05, 0.4, 0.1, 0.25, 0.2])
    top2 = np.where(np.isin(np.arange(5), [1, 3]), p, 0)
    _check_freqs(_freqs(temperature=1.0, top_k=2), top2 / top2.sum())
    # nucleus 0.7: sorted 0.4, 0.25 (cum 0.65 < 0.7), then 0.2 is needed to reach 0.7 -> {1, 3, 4}
    nuc = np.where(np.isin(np.arange(5), [1, 3, 4]), p, 0)
    _check_freqs(_freqs(temperature=1.0, top_p=0.7), nuc / nuc.sum())
    assert (_freqs(n=2000, temperature=1.0, top_k=1) == np.eye(5)[1]).all()
    assert int(sample_logits(LOGITS, jax.random.key(0))[0]) == 1


def test_generate_rejects_bad_arguments():
    params = init_params(CFG, jax.random.key(0))
    toks, lens = _batch(PROMPTS)
    with pytest.raises(ValueError, match="max_len"):
        generate(params, CFG, toks, lens, max_new_tokens=30, key=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(params, CFG, toks, lens[:2], max_new_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        generate(params, CFG, toks, lens, max_new_tokens=3, key=jax.random.key(0), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, toks, lens, max_new_tokens=3, key=jax.random.key(0), temperature=1.0, top_p=1.5)
    with pytest.raises(TypeError, match="integer"):
        generate(params, CFG, toks.astype(jnp.float32), lens, max_new_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 5\]"):
        generate(params, CFG, toks, lens.at[1].set(0), max_new_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 5\]"):
        generate(params, CFG, toks, lens.at[1].set(6), max_new_tokens=3, key=jax.random.key(0))
