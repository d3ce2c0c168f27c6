"""The Grain input pipeline (research.data.pipeline): deterministic shuffling, exact resume from a
saved iterator state (with and without augmentation and worker processes), sharding (in one
process and across two jax.distributed processes), augmentation."""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from research.data.pipeline import (ArraySource, ImageAugment, get_iterator_state, make_grain_loader,
                                    restore_iterator_state, save_iterator_state, set_iterator_state)
from tests.subproc import REPO, xla_flags as _xla_flags

N = 24


def _arrays(n=N, hw=8, c=3):
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8),
            "y": (np.arange(n) % 10).astype(np.int32), "id": np.arange(n, dtype=np.int64)}


def _take(it, k):
    return [{key: np.array(v) for key, v in next(it).items()} for _ in range(k)]


def _ids(batches):
    return np.concatenate([b["id"] for b in batches])


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_same_seed_same_batches_other_seed_other_order():
    a = _take(make_grain_loader(_arrays(), batch_size=4, seed=3), 9)
    b = _take(make_grain_loader(_arrays(), batch_size=4, seed=3), 9)
    c = _take(make_grain_loader(_arrays(), batch_size=4, seed=4), 9)
    assert _same(a, b)
    assert not np.array_equal(_ids(a), _ids(c))
    assert a[0]["x"].shape == (4, 8, 8, 3) and a[0]["x"].dtype == np.uint8 and a[0]["y"].dtype == np.int32
    arr = _arrays()
    for bt in a:  # rows stay together
        assert np.array_equal(bt["x"], arr["x"][bt["id"]]) and np.array_equal(bt["y"], arr["y"][bt["id"]])


def test_each_epoch_is_a_permutation():
    it = make_grain_loader(_arrays(), batch_size=5, seed=0, num_epochs=2, drop_remainder=False)
    ids = _ids(list(it))
    assert len(ids) == 2 * N  # the last batch is partial (48 = 9 * 5 + 3)
    e0, e1 = ids[:N], ids[N:]
    assert sorted(e0) == list(range(N)) and sorted(e1) == list(range(N))
    assert not np.array_equal(e0, e1)  # a new permutation each epoch
    assert not np.array_equal(e0, np.arange(N))
    ordered = _ids(list(make_grain_loader(_arrays(), batch_size=5, seed=0, num_epochs=1, shuffle=False,
                                          drop_remainder=False)))
    assert np.array_equal(ordered, np.arange(N))
    # drop_remainder: only full batches
    full = list(make_grain_loader(_arrays(), batch_size=5, seed=0, num_epochs=1))
    assert [len(b["id"]) for b in full] == [5] * 4


@pytest.mark.parametrize("augment", [None, ("flip", "crop")])
def test_resume_is_exact(augment, tmp_path):
    kw = dict(batch_size=4, seed=11, augment=augment)
    it = make_grain_loader(_arrays(), **kw)
    _take(it, 7)  # crosses the epoch boundary (6 batches per epoch)
    (tmp_path / "5").mkdir()
    path = save_iterator_state(tmp_path / "5", it)
    assert path == str(tmp_path / "5" / "data_state.json")
    json.loads(open(path).read())
    want = _take(it, 5)
    fresh = restore_iterator_state(tmp_path / "5", make_grain_loader(_arrays(), **kw))
    assert _same(_take(fresh, 5), want)
    # get/set as a JSON-serialisable dict
    it2 = make_grain_loader(_arrays(), **kw)
    _take(it2, 3)
    state = json.loads(json.dumps(get_iterator_state(it2)))
    want2 = _take(it2, 4)
    it3 = make_grain_loader(_arrays(), **kw)
    set_iterator_state(it3, state)
    assert _same(_take(it3, 4), want2)


def test_restore_rejects_another_loader(tmp_path):
    it = make_grain_loader(_arrays(), batch_size=4, seed=1)
    _take(it, 2)
    save_iterator_state(tmp_path / "s.json", it)
    for other in (dict(seed=2), dict(seed=1, shard_index=0, num_shards=2)):
        with pytest.raises(ValueError):
            restore_iterator_state(tmp_path / "s.json", make_grain_loader(_arrays(), batch_size=4, **other))
    with pytest.raises(ValueError):  # another dataset shape
        restore_iterator_state(tmp_path / "s.json", make_grain_loader(_arrays(hw=6), batch_size=4, seed=1))
    with pytest.raises(FileNotFoundError):
        restore_iterator_state(tmp_path / "nothing", make_grain_loader(_arrays(), batch_size=4, seed=1))
    with pytest.raises(FileNotFoundError):  # never creates a (checkpoint step) directory
        save_iterator_state(tmp_path / "7", it)


