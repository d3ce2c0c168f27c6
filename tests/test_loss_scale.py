"""Dynamic loss scaling: the scale schedule, static metadata surviving jit/tree_map, skipping
exactly the overflowing step inside the train step, exactness of power-of-two scaling, float16
underflow rescued by scaling, and checkpointing of the scale."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.train.loss_scale import (
    DynamicLossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    make_loss_scale,
)
from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step


# ---------------------------------------------------------------------------------------------
# the scale schedule against a plain-python reference
# ---------------------------------------------------------------------------------------------
def _reference_schedule(finite_seq, s0, period, factor, lo, hi):
    s, c, out = s0, 0, []
    for f in finite_seq:
        if f:
            c += 1
            if c >= period:
                s, c = min(s * factor, hi), 0
        else:
            s, c = max(s / factor, lo), 0
        out.append((s, c))
    return out


@pytest.mark.parametrize("period, factor", [(1, 2.0), (3, 2.0), (4, 4.0)])
def test_schedule_matches_reference(period, factor):
    rng = np.random.default_rng(period)
    seq = rng.random(60) < 0.8
    seq[:12] = True  # a finite streak: must hit the ceiling
    seq[20:32] = False  # a long overflow streak: must hit the floor
    ls = DynamicLossScale.create(2.0 ** 6, period=period, factor=factor, min_loss_scale=2.0,
                                 max_loss_scale=2.0 ** 9)
    adjust = jax.jit(lambda s, f: s.adjust(f))
    ref = _reference_schedule(seq, 2.0 ** 6, period, factor, 2.0, 2.0 ** 9)
    for f, (s, c) in zip(seq, ref):
        ls = adjust(ls, jnp.asarray(f))
        assert float(ls.loss_scale) == s and int(ls.counter) == c
    assert min(s for s, _ in ref) == 2.0 and max(s for s, _ in ref) == 2.0 ** 9


def test_static_metadata_survives_jit_and_tree_map():
    ls = DynamicLossScale.create(1024.0, period=7, factor=3.0, min_loss_scale=8.0)
    for out in (jax.jit(lambda s: s)(ls), jax.tree.map(lambda x: x + 0, ls),
                jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(ls)))):
        assert (out.period, out.factor, out.min_loss_scale) == (7, 3.0, 8.0)
    # and the floor still holds after many overflows inside jit
    f = jax.jit(lambda s: jax.lax.fori_loop(0, 50, lambda i, s: s.adjust(False), s))
    assert float(f(ls).loss_scale) == 8.0
    assert len(jax.tree_util.tree_leaves(ls)) == 2  # only loss_scale and counter are state


def test_all_finite_and_factory():
    assert bool(all_finite({"a": jnp.ones(3), "i": jnp.arange(3)}))
    assert not bool(all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert not bool(all_finite([jnp.array([jnp.nan], jnp.float16)]))
    assert isinstance(make_loss_scale("none"), NoOpLossScale)
    assert isinstance(make_loss_scale("static", initial_scale=4.0), StaticLossScale)
    assert isinstance(make_loss_scale("dynamic"), DynamicLossScale)
    with pytest.raises(ValueError, match="unknown loss scale"):
        make_loss_scale("adaptive")
    with pytest.raises(ValueError, match="min_loss_scale"):
        DynamicLossScale.create(1.0, min_loss_scale=2.0)
    with pytest.raises(ValueError, match="period"):
        DynamicLossScale.create(2.0, period=0)


# ---------------------------------------------------------------------------------------------
# inside the train step
# ---------------------------------------------------------------------------------------------
def _params():
    k1, k2 = jax.random.split(jax.random.key(3))
    return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _batch(i, boost=1.0):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": rng.normal(size=(8, 3)).astype(np.float32), "boost": np.float32(boost)}


def _loss(params, batch, key):
    del key
    pred = batch["x"] @ params["w"] + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["boost"]
    return loss, {}


def _tree_equal(a, b):
    # bitwise; used only where the same compiled program produced both trees (see each use)
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def opt():
    return adamw(1e-2)


@pytest.fixture(scope="module")
def step(opt):
    return make_train_step(_loss, opt, ema_decay=0.9, donate=False)


def test_injected_overflow_skips_exactly_that_step(opt, step):
    ls = DynamicLossScale.create(2.0 ** 15, period=100)
    s = create_train_state(_params(), opt, jax.random.key(0), loss_scale=ls)
    # 1e36 * 2^15 overflows float32 in the scaled loss/gradients; unscaled it would be finite
    batches = [_batch(0), _batch(1), _batch(2, boost=1e36), _batch(3)]
    states, metrics = [s], []
    for b in batches:
        s, m = step(s, b)
        states.append(s)
        metrics.append(m)
    before, after = states[2], states[3]
    assert _tree_equal(before.params, after.params)
    assert _tree_equal(before.opt_state, after.opt_state)
    assert _tree_equal(before.ema_params, after.ema_params)
    assert int(after.step) == 3  # the step counter still advances (documented choice)
    assert float(after.loss_scale.loss_scale) == 2.0 ** 14 and int(after.loss_scale.counter) == 0
    assert [float(m["grads_finite"]) for m in metrics] == [1.0, 1.0, 0.0, 1.0]
    assert [float(m["loss_scale"]) for m in metrics] == [2.0 ** 15] * 3 + [2.0 ** 14]
    assert int(states[2].loss_scale.counter) == 2
    # the other steps did update
    assert not _tree_equal(states[1].params, states[2].params)
    assert not _tree_equal(states[3].params, states[4].params)
    # and the run equals one that never saw the poisoned batch (the loss ignores the key). Bitwise is
    # legitimate: the same period -> the same pytree metadata -> the same compiled program, and its
    # scales (2^15 vs 2^14 after the skip) are powers of two, which scale exactly
    r = create_train_state(_params(), opt, jax.random.key(0),
                           loss_scale=DynamicLossScale.create(2.0 ** 15, period=100))
    for b in (batches[0], batches[1], batches[3]):
        r, _ = step(r, b)
    assert _tree_equal(r.params, s.params) and _tree_equal(r.opt_state, s.opt_state)
    assert _tree_equal(r.ema_params, s.ema_params)


def test_power_of_two_scaling_is_exact(opt, step):
    """Scaling the loss by 2^k and the gradients by 2^-k is exact in floating point (barring over- and
    underflow): the backward pass is linear in the cotangent, and rounding commutes with powers of
    two. So ONE compiled program run with two different power-of-two scale trajectories gives
    bit-identical results -- a legitimate bitwise check (same program, same machine code)."""
    # same pytree type and static metadata -> the same compiled `step`; scales 1, 2, 4 vs 2^12 .. 2^14
    a = create_train_state(_params(), opt, jax.random.key(0), loss_scale=DynamicLossScale.create(1.0, period=2))
    b = create_train_state(_params(), opt, jax.random.key(0),
                           loss_scale=DynamicLossScale.create(2.0 ** 12, period=2))
    for i in range(5):
        a, ma = step(a, _batch(i))
        b, mb = step(b, _batch(i))
        assert float(ma["loss"]) == float(mb["loss"])  # metrics report the unscaled loss
    assert _tree_equal(a.params, b.params) and _tree_equal(a.opt_state, b.opt_state)
    assert float(a.loss_scale.loss_scale) == 4.0 and float(b.loss_scale.loss_scale) == 2.0 ** 14  # grew twice


def test_loss_scaled_step_matches_unscaled_step(opt, step):
    """With vs without a loss scale the step is a DIFFERENT compiled program (extra multiplies, the
    finiteness select): XLA may fuse/contract (FMA) differently, and XLA:CPU's code differs by ISA
    (AVX vs AVX2 vs AVX-512), so compare with a tolerance derived from the arithmetic, not bitwise.

    Per step the gradients differ by at most ~K float32 roundings relative (K = 64 covers the
    4-term dots, the 24-term mean and the backward pass: K * 2^-24 ~ 4e-6); AdamW's update
    m_hat / (sqrt(v_hat) + eps) is then perturbed by at most ~2x that relative, times lr, and
    p + update adds one rounding of p (2^-24 |p|, up to 2^-23 with the decay term). Over n steps:
    |dp| <= n * (lr * K * 2^-24 + 2^-23 |p|). The loss: ~30 roundings (2^-24 each) -> rtol 32 * 2^-24."""
    n, lr, k = 5, 1e-2, 64
    a = create_train_state(_params(), opt, jax.random.key(0))
    b = create_train_state(_params(), opt, jax.random.key(0),
                           loss_scale=DynamicLossScale.create(2.0 ** 12, period=2))
    for i in range(n):
        a, ma = step(a, _batch(i))
        b, mb = step(b, _batch(i))
        np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=32 * 2.0 ** -24)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=n * 2.0 ** -23, atol=n * lr * k * 2.0 ** -24)
    assert float(b.loss_scale.loss_scale) == 2.0 ** 14


def test_float16_underflow_needs_scaling():
    """A gradient of ~1e-8 underflows in float16 (smallest subnormal 6e-8) unless the loss is scaled."""
    opt = optax.sgd(1.0)
    x = np.linspace(0.5, 1.5, 6).astype(np.float32)

    def loss(params, batch, key):
        del key
        # computed in float16 under the policy: the cotangent 1 * 1e-4 * 1e-4 underflows to 0
        c = batch["c"].astype(params["w"].dtype)  # data, not a constant XLA could fold into c*c
        return jnp.sum(params["w"] * batch["x"].astype(params["w"].dtype)) * c * c, {}

    step = make_train_step(loss, opt, precision="float16", donate=False)
    p0 = {"w": jnp.zeros(6, jnp.float32)}  # zeros: 1 - 1e-8 would round back to 1 in float32
    plain = create_train_state(p0, opt, jax.random.key(0), ema=False)
    _, m_plain = step(plain, {"x": x, "c": np.float32(1e-4)})
    scaled = create_train_state(p0, opt, jax.random.key(0), ema=False,
                                loss_scale=DynamicLossScale.create(2.0 ** 14))
    new, m = step(scaled, {"x": x, "c": np.float32(1e-4)})
    assert float(m_plain["grad_norm"]) == 0.0  # underflow: no learning signal at all
    got = np.asarray(p0["w"] - new.params["w"])  # sgd(1): the update is the gradient
    np.testing.assert_allclose(got, 1e-8 * x, rtol=2e-3)
    assert new.params["w"].dtype == jnp.float32


def test_loss_scale_is_checkpointed(tmp_path, opt, step):
    from research.train.checkpoint import Checkpointer

    s = create_train_state(_params(), opt, jax.random.key(0),
                           loss_scale=DynamicLossScale.create(2.0 ** 10, period=3, min_loss_scale=4.0))
    s, _ = step(s, _batch(0, boost=1e38))  # overflow -> 2^9, counter 0
    s, _ = step(s, _batch(1))               # counter 1
    ck = Checkpointer(str(tmp_path / "ck"), save_every=1, async_save=False)
    ck.save(int(s.step), s, force=True)
    ck.wait()
    template = create_train_state(_params(), opt, jax.random.key(1),
                                  loss_scale=DynamicLossScale.create(2.0 ** 10, period=3, min_loss_scale=4.0))
    r = ck.restore_latest(template)
    ck.close()
    assert float(r.loss_scale.loss_scale) == 2.0 ** 9 and int(r.loss_scale.counter) == 1
    assert r.loss_scale.min_loss_scale == 4.0 and r.loss_scale.period == 3
    assert _tree_equal(r.params, s.params) and int(r.step) == 2
