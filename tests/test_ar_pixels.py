"""research.ar.pixels: the class-conditional AR model over token grids on the LM stack.

Causality, cached sampling == full forward, exact NLL against a float64 NumPy reference, the
closed-form NLL of a uniform model, sampled frequencies of a model with a known fixed
distribution (chi-square), and input validation; float32 and float64 where it applies.
"""
import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.ar import (
    TokenGrid, bits_per_token, input_sequence, log_likelihood, make_lm_config, nll_loss, sample, token_logits,
)
from research.lm import apply_logits, init_params

DTYPES = ["float32", "float64"]
TOL = {"float32": 2e-5, "float64": 1e-10}


@contextlib.contextmanager
def precision(dtype):
    """float64 runs inside ``jax.enable_x64`` (restored afterwards for the other tests)."""
    if dtype == "float64":
        with jax.enable_x64(True):
            yield
    else:
        yield


def _model(grid, dtype, *, num_kv_heads=None, init_std=0.3, seed=0):
    cfg = make_lm_config(grid, dim=16, depth=2, num_heads=2, num_kv_heads=num_kv_heads, dtype=dtype,
                         init_std=init_std)
    return cfg, init_params(cfg, jax.random.key(seed))


def _data(grid, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, grid.num_levels, (n, grid.height, grid.width)).astype(np.int32),
            rng.integers(0, grid.num_classes, n).astype(np.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_changing_token_i_leaves_positions_up_to_i(dtype):
    grid = TokenGrid(4, 4, num_levels=5, num_classes=3)
    with precision(dtype):
        cfg, params = _model(grid, dtype)
        tokens, labels = _data(grid, 3)
        fn = jax.jit(lambda t, y: token_logits(params, cfg, grid, t, y))
        base = np.asarray(fn(tokens, labels))
        assert base.shape == (3, 16, 5) and base.dtype == np.dtype(dtype)
        for i in (0, 5, 14, 15):
            t2 = tokens.reshape(3, 16).copy()
            t2[:, i] = (t2[:, i] + 1) % grid.num_levels
            out = np.asarray(fn(t2.reshape(3, 4, 4), labels))
            # position j predicts token j from tokens < j: token i only reaches positions > i
            np.testing.assert_allclose(out[:, :i + 1], base[:, :i + 1], rtol=0, atol=TOL[dtype])
            if i < 15:
                assert np.abs(out[:, i + 1:] - base[:, i + 1:]).max() > 1e-3
        # the class token conditions every position, the first one included
        out = np.asarray(fn(tokens, (labels + 1) % grid.num_classes))
        assert np.all(np.abs(out - base).max(axis=-1) > 1e-4)


@pytest.mark.parametrize("dtype,num_kv_heads,shape", [("float64", None, (4, 4)), ("float32", 1, (3, 5))])
def test_cached_sampler_logits_equal_full_forward(dtype, num_kv_heads, shape):
    grid = TokenGrid(*shape, num_levels=6, num_classes=4)
    with precision(dtype):
        cfg, params = _model(grid, dtype, num_kv_heads=num_kv_heads)
        labels = jnp.arange(8, dtype=jnp.int32) % grid.num_classes
        toks, logits = sample(params, cfg, grid, labels, jax.random.key(1), return_logits=True)
        assert toks.shape == (8, *shape) and toks.dtype == jnp.int32
        assert logits.shape == (8, grid.length, 6) and logits.dtype == jnp.dtype(dtype)
        full = token_logits(params, cfg, grid, toks, labels)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=0, atol=TOL[dtype])
        # the samples vary (the comparison is over more than one repeated sequence)
        assert len({tuple(np.asarray(r).ravel()) for r in toks}) == 8
        # same key -> same samples; another key -> other samples
        again = sample(params, cfg, grid, labels, jax.random.key(1), return_logits=True)[0]
        np.testing.assert_array_equal(np.asarray(again), np.asarray(toks))
        other = sample(params, cfg, grid, labels, jax.random.key(2), return_logits=True)[0]
        assert np.any(np.asarray(other) != np.asarray(toks))


def _numpy_log_likelihood(logits_full, tokens, labels, grid):
    """float64 NumPy: sum over raster positions of log-softmax over the level logits, picked at the token."""
    lg = np.asarray(logits_full, np.float64)[..., :grid.num_levels]
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    flat = tokens.reshape(len(tokens), -1)
    out = np.zeros(len(tokens))
    for b in range(len(tokens)):
        for i in range(grid.length):
            out[b] += logp[b, i, flat[b, i]]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_nll_matches_float64_numpy(dtype):
    grid = TokenGrid(3, 4, num_levels=7, num_classes=5)
    with precision(dtype):
        cfg, params = _model(grid, dtype)
        tokens, labels = _data(grid, 4, seed=3)
        # the input row built by hand: class token (num_levels + y), then the raster tokens but the last
        seq = np.concatenate([grid.num_levels + labels[:, None], tokens.reshape(4, -1)[:, :-1]], axis=1)
        np.testing.assert_array_equal(np.asarray(input_sequence(grid, tokens, labels)), seq)
        ref = _numpy_log_likelihood(apply_logits(params, cfg, jnp.asarray(seq)), tokens, labels, grid)
        got = np.asarray(log_likelihood(params, cfg, grid, tokens, labels))
        np.testing.assert_allclose(got, ref, rtol=1e-5 if dtype == "float32" else 1e-12)
        loss, aux = nll_loss(params, cfg, grid, {"tokens": tokens, "label": labels})
        np.testing.assert_allclose(float(loss), -ref.mean() / grid.length, rtol=1e-5)
        np.testing.assert_allclose(float(aux["bits_per_token"]), -ref.mean() / grid.length / math.log(2), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(bits_per_token(got, grid.length)),
                                   -ref / (grid.length * math.log(2)), rtol=1e-5)


