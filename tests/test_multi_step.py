"""Multi-model train step on a tiny GAN (2-D data, MLP generator and discriminator, non-saturating
loss): the schedule updates exactly the scheduled model (the other stays bit-identical), per-model
metrics, n_critic counts, and checkpoint + resume bit-identical to an uninterrupted run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.train.checkpoint import Checkpointer
from research.train.loop import train_loop
from research.train.multi import (
    MultiTrainState,
    alternate,
    create_multi_train_state,
    make_multi_train_step,
    n_critic,
)
from research.train.optim import adamw

BATCH, LATENT = 16, 2


class MLP(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(nn.leaky_relu(nn.Dense(16)(x), 0.2))


G, D = MLP(2), MLP(1)


def loss_g(params, others, batch, key):
    fake = G.apply({"params": params}, jax.random.normal(key, (BATCH, LATENT)))
    logits = D.apply({"params": others["discriminator"]}, fake)[:, 0]
    return jnp.mean(jax.nn.softplus(-logits)), {"fake_mean": jnp.mean(fake)}  # non-saturating


def loss_d(params, others, batch, key):
    fake = G.apply({"params": others["generator"]}, jax.random.normal(key, (BATCH, LATENT)))
    real = D.apply({"params": params}, batch["x"])[:, 0]
    fake = D.apply({"params": params}, fake)[:, 0]
    return jnp.mean(jax.nn.softplus(-real) + jax.nn.softplus(fake)), {"real_logit": jnp.mean(real)}


def _batches(start, crash_at=None):
    i = start
    while True:
        if crash_at is not None and i == crash_at:
            raise KeyboardInterrupt("simulated crash")
        rng = np.random.default_rng(500 + i)
        centre = np.array([[2.0, 0.0], [-2.0, 0.0]], np.float32)[rng.integers(0, 2, BATCH)]
        yield {"x": centre + 0.1 * rng.normal(size=(BATCH, 2)).astype(np.float32)}
        i += 1


def _setup(schedule=None, seed=0, ema=0.9):
    kg, kd = jax.random.split(jax.random.key(seed))
    params = {"discriminator": D.init(kd, jnp.zeros((1, 2)))["params"],
              "generator": G.init(kg, jnp.zeros((1, LATENT)))["params"]}
    opts = {"discriminator": adamw(2e-3), "generator": adamw(1e-3)}
    state = create_multi_train_state(params, opts, jax.random.key(seed + 7), ema={"generator": True,
                                                                                  "discriminator": False})
    step = make_multi_train_step({"discriminator": loss_d, "generator": loss_g}, opts,
                                 schedule=alternate("discriminator", "generator") if schedule is None else schedule,
                                 ema_decay={"generator": ema, "discriminator": None})
    return state, step


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def _identical(a, b):
    # bitwise is right here: either the same values passed through (a model not updated), or the
    # same compiled program run twice on the same inputs (resume vs uninterrupted)
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_schedule_leaves_the_other_model_bit_identical():
    state, step = _setup()
    it = _batches(0)
    history = [jax.device_get(state)]
    for _ in range(4):
        state, m = step(state, next(it))
        history.append((jax.device_get(state), jax.device_get(m)))
    for s in range(4):
        before = history[s] if s == 0 else history[s][0]
        after, m = history[s + 1]
        updated = "discriminator" if s % 2 == 0 else "generator"
        frozen = "generator" if updated == "discriminator" else "discriminator"
        assert _identical(before.models[frozen], after.models[frozen]), (s, frozen)
        assert not _identical(before.models[updated].params, after.models[updated].params), (s, updated)
        assert m[f"{updated}/updated"] == 1.0 and m[f"{frozen}/updated"] == 0.0
        assert m[f"{frozen}/grad_norm"] == 0.0 and m[f"{updated}/grad_norm"] > 0
        assert np.isfinite(m[f"{frozen}/loss"])  # forward-only loss of the frozen model
    final = history[-1][0]
    assert int(final.step) == 4
    assert int(final.models["discriminator"].step) == 2 and int(final.models["generator"].step) == 2
    assert final.models["discriminator"].ema_params is None and final.models["generator"].ema_params is not None
    assert set(history[-1][1]) == {f"{n}/{k}" for n in ("discriminator", "generator")
                                   for k in ("loss", "grad_norm", "lr", "updated")} | {
        "discriminator/real_logit", "generator/fake_mean"}


def test_n_critic_schedule_and_step_compiles_once():
    state, step = _setup(schedule=n_critic("discriminator", "generator", 3))
    it = _batches(0)
    updated = []
    for _ in range(6):
        state, m = step(state, next(it))
        updated.append((float(m["discriminator/updated"]), float(m["generator/updated"])))
    assert updated == [(1, 0), (1, 0), (1, 1)] * 2
    assert int(state.models["discriminator"].step) == 6 and int(state.models["generator"].step) == 2
    assert step._cache_size() == 1


def test_everyone_every_step_and_generator_sees_the_updated_discriminator():
    # schedule=None: both models every step, in dict order; the generator's loss at step s must be the
    # loss against the discriminator AFTER its update at step s
    state, step = _setup(schedule=[{"discriminator", "generator"}])
    state0 = jax.device_get(state)
    batch = next(_batches(0))
    state1, m = step(state, batch)
    key_g = jax.random.fold_in(jax.random.fold_in(state0.key, 0), 1)
    others = {"discriminator": state1.models["discriminator"].params}
    want, _ = loss_g(state0.models["generator"].params, others, batch, key_g)
    # same arithmetic in a separately compiled program: a few float32 roundings per op over ~10
    # ops of 16-wide layers -> relative 1e-5 is generous (2^-24 * 16 * 10 ~ 1e-5)
    np.testing.assert_allclose(m["generator/loss"], want, rtol=1e-5)


def test_bad_schedules_are_rejected():
    opts = {"discriminator": adamw(1e-3), "generator": adamw(1e-3)}
    fns = {"discriminator": loss_d, "generator": loss_g}
    with pytest.raises(ValueError, match="unknown models"):
        make_multi_train_step(fns, opts, schedule=[{"critic"}])
    with pytest.raises(ValueError, match="never updates"):
        make_multi_train_step(fns, opts, schedule=[{"discriminator"}])
    with pytest.raises(ValueError, match="different models"):
        make_multi_train_step(fns, {"generator": adamw(1e-3)})


@pytest.mark.parametrize("crash_at", [5])
def test_gan_checkpoint_resume_is_bit_identical(tmp_path, crash_at):
    num_steps = 8
    state, step = _setup()
    straight = train_loop(state, step, _batches, num_steps=num_steps, run_dir=tmp_path / "a", log_every=2,
                          progress=False, watch="generator/loss")

    state, step = _setup()
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=3, config={"gan": 1})
    with pytest.raises(KeyboardInterrupt):
        train_loop(state, step, lambda s: _batches(s, crash_at=crash_at), num_steps=num_steps,
                   run_dir=tmp_path / "b", checkpointer=ck, log_every=2, progress=False, watch="generator/loss")
    ck.close()

    template, step = _setup(seed=99)  # fresh objects, another key: everything must come from the checkpoint
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=3, config={"gan": 1})
    restored = ck.restore_latest(template)
    assert isinstance(restored, MultiTrainState) and int(restored.step) == 3
    resumed = train_loop(restored, step, _batches, num_steps=num_steps, run_dir=tmp_path / "b", checkpointer=ck,
                         log_every=2, progress=False, watch="generator/loss")
    ck.close()
    assert _identical(straight, resumed)
    assert (tmp_path / "b" / "curves.png").exists()
