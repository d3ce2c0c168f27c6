"""TrainState.model_state through the stateful train step, on a tiny VQ autoencoder whose codebook
is updated by EMA in a flax mutable collection (straight-through estimator, commitment loss): the
codebook moves without gradients, dtypes are kept, grad accumulation threads the state through the
micro-batches, checkpoint + resume is bit-identical to an uninterrupted run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.train.checkpoint import Checkpointer
from research.train.loop import train_loop
from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step

K, DIM, BATCH, DECAY, BETA = 4, 2, 16, 0.9, 0.25


class VQ(nn.Module):
    """Nearest-code quantiser; the codebook is an EMA of the assigned encodings ("vq_ema" collection)."""

    @nn.compact
    def __call__(self, z, train: bool):
        init = lambda: jnp.asarray(np.linspace(-1, 1, K * DIM, dtype=np.float32).reshape(K, DIM))  # noqa: E731
        codebook = self.variable("vq_ema", "codebook", init)
        embed_sum = self.variable("vq_ema", "embed_sum", init)
        cluster_size = self.variable("vq_ema", "cluster_size", lambda: jnp.ones((K,), jnp.float32))
        calls = self.variable("vq_ema", "calls", lambda: jnp.zeros((), jnp.int32))
        d = jnp.sum((z[:, None, :] - codebook.value[None]) ** 2, -1)
        idx = jnp.argmin(d, axis=1)
        q = codebook.value[idx]
        if train:
            onehot = jax.nn.one_hot(idx, K, dtype=z.dtype)
            zs = jax.lax.stop_gradient(z)
            cluster_size.value = DECAY * cluster_size.value + (1 - DECAY) * onehot.sum(0)
            embed_sum.value = DECAY * embed_sum.value + (1 - DECAY) * onehot.T @ zs
            n = cluster_size.value.sum()
            smoothed = (cluster_size.value + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing
            codebook.value = embed_sum.value / smoothed[:, None]
            calls.value = calls.value + 1
        commit = jnp.mean((z - jax.lax.stop_gradient(q)) ** 2)
        return z + jax.lax.stop_gradient(q - z), commit  # straight-through estimator


class VQAE(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        z = nn.Dense(DIM)(nn.tanh(nn.Dense(8)(x)))
        q, commit = VQ()(z, train)
        return nn.Dense(2)(nn.tanh(nn.Dense(8)(q))), commit


MODEL = VQAE()


def loss_fn(params, model_state, batch, key):
    del key
    (x_hat, commit), new_vars = MODEL.apply({"params": params, **model_state}, batch["x"], train=True,
                                            mutable=list(model_state))
    rec = jnp.mean((x_hat - batch["x"]) ** 2)
    return rec + BETA * commit, ({"rec": rec, "commit": commit}, new_vars)


def _setup(seed=0, accum=1):
    variables = MODEL.init(jax.random.key(seed), jnp.zeros((1, 2)))
    params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    opt = adamw(1e-2)
    state = create_train_state(params, opt, jax.random.key(seed + 1), ema=False, model_state=model_state)
    return state, make_train_step(loss_fn, opt, stateful=True, grad_accum_steps=accum)


def _batches(start, crash_at=None):
    i = start
    while True:
        if crash_at is not None and i == crash_at:
            raise KeyboardInterrupt("simulated crash")
        rng = np.random.default_rng(900 + i)
        centres = np.array([[1, 1], [-1, 1], [1, -1], [-1, -1]], np.float32)
        yield {"x": centres[rng.integers(0, 4, BATCH)] + 0.05 * rng.normal(size=(BATCH, 2)).astype(np.float32)}
        i += 1


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def test_codebook_moves_by_ema_and_keeps_dtypes():
    state, step = _setup()
    cb0 = np.asarray(state.model_state["vq_ema"]["VQ_0"]["codebook"])
    it = _batches(0)
    for _ in range(5):
        state, m = step(state, next(it))
    ms = state.model_state["vq_ema"]["VQ_0"]
    assert int(ms["calls"]) == 5 and ms["calls"].dtype == jnp.int32 and ms["codebook"].dtype == jnp.float32
    assert not np.allclose(np.asarray(ms["codebook"]), cb0)
    assert set(m) == {"loss", "rec", "commit", "grad_norm", "lr"} and np.isfinite(float(m["loss"]))
    # the codebook is state, not a parameter: the optimiser never sees it
    assert "vq_ema" not in jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
    # the EMA formula, checked on the float cluster sizes: they always sum to (1 - DECAY^n) * B + DECAY^n * K
    total = float(ms["cluster_size"].sum())
    n = 5
    np.testing.assert_allclose(total, (1 - DECAY ** n) * BATCH + DECAY ** n * K, rtol=1e-5)  # ~5 roundings


def test_grad_accumulation_threads_the_model_state():
    state, step = _setup(accum=4)
    state, _ = step(state, next(_batches(0)))
    assert int(state.model_state["vq_ema"]["VQ_0"]["calls"]) == 4  # four micro-batch forwards, in order


def test_stateful_step_needs_a_model_state():
    state, step = _setup()
    with pytest.raises(ValueError, match="stateful=True needs state.model_state"):
        step(state.replace(model_state=None), next(_batches(0)))


def test_vq_checkpoint_resume_is_bit_identical(tmp_path):
    num_steps = 9
    state, step = _setup()
    straight = train_loop(state, step, _batches, num_steps=num_steps, run_dir=tmp_path / "a", log_every=3,
                          progress=False)
    state, step = _setup()
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train_loop(state, step, lambda s: _batches(s, crash_at=6), num_steps=num_steps, run_dir=tmp_path / "b",
                   checkpointer=ck, log_every=3, progress=False)
    ck.close()
    template, step = _setup(seed=5)
    ck = Checkpointer(tmp_path / "b" / "ckpt", save_every=4)
    restored = ck.restore_latest(template)
    assert int(restored.step) == 4 and int(restored.model_state["vq_ema"]["VQ_0"]["calls"]) == 4
    resumed = train_loop(restored, step, _batches, num_steps=num_steps, run_dir=tmp_path / "b", checkpointer=ck,
                         log_every=3, progress=False)
    ck.close()
    # bitwise: the same compiled step run on the same inputs (restore gives back the saved bytes)
    la, lb = _leaves(straight), _leaves(resumed)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)
    assert int(resumed.model_state["vq_ema"]["VQ_0"]["calls"]) == num_steps
