"""Multi-host training on localhost: two processes joined by ``jax.distributed`` (CPU collectives
through gloo) train a few steps, data parallel and FSDP, each loading only its own half of the
batch, and agree with a single process; only process 0 writes; a stalled peer ends the run with a
clear error instead of hanging; environment parsing."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from research.parallel.distributed import DistributedConfig, config_from_env

from tests.subproc import REPO, xla_flags as _xla_flags  # noqa: E402

WORKER = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.experimental import multihost_utils
from research.parallel.distributed import (initialize_from_env, is_primary, barrier, Watchdog,
                                        process_batch_slice)

mode_arg, out_dir = sys.argv[1], sys.argv[2]
initialize_from_env(init_timeout_s=60)

from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step
from research.parallel.sharding import make_mesh, init_sharded, shard_batch

if mode_arg == "stall":
    if jax.process_index() == 1:
        time.sleep(40)   # a stalled peer: never reaches the barrier or the step in time
        sys.exit(0)
    try:
        barrier("start", timeout_s=3)
    except TimeoutError as e:
        print("BARRIER_TIMEOUT", e, flush=True)
    mesh = make_mesh()
    x = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
                                               np.ones((1, 4), np.float32))
    with Watchdog(4, what="training step"):
        jax.block_until_ready(jax.jit(lambda a: a.sum())(x))  # needs the stalled peer: hangs
    print("NOT_REACHED", flush=True)
    sys.exit(0)

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.gelu(nn.Dense(8)(x)))

model = MLP()
rng = np.random.default_rng(0)
GLOBAL_BATCH = 16
batches = [{"x": rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32),
            "y": rng.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)} for _ in range(4)]

def loss_fn(params, batch, key):
    x = batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)
    return jnp.mean((model.apply({"params": params}, x) - batch["y"]) ** 2), {}

opt = adamw(1e-2)
def init(key):
    params = model.init(key, jnp.zeros((1, 6)))["params"]
    return create_train_state(params, opt, jax.random.fold_in(key, 1), ema=False)

results = {}
modes = ["single"] if mode_arg == "single" else ["dp", "fsdp"]
for mode in modes:
    if mode == "single":
        state = init(jax.random.key(0))
        step = make_train_step(loss_fn, opt)
        feed = lambda b: b
    else:
        mesh = make_mesh({"data": -1})
        state, sh = init_sharded(init, jax.random.key(0), mesh=mesh, mode=mode)
        step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=sh)
        sl = process_batch_slice(GLOBAL_BATCH)   # this process loads only its own rows
        feed = lambda b: shard_batch({k: v[sl] for k, v in b.items()}, mesh)
    losses = []
    with Watchdog(120) as wd:
        for b in batches:
            state, m = step(state, feed(b))
            losses.append(float(m["loss"]))
            wd.kick()
    params = multihost_utils.process_allgather(state.params, tiled=True) if mode != "single" else state.params
    if mode == "fsdp":  # every process calls save/restore; orbax writes each shard once
        from research.train.checkpoint import Checkpointer
        ck = Checkpointer(sys.argv[3], save_every=1, async_save=False)
        ck.save(int(state.step), state, force=True)
        ck.wait()
        restored = ck.restore_latest(init_sharded(init, jax.random.key(9), mesh=mesh, mode=mode)[0])
        ck.close()
        assert int(restored.step) == 4
        assert restored.params["Dense_0"]["kernel"].sharding.spec == state.params["Dense_0"]["kernel"].sharding.spec
        for a, b in zip(jax.tree.leaves(multihost_utils.process_allgather(restored.params, tiled=True)),
                        jax.tree.leaves(params)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    results[mode] = {"losses": losses,
                     "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(params)]}
if is_primary():
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"process_count": jax.process_count(), "results": results}, f)
barrier("end", timeout_s=60)
print("DONE", jax.process_index(), flush=True)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(worker, mode, out_dir, pid=None, n=None, port=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = _xla_flags()  # keeps an ISA cap, drops simulated device counts
    for k in ("RESEARCH_COORDINATOR", "RESEARCH_NUM_PROCESSES", "RESEARCH_PROCESS_ID"):
        env.pop(k, None)
    if pid is not None:
        env.update(RESEARCH_COORDINATOR=f"localhost:{port}", RESEARCH_NUM_PROCESSES=str(n),
                   RESEARCH_PROCESS_ID=str(pid))
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(os.path.dirname(str(out_dir)), "ckpt")  # shared by the processes of a run
    return subprocess.Popen([sys.executable, str(worker), mode, str(out_dir), ckpt], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "worker.py"
    path.write_text(WORKER)
    return path


def test_two_processes_agree_with_one(worker, tmp_path):
    port = _free_port()
    procs = [_launch(worker, "multi", tmp_path / f"p{i}", pid=i, n=2, port=port) for i in range(2)]
    procs.append(_launch(worker, "single", tmp_path / "single"))
    outs = _finish(procs, timeout=240)
    for rc, out, err in outs:
        assert rc == 0, out[-2000:] + err[-4000:]
    assert not (tmp_path / "p1" / "result.json").exists()  # only process 0 writes
    assert (tmp_path / "ckpt").is_dir()  # the FSDP state was checkpointed and restored by both
    multi = json.loads((tmp_path / "p0" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    assert multi["process_count"] == 2 and single["process_count"] == 1
    ref = single["results"]["single"]
    for mode in ("dp", "fsdp"):
        got = multi["results"][mode]
        assert len(got["losses"]) == 4
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (mode, got["losses"], ref["losses"])
        for a, b in zip(got["params"], ref["params"]):
            assert max(abs(x - y) for x, y in zip(a, b)) < 2e-5, mode
    assert ref["losses"][-1] < ref["losses"][0]


def test_stalled_peer_ends_with_clear_error(worker, tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    procs = [_launch(worker, "stall", tmp_path / f"p{i}", pid=i, n=2, port=port) for i in range(2)]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    elapsed = time.monotonic() - t0
    assert "BARRIER_TIMEOUT" in out and "barrier 'start' timed out" in out, out + err[-3000:]
    assert procs[0].returncode == 75, (procs[0].returncode, err[-3000:])
    assert "no training step completed" in err and "stalled" in err
    assert "NOT_REACHED" not in out
    assert elapsed < 40  # well before the stalled peer (40 s) would have woken up


def test_init_timeout_is_a_clear_error(worker, tmp_path):
    code = ("from research.parallel.distributed import initialize_from_env\n"
            "initialize_from_env(init_timeout_s=3)\nprint('NOT_REACHED')\n")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               RESEARCH_COORDINATOR=f"localhost:{_free_port()}", RESEARCH_NUM_PROCESSES="2",
               RESEARCH_PROCESS_ID="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 75 and "did not complete within 3 s" in r.stderr, r.stderr[-3000:]
    assert "NOT_REACHED" not in r.stdout


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RESEARCH_COORDINATOR": "h:1", "RESEARCH_NUM_PROCESSES": "4", "RESEARCH_PROCESS_ID": "3"},
     DistributedConfig("h:1", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
      "RESEARCH_LOCAL_DEVICE_IDS": "0,1"}, DistributedConfig("h:2", 2, 0, (0, 1))),
])
def test_config_from_env(env, expected):
    assert config_from_env(env) == expected


@pytest.mark.parametrize("env, match", [
    ({"RESEARCH_COORDINATOR": "h:1"}, "missing RESEARCH_NUM_PROCESSES, RESEARCH_PROCESS_ID"),
    ({"RESEARCH_COORDINATOR": "h:1", "RESEARCH_NUM_PROCESSES": "two", "RESEARCH_PROCESS_ID": "0"},
     "not an integer"),
    ({"RESEARCH_COORDINATOR": "h:1", "RESEARCH_NUM_PROCESSES": "2", "RESEARCH_PROCESS_ID": "2"},
     "outside 0..1"),
    ({"RESEARCH_COORDINATOR": "h", "RESEARCH_NUM_PROCESSES": "2", "RESEARCH_PROCESS_ID": "1"},
     "host:port"),
])
def test_config_from_env_errors(env, match):
    with pytest.raises(ValueError, match=match):
        config_from_env(env)