def test_state_saved_with_the_train_state(tmp_path):
    import jax.numpy as jnp
    from research.train.checkpoint import Checkpointer
    kw = dict(batch_size=4, seed=0, augment=("flip", "crop"))
    it = make_grain_loader(_arrays(), **kw)
    ck = Checkpointer(tmp_path / "ckpt", save_every=3)  # async saves
    for step in range(1, 7):
        next(it)
        if ck.save(step, {"w": jnp.full(3, float(step))}):
            state = get_iterator_state(it)  # captured with the train state of this step
            ck.wait()
            save_iterator_state(ck.step_path(step), state)
    want = _take(it, 3)
    ck.close()
    ck = Checkpointer(tmp_path / "ckpt", save_every=3)
    restored = ck.restore_latest({"w": jnp.zeros(3)})
    step = ck.latest_step()
    assert step == 6 and float(restored["w"][0]) == 6.0
    assert {"data_state.json", "digest.json", "state"} <= set(os.listdir(ck.step_path(step)))
    fresh = restore_iterator_state(ck.step_path(step), make_grain_loader(_arrays(), **kw))
    ck.close()
    assert _same(_take(fresh, 3), want)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_with_worker_processes(workers, tmp_path):
    # Workers are spawned processes (they import jax): ~1-3 s each on 2 cores.
    kw = dict(batch_size=4, seed=5, augment=("flip", "crop"), worker_count=workers, num_epochs=1,
              drop_remainder=False)
    it = make_grain_loader(_arrays(), **kw)
    first = _take(it, 2)
    save_iterator_state(tmp_path, it)
    want = [{k: np.array(v) for k, v in b.items()} for b in it]  # the rest of the epoch
    del it
    gc.collect()
    fresh = restore_iterator_state(tmp_path, make_grain_loader(_arrays(), **kw))
    got = [{k: np.array(v) for k, v in b.items()} for b in fresh]
    del fresh
    gc.collect()
    assert len(want) == 4 and _same(got, want)
    # every record keeps its augmentation draw whatever the worker count (only the batching differs)
    ref = list(make_grain_loader(_arrays(), **dict(kw, worker_count=0)))
    by_id = lambda bs: {int(i): np.array(x) for b in bs for i, x in zip(b["id"], b["x"])}
    a, b = by_id(first + want), by_id(ref)
    assert sorted(a) == sorted(b) == list(range(N))
    assert all(np.array_equal(a[i], b[i]) for i in a)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_shards_are_disjoint_and_cover(drop_remainder):
    n = 24 if not drop_remainder else 25
    epochs = [_ids(list(make_grain_loader(_arrays(n), batch_size=3 if not drop_remainder else 4, seed=7,
                                          num_epochs=1, drop_remainder=drop_remainder, shard_index=i,
                                          num_shards=2)))
              for i in range(2)]
    s0, s1 = set(epochs[0].tolist()), set(epochs[1].tolist())
    assert len(s0) == len(epochs[0]) and len(s1) == len(epochs[1]) and not s0 & s1
    if drop_remainder:  # equal shards of 12 (one record left over); full batches only: 3 of 4
        assert len(epochs[0]) == len(epochs[1]) == 12
    else:
        assert s0 | s1 == set(range(n))
        # uneven shards with a finite num_epochs: Grain 0.2.18 reads n // num_shards per shard (warned)
        with pytest.warns(UserWarning, match="do not split evenly"):
            make_grain_loader(_arrays(25), batch_size=3, seed=7, num_epochs=1, drop_remainder=False,
                              shard_index=0, num_shards=2)
    with pytest.raises(ValueError):
        make_grain_loader(_arrays(), batch_size=3, seed=0, shard_index=0)
    with pytest.raises(ValueError):
        make_grain_loader(_arrays(), batch_size=3, seed=0, shard_index=2, num_shards=2)


WORKER = r'''
import json, sys
import numpy as np
from research.parallel.distributed import initialize_from_env
initialize_from_env(init_timeout_s=60)
import jax
from research.data.pipeline import make_grain_loader
n = int(sys.argv[2])
it = make_grain_loader({"id": np.arange(n), "x": np.zeros((n, 2), np.float32)}, batch_size=4, seed=3,
                       num_epochs=1, drop_remainder=False)
ids = [int(i) for b in it for i in b["id"]]
with open(sys.argv[1], "w") as f:
    json.dump({"process": jax.process_index(), "count": jax.process_count(), "ids": ids}, f)
'''


def test_two_processes_read_disjoint_covering_shards(tmp_path):
    from tests.test_distributed import _free_port  # the existing multi-process test's helpers
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port, n = _free_port(), 22
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1", XLA_FLAGS=_xla_flags(),
               RESEARCH_COORDINATOR=f"localhost:{port}", RESEARCH_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"p{i}.json"), str(n)],
                              env=dict(env, RESEARCH_PROCESS_ID=str(i)), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [r["process"] for r in res] == [0, 1] and all(r["count"] == 2 for r in res)
    a, b = set(res[0]["ids"]), set(res[1]["ids"])
    assert len(a) == len(res[0]["ids"]) == n // 2 and len(b) == len(res[1]["ids"]) == n // 2
    assert not a & b and a | b == set(range(n))


