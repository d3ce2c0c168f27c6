"""Checkpointer: periodic save / keep-N / restore into a template; resume equivalence bit for bit."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.train.checkpoint import CheckpointError, Checkpointer
from research.train.loop import train_loop
from research.train.optim import make_optimizer
from research.train.state import create_train_state
from research.train.step import make_train_step

NUM_STEPS, CRASH_AT, SAVE_EVERY, BATCH = 20, 13, 5, 16


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.gelu(nn.Dense(16)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(1)(x)[..., 0]


def _setup(key_kind, seed=42):
    """Fresh objects, as a new process would build them."""
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    opt = make_optimizer(learning_rate=3e-2, warmup_steps=3, total_steps=NUM_STEPS, weight_decay=0.1)

    def loss_fn(p, batch, key):
        pred = model.apply({"params": p}, batch["x"], train=True, rngs={"dropout": key})
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {}

    step = make_train_step(loss_fn, opt, ema_decay=0.9)
    key = jax.random.key(seed) if key_kind == "typed" else jax.random.PRNGKey(seed)
    state = create_train_state(params, opt, key)
    return state, step


def _batches(start_step, crash_at=None):
    """Deterministic data: batch i depends only on i (like batch_iterator(start_step=...))."""
    i = start_step
    while True:
        if crash_at is not None and i == crash_at:
            raise KeyboardInterrupt("simulated crash")
        rng = np.random.default_rng(1000 + i)
        x = rng.uniform(-1, 1, size=(BATCH, 2)).astype(np.float32)
        yield {"x": x, "y": np.sin(3 * x[:, 0]) * x[:, 1]}
        i += 1


def _assert_states_identical(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("key_kind", ["typed", "raw"])
def test_resume_is_bit_identical(tmp_path, key_kind):
    # uninterrupted run
    state, step = _setup(key_kind)
    straight = train_loop(state, step, _batches, num_steps=NUM_STEPS, run_dir=tmp_path / "a",
                          log_every=4, progress=False)

    # interrupted run: crashes while computing step 13, after the checkpoint of step 10
    state, step = _setup(key_kind)
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=SAVE_EVERY)
    with pytest.raises(KeyboardInterrupt):
        train_loop(state, step, lambda s: _batches(s, crash_at=CRASH_AT), num_steps=NUM_STEPS,
                   run_dir=tmp_path / "b", checkpointer=ck, log_every=4, progress=False)
    ck.close()

    # restart with fresh objects (a template with another key: the key must come from the checkpoint)
    template, step = _setup(key_kind, seed=999)
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=SAVE_EVERY)
    assert ck.latest_step() == 10
    restored = ck.restore_latest(template)
    assert int(restored.step) == 10
    resumed = train_loop(restored, step, _batches, num_steps=NUM_STEPS, run_dir=tmp_path / "b",
                         checkpointer=ck, log_every=4, progress=False)
    ck.close()
    assert int(resumed.step) == NUM_STEPS
    _assert_states_identical(straight, resumed)
    # and the training did something
    assert not np.array_equal(np.asarray(straight.params["Dense_0"]["kernel"]),
                              np.asarray(template.params["Dense_0"]["kernel"]))
    assert Checkpointer(tmp_path / "b" / "ckpt", save_every=SAVE_EVERY).latest_step() == NUM_STEPS


def _small_state(key=None, dtype=jnp.float32):
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0)
    params = {"w": jnp.arange(6, dtype=dtype).reshape(2, 3), "b": jnp.ones(3, dtype)}
    return create_train_state(params, opt, jax.random.key(1) if key is None else key)


def test_missing_directory_gives_none(tmp_path):
    ck = Checkpointer(tmp_path / "nothing_here", save_every=1)
    assert ck.latest_step() is None
    assert ck.restore_latest(_small_state()) is None


def test_periodic_save_and_keep_last_n(tmp_path):
    ck = Checkpointer(tmp_path / "ck", save_every=2, keep=3)
    state = _small_state()
    saved = [s for s in range(11) if ck.save(s, state.replace(step=jnp.int32(s)))]
    assert saved == [0, 2, 4, 6, 8, 10]
    assert ck.save(11, state.replace(step=jnp.int32(11)), force=True)
    ck.wait()
    assert ck.all_steps() == [8, 10, 11]
    assert ck.latest_step() == 11
    assert int(ck.restore_latest(_small_state()).step) == 11
    assert int(ck.restore(8, _small_state()).step) == 8
    ck.close()


def test_restore_keeps_template_dtypes_shardings_and_key_impl(tmp_path):
    state = _small_state(key=jax.random.key(5, impl="rbg"), dtype=jnp.bfloat16)
    state = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
    ck = Checkpointer(tmp_path / "ck", save_every=1)
    ck.save(3, state)
    ck.wait()
    template = _small_state(key=jax.random.key(0, impl="rbg"), dtype=jnp.bfloat16)
    restored = ck.restore_latest(template)
    _assert_states_identical(state, restored)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
        assert r.dtype == t.dtype
        assert r.sharding == t.sharding
    ck.close()


def test_corrupt_checkpoint_names_the_path(tmp_path):
    ck = Checkpointer(tmp_path / "ck", save_every=1)
    ck.save(1, _small_state())
    ck.wait()
    step_dir = tmp_path / "ck" / "1"
    n = 0
    for root, _, files in os.walk(step_dir):
        for f in files:
            if root != str(step_dir):  # keep the step-level metadata, break the array data
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
                n += 1
    assert n > 0
    ck2 = Checkpointer(tmp_path / "ck", save_every=1)
    with pytest.raises(CheckpointError, match=str(step_dir)):
        ck2.restore_latest(_small_state())


def test_structure_mismatch_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck", save_every=1)
    ck.save(1, _small_state())
    ck.wait()
    opt = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0)
    other = create_train_state({"w": jnp.zeros((4, 4))}, opt, jax.random.key(0))
    with pytest.raises(CheckpointError, match="could not restore the checkpoint at"):
        ck.restore_latest(other)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)
