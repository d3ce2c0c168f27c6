"""Vector quantisation (research.latent.vq): nearest-code lookup against a brute-force NumPy argmin,
the straight-through gradient (identity), the codebook / commitment losses' gradients, the EMA
codebook update (decay 0 without smoothing = the exact cluster means; general decay against a
float64 NumPy transcription), dead-code restart (exactly the dead codes change, to batch vectors),
perplexity / utilisation, and the stateful VQ-VAE loss in the generic train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.latent.vq import (
    VQVAE, VQObjective, codebook_usage, ema_update, init_ema_state, nearest_codes, perplexity, quantize,
    restart_dead_codes, straight_through, vq_losses,
)
from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step

DTYPES = ["float32", "float64"]


def _x64(dtype):
    return jax.enable_x64(dtype == "float64")


def _np_state(rng, k, d):
    return {"codebook": rng.normal(size=(k, d)), "cluster_size": rng.uniform(0.5, 3.0, size=k),
            "embed_sum": rng.normal(size=(k, d))}


def _as(state, dtype):
    return {n: jnp.asarray(v, dtype) for n, v in state.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_codes_match_brute_force_argmin(dtype):
    rng = np.random.default_rng(0)
    z, codebook = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(11, 5))
    expected = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    with _x64(dtype):
        codes = nearest_codes(jnp.asarray(z, dtype), jnp.asarray(codebook, dtype))
        assert codes.dtype == jnp.int32 and codes.shape == (3, 4, 4)
        np.testing.assert_array_equal(np.asarray(codes), expected)
        st, codes2, q = quantize(jnp.asarray(z, dtype), jnp.asarray(codebook, dtype))
        np.testing.assert_array_equal(np.asarray(codes2), expected)
        np.testing.assert_allclose(np.asarray(q), codebook[expected], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(st), codebook[expected], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="codebook"):
        nearest_codes(jnp.zeros((2, 5)), jnp.zeros((4, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_straight_through_gradient_is_the_identity(dtype):
    rng = np.random.default_rng(1)
    with _x64(dtype):
        z, codebook = jnp.asarray(rng.normal(size=(6, 3)), dtype), jnp.asarray(rng.normal(size=(4, 3)), dtype)
        cot = jnp.asarray(rng.normal(size=(6, 3)), dtype)
        out, vjp = jax.vjp(lambda zz, cb: quantize(zz, cb)[0], z, codebook)
        g_z, g_cb = vjp(cot)
        np.testing.assert_array_equal(np.asarray(g_z), np.asarray(cot))  # exactly the incoming gradient
        np.testing.assert_array_equal(np.asarray(g_cb), 0.0)  # nothing reaches the codebook through it
        q = jnp.asarray(rng.normal(size=(6, 3)), dtype)
        np.testing.assert_array_equal(np.asarray(jax.jacfwd(lambda zz: straight_through(zz, q))(z)),
                                      np.asarray(jnp.eye(18, dtype=dtype).reshape(6, 3, 6, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vq_losses_values_and_gradients(dtype):
    rng = np.random.default_rng(2)
    z, q = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    with _x64(dtype):
        zj, qj = jnp.asarray(z, dtype), jnp.asarray(q, dtype)
        cb_loss, commit = vq_losses(zj, qj)
        np.testing.assert_allclose([float(cb_loss), float(commit)], [np.mean((z - q) ** 2)] * 2, rtol=1e-6)
        (gz_cb, gq_cb) = jax.grad(lambda a, b: vq_losses(a, b)[0], argnums=(0, 1))(zj, qj)
        (gz_c, gq_c) = jax.grad(lambda a, b: vq_losses(a, b)[1], argnums=(0, 1))(zj, qj)
    np.testing.assert_array_equal(np.asarray(gz_cb), 0.0)  # the codebook loss moves only the codes
    np.testing.assert_allclose(np.asarray(gq_cb), 2 * (q - z) / z.size, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(gq_c), 0.0)  # the commitment loss moves only the encoder
    np.testing.assert_allclose(np.asarray(gz_c), 2 * (z - q) / z.size, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_update_with_decay_0_is_the_exact_cluster_mean(dtype):
    rng = np.random.default_rng(3)
    state = _np_state(rng, 5, 3)
    z = rng.normal(size=(12, 3))
    codes = np.array([0, 0, 2, 2, 2, 4, 0, 4, 2, 0, 4, 4])  # codes 1 and 3 unused
    with _x64(dtype):
        new = ema_update(_as(state, dtype), jnp.asarray(z, dtype), jnp.asarray(codes), decay=0.0, eps=0.0)
        assert all(new[n].dtype == jnp.dtype(dtype) for n in new)
    for k in (0, 2, 4):
        np.testing.assert_allclose(np.asarray(new["codebook"][k]), z[codes == k].mean(0), rtol=1e-5, atol=1e-6)
    for k in (1, 3):  # no assignment and no smoothing: the code keeps its vector
        np.testing.assert_allclose(np.asarray(new["codebook"][k]), state["codebook"][k], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), np.bincount(codes, minlength=5), rtol=1e-6)


def _np_ema(state, z, codes, decay, eps):
    """Float64 NumPy transcription of the EMA update (loops, no one-hot)."""
    k = len(state["cluster_size"])
    n_k = np.array([np.sum(codes == i) for i in range(k)], float)
    s_k = np.stack([z[codes == i].sum(0) for i in range(k)])
    size = decay * state["cluster_size"] + (1 - decay) * n_k
    total = decay * state["embed_sum"] + (1 - decay) * s_k
    n = size.sum()
    smoothed = (size + eps) / (n + k * eps) * n
    return {"codebook": total / smoothed[:, None], "cluster_size": size, "embed_sum": total}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay,eps", [(0.99, 1e-5), (0.5, 0.1), (0.9, 0.0)])
def test_ema_update_matches_numpy_transcription(dtype, decay, eps):
    rng = np.random.default_rng(4)
    state = _np_state(rng, 7, 4)
    z = rng.normal(size=(30, 4))
    codes = rng.integers(0, 7, size=30)
    expected = _np_ema(state, z, codes, decay, eps)
    with _x64(dtype):
        new = ema_update(_as(state, dtype), jnp.asarray(z, dtype), jnp.asarray(codes), decay=decay, eps=eps)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for n in expected:
        np.testing.assert_allclose(np.asarray(new[n]), expected[n], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_vectors", [40, 5])  # >= K: distinct batch rows; < K: rows drawn with replacement
def test_restart_replaces_exactly_the_dead_codes(dtype, num_vectors):
    rng = np.random.default_rng(5)
    state = _np_state(rng, 8, 3)
    state["cluster_size"] = np.array([2.0, 0.5, 1.0, 0.99, 3.0, 0.0, 1.5, 0.2])
    dead = state["cluster_size"] < 1.0
    z = rng.normal(size=(num_vectors, 3))
    with _x64(dtype):
        new, count = restart_dead_codes(_as(state, dtype), jnp.asarray(z, dtype), jax.random.key(6), threshold=1.0)
        old = _as(state, dtype)
    assert int(count) == dead.sum() == 4
    for n in new:  # the live codes and their statistics are bitwise unchanged
        np.testing.assert_array_equal(np.asarray(new[n])[~dead], np.asarray(old[n])[~dead])
    cb = np.asarray(new["codebook"])[dead]
    match = np.abs(cb[:, None, :] - z[None].astype(dtype)).max(-1) < 1e-6  # each new code is a batch vector
    assert np.all(match.sum(1) >= 1)
    if num_vectors >= 8:
        assert len({int(np.argmax(m)) for m in match}) == dead.sum()  # distinct rows
    np.testing.assert_array_equal(np.asarray(new["embed_sum"])[dead], cb)
    np.testing.assert_array_equal(np.asarray(new["cluster_size"])[dead], 1.0)


def test_first_step_from_the_initial_state_restarts_unused_codes():
    state = init_ema_state(jnp.asarray(np.random.default_rng(7).normal(size=(6, 2)), jnp.float32))
    z = jnp.asarray([[0.1, 0.2], [0.3, -0.1], [5.0, 5.0]], jnp.float32)
    codes = nearest_codes(z, state["codebook"])
    new = ema_update(state, z, codes, decay=0.99, eps=1e-5)
    _, count = restart_dead_codes(new, z, jax.random.key(8), threshold=1.0)
    assert int(count) == 6 - len(set(np.asarray(codes).tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_and_usage(dtype):
    with _x64(dtype):
        np.testing.assert_allclose(float(perplexity(jnp.full((16,), 3.0, dtype))), 16.0, rtol=1e-5)
        np.testing.assert_allclose(float(perplexity(jnp.asarray([0, 0, 7, 0], dtype))), 1.0, rtol=1e-6)
        counts = np.array([5.0, 1.0, 0.0, 2.0])
        p = counts / counts.sum()
        expected = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
        np.testing.assert_allclose(float(perplexity(jnp.asarray(counts, dtype))), expected, rtol=1e-6)
    u = codebook_usage(np.array([[0, 0, 3], [3, 3, 5]]), 8)
    assert u["utilisation"] == 3 / 8 and u["num_used"] == 3 and u["counts"] == [2, 0, 0, 3, 0, 1, 0, 0]
    assert codebook_usage(np.arange(8), 8)["perplexity"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        codebook_usage(np.array([0, 8]), 8)
    with pytest.raises(ValueError, match="integer"):
        codebook_usage(np.array([0.5]), 8)


def test_vqvae_loss_in_the_stateful_train_step():
    model = VQVAE(features=(8, 8), code_dim=4, num_codes=16)
    params, ema_state = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, size=(8, 8, 8, 1)), jnp.float32)
    # beta = 0: the encoder's only gradient is the decoder's, through the straight-through estimator
    loss_fn = VQObjective(beta=0.0, decay=0.9).make_loss_fn(model)
    opt = adamw(1e-3)
    state = create_train_state(params, opt, jax.random.key(2), ema=False, model_state=ema_state)
    before = jax.tree.map(np.asarray, (state.params, state.model_state))
    state, metrics = make_train_step(loss_fn, opt, stateful=True)(state, {"image": x})
    enc_before, enc_after = jax.tree.leaves(before[0]["encoder"]), jax.tree.leaves(state.params["encoder"])
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(enc_before, enc_after))
    assert np.isfinite(float(metrics["loss"])) and 1.0 <= float(metrics["batch_perplexity"]) <= 16.0
    assert not np.allclose(np.asarray(state.model_state["codebook"]), before[1]["codebook"])  # moved without grads
    assert all(state.model_state[n].dtype == before[1][n].dtype for n in before[1])
    assert "codebook" not in state.params
    with pytest.raises(ValueError, match="num_codes"):
        VQVAE(num_codes=0)
