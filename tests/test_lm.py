"""research.lm: the model's invariants against closed forms and independent constructions.

* cached decoding (prefill + one token at a time, ragged rows) reproduces the full causal forward's
  logits at every position, for MHA / GQA / MQA, tied / untied, scanned / unrolled blocks,
  softmax and linear attention, float32 (<= 1e-5) and float64 (<= 1e-10);
* a packed row gives each document the logits (and loss) it has alone;
* a GQA model equals the MHA model whose K/V heads are the GQA heads repeated per group;
* RoPE equals a float64 complex-multiplication transcription, and scores depend only on m - n;
* KV-cache rollback: decoding after a rollback equals decoding from scratch.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.lm import LMConfig, lm_loss
from research.lm import apply_logits as _apply_logits
from research.lm import init_params as _init_params
from research.lm.cache import forward_cached, init_cache
from research.lm.model import head, rope

# jitted once per config (eager flax applies dominate these tiny tests' time otherwise)
init_params = jax.jit(_init_params, static_argnums=0)
apply_logits = jax.jit(_apply_logits, static_argnums=1)
lm_loss = jax.jit(lm_loss, static_argnums=1)

TOL = {"float32": 1e-5, "float64": 1e-10}


@pytest.fixture(params=["float32", "float64"])
def fdtype(request):
    if request.param == "float32":
        yield "float32"
    else:
        with jax.enable_x64(True):
            yield "float64"


def small_cfg(dtype="float32", **kw):
    base = dict(vocab_size=37, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=40, max_len=24,
                dtype=dtype, param_dtype=dtype, init_std=0.3)
    base.update(kw)
    return LMConfig(**base)


def _tokens(key, b, t, vocab):
    return jax.random.randint(jax.random.key(key), (b, t), 0, vocab, dtype=jnp.int32)


def cached_logits(params, cfg, tokens, prompt_lengths):
    """Logits at every position from a ragged prefill followed by one-token decode steps.

    Row b's first prompt_lengths[b] tokens are prefilled together (the batch's other columns are
    padding for that row); then each row is fed its own next token one at a time."""
    b, t = tokens.shape
    p = int(max(prompt_lengths))
    cache = init_cache(cfg, b, t)
    prefill = jax.jit(lambda prm, tok, c, n: (lambda h, c: (head(prm, cfg, h), c))(
        *forward_cached(prm, cfg, tok, c, num_new=n)))
    logits, cache = prefill(params, tokens[:, :p], cache, jnp.asarray(prompt_lengths))
    out = np.zeros((b, t, cfg.vocab_size))
    logits = np.asarray(logits)
    for r in range(b):
        out[r, :prompt_lengths[r]] = logits[r, :prompt_lengths[r]]
    @jax.jit
    def step(prm, tok, c, n):
        hidden, c = forward_cached(prm, cfg, tok, c, num_new=n)
        return head(prm, cfg, hidden[:, 0]), c

    for _ in range(t - min(prompt_lengths)):
        pos = np.asarray(cache.lengths)
        keep = pos < t  # a row that has consumed all its tokens keeps nothing more
        tok = tokens[jnp.arange(b), jnp.minimum(cache.lengths, t - 1)][:, None]
        logits, cache = step(params, tok, cache, jnp.asarray(keep, jnp.int32))
        logits = np.asarray(logits)
        for r in np.nonzero(keep)[0]:
            out[r, pos[r]] = logits[r]
    return out


VARIANTS = {
    "gqa": {},
    "mha": dict(num_kv_heads=4),
    "mqa": dict(num_kv_heads=1),
    "tied": dict(tie_embeddings=True),
    "unrolled": dict(scan_layers=False),
    "linear": dict(attention="linear", num_kv_heads=4),
}


# every variant in float32; float64 for the two decoding states (KV cache, linear state)
@pytest.mark.parametrize("variant, fdtype", [(v, "float32") for v in VARIANTS]
                         + [("gqa", "float64"), ("linear", "float64")])
def test_cached_decoding_equals_full_forward(variant, fdtype):
    with jax.enable_x64(fdtype == "float64"):
        cfg = small_cfg(fdtype, **VARIANTS[variant])
        params = init_params(cfg, jax.random.key(0))
        tokens = _tokens(1, 3, 11, cfg.vocab_size)
        full = np.asarray(apply_logits(params, cfg, tokens))
        got = cached_logits(params, cfg, tokens, [4, 1, 7])
    np.testing.assert_allclose(got, full, atol=TOL[fdtype] * max(1.0, np.abs(full).max()), rtol=0)


def test_cached_decoding_pallas_kernel_matches_xla():
    """attn_impl='pallas' routes cached attention through the split-K kernel (interpret mode here)."""
    cfg = small_cfg("float32", depth=1, dim=64, attn_impl="pallas")  # head dim 16: the kernels' minimum
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 2, 9, cfg.vocab_size)
    full = np.asarray(apply_logits(params, cfg.replace(attn_impl="xla"), tokens))
    np.testing.assert_allclose(cached_logits(params, cfg, tokens, [3, 5]), full, atol=1e-5 * np.abs(full).max())


def test_rollback_then_redecode_equals_fresh():
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(3))
    a, b = _tokens(4, 2, 10, cfg.vocab_size), _tokens(5, 2, 4, cfg.vocab_size)
    cache = init_cache(cfg, 2, 16)
    _, cache = forward_cached(params, cfg, a, cache)
    _, cache = forward_cached(params, cfg, b, cache)         # a speculative continuation ...
    cache = cache.rollback(jnp.array([10, 7]))               # ... rejected (row 1 also loses 3 of a)
    nxt = b[:, :2]
    h_roll, _ = forward_cached(params, cfg, nxt, cache)
    fresh = init_cache(cfg, 2, 16)
    _, fresh = forward_cached(params, cfg, a, fresh, num_new=jnp.array([10, 7]))
    h_fresh, _ = forward_cached(params, cfg, nxt, fresh)
    np.testing.assert_array_equal(np.asarray(h_roll), np.asarray(h_fresh))  # same program, same inputs


def _pack(docs):
    tokens = np.concatenate(docs)[None].astype(np.int32)
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(len(d)) for d in docs])[None].astype(np.int32)
    return tokens, seg, pos


def test_packed_row_equals_documents_alone(fdtype):
    cfg = small_cfg(fdtype)
    params = init_params(cfg, jax.random.key(1))
    docs = [np.asarray(_tokens(10 + i, 1, n, cfg.vocab_size))[0] for i, n in enumerate([5, 9, 3])]
    tokens, seg, pos = _pack(docs)
    packed = np.asarray(apply_logits(params, cfg, jnp.asarray(tokens), positions=jnp.asarray(pos),
                                     segment_ids=jnp.asarray(seg)))[0]
    start, nll_docs = 0, 0.0
    for d in docs:
        alone = np.asarray(apply_logits(params, cfg, jnp.asarray(d[None])))[0]
        np.testing.assert_allclose(packed[start:start + len(d)], alone, atol=TOL[fdtype] * np.abs(alone).max())
        _, aux = lm_loss(params, cfg, {"tokens": jnp.asarray(d[None]), "segment_ids": jnp.ones((1, len(d)), jnp.int32)})
        nll_docs += float(aux["nll_sum"])
        start += len(d)
    _, aux = lm_loss(params, cfg, {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
                                   "positions": jnp.asarray(pos)})
    assert float(aux["real_tokens"]) == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(float(aux["nll_sum"]), nll_docs, rtol=10 * TOL[fdtype])


def _repeat_kv_heads(params, cfg):
    """MHA params equal to the GQA model: each K/V head repeated for the query heads it serves."""
    rep = cfg.num_heads // cfg.num_kv_heads

    def expand(kernel):  # [depth, dim, Hkv * hd] -> [depth, dim, Hq * hd]
        d, dim, _ = kernel.shape
        k = kernel.reshape(d, dim, cfg.num_kv_heads, 1, cfg.head_dim)
        return jnp.broadcast_to(k, (d, dim, cfg.num_kv_heads, rep, cfg.head_dim)).reshape(d, dim, -1)

    attn = dict(params["blocks"]["attn"])
    for name in ("k_proj", "v_proj"):
        attn[name] = {"kernel": expand(attn[name]["kernel"])}
    blocks = {**params["blocks"], "attn": attn}
    return {**params, "blocks": blocks}


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(kv_heads, fdtype):
    cfg = small_cfg(fdtype, num_kv_heads=kv_heads)
    params = init_params(cfg, jax.random.key(2))
    mha_cfg = cfg.replace(num_kv_heads=cfg.num_heads)
    tokens = _tokens(3, 2, 9, cfg.vocab_size)
    gqa = np.asarray(apply_logits(params, cfg, tokens))
    mha = np.asarray(apply_logits(_repeat_kv_heads(params, cfg), mha_cfg, tokens))
    np.testing.assert_allclose(gqa, mha, atol=TOL[fdtype] * np.abs(gqa).max())
    # and the mapping matters: pairing query head h with kv head h % Hkv instead breaks the equality
    if kv_heads == 2:
        wrong = jax.tree.map(lambda a: a, _repeat_kv_heads(params, cfg))
        k = params["blocks"]["attn"]["k_proj"]["kernel"].reshape(cfg.depth, cfg.dim, kv_heads, cfg.head_dim)
        tiled = jnp.tile(k, (1, 1, cfg.num_heads // kv_heads, 1)).reshape(cfg.depth, cfg.dim, -1)
        wrong["blocks"]["attn"]["k_proj"] = {"kernel": tiled}
        assert np.abs(np.asarray(apply_logits(wrong, mha_cfg, tokens)) - gqa).max() > 1e-3


def test_rope_matches_complex_rotation_and_is_relative():
    rng = np.random.default_rng(0)
    d, theta = 8, 500.0
    x = rng.normal(size=(1, 3, 2, d))
    pos = np.array([[0, 5, 17]])
    with jax.enable_x64(True):
        got = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), theta))
    z = x[..., :d // 2] + 1j * x[..., d // 2:]          # pair i = (x_i, x_{i + d/2}) as a complex number
    w = theta ** (-np.arange(0, d, 2) / d)
    zr = z * np.exp(1j * pos[..., None, None] * w)
    np.testing.assert_allclose(got, np.concatenate([zr.real, zr.imag], -1), atol=1e-12)

    q, k = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32), jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)
    score = lambda m, n: float(jnp.sum(rope(q, jnp.array([[m]]), theta) * rope(k, jnp.array([[n]]), theta)))  # noqa: E731
    for shift in (1, 7, 100):
        assert score(9, 4) == pytest.approx(score(9 + shift, 4 + shift), abs=2e-5)
    assert abs(score(9, 4) - score(9, 5)) > 1e-3


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_heads .* divisible by num_kv_heads"):
        small_cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        small_cfg(attn_impl="flash")
    with pytest.raises(ValueError, match="must be even"):
        small_cfg(dim=12, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        small_cfg(vocab_size=0)
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="max_len"):
        apply_logits(params, cfg, jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        apply_logits(params, cfg, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        lin = small_cfg(attention="linear", num_kv_heads=4)
        apply_logits(init_params(lin, jax.random.key(0)), lin, jnp.zeros((1, 4), jnp.int32),
                     segment_ids=jnp.ones((1, 4), jnp.int32))
    assert dataclasses.is_dataclass(cfg) and hash(cfg) == hash(small_cfg())
