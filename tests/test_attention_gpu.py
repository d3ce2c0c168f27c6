"""GPU-only attention tests: the compiled Pallas (Triton-lowered) kernel, the jax-triton
baseline forward (experiments/baselines/jax_triton_fwd.py) and the cuDNN dispatch branch, each
against the plain-JAX reference evaluated in float32 on upcast inputs (exact float32 products). Skipped on CPU (see conftest); the same Pallas code
paths run in interpret mode in tests/test_flash_attention.py.

Tolerances (relative L2 error): float32 1e-4, float16 1e-2, bfloat16 3e-2.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention, reference_attention
from tests.test_flash_attention import fwd_bwd, make_inputs, rel_err

pytestmark = pytest.mark.gpu
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def _rel(x, r):
    """Relative L2 error against a float32 reference."""
    return rel_err(x, np.asarray(r, np.float64))


def _ref(q, k, v, do, **kw):
    up = lambda x: x.astype(jnp.float32)
    return fwd_bwd(reference_attention, up(q), up(k), up(v), up(do), **kw)


CASES = [
    # B, Tq, Tk, Hq, Hkv, D, causal, segments, dtype
    (2, 256, 256, 4, 4, 64, False, False, "bfloat16"),
    (2, 300, 300, 8, 2, 128, True, False, "bfloat16"),
    (1, 200, 513, 4, 1, 128, True, False, "float16"),
    (1, 513, 200, 4, 2, 64, True, False, "bfloat16"),
    (2, 384, 384, 4, 2, 128, True, True, "bfloat16"),
    (1, 129, 257, 2, 2, 256, False, False, "bfloat16"),
    (1, 190, 190, 2, 1, 256, True, False, "float16"),
    (1, 100, 77, 2, 2, 64, False, False, "float32"),
    (1, 1024, 1024, 2, 2, 128, True, False, "bfloat16"),
]


@pytest.mark.parametrize("backend", ["triton", None], ids=["triton", "auto"])
@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,segs,dtype", CASES)
def test_compiled_pallas_matches_reference(B, Tq, Tk, Hq, Hkv, D, causal, segs, dtype, backend):
    # backend=None picks the Mosaic GPU forward on Hopper where it supports the call, else triton.
    q, k, v, do = make_inputs(Tq + 7 * Tk + D, B, Tq, Tk, Hq, Hkv, D, jnp.dtype(dtype))
    seg = None
    if segs:
        ids = np.sort(np.random.default_rng(0).integers(0, 4, (B, Tq)), axis=1).astype(np.int32)
        seg = jnp.asarray(ids)
    out = fwd_bwd(flash_attention, q, k, v, do, causal=causal, segment_ids=seg, interpret=False,
                   backend=backend)
    ref = _ref(q, k, v, do, causal=causal, segment_ids=seg)
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert x.dtype == q.dtype
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err = _rel(x.astype(jnp.float32), r)
        assert err < TOL[dtype], f"{name}: {err:.2e}"


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal", [
    (2, 256, 256, 4, 4, 64, False), (2, 300, 300, 8, 2, 128, True),
    (1, 200, 513, 4, 1, 128, True), (1, 513, 200, 4, 2, 64, True), (1, 129, 257, 2, 2, 256, False)])
def test_jax_triton_forward_matches_reference(B, Tq, Tk, Hq, Hkv, D, causal):
    pytest.importorskip("jax_triton", reason="jax-triton not installed")
    from experiments.baselines.jax_triton_fwd import triton_flash_forward

    q, k, v, _ = make_inputs(Tq + Tk, B, Tq, Tk, Hq, Hkv, D, jnp.bfloat16)
    o = jax.jit(lambda q, k, v: triton_flash_forward(q, k, v, causal=causal))(q, k, v)
    up = lambda x: x.astype(jnp.float32)
    r = reference_attention(up(q), up(k), up(v), causal=causal)
    assert _rel(o.astype(jnp.float32), r) < TOL["bfloat16"]


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_dispatch_gpu_impls(impl):
    from research.nn.attention import attention

    q, k, v, do = make_inputs(1, 2, 256, 256, 4, 4, 64, jnp.bfloat16)
    out = fwd_bwd(lambda q, k, v, **kw: attention(q, k, v, impl=impl, **kw), q, k, v, do,
                   causal=True)
    ref = _ref(q, k, v, do, causal=True)
    for x, r in zip(out, ref):
        assert _rel(x.astype(jnp.float32), r) < TOL["bfloat16"]
