"""Meshes and shardings. One data-parallel / FSDP / ring-all-reduce step on 8 simulated CPU devices
equals the single-device step (in a subprocess: the device count is fixed at JAX start-up)."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.parallel.sharding import fsdp_spec, make_mesh, tree_shardings
from research.parallel.distributed import process_batch_slice

from tests.subproc import REPO, xla_flags as _xla_flags  # noqa: E402


@pytest.mark.parametrize("shape, n, expected", [
    ((16, 32), 8, P(None, "data")),      # largest divisible dim
    ((32, 16), 8, P("data")),
    ((24, 24), 8, P("data")),            # tie -> first
    ((12, 7), 8, P()),                   # nothing divisible -> replicated
    ((), 8, P()),                        # scalar
    ((8, 3, 40), 4, P(None, None, "data")),
    ((64,), 1, P()),                     # one device: nothing to shard
])
def test_fsdp_spec(shape, n, expected):
    assert fsdp_spec(shape, n) == expected


def test_fsdp_spec_min_size():
    assert fsdp_spec((16, 16), 8, min_shard_size=1024) == P()
    assert fsdp_spec((32, 32), 8, min_shard_size=1024) == P("data")


def test_make_mesh_errors_and_single_device():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == len(jax.devices())
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "model": -1})
    with pytest.raises(ValueError, match="need"):
        make_mesh({"data": len(jax.devices()) + 1})
    with pytest.raises(ValueError, match="bad size"):
        make_mesh({"data": 0})
    with pytest.raises(ValueError, match="unknown sharding mode"):
        tree_shardings({"a": np.ones(2)}, mesh, mode="zero3")
    with pytest.raises(ValueError, match="not 'model'"):
        tree_shardings({"a": np.ones(2)}, mesh, axis="model")


def test_process_batch_slice():
    assert process_batch_slice(12, process_index=2, process_count=3) == slice(8, 12)
    with pytest.raises(ValueError, match="divisible"):
        process_batch_slice(10, process_index=0, process_count=3)


SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import PartitionSpec as P
    from research.train.optim import adamw
    from research.train.state import create_train_state
    from research.train.step import make_train_step
    from research.train.loss_scale import DynamicLossScale
    from research.parallel.sharding import make_mesh, init_sharded, shard_batch, state_shardings

    assert len(jax.devices()) == 8

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(32)(x))           # kernel [16, 32] -> sharded on dim 1
            h = nn.gelu(nn.Dense(24)(h))           # kernel [32, 24] -> dim 0 (24 % 8 == 0 too)
            return nn.Dense(3)(h)                  # kernel [24, 3] -> dim 0; bias [3] replicated

    model = MLP()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(32, 16)).astype(np.float32),
                "y": rng.normal(size=(32, 3)).astype(np.float32)} for _ in range(3)]

    def loss_fn(params, batch, key):   # uses the key: noise on the inputs
        x = batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)
        return jnp.mean((model.apply({"params": params}, x) - batch["y"]) ** 2), {}

    def det_loss_fn(params, batch, key):
        return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2), {}

    opt = adamw(1e-2)

    def init(key, ls=False):
        params = model.init(key, jnp.zeros((1, 16)))["params"]
        return create_train_state(params, opt, jax.random.fold_in(key, 1),
                                  loss_scale=DynamicLossScale.create(2.0 ** 10) if ls else None)

    def run_single(loss, accum=1, ls=False):
        step = make_train_step(loss, opt, ema_decay=0.9, grad_accum_steps=accum)
        dev0 = jax.devices()[0]
        state = jax.device_put(init(jax.random.key(0), ls), dev0)
        for b in batches:
            state, m = step(state, jax.device_put(b, dev0))
        return state, float(m["loss"])

    def close(a, b, tol=2e-5):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)

    mesh = make_mesh({"data": -1})
    for mode, loss, reduce, accum, ls in [("dp", loss_fn, "auto", 1, False),
                                         ("fsdp", loss_fn, "auto", 1, False),
                                         ("fsdp", loss_fn, "auto", 2, True),
                                         ("dp", det_loss_fn, "ring", 1, False),
                                         ("fsdp", det_loss_fn, "ring", 2, False)]:
        ref, ref_loss = run_single(loss, accum, ls)
        state, sh = init_sharded(lambda k: init(k, ls), jax.random.key(0), mesh=mesh, mode=mode)
        step = make_train_step(loss, opt, ema_decay=0.9, grad_accum_steps=accum, mesh=mesh,
                               state_sharding=sh, grad_reduce=reduce)
        k0 = state.params["Dense_0"]["kernel"]
        want = P(None, "data") if mode == "fsdp" else P()
        assert k0.sharding.spec == want, (mode, k0.sharding)
        assert k0.addressable_shards[0].data.shape == ((16, 4) if mode == "fsdp" else (16, 32))
        for b in batches:
            state, m = step(state, shard_batch(b, mesh))
        # the layout is kept step after step (out_shardings), for params, moments and EMA
        for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(sh)):
            assert got.sharding.is_equivalent_to(exp, got.ndim), (mode, got.sharding, exp)
        close(state.params, ref.params)
        close(state.ema_params, ref.ema_params)
        assert abs(float(m["loss"]) - ref_loss) < 1e-5 * max(1, abs(ref_loss)), (mode, reduce)
        assert int(state.step) == 3
        if ls:
            assert float(state.loss_scale.loss_scale) == float(ref.loss_scale.loss_scale)
        print("ok", mode, reduce, accum, ls, flush=True)

    # shape-first init: the sharded init's compiled program never holds a full FSDP kernel
    big = lambda key: {"w": jax.random.normal(key, (1024, 256)), "b": jnp.zeros((256,))}
    _, shb = init_sharded(big, jax.random.key(0), mesh=mesh, mode="fsdp")
    comp = jax.jit(big, out_shardings=shb).lower(jax.random.key(0)).compile()
    mem = comp.memory_analysis()
    assert mem.output_size_in_bytes <= 1024 * 256 * 4 // 8 + 256 * 4 + 64, mem.output_size_in_bytes
    print("OK")
""")


def test_dp_fsdp_ring_equal_single_device_8_devices():
    env = dict(os.environ, XLA_FLAGS=_xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