def test_uniform_model_nll_is_log_num_levels_and_gradients_flow():
    grid = TokenGrid(8, 8, num_levels=17, num_classes=10)
    cfg, params = _model(grid, "float32")
    params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])
    tokens, labels = _data(grid, 5)
    fn = jax.jit(jax.value_and_grad(lambda p: nll_loss(p, cfg, grid, {"tokens": tokens, "label": labels}),
                                    has_aux=True))
    (loss, aux), grads = fn(params)
    np.testing.assert_allclose(float(loss), math.log(17), rtol=1e-6)  # the 10 class logits are not in the softmax
    np.testing.assert_allclose(float(aux["bits_per_token"]), math.log2(17), rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["lm_head"]["kernel"]).max()) > 0


def _fixed_distribution_params(cfg, params, logits):
    """Blocks zeroed (the residual stream is the embedding), every embedding = ones, final norm scale 1:
    the hidden state is ones / sqrt(1 + eps) at every position, so the logits are ``logits`` everywhere."""
    fixed = jax.tree.map(jnp.zeros_like, params)
    fixed["embed"]["embedding"] = jnp.ones_like(params["embed"]["embedding"])
    fixed["norm"]["scale"] = jnp.ones_like(params["norm"]["scale"])
    w = np.tile(np.asarray(logits, np.float64)[None] * math.sqrt(1 + cfg.norm_eps) / cfg.dim, (cfg.dim, 1))
    fixed["lm_head"]["kernel"] = jnp.asarray(w, params["lm_head"]["kernel"].dtype)
    return fixed


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, 3)])
def test_sampled_frequencies_match_known_distribution(temperature, top_k):
    grid = TokenGrid(4, 4, num_levels=5, num_classes=3)
    cfg, params = _model(grid, "float32")
    level_logits = np.array([0.3, -1.0, 1.2, 0.0, 0.7])
    # the class tokens get by far the largest logits: they must be dropped, not sampled
    params = _fixed_distribution_params(cfg, params, np.concatenate([level_logits, [9.0, 9.0, 9.0]]))
    z = level_logits / temperature
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(np.asarray(token_logits(params, cfg, grid, *_data(grid, 2)))[0, 3], level_logits,
                               atol=1e-5)
    labels = jnp.arange(2000, dtype=jnp.int32) % 3
    toks = np.asarray(sample(params, cfg, grid, labels, jax.random.key(4), temperature=temperature, top_k=top_k))
    counts = np.bincount(toks.ravel(), minlength=grid.vocab_size)
    assert counts[grid.num_levels:].sum() == 0  # never a class token
    n = counts.sum()
    assert np.all(counts[:5][probs == 0] == 0)  # outside the top-k: never drawn
    keep = probs > 0
    chi2 = float(np.sum((counts[:5][keep] - n * probs[keep]) ** 2 / (n * probs[keep])))
    assert chi2 < 25.0, (chi2, counts, n * probs)  # dof <= 4: P(chi2 > 25) < 1e-4


def test_greedy_sampling_takes_the_argmax():
    grid = TokenGrid(2, 3, num_levels=4, num_classes=2)
    cfg, params = _model(grid, "float32")
    params = _fixed_distribution_params(cfg, params, [0.1, 2.0, 0.5, -1.0, 5.0, 5.0])
    toks = sample(params, cfg, grid, jnp.array([0, 1], jnp.int32), jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(toks), np.ones((2, 2, 3), np.int32))


def test_bad_inputs_rejected():
    grid = TokenGrid(4, 4, num_levels=5, num_classes=3)
    cfg, params = _model(grid, "float32")
    tokens, labels = _data(grid, 2)
    key = jax.random.key(0)
    cases = [
        (lambda: sample(params, cfg, grid, jnp.array([0, 3]), key), ValueError, "labels must be in"),
        (lambda: sample(params, cfg, grid, jnp.array([-1, 0]), key), ValueError, "labels must be in"),
        (lambda: sample(params, cfg, grid, jnp.array([0.0, 1.0]), key), TypeError, "integer class ids"),
        (lambda: sample(params, cfg, grid, jnp.zeros((2, 1), jnp.int32), key), ValueError, r"labels must be \[N\]"),
        (lambda: sample(params, cfg, grid, labels, key, temperature=-1.0), ValueError, "temperature"),
        (lambda: sample(params, cfg, grid, labels, key, top_k=0), ValueError, "top_k"),
        (lambda: log_likelihood(params, cfg, grid, tokens[:, :3], labels), ValueError, r"tokens must be \[N, 4, 4\]"),
        (lambda: log_likelihood(params, cfg, grid, tokens + 5, labels), ValueError, r"tokens must be in \[0, 4\]"),
        (lambda: log_likelihood(params, cfg, grid, tokens.astype(np.float32), labels), TypeError, "integer token"),
        (lambda: log_likelihood(params, cfg, grid, tokens, labels[:1]), ValueError, r"labels must be \[2\]"),
        (lambda: log_likelihood(params, cfg, TokenGrid(4, 4, 6, 3), tokens, labels), ValueError, "vocab_size"),
        (lambda: log_likelihood(params, cfg, TokenGrid(5, 4, 4, 4), tokens, labels), ValueError, "max_len"),
        (lambda: TokenGrid(8, 8, 0, 10), ValueError, "num_levels must be a positive int"),
        (lambda: make_lm_config((8, 8), dim=16, depth=1, num_heads=2), TypeError, "TokenGrid"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
