"""Tests for research.nn: attention dispatch, layers, embeddings, remat policies, DiT."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.nn import attention as attn_mod
from research.nn import dit as dit_mod
from research.nn.embeddings import sincos_1d, sincos_2d, timestep_embedding
from research.nn.layers import RMSNorm, patchify, unpatchify
from research.nn.remat import CHECKPOINT_NAMES, remat_policy

SMALL = dict(hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _inputs(b=3, size=8, c=1, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (b, size, size, c))
    t = jax.random.uniform(k2, (b,))
    y = jnp.arange(b, dtype=jnp.int32) % 10
    return x, t, y


def _perturb(params, seed=1, scale=0.1):
    """Adds noise to every leaf, so zero-initialised paths become non-trivial."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    )


@functools.lru_cache(maxsize=None)
def _jit_apply(model, **kw):
    """Jitted ``model.apply`` (eager flax apply is slow op-by-op dispatch)."""
    return jax.jit(lambda p, x, t, y, **a: model.apply({"params": p}, x, t, y, **kw, **a))


@functools.lru_cache(maxsize=None)
def _small(scan=True, remat="none"):
    model = dit_mod.DiT(**SMALL, scan_blocks=scan, remat_policy=remat)
    params = _perturb(dit_mod.init_dit(model, jax.random.key(0)))
    return model, params


# ---------------------------------------------------------------- attention dispatch
def _np_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_attention_xla_matches_numpy():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 3, 4))
    np.testing.assert_allclose(np.asarray(attn_mod.attention(q, k, v)), _np_attention(q, k, v), atol=1e-5)


def test_attention_unknown_impl():
    q = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn_mod.attention(q, q, q, impl="flashy")


# ---------------------------------------------------------------- layers and embeddings
@pytest.mark.parametrize("p,c", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_patchify_is_the_documented_permutation(p, c):
    x = np.random.default_rng(0).normal(size=(2, 8, 8, c)).astype(np.float32)
    tok = np.asarray(patchify(jnp.asarray(x), p))
    g = 8 // p
    assert tok.shape == (2, g * g, p * p * c)
    for r in range(g):
        for col in range(g):
            for pi in range(p):
                for pj in range(p):
                    np.testing.assert_array_equal(
                        tok[:, r * g + col, (pi * p + pj) * c : (pi * p + pj + 1) * c],
                        x[:, r * p + pi, col * p + pj, :],
                    )
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tok), p, 8, 8, c)), x)
    # it is a permutation: the multiset of values is unchanged
    np.testing.assert_array_equal(np.sort(tok.ravel()), np.sort(x.ravel()))


def test_patchify_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        patchify(jnp.zeros((1, 7, 7, 1)), 2)
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(jnp.zeros((1, 16, 5)), 2, 8, 8, 1)


def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32) * 3
    mod = RMSNorm(eps=1e-6)
    params = {"scale": jnp.arange(1.0, 7.0)}
    out = mod.apply({"params": params}, jnp.asarray(x))
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.arange(1.0, 7.0)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)


