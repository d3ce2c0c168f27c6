"""Resumable, sharded sample generation: determinism, resume after interruption / lost shards,
identical results on 8 simulated CPU devices (subprocess: the device count is fixed at JAX
start-up), and the argument errors."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.eval import fid_sampling as fs
from tests.subproc import REPO, xla_flags


def sample_fn(key, n):
    """Integer-only (random bits), so the 8-device and 1-device programs must agree bit for bit: what
    is compared across programs is the keys' partition-independence, not float rounding (which may
    differ between two compiled programs)."""
    k1, k2 = jax.random.split(key)
    return jax.random.bits(k1, (n, 6, 5, 3), jnp.uint8) ^ jax.random.bits(k2, (n, 1, 1, 1), jnp.uint8)


KW = dict(num_samples=21, batch_size=8, seed=3)  # 3 shards: 8, 8, 5


def _shards(d):
    return [np.load(fs.shard_path(d, i))["images"] for i in range(3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    res = fs.generate_samples(sample_fn, out_dir=d, **KW)
    assert res.generated == [0, 1, 2] and res.skipped == []
    return d, fs.load_samples(d)


def test_shapes_determinism_and_per_shard_keys(reference, tmp_path):
    d, ref = reference
    assert ref.shape == (21, 6, 5, 3) and ref.dtype == np.uint8
    assert [len(s) for s in _shards(d)] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate(list(fs.iter_samples(d))), ref)
    fs.generate_samples(sample_fn, out_dir=tmp_path, **KW)
    np.testing.assert_array_equal(fs.load_samples(tmp_path), ref)
    root = jax.random.key(KW["seed"])  # shard i is sample_fn(fold_in(key(seed), i), batch_size)
    np.testing.assert_array_equal(_shards(d)[1], np.asarray(sample_fn(jax.random.fold_in(root, 1), 8)))
    assert not np.array_equal(_shards(d)[0], _shards(d)[1])


def test_resume_after_interruption(reference, tmp_path):
    _, ref = reference
    fs.generate_samples(sample_fn, out_dir=tmp_path, **KW)
    os.remove(fs.shard_path(tmp_path, 1))  # a lost shard: a gap
    with pytest.raises(ValueError, match=r"shards missing: \[1\]"):
        fs.load_samples(tmp_path)
    os.remove(fs.shard_path(tmp_path, 2))  # a run killed while writing the last one
    (tmp_path / ".samples_000002.npz.tmp-999").write_bytes(b"partial")
    with pytest.raises(ValueError, match="1 of 3 shards"):
        fs.load_samples(tmp_path)
    res = fs.generate_samples(sample_fn, out_dir=tmp_path, **KW)
    assert res.generated == [1, 2] and res.skipped == [0]
    assert not (tmp_path / ".samples_000002.npz.tmp-999").exists()
    np.testing.assert_array_equal(fs.load_samples(tmp_path), ref)
    assert fs.generate_samples(sample_fn, out_dir=tmp_path, **KW).generated == []  # complete: no-op


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="different run"):
        fs.generate_samples(sample_fn, out_dir=tmp_path, **KW)
        fs.generate_samples(sample_fn, out_dir=tmp_path, **{**KW, "seed": 4})
    with pytest.raises(ValueError, match="uint8"):
        fs.generate_samples(lambda k, n: jnp.zeros((n, 4, 4, 3)), num_samples=4, batch_size=2,
                            out_dir=tmp_path / "f", seed=0)
    with pytest.raises(ValueError, match=r"uint8 \[2, H, W, C\]"):
        fs.generate_samples(lambda k, n: jnp.zeros((n + 1, 4, 4, 3), jnp.uint8), num_samples=4,
                            batch_size=2, out_dir=tmp_path / "g", seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        fs.generate_samples(sample_fn, num_samples=0, batch_size=2, out_dir=tmp_path / "h", seed=0)
    assert not (tmp_path / "f").exists()  # sample_fn validated before anything is written
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no samples"):
        fs.load_samples(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        fs.load_samples(tmp_path / "nope")


SCRIPT = textwrap.dedent(r"""
    import sys, numpy as np, jax
    from research.eval import fid_sampling as fs
    from research.parallel.sharding import make_mesh
    from tests.test_fid_sampling import sample_fn, KW
    assert len(jax.devices()) == 8, jax.devices()
    out, ref_dir = sys.argv[1], sys.argv[2]
    gen = fs.make_sharded_sampler(sample_fn, 8, make_mesh())
    y = gen(jax.random.key(0))
    assert len({s.device for s in y.addressable_shards}) == 8 and y.addressable_shards[0].data.shape[0] == 1
    fs.generate_samples(sample_fn, out_dir=out, **KW)  # default mesh: all 8 devices
    np.testing.assert_array_equal(fs.load_samples(out), fs.load_samples(ref_dir))
    try:
        fs.generate_samples(sample_fn, num_samples=12, batch_size=12, out_dir=out + "_b", seed=0)
    except ValueError as e:
        assert "divisible by the 8 devices" in str(e), e
    else:
        raise AssertionError("batch 12 on 8 devices accepted")
    print("OK")
""")


def test_eight_devices_give_identical_samples(reference, tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s8"), str(reference[0])],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