def test_augmentation_shapes_applied_reproducible():
    arr = _arrays(n=16, hw=8)
    kw = dict(batch_size=16, seed=2, num_epochs=1, shuffle=False)
    plain = next(make_grain_loader(arr, **kw))
    both = next(make_grain_loader(arr, augment=("flip", "crop"), **kw))
    again = next(make_grain_loader(arr, augment=("flip", "crop"), **kw))
    assert both["x"].shape == plain["x"].shape and both["x"].dtype == np.uint8
    assert _same([both], [again])
    assert np.array_equal(both["y"], plain["y"]) and np.array_equal(both["id"], plain["id"])
    changed = [not np.array_equal(a, b) for a, b in zip(both["x"], plain["x"])]
    assert 0 < sum(changed)
    # flip only: each image is itself or its mirror, both occur
    flip = next(make_grain_loader(arr, augment="flip", **kw))["x"]
    same = [np.array_equal(f, p) for f, p in zip(flip, plain["x"])]
    mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flip, plain["x"])]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    # crop only: a shifted window of the zero-padded image
    crop = next(make_grain_loader(arr, augment="crop", crop_padding=2, **kw))["x"]
    for c, p in zip(crop, plain["x"]):
        padded = np.pad(p, [(2, 2), (2, 2), (0, 0)])
        assert any(np.array_equal(c, padded[dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert not all(np.array_equal(c, p) for c, p in zip(crop, plain["x"]))
    # another seed, other draws; grayscale [H, W] images work too
    other = next(make_grain_loader(arr, augment=("flip", "crop"), **dict(kw, seed=9)))
    assert not np.array_equal(other["x"], both["x"])
    gray = next(make_grain_loader({"x": arr["x"][..., 0]}, augment=("flip", "crop"), **kw))["x"]
    assert gray.shape == (16, 8, 8) and gray.dtype == np.uint8


def _noise(example, rng):
    return dict(example, x=example["x"].astype(np.float32) + rng.normal(size=example["x"].shape).astype(np.float32))


def test_callable_augment_and_checks():
    arr = _arrays(n=8)
    a = next(make_grain_loader(arr, batch_size=8, seed=0, augment=_noise))
    b = next(make_grain_loader(arr, batch_size=8, seed=0, augment=_noise))
    assert a["x"].dtype == np.float32 and np.array_equal(a["x"], b["x"])
    assert repr(ArraySource(arr)) == "ArraySource(n=8, {x: (8, 8, 3) uint8, y: () int32, id: () int64})"
    assert "crop_padding=4" in repr(ImageAugment())
    with pytest.raises(ValueError):
        make_grain_loader(arr, batch_size=2, seed=0, augment=("rotate",))
    with pytest.raises(ValueError):
        make_grain_loader(arr, batch_size=2, seed=2 ** 32)
    with pytest.raises(ValueError):
        make_grain_loader({"x": np.zeros(3), "y": np.zeros(4)}, batch_size=2, seed=0)
    with pytest.raises(ValueError):
        make_grain_loader(arr, batch_size=2, seed=0, num_classes=5)  # labels go up to 7
    with pytest.raises(ValueError):
        make_grain_loader(arr, batch_size=9, seed=0, num_epochs=1)
    with pytest.raises(ValueError):  # flat vectors are not images
        next(make_grain_loader({"x": np.zeros((4, 5))}, batch_size=2, seed=0, augment="flip"))


def test_embedded_digits_and_toy_data_through_the_same_interface():
    """The embedded data sets use the same loader as files on disk: every record once per epoch,
    values unchanged (digits: float images + labels; 2-D toy points without labels)."""
    import jax

    from research.data.digits import load_digits
    from research.data.toy import sample_toy

    x, y = load_digits("train", seed=0, test_fraction=0.2)
    digits = {"x": x, "y": y, "id": np.arange(len(y))}
    it = make_grain_loader(digits, batch_size=64, seed=3, num_epochs=1, drop_remainder=False, num_classes=11)
    batches = [{k: np.array(v) for k, v in b.items()} for b in it]
    ids = _ids(batches)
    assert sorted(ids) == list(range(len(y))) and not np.array_equal(ids, np.arange(len(y)))
    for b in batches:
        assert b["x"].shape[1:] == (8, 8, 1) and b["x"].dtype == np.float32
        np.testing.assert_array_equal(b["x"], x[b["id"]])
        np.testing.assert_array_equal(b["y"], y[b["id"]])

    pts = np.asarray(sample_toy("two_moons", jax.random.key(0), 100))
    it = make_grain_loader({"x": pts, "id": np.arange(100)}, batch_size=25, seed=0, num_epochs=1)
    got = [{k: np.array(v) for k, v in b.items()} for b in it]
    assert [g["x"].shape for g in got] == [(25, 2)] * 4
    for g in got:
        np.testing.assert_array_equal(g["x"], pts[g["id"]])
