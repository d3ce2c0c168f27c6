"""Ring all-reduce (ppermute reduce-scatter + all-gather) equals psum; communication volume.

The multi-device checks run in a subprocess with 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``), since the device count is fixed at JAX start-up.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from research.parallel.collectives import ring_all_reduce, ring_communication_volume

from tests.subproc import REPO, xla_flags as _xla_flags  # noqa: E402

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from research.parallel.collectives import ring_all_reduce, ring_mean, ring_communication_volume

    devs = jax.devices()
    assert len(devs) == 8, devs
    rng = np.random.default_rng(0)

    def run(p, fn, *xs):
        mesh = Mesh(np.array(devs[:p]), ("d",))
        f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        return f(*xs)

    for p in (2, 3, 4, 8):
        for n in (1, 5, 64, 1001):
            x = rng.standard_normal((p, n)).astype(np.float32)
            ring = np.asarray(run(p, lambda a: ring_all_reduce(a[0], "d")[None], x))
            ps = np.asarray(run(p, lambda a: jax.lax.psum(a[0], "d")[None], x))
            exact = x.astype(np.float64).sum(0)
            for i in range(p):  # every device holds the full sum
                np.testing.assert_allclose(ring[i], exact, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(ring[i], ps[i], rtol=1e-5, atol=1e-5)
            xi = rng.integers(-1000, 1000, size=(p, n)).astype(np.int32)
            ring_i = np.asarray(run(p, lambda a: ring_all_reduce(a[0], "d")[None], xi))
            assert np.array_equal(ring_i, np.broadcast_to(xi.sum(0), (p, n))), (p, n)

            # communication volume from the jaxpr: ppermutes and the elements they carry
            mesh = Mesh(np.array(devs[:p]), ("d",))
            f = jax.shard_map(lambda a: ring_all_reduce(a[0], "d")[None], mesh=mesh,
                              in_specs=P("d"), out_specs=P("d"))
            jaxpr = jax.make_jaxpr(f)(x).jaxpr
            inner = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"][0].params["jaxpr"]
            perms = [e for e in inner.eqns if e.primitive.name == "ppermute"]
            assert len(perms) == 2 * (p - 1), (p, len(perms))
            sent = sum(int(np.prod(e.invars[0].aval.shape)) for e in perms)
            chunk = -(-n // p)
            assert sent == 2 * (p - 1) * chunk, (p, n, sent)
            if n % p == 0:
                assert sent == ring_communication_volume(n, p)

    # pytree with mixed dtypes and shapes, and the mean
    p = 8
    tree = {"w": rng.standard_normal((p, 3, 5)).astype(np.float32),
            "b": rng.standard_normal((p, 7)).astype(np.float32),
            "n": rng.integers(0, 9, size=(p, 2)).astype(np.int32),
            "h": rng.standard_normal((p, 4)).astype(jnp.bfloat16)}
    mesh = Mesh(np.array(devs), ("d",))
    spec = {k: P("d") for k in tree}
    out = jax.jit(jax.shard_map(lambda t: jax.tree.map(lambda a: a[None],
                                ring_mean(jax.tree.map(lambda a: a[0], t), "d")),
                                mesh=mesh, in_specs=(spec,), out_specs=spec))(tree)
    for k, v in tree.items():
        exact = np.asarray(v, np.float64).mean(0)
        tol = 2e-2 if k == "h" else 1e-5
        for i in range(p):
            np.testing.assert_allclose(np.asarray(out[k][i], np.float64), exact, rtol=tol, atol=tol)
    assert out["h"].dtype == jnp.bfloat16 and out["w"].shape == (p, 3, 5)
    print("OK")
""")


def test_ring_all_reduce_equals_psum_8_devices():
    env = dict(os.environ, XLA_FLAGS=_xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]


def test_single_device_ring_is_identity():
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    x = jnp.arange(6.0).reshape(1, 6)
    f = jax.shard_map(lambda a: ring_all_reduce({"a": a}, "d")["a"], mesh=mesh, in_specs=P("d"),
                      out_specs=P("d"))
    np.testing.assert_array_equal(f(x), x)


@pytest.mark.parametrize("n, p, expected", [(800, 8, 1400.0), (10, 1, 0.0), (6, 2, 6.0)])
def test_volume_formula(n, p, expected):
    assert ring_communication_volume(n, p) == expected


def test_bad_input():
    with pytest.raises(ValueError, match="num_devices"):
        ring_communication_volume(10, 0)