def test_timestep_embedding_closed_form():
    t = jnp.array([0.0, 1.5, 250.0])
    e = np.asarray(timestep_embedding(t, 8, max_period=10000.0))
    f = 10000.0 ** (-np.arange(4) / 4)
    ref = np.concatenate([np.cos(np.outer(t, f)), np.sin(np.outer(t, f))], 1)
    np.testing.assert_allclose(e, ref, atol=2e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_sincos_2d_properties():
    d, gh, gw = 16, 3, 5
    e = sincos_2d(d, gh, gw).astype(np.float64)
    assert e.shape == (gh * gw, d) and np.all(np.abs(e) <= 1)
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    # closed form of the first frequency (omega_0 = 1) in each half
    np.testing.assert_allclose(e[:, 0], np.sin(rows), atol=1e-6)
    np.testing.assert_allclose(e[:, d // 4], np.cos(rows), atol=1e-6)
    np.testing.assert_allclose(e[:, d // 2], np.sin(cols), atol=1e-6)
    np.testing.assert_allclose(e[:, 3 * d // 4], np.cos(cols), atol=1e-6)
    # sin^2 + cos^2 = 1 per frequency and axis -> every row has squared norm d/2
    np.testing.assert_allclose((e**2).sum(1), d / 2, atol=1e-5)
    # relative-position property: <e(p), e(q)> depends only on p - q
    gram = e @ e.T
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for i in range(gh * gw):
        for j in range(gh * gw):
            ref = np.cos(omega * (rows[i] - rows[j])).sum() + np.cos(omega * (cols[i] - cols[j])).sum()
            np.testing.assert_allclose(gram[i, j], ref, atol=1e-5)
    # all positions distinct
    assert len({tuple(np.round(r, 6)) for r in e}) == gh * gw
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(5, np.arange(3))


# ---------------------------------------------------------------- remat policies
def test_remat_policy_names():
    assert remat_policy("none") is None
    for name in ["full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_names:qkv,attn_out"]:
        assert callable(remat_policy(name))
    with pytest.raises(ValueError, match="unknown remat policy"):
        remat_policy("some")
    with pytest.raises(ValueError, match="unknown checkpoint names"):
        remat_policy("save_names:qvk")
    with pytest.raises(ValueError, match="at least one"):
        remat_policy("save_names:")
    assert set(CHECKPOINT_NAMES) == {"qkv", "attn_out", "mlp_hidden"}


# ---------------------------------------------------------------- DiT
@pytest.mark.parametrize("cfg", [
    dict(input_size=8, in_channels=3, patch_size=4),
    dict(input_size=4, in_channels=2, patch_size=1, qk_norm=False, scan_blocks=False),
])
def test_dit_shapes_and_zero_init(cfg):
    model = dit_mod.DiT(**SMALL, **cfg)
    params = dit_mod.init_dit(model, jax.random.key(0))
    x, t, y = _inputs(size=cfg["input_size"], c=cfg["in_channels"])
    out = _jit_apply(model)(params, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # adaLN-Zero + zero final layer: exactly zero output at initialisation
    assert float(jnp.max(jnp.abs(out))) == 0.0
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    assert any("q_norm" in k for k in flat) == cfg.get("qk_norm", True)
    assert flat["y_embedder/embedding_table/embedding"].shape == (11, 32)  # + null label
    gates = [v for k, v in flat.items() if "adaLN_modulation" in k or k.startswith("final_layer/linear")]
    assert gates and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in gates)
    # perturbed params give a non-trivial, finite output
    out2 = _jit_apply(model)(_perturb(params), x, t, y)
    assert float(jnp.std(out2)) > 1e-3 and bool(jnp.all(jnp.isfinite(out2)))


def test_dit_scan_equals_unrolled():
    model_s, params_s = _small(scan=True)
    model_u = dit_mod.DiT(**SMALL, scan_blocks=False)
    params_u = dict(params_s)
    blocks = params_u.pop("blocks")
    for i in range(SMALL["depth"]):
        params_u[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
    # the unrolled model accepts exactly this structure
    ref_struct = jax.tree.structure(dit_mod.init_dit(model_u, jax.random.key(0)))
    assert jax.tree.structure(params_u) == ref_struct
    x, t, y = _inputs()
    np.testing.assert_allclose(
        np.asarray(_jit_apply(model_s)(params_s, x, t, y)),
        np.asarray(_jit_apply(model_u)(params_u, x, t, y)), rtol=1e-5, atol=1e-6,
    )


@functools.lru_cache(maxsize=None)
def _baseline_grads(scan):
    return _grads(*_small(scan=scan))


def _grads(model, params):
    x, t, y = _inputs()

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, y) ** 2)

    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy,scan", [
    ("full", True), ("dots_saveable", True), ("dots_with_no_batch_dims_saveable", True),
    ("save_names:qkv,attn_out,mlp_hidden", True), ("save_names:attn_out", False),
])
def test_remat_policies_give_same_gradients(policy, scan):
    _, params = _small(scan=scan)
    model = dit_mod.DiT(**SMALL, scan_blocks=scan, remat_policy=policy)
    g0, g = _baseline_grads(scan), _grads(model, params)
    assert jax.tree.structure(g0) == jax.tree.structure(g)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g0)) > 0


def test_label_dropout_rate_only_in_train_mode():
    emb = dit_mod.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.25)
    y = jnp.arange(20000, dtype=jnp.int32) % 10
    params = emb.init({"params": jax.random.key(0)}, y[:2], train=False)
    table = params["params"]["embedding_table"]["embedding"]
    out = emb.apply(params, y, train=True, rngs={"dropout": jax.random.key(1)})
    dropped = np.all(np.asarray(out) == np.asarray(table[10]), axis=1)
    # binomial(20000, 0.25): std ~ 0.003
    assert abs(dropped.mean() - 0.25) < 0.015
    kept = ~dropped
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(table)[np.asarray(y)[kept]])
    out_eval = emb.apply(params, y, train=False)
    np.testing.assert_array_equal(np.asarray(out_eval), np.asarray(table)[np.asarray(y)])
    # different dropout keys drop different labels
    out2 = emb.apply(params, y, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.array_equal(dropped, np.all(np.asarray(out2) == np.asarray(table[10]), axis=1))


def test_dit_force_drop_and_model_fn():
    model, params = _small()
    x, t, y = _inputs()
    null = jnp.full_like(y, 10)
    forced = _jit_apply(model)(params, x, t, y, force_drop_ids=jnp.ones_like(y))
    np.testing.assert_allclose(
        np.asarray(forced), np.asarray(_jit_apply(model)(params, x, t, null)), atol=1e-6)
    fn = jax.jit(dit_mod.make_model_fn(model))
    eval_out = fn(params, x, t, y, None)
    np.testing.assert_array_equal(np.asarray(eval_out), np.asarray(_jit_apply(model)(params, x, t, y)))
    assert not np.allclose(np.asarray(eval_out), np.asarray(forced))
    # train mode with dropout 0.1: some key drops a label and changes that example only
    big_y = jnp.arange(64, dtype=jnp.int32) % 10
    xb, tb = jnp.tile(x[:1], (64, 1, 1, 1)), jnp.full((64,), 0.3)
    tr = fn(params, xb, tb, big_y, jax.random.key(5))
    ev = _jit_apply(model)(params, xb, tb, big_y)
    changed = np.any(np.abs(np.asarray(tr - ev)) > 1e-6, axis=(1, 2, 3))
    assert 0 < changed.sum() < 20


def test_dit_compute_dtype_bf16():
    model = dit_mod.DiT(**SMALL, dtype=jnp.bfloat16)
    params = _perturb(dit_mod.init_dit(model, jax.random.key(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x, t, y = _inputs()
    out = _jit_apply(model)(params, x, t, y)
    ref = _jit_apply(_small()[0])(params, x, t, y)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.1 * float(jnp.std(ref)) + 1e-2)


def test_dit_bad_inputs():
    model, params = _small()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        model.apply({"params": params}, x[..., 0], t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        model.apply({"params": params}, x, t[:2], y)
    with pytest.raises(TypeError, match="integer"):
        model.apply({"params": params}, x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        dit_mod.init_dit(dit_mod.DiT(hidden_size=30, num_heads=4), jax.random.key(0))
    with pytest.raises(ValueError, match="unknown remat policy"):
        dit_mod.init_dit(dit_mod.DiT(**SMALL, remat_policy="most"), jax.random.key(0))
