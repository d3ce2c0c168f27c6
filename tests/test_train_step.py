"""make_train_step: single compilation, per-step keys, grad accumulation, EMA closed forms, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.train.ema import ema_decay_from_half_life, ema_update
from research.train.optim import adamw
from research.train.state import TrainState, create_train_state
from research.train.step import compute_grads, make_train_step, step_key

D_IN, D_OUT, BATCH = 3, 2, 8


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"dense": {"kernel": jax.random.normal(k1, (D_IN, D_OUT)), "bias": jax.random.normal(k2, (D_OUT,))}}


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(1, D_IN * D_OUT + 1, dtype=np.float32).reshape(D_IN, D_OUT)) + 1.0}


def mse_loss(params, batch, key):
    del key
    pred = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


def test_step_compiles_once_and_counts_steps():
    traces = []

    def loss_fn(params, batch, key):
        traces.append(1)  # python side effect: runs only while tracing
        return mse_loss(params, batch, key)

    opt = adamw(1e-2)
    step = make_train_step(loss_fn, opt, ema_decay=0.99)
    state = create_train_state(_params(), opt, jax.random.key(0))
    losses = []
    for i in range(6):
        state, metrics = step(state, _batch(i))
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert int(state.step) == 6 and state.step.dtype == jnp.int32
    assert np.all(np.isfinite(losses))


def test_state_is_donated():
    opt = adamw(1e-2)
    step = make_train_step(mse_loss, opt, ema_decay=0.9)
    state = create_train_state(_params(), opt, jax.random.key(0))
    params_leaf = state.params["dense"]["kernel"]
    new_state, _ = step(state, _batch(0))
    jax.block_until_ready(new_state)
    assert params_leaf.is_deleted()
    # no donation when asked
    step_nd = make_train_step(mse_loss, opt, ema_decay=0.9, donate=False)
    leaf = new_state.params["dense"]["kernel"]
    step_nd(new_state, _batch(1))
    assert not leaf.is_deleted()


def test_create_train_state_copies_params():
    params = _params()
    opt = adamw(1e-2)
    state = create_train_state(params, opt, jax.random.key(0), ema=True)
    step = make_train_step(mse_loss, opt, ema_decay=0.9)
    step(state, _batch(0))
    assert not params["dense"]["kernel"].is_deleted()  # the caller's arrays survive donation
    assert create_train_state(params, opt, jax.random.key(0), ema=False).ema_params is None


def _key_loss(params, batch, key):
    loss, aux = mse_loss(params, batch, key)
    return loss, {**aux, "u": jax.random.uniform(key, ())}


@pytest.mark.parametrize("make_key", [lambda: jax.random.key(7), lambda: jax.random.PRNGKey(7)],
                         ids=["typed", "raw"])
def test_per_step_keys_differ_and_are_deterministic(make_key):
    opt = adamw(1e-2)
    step = make_train_step(_key_loss, opt, ema_decay=None)

    def run():
        state = create_train_state(_params(), opt, make_key(), ema=False)
        us = []
        for i in range(5):
            state, m = step(state, _batch(i))
            us.append(float(m["u"]))
        return us

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == 5
    want = [float(jax.random.uniform(jax.random.fold_in(make_key(), i), ())) for i in range(5)]
    assert first == want


def test_step_key_is_fold_in():
    state = create_train_state(_params(), adamw(1e-3), jax.random.key(3), ema=False).replace(step=jnp.int32(11))
    assert jnp.array_equal(jax.random.key_data(step_key(state)),
                           jax.random.key_data(jax.random.fold_in(jax.random.key(3), 11)))


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_full_batch(accum):
    opt = optax.chain(optax.clip_by_global_norm(5.0), adamw(1e-2, weight_decay=0.1))
    full = make_train_step(mse_loss, opt, ema_decay=0.9)
    acc = make_train_step(mse_loss, opt, ema_decay=0.9, grad_accum_steps=accum)
    s_full = create_train_state(_params(), opt, jax.random.key(0))
    s_acc = create_train_state(_params(), opt, jax.random.key(0))
    for i in range(4):
        s_full, m_full = full(s_full, _batch(i))
        s_acc, m_acc = acc(s_acc, _batch(i))
        for k in ("loss", "mae", "grad_norm", "lr"):
            np.testing.assert_allclose(m_acc[k], m_full[k], rtol=2e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves((s_full.params, s_full.opt_state, s_full.ema_params)),
                    jax.tree.leaves((s_acc.params, s_acc.opt_state, s_acc.ema_params))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_grad_accumulation_microbatch_keys():
    # micro-batch i uses fold_in(step_key, i): the averaged aux equals the mean of those draws
    key = jax.random.key(5)
    _, aux, _ = compute_grads(_key_loss, _params(), jax.tree.map(jnp.asarray, _batch(0)), key, 4)
    want = np.mean([float(jax.random.uniform(jax.random.fold_in(key, i), ())) for i in range(4)])
    np.testing.assert_allclose(aux["u"], want, rtol=1e-6)


def test_grad_accumulation_rejects_indivisible_batch():
    opt = adamw(1e-2)
    step = make_train_step(mse_loss, opt, grad_accum_steps=3)
    state = create_train_state(_params(), opt, jax.random.key(0), ema=False)
    with pytest.raises(ValueError, match="grad_accum_steps=3 must divide the batch size"):
        step(state, _batch(0))
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(mse_loss, opt, grad_accum_steps=0)


def test_metrics_values():
    opt = adamw(lambda s: 0.5 / (1.0 + s))
    step = make_train_step(mse_loss, opt, ema_decay=None)
    params = _params()
    state = create_train_state(params, opt, jax.random.key(0), ema=False)
    batch = jax.tree.map(jnp.asarray, _batch(0))
    (loss, aux), grads = jax.value_and_grad(mse_loss, has_aux=True)(params, batch, None)
    gnorm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
    state, m = step(state, batch)
    assert set(m) == {"loss", "mae", "grad_norm", "lr"}
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["mae"], aux["mae"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], gnorm, rtol=1e-5)
    np.testing.assert_allclose(m["lr"], 0.5)
    state, m = step(state, batch)
    np.testing.assert_allclose(m["lr"], 0.25)


def test_ema_mismatch_is_rejected():
    opt = adamw(1e-2)
    with_ema = create_train_state(_params(), opt, jax.random.key(0), ema=True)
    without = create_train_state(_params(), opt, jax.random.key(0), ema=False)
    with pytest.raises(ValueError, match="ema_decay is None"):
        make_train_step(mse_loss, opt)(with_ema, _batch(0))
    with pytest.raises(ValueError, match="no ema_params"):
        make_train_step(mse_loss, opt, ema_decay=0.9)(without, _batch(0))
    with pytest.raises(ValueError, match="ema_decay"):
        make_train_step(mse_loss, opt, ema_decay=1.5)


# ---------------------------------------------------------------- EMA closed forms
def test_ema_decay_from_half_life():
    beta = ema_decay_from_half_life(500_000, 256)
    assert beta == pytest.approx(0.5 ** (256 / 500_000))
    # after half_life / batch steps the old average's weight is exactly one half
    assert ema_decay_from_half_life(1000, 10) ** 100 == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="half_life_images"):
        ema_decay_from_half_life(0, 10)
    with pytest.raises(ValueError, match="batch_size"):
        ema_decay_from_half_life(100, 0)


def test_ema_update_formula():
    e = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0, jnp.bfloat16)}
    p = {"a": jnp.array([3.0, -2.0]), "b": jnp.array(1.0)}
    out = ema_update(e, p, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.0])
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"]) == 2.5


def test_ema_converges_geometrically_in_train_step():
    # frozen params (optimizer outputs zero updates): ema_n - c = beta^n (ema_0 - c)
    opt = optax.set_to_zero()
    beta = ema_decay_from_half_life(80, 8)  # half-life of 10 steps
    step = make_train_step(mse_loss, opt, ema_decay=beta)
    params = _params()
    state = create_train_state(params, opt, jax.random.key(0))
    state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, params))
    batch = _batch(0)
    for n in range(1, 31):
        state, _ = step(state, batch)
        if n in (1, 10, 30):
            for e, c in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
                np.testing.assert_allclose(e, c * (1 - beta ** n), rtol=1e-5, atol=1e-7)
    for e, c in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):  # 3 half-lives: 1/8 left
        np.testing.assert_allclose(e, c * (1 - 0.125), rtol=1e-5, atol=1e-7)


def test_unjitted_step_matches_jitted():
    opt = adamw(1e-2)
    s1 = create_train_state(_params(), opt, jax.random.key(0))
    s2 = create_train_state(_params(), opt, jax.random.key(0))
    s1, m1 = make_train_step(mse_loss, opt, ema_decay=0.5, jit=False)(s1, _batch(0))
    s2, m2 = make_train_step(mse_loss, opt, ema_decay=0.5)(s2, _batch(0))
    assert isinstance(s1, TrainState)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_create_train_state_rejects_bad_arguments():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        create_train_state(_params(), "adam", jax.random.key(0))
    with pytest.raises(TypeError, match="PRNG key"):
        create_train_state(_params(), adamw(1e-3), 0)
